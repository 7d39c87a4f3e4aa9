"""experiments.py: configs read strictly, jobs validated like the CLI's arguments, the demo
config loads, names are printable, figure names derive from plan names."""

from __future__ import annotations

from pathlib import Path

import pytest

from sharding_roofline.errors import ConfigError, SpecError
from sharding_roofline.experiments import (
    CollectiveJob,
    CommandJob,
    PlanJob,
    figure_slug,
    load_experiment,
    printable,
    run_collective,
    run_command,
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


def test_the_demo_runs_a_layer_and_a_model_command() -> None:
    kinds = [job.args[0] for job in load_experiment(DEMO).command]
    assert kinds == ["layer", "model"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "must start with one of"),
        (("rm", "-rf", "/"), "must start with one of .* got 'rm'"),
        (("layer", "--json"), "leave out --json"),
        (("model", "--plot", "x.png"), "leave out --json, --plot"),
    ],
)
def test_command_jobs_are_checked_when_loaded(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CommandJob(args=args)


def test_a_command_job_reports_what_the_cli_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The job's text and JSON are the command's own (``main`` run both ways)."""
    import json  # noqa: PLC0415

    from sharding_roofline.cli import main  # noqa: PLC0415

    args = ("layer", "--hardware", "tpu-v5e", "--mesh", "x=2,y=4", "--layer", "mlp",
            "--dims", "d=256,f=1024", "--batch-tokens", "512", "--compare")  # fmt: skip
    text, data = run_command(CommandJob(args=args, label="mlp"))
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    data.pop("seconds"), expected.pop("seconds")  # how long it took: the one difference
    assert data == expected
    assert main(list(args)) == 0
    assert text == capsys.readouterr().out.rstrip()


def test_a_failing_command_job_names_the_command_and_the_error() -> None:
    job = CommandJob(args=("layer", "--hardware", "tpu-v5e", "--mesh", "x=2,y=4", "--layer", "mlp",
                           "--dims", "d=256,f=1024", "--batch-tokens", "512",
                           "--strategy", "tp=q"), label="odd")  # fmt: skip
    with pytest.raises(ConfigError, match=r"command 'odd' \(layer .*\) failed: .*'q'"):
        run_command(job)
