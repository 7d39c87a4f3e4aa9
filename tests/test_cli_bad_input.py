"""Bad input at the command line, found by fuzzing: each gets one line on stderr naming the
value, what was expected and the fix, exit 1 (130 for Ctrl-C), never a traceback, and no
output file is touched when the request is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sharding_roofline import cli
from sharding_roofline.cli import json_text, main
from sharding_roofline.errors import ShardingRooflineError

V5E = ["--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4"]
SMALL = ["--einsum", "bd,df->bf", "--dims", "b=64,d=64,f=64"]
FIXED = ["--lhs", "x,None", "--rhs", "None,y", "--out", "x,y"]


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> str:
    """Run ``argv``; it must exit 1 with one error line matching ``message``."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("sharding-roofline: error: ")
    assert "Traceback" not in captured.err
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["collective", *V5E, "--op", "all-gather", "--axes", "x", "--shape", "64,-64",
             "--spec", "x,None"],
            "'-64' is not a whole number",
            id="negative-shape",
        ),
        pytest.param(
            ["collective", *V5E, "--op", "all-gather", "--axes", "x",
             "--shape", ",".join(["1"] * 20), "--spec", "x"],
            "20 dimensions; give at most 8",
            id="20-dim-shape",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", ",ij->ij", "--dims", "i=8,j=8"],
            "the lhs operand is empty",
            id="empty-operand",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "bd,df->bf", "--dims", "b=²,d=8,f=8"],
            "'b=²' is not LETTER=SIZE",
            id="superscript-size",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "bd,df->bf", "--dims", "b=1" + "0" * 300 + ",d=8,f=8"],
            "digits",
            id="size-10^300",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "ij,jk→ik", "--dims", "i=8,j=8,k=8"],
            "einsum 'ij,jk→ik' contains '→'",
            id="echo-as-typed",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "bd,df-", "--dims", "b=8,d=8,f=8"],
            "the shell read '>' as a redirect",
            id="shell-ate-the-arrow",
        ),
        pytest.param(
            ["plan", "--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "none=2,y=4",
             *SMALL],
            "reads it as 'replicated'",
            id="axis-named-none",
        ),
        pytest.param(
            ["plan", "--hardware", "tpu-v5p", "--topology", "4x8x8",
             "--mesh", ",".join(f"a{i}=2" for i in range(8)), *SMALL],
            "8 axes of size > 1, more than the 6",
            id="8-axis-mesh",
        ),
        pytest.param(
            ["validate", *V5E, *SMALL, *FIXED, "--devices", "20000"],
            "--devices 20000 is outside 1 to 4096",
            id="20000-devices",
        ),
        pytest.param(
            ["validate", *V5E, "--einsum", "bd,df->bf", "--dims", "b=65536,d=65536,f=65536",
             *FIXED, "--execute"],
            "more than the 4 GiB it may use",
            id="execute-too-big",
        ),
        pytest.param(["run", "/"], "is a directory", id="run-a-directory"),
        pytest.param(
            ["plan", "--hardware", "/dev/zero", "--mesh", "x=8", *SMALL],
            "is not a regular file",
            id="hardware-dev-zero",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    refused(capsys, argv, message)


def test_ctrl_c_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["hardware", "list"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "sharding-roofline: interrupted (Ctrl-C); nothing more was written"


def test_json_writer_refuses_non_finite_numbers() -> None:
    """``--json`` once held the literal ``Infinity``: no JSON parser reads it."""
    with pytest.raises(ShardingRooflineError, match=r"strategies\[0\]\.time_s = inf"):
        json_text({"strategies": [{"time_s": float("inf")}]})
    assert json.loads(json_text({"time_s": 1.5})) == {"time_s": 1.5}


# -- hardware files --------------------------------------------------------------------------


def _user_hardware(tmp_path: Path, **replace: str) -> Path:
    from importlib import resources  # noqa: PLC0415

    text = (resources.files("sharding_roofline") / "presets" / "tpu-v5e.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "mine.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        pytest.param(
            {"bfloat16 = 1.97e14": "bfloat16 = 5e-324"}, "outside the physical range",
            id="peak-5e-324",
        ),
        pytest.param(
            {"link_bytes_per_s_per_direction = 4.5e10": "link_bytes_per_s_per_direction = 1.7e308"},
            "outside the physical range",
            id="bandwidth-1.7e308",
        ),
        pytest.param(
            {"link_bytes_per_s_per_direction = 4.5e10": "link_bytes_per_s_per_direction = 1e-300"},
            "outside the physical range",
            id="bandwidth-underflows",
        ),
        pytest.param(
            {"hbm_capacity_bytes = 17179869184": "hbm_capacity_bytes = " + "9" * 400},
            "not a finite number",
            id="400-digit-integer",
        ),
        pytest.param({"bfloat16 = 1.97e14": "bfloat16 = nan"}, "finite", id="nan"),
    ],
)  # fmt: skip
def test_user_hardware_numbers_are_physical(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, replace: dict[str, str], message: str
) -> None:
    path = _user_hardware(tmp_path, **replace)
    refused(capsys, ["plan", "--hardware", str(path), "--mesh", "x=2,y=4", *SMALL], message)


def test_latin1_and_fifo_hardware_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    refused(capsys, ["hardware", "show", str(latin)], "not UTF-8 text")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    refused(capsys, ["hardware", "show", str(fifo)], "is not a regular file")


# -- output files ----------------------------------------------------------------------------


def test_plot_paths_are_checked_before_computing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = ["plan", *V5E, *SMALL, "--top", "2"]
    refused(capsys, [*plan, "--plot", str(tmp_path / "b.txt")], "'.txt' is not a format")
    refused(capsys, [*plan, "--plot", str(tmp_path / "b")], "it has no suffix")
    refused(capsys, [*plan, "--plot", str(tmp_path / "no" / "b.png")], "does not exist")
    refused(capsys, [*plan, "--plot", str(tmp_path)], "it is a directory")
    target = tmp_path / "b.png"
    assert main([*plan, "--plot", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target}" in out
    first = target.read_bytes()
    assert first.startswith(b"\x89PNG")
    line = refused(capsys, [*plan, "--plot", str(target)], "already exists; pass --force")
    assert "b.png" in line
    assert capsys.readouterr().out == ""  # refused before anything was printed
    assert main([*plan, "--plot", str(target), "--force"]) == 0
    capsys.readouterr()
    svg = tmp_path / "b.svg"
    assert main([*plan, "--plot", str(svg), "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON object; the path goes to stderr
    assert f"wrote {svg}" in captured.err
    assert svg.read_text().lstrip().startswith("<?xml")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_unwritable_plot_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        refused(capsys, ["plan", *V5E, *SMALL, "--plot", str(locked / "b.png")], "is not writable")
    finally:
        locked.chmod(0o700)


# -- run configs -----------------------------------------------------------------------------

PLAN_JOB = """
[[plan]]
name = "{name}"
hardware = "tpu-v5e"
topology = "2x4"
mesh = "x=2,y=4"
einsum = "bd,df->bf"
dims = "b=64,d=64,f=64"
{extra}
"""


def _config(tmp_path: Path, body: str, *, figures: bool = False) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(f"figures = {str(figures).lower()}\n{body}", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param("top = 0", "top = 0, but a plan lists 1 to 1000", id="top-0"),
        pytest.param('crossover_dim = "z"', "crossover_dim = 'z' is not a letter", id="dim-z"),
        pytest.param("validate = -3", "validate = -3", id="validate-negative"),
        pytest.param('overlap = "partial"', "overlap = 'partial' is not one of", id="overlap"),
    ],
)
def test_run_config_is_checked_like_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: str, message: str
) -> None:
    config = _config(tmp_path, PLAN_JOB.format(name="p", extra=extra))
    refused(capsys, ["run", str(config), "--out-dir", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


def test_run_plans_whose_figures_would_collide(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    body = PLAN_JOB.format(name="TPU v5e", extra="") + PLAN_JOB.format(name="tpu-v5e!", extra="")
    config = _config(tmp_path, body, figures=True)
    refused(capsys, ["run", str(config)], "would write the same figure files (tpu-v5e_*.png)")


def test_run_collective_shape_with_x_and_escaped_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``shape = "2048x8192"`` was a traceback; a name's control characters are escaped."""
    body = (
        PLAN_JOB.format(name="evil\\u001b[2J name", extra="")
        + """
[[collective]]
label = "gather\\u0007"
hardware = "tpu-v5e"
mesh = "x=2,y=4"
topology = "2x4"
op = "all-gather"
axes = "y"
shape = "2048x8192"
spec = "y,None"
"""
    )
    config = _config(tmp_path, body)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed
    assert "\x07" not in printed
    assert "evil\\x1b[2J name" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["collectives"][0]["bytes_sent_per_chip"] == 3 / 4 * 2048 * 8192 * 2
    # a second run without --force refuses before computing; with --force it replaces
    refused(capsys, ["run", str(config), "--out-dir", str(out)], "already exists; pass --force")
    assert main(["run", str(config), "--out-dir", str(out), "--force"]) == 0


def test_run_out_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = _config(tmp_path, PLAN_JOB.format(name="p", extra=""))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(capsys, ["run", str(config), "--out-dir", str(blocker)], "is a file, not a directory")


def test_run_latin1_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "latin.toml"
    config.write_bytes('title = "caf\xe9"\n'.encode("latin-1"))
    refused(capsys, ["run", str(config)], "not UTF-8 text")


def test_run_with_a_user_config_draws_only_its_own_figures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The demo's fixed chip comparison is drawn only when a config asks for it."""
    config = _config(tmp_path, PLAN_JOB.format(name="mine", extra="top = 3"), figures=True)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out-dir", str(out)]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in out.iterdir())
    assert "chips_crossover.png" not in names
    assert "mine_breakdown.png" in names
    assert "mine_roofline.png" in names
    assert set(names) <= {
        "report.md", "results.json", "collectives.png",
        "mine_breakdown.png", "mine_roofline.png", "mine_crossover.png",
    }  # fmt: skip


def test_a_strategy_that_cannot_split_the_batch_says_how_to_fix_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 8 sequences in 2 microbatches of 4 cannot split over x+y (8 chips)
    argv = [
        "model",
        "--config",
        "configs/models/tiny-dense.toml",
        "--hardware",
        "tpu-v5e",
        "--topology",
        "2x4",
        "--mesh",
        "x=2,y=4",
        "--batch-tokens",
        "128",
        "--strategy",
        "dp=x,fsdp=y,mb=2",
    ]
    assert main([*argv, "--json"]) == 1
    error = json.loads(capsys.readouterr().out)
    assert "does not divide over x+y" in error["error"]
    assert "--search" in error["fix"]
    assert main(argv) == 1
    assert "fix: change the strategy's axes" in capsys.readouterr().err
