"""experiments.py: configs read strictly, jobs validated like the CLI's arguments, the demo
config loads, names are printable, figure names derive from plan names."""

from __future__ import annotations

from pathlib import Path

import pytest

from sharding_roofline.errors import ConfigError, SpecError
from sharding_roofline.experiments import (
    CollectiveJob,
    PlanJob,
    figure_slug,
    load_experiment,
    printable,
    run_collective,
    run_plan,
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def test_the_demo_config_loads_and_asks_for_the_chip_comparison() -> None:
    experiment = load_experiment(DEMO)
    assert experiment.chip_comparison is True
    assert len(experiment.plan) == 3
    assert all(job.validate <= job.top for job in experiment.plan)


def test_unknown_key_names_the_file_table_and_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[plan]]\nname = "p"\nhardwre = "h100"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.toml: \[plan\[0\]\]: unknown key 'hardwre'"):
        load_experiment(path)


def test_missing_config() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment("/nonexistent/c.toml")


def _plan(**changes: object) -> PlanJob:
    base: dict[str, object] = {
        "name": "p",
        "hardware": "tpu-v5e",
        "topology": "2x4",
        "mesh": "x=2,y=4",
        "einsum": "bd,df->bf",
        "dims": "b=64,d=64,f=64",
    }
    base.update(changes)
    return PlanJob(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"top": 0}, "top = 0", id="top"),
        pytest.param({"top": 2000}, "1 to 1000", id="top-huge"),
        pytest.param({"validate": 9, "top": 5}, "validate = 9", id="validate-above-top"),
        pytest.param({"overlap": "partial"}, "'partial' is not one of full, none", id="overlap"),
        pytest.param({"crossover_dim": "z"}, "use one of b, d, f", id="crossover-dim"),
        pytest.param({"name": "  "}, "name is empty", id="empty-name"),
    ],
)
def test_plan_jobs_are_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(**changes)


def test_plan_job_runs_and_uses_its_crossover_dimension() -> None:
    ranking = run_plan(_plan(top=2, crossover_dim="D"))
    assert len(ranking.strategies) == 2


def test_collective_job_shape_spellings() -> None:
    job = CollectiveJob(
        hardware="tpu-v5e", mesh="x=8,y=4", topology="8x4", op="all-gather", axes="y",
        shape="2048x8192", spec="y,None",
    )  # fmt: skip
    row = run_collective(job)
    assert row["time_s"] == pytest.approx(3 * (2048 * 8192 * 2 / 4) / 4.5e10)
    with pytest.raises(SpecError, match="unknown collective"):
        CollectiveJob(hardware="h100", mesh="x=8", op="gather", axes="x", shape="8")


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x1b[2Jb\x07") == "a\\x1b[2Jb\\x07"
    assert printable("TPU v5e 4x4 · ok") == "TPU v5e 4x4 · ok"


def test_figure_names_follow_plan_names() -> None:
    assert figure_slug("TPU v5e 4x4, every layout free") == "tpu-v5e-4x4-every-layout-free"
    assert figure_slug("!!!") == "plan"
