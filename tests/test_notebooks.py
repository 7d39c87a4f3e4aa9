"""Every notebook in ``notebooks/`` runs without error, from a temporary copy, in a kernel
started from this interpreter; the committed copies carry their outputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SECONDS_PER_NOTEBOOK = 60  # the budget on 2 cores (kernel start included)

nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extras")
from sharding_roofline import _notebooks  # noqa: E402


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_cleanly(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    start = time.perf_counter()
    nb = _notebooks.execute(copy)  # raises CellExecutionError with the cell and traceback
    took = time.perf_counter() - start
    assert _notebooks.problems(nb) == []
    assert took < SECONDS_PER_NOTEBOOK, f"{path.name} took {took:.0f} s"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_carry_their_outputs(path: Path) -> None:
    """So the figures show on a repository page: every code cell was run, in order, and
    at least one figure was saved (``make notebooks`` regenerates them)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), "run the notebook top to bottom"
    images = [
        output
        for cell in code
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} shows no figure"
    errors = [o for cell in code for o in cell.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    assert all("execution" not in cell.get("metadata", {}) for cell in code), "timestamps"


@pytest.mark.notebook
def test_running_in_place_is_deterministic(tmp_path: Path) -> None:
    source = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "only",
                "metadata": {},
                "outputs": [],
                "source": "from sharding_roofline import plot\nplot.roofline('tpu-v5e').figure",
            }
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "tiny.ipynb"
    path.write_text(json.dumps(source), encoding="utf-8")
    assert _notebooks.main([str(path)]) == 0
    first = path.read_bytes()
    assert b"image/png" in first
    assert _notebooks.main([str(path)]) == 0
    assert path.read_bytes() == first
