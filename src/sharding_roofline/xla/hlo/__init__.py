"""Compiled HLO text -> the collectives XLA really emitted, and the dot FLOPs.

Pure text processing: this package never imports JAX, so its tests read captured fixtures.
The input is ``compiled.as_text()``, the per-device program after SPMD partitioning.
What it relies on (jax_notes.md section 3, seen with jax 0.10.2 on simulated CPU devices):

- Collectives can sit in any computation (fusions, while bodies), so every computation is
  scanned. An async ``-start`` op is counted once; its ``-done`` half is skipped.
- Replica groups print in five forms (:func:`parse_replica_groups`). The ids in them are
  *partition* ids, i.e. positions in the jitted mesh's device array in row-major order, not
  ``Device.id``: a mesh whose devices are permuted prints exactly the same groups.
- The CPU backend never prints ``reduce-scatter``: it prints an all-reduce whose result is
  dynamic-sliced to 1/g (:func:`reclassify_reduce_scatters`).
- The CPU all-to-all is a tuple with one operand per peer; combined all-reduces are tuples.
  A collective's per-device size is the sum over its result leaves.
- A collective inside a ``scan``/``fori_loop`` is printed once, in the while body; the trip
  count is in the while op's ``backend_config`` (``known_trip_count``).
- On CPU every bf16 collective and dot prints as f32: take element counts from here and the
  dtype from the plan.

Use :func:`read_collectives` (parse, reclassify, dedupe and weight) and :func:`dot_flops`.

Modules, one concept each: ``_text`` (instructions, types and computations as printed, the
module's call graph and execution counts), ``groups`` (the printed replica-group forms, and
device groups or permute pairs -> mesh axes), ``collectives`` (:class:`HloCollective`:
parse, reclassify reduce-scatters, dedupe and weight) and ``flops`` (dot FLOPs).
"""

from ._text import COLLECTIVE_KINDS as COLLECTIVE_KINDS
from ._text import Leaf as Leaf
from .collectives import HloCollective as HloCollective
from .collectives import dedupe_and_weight as dedupe_and_weight
from .collectives import op_name as op_name
from .collectives import parse_collectives as parse_collectives
from .collectives import read_collectives as read_collectives
from .collectives import reclassify_reduce_scatters as reclassify_reduce_scatters
from .collectives import split_combined as split_combined
from .flops import dot_flops as dot_flops
from .groups import Groups as Groups
from .groups import groups_to_axes as groups_to_axes
from .groups import pairs_to_axes as pairs_to_axes
from .groups import parse_replica_groups as parse_replica_groups

__all__ = [
    "COLLECTIVE_KINDS",
    "Groups",
    "HloCollective",
    "Leaf",
    "dedupe_and_weight",
    "dot_flops",
    "groups_to_axes",
    "op_name",
    "pairs_to_axes",
    "parse_collectives",
    "parse_replica_groups",
    "read_collectives",
    "reclassify_reduce_scatters",
    "split_combined",
]
