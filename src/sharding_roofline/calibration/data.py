"""The public measurements and the fixed calibration split.

The CSVs live outside the package, in the project's shared data folder (documented in its
``README.md``); nothing here ships them. ``find_data_dir`` finds the folder,
``read_rows`` reads one file with each row's index, and ``split_of`` says whether a row may
be fitted on (``Split.CALIBRATION``) or is held out (``Split.HELDOUT``).

**The split** (fixed by the issue, so held-out error means something):

* *Row index* is the 0-based position of a data row in its file, the header excluded: the
  first row under the header has index 0. "Even rows" are those with an even index.
* ``xla_h100_matmul.csv``, ``xla_b200_matmul.csv``, ``xla_gpu_collectives.csv``: a row is
  calibration iff its index is even.
* ``playbook_collectives.csv`` (the Playbook's bandwidth-versus-nodes sweep, the only
  cross-node collective data): a row is calibration iff it ran on at most 8 nodes; the 16-64
  node rows are held out. The even-row rule does not apply: it names the XLA perf-table
  rows, where parity interleaves shapes and message sizes; in this sweep parity would pick
  alternate node counts and put held-out node counts (16, 64) on the fitted side. The
  node-count rule the issue sets for the Playbook runs makes the held-out check an
  extrapolation from 1-8 nodes to 16-64, which is the cross-node degradation to test.
* ``playbook_h100_runs.csv``: calibration iff the model is 1B or 8B and it ran on 1-8 nodes.
* ``playbook_h100_failed_runs.csv`` and ``torchtitan_h100.csv``: held out entirely.
* ``playbook_models.csv`` describes the models' architectures; it measures nothing and is
  ``Split.REFERENCE`` (an input to predictions on both sides of the split).
"""

from __future__ import annotations

import csv
import enum
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UnknownNameError

#: The environment variable that overrides where the shared data folder is.
DATA_DIR_ENV = "SR_SHARED_DATA"

MATMUL_FILES = {"H100": "xla_h100_matmul.csv", "B200": "xla_b200_matmul.csv"}
COLLECTIVES_FILE = "xla_gpu_collectives.csv"
PLAYBOOK_COLLECTIVES_FILE = "playbook_collectives.csv"
PLAYBOOK_RUNS_FILE = "playbook_h100_runs.csv"
PLAYBOOK_FAILED_FILE = "playbook_h100_failed_runs.csv"
PLAYBOOK_MODELS_FILE = "playbook_models.csv"
TORCHTITAN_FILE = "torchtitan_h100.csv"

#: Every file the split covers.
DATA_FILES = (
    *MATMUL_FILES.values(),
    COLLECTIVES_FILE,
    PLAYBOOK_COLLECTIVES_FILE,
    PLAYBOOK_RUNS_FILE,
    PLAYBOOK_FAILED_FILE,
    PLAYBOOK_MODELS_FILE,
    TORCHTITAN_FILE,
)

#: Playbook models and node counts the issue lets us fit on.
CALIBRATION_MODELS = frozenset({"1B", "8B"})
MAX_CALIBRATION_NODES = 8


class Split(enum.Enum):
    CALIBRATION = "calibration"  # may be fitted on
    HELDOUT = "heldout"  # never fitted on; reported
    REFERENCE = "reference"  # not a measurement (model architectures)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One data row: its 0-based index in the file (header excluded) and its cells."""

    index: int
    cells: Mapping[str, str]

    def __getitem__(self, column: str) -> str:
        return self.cells[column]


def find_data_dir(repo_root: Path | str) -> Path | None:
    """The shared data folder: ``$SR_SHARED_DATA`` if set, else the first of
    ``<repo>/../shared/data`` and ``<repo>/../../shared/data`` (a git worktree one level
    further down) that exists; None if none does."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    root = Path(repo_root).resolve()
    for candidate in (root.parent / "shared" / "data", root.parent.parent / "shared" / "data"):
        if (candidate / COLLECTIVES_FILE).is_file():
            return candidate
    return None


def read_rows(data_dir: Path | str, name: str) -> list[Row]:
    """Every data row of ``name`` with its index (0 = the first row under the header)."""
    path = Path(data_dir) / name
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [Row(index=i, cells=cells) for i, cells in enumerate(csv.DictReader(handle))]
    except FileNotFoundError:
        raise UnknownNameError(
            f"data file {str(path)!r} does not exist; point ${DATA_DIR_ENV} at the shared data "
            "folder (the one with README.md and the CSVs)"
        ) from None


def file_sha256(data_dir: Path | str, name: str) -> str:
    return hashlib.sha256((Path(data_dir) / name).read_bytes()).hexdigest()


def _nodes(row: Row, name: str) -> int:
    try:
        return int(row["nodes"])
    except (KeyError, ValueError):
        raise ConfigError(f"{name}: row {row.index} has no integer 'nodes' column") from None


def split_of(name: str, row: Row) -> Split:
    """Which side of the fixed split row ``row`` of file ``name`` is on (module docstring)."""
    even = row.index % 2 == 0
    if name in MATMUL_FILES.values() or name == COLLECTIVES_FILE:
        return Split.CALIBRATION if even else Split.HELDOUT
    if name == PLAYBOOK_COLLECTIVES_FILE:
        small = 1 <= _nodes(row, name) <= MAX_CALIBRATION_NODES
        return Split.CALIBRATION if small else Split.HELDOUT
    if name == PLAYBOOK_RUNS_FILE:
        model_ok = row["model"] in CALIBRATION_MODELS
        nodes_ok = 1 <= _nodes(row, name) <= MAX_CALIBRATION_NODES
        return Split.CALIBRATION if model_ok and nodes_ok else Split.HELDOUT
    if name in (PLAYBOOK_FAILED_FILE, TORCHTITAN_FILE):
        return Split.HELDOUT
    if name == PLAYBOOK_MODELS_FILE:
        return Split.REFERENCE
    raise UnknownNameError(
        f"no split is defined for data file {name!r}; files with a split: {', '.join(DATA_FILES)}"
    )


def split_counts(data_dir: Path | str) -> dict[str, dict[str, int]]:
    """Rows per split for every file: ``{file: {"calibration": n, "heldout": m, ...}}``."""
    counts: dict[str, dict[str, int]] = {}
    for name in DATA_FILES:
        per: dict[str, int] = {split.value: 0 for split in Split}
        for row in read_rows(data_dir, name):
            per[split_of(name, row).value] += 1
        counts[name] = {key: value for key, value in per.items() if value}
    return counts
