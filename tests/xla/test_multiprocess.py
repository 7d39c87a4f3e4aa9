"""validate --processes P: the plan's programs across P local processes (jax.distributed).

Each run starts two worker processes (JAX import, gloo rendezvous, two compiles, one run):
a few seconds each, so these are marked slow. Every test checks that no worker outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharding_roofline.cli import main
from sharding_roofline.einsum import Einsum
from sharding_roofline.errors import ValidationError
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.planner import estimate
from sharding_roofline.presets import load_preset

ARGS = [
    "validate",
    "--hardware",
    "tpu-v5e",
    "--mesh",
    "x=2,y=4",
    "--einsum",
    "bd,df->bf",
    "--dims",
    "b=256,d=512,f=1024",
    "--lhs",
    "x,y",
    "--rhs",
    "y,None",
    "--out",
    "x,None",
]


def _plan() -> object:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")
    einsum = Einsum.create("bd,df->bf", "b=256,d=512,f=1024")
    return estimate(einsum, mesh, lhs="x,y", rhs="y,None", out="x,None")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_processes_must_divide_the_devices() -> None:
    from sharding_roofline.xla.multiprocess import validate_multiprocess  # noqa: PLC0415

    with pytest.raises(ValidationError, match=r"--processes 3 must divide the 8 devices"):
        validate_multiprocess(_plan(), processes=3)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.jax
def test_validate_across_two_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pidfile = tmp_path / "pids"
    monkeypatch.setenv("SR_MULTIPROCESS_PIDFILE", str(pidfile))
    assert main([*ARGS, "--processes", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "match"
    assert [r["kind"] for r in data["observed"]] == ["all-reduce"]
    assert data["observed"][0]["axes"] == ["y"]
    assert data["numerics"]["ok"] is True
    assert [(p["process"], p["local_devices"], p["num_devices"]) for p in data["processes"]] == [
        (0, 4, 8),
        (1, 4, 8),
    ]
    # each process checked only the output shards it holds, and both held some
    assert all(p["shard_errors"]["shard_map"][0] >= 0 for p in data["processes"])
    pids = _pids(pidfile)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.slow
@pytest.mark.jax
def test_a_failing_worker_stops_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sharding_roofline.xla.multiprocess import validate_multiprocess  # noqa: PLC0415

    pidfile = tmp_path / "pids"
    monkeypatch.setenv("SR_MULTIPROCESS_PIDFILE", str(pidfile))
    monkeypatch.setenv("SR_MULTIPROCESS_FAIL", "1")
    with pytest.raises(ValidationError, match=r"(?s)worker 1 of 2 exited with code 1.*on purpose"):
        validate_multiprocess(_plan(), processes=2, timeout_s=120)  # type: ignore[arg-type]
    pids = _pids(pidfile)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)  # worker 0 was waiting on the coordinator


@pytest.mark.slow
@pytest.mark.jax
def test_ctrl_c_stops_every_worker(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    env = dict(os.environ, SR_MULTIPROCESS_PIDFILE=str(pidfile), SR_MULTIPROCESS_HOLD_S="60")
    parent = subprocess.Popen(
        [sys.executable, "-m", "sharding_roofline", *ARGS, "--processes", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_pids(pidfile)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(pidfile)
        assert len(pids) == 2
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=30)
    finally:
        if parent.poll() is None:  # pragma: no cover - only if the test fails
            parent.kill()
            parent.wait()
    assert parent.returncode == 1
    assert "interrupted: the 2 validation workers were stopped" in err
    assert "Traceback" not in err
    assert not any(_alive(pid) for pid in pids)
