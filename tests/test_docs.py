"""The README, docs and notebooks show commands a user can paste: every ``--einsum`` value is
quoted (unquoted, the shell reads ``>`` as a redirect and the einsum ends in ``-``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNQUOTED = re.compile(r"--einsum[ =]+(?!['\"])\S+")


def _texts() -> list[tuple[str, str]]:
    found = [(str(p.relative_to(ROOT)), p.read_text()) for p in [ROOT / "README.md"]]
    found += [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted(ROOT.glob("docs/*.md"))]
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join("".join(cell["source"]) for cell in cells)
        found.append((str(path.relative_to(ROOT)), source))
    return found


@pytest.mark.parametrize(("name", "text"), _texts(), ids=[name for name, _ in _texts()])
def test_every_einsum_on_a_command_line_is_quoted(name: str, text: str) -> None:
    assert not UNQUOTED.findall(text), f"{name}: quote the einsum, e.g. --einsum 'bd,df->bf'"
