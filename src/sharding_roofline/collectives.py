"""Collectives and their cost on each kind of link.

(work in progress: the enum is the shared vocabulary; cost functions follow)
"""

from __future__ import annotations

import enum


class Collective(enum.Enum):
    """The collectives a sharded einsum can need. Values are XLA's HLO op names, so the
    estimator and the HLO reader speak the same words."""

    ALL_GATHER = "all-gather"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_REDUCE = "all-reduce"
    ALL_TO_ALL = "all-to-all"
    COLLECTIVE_PERMUTE = "collective-permute"

    @property
    def book_name(self) -> str:
        """The scaling book's spelling: ``AllGather``, ``ReduceScatter``, ..."""
        return _BOOK_NAMES[self]


_BOOK_NAMES = {
    Collective.ALL_GATHER: "AllGather",
    Collective.REDUCE_SCATTER: "ReduceScatter",
    Collective.ALL_REDUCE: "AllReduce",
    Collective.ALL_TO_ALL: "AllToAll",
    Collective.COLLECTIVE_PERMUTE: "CollectivePermute",
}
