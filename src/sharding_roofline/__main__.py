"""``python -m sharding_roofline`` is the ``sharding-roofline`` command."""

from .cli import main

raise SystemExit(main())
