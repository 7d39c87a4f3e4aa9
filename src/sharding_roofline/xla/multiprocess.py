"""Validate a plan across P local processes with ``jax.distributed`` (``validate --processes P``).

One simulated CPU device per chip is not how a real job runs: a real job is several
processes, each owning some devices, joined by a coordinator. This runs the plan's two
programs (XLA's ``jit`` and the plan's own ``shard_map``, as :func:`.compare.validate_plan`
does) the same way on one machine: P worker processes with ``N/P`` simulated CPU devices each,
a coordinator on ``127.0.0.1``, and CPU collectives over gloo. Every worker compiles the same
global program, checks its collectives against the plan, runs it on the same seeded inputs
(each process builds only its own shards) and checks the numbers of the shards it holds; the
errors are combined across processes with ``process_allgather``.

The parent never imports JAX. It starts the workers, each in its own process group; if one
fails, the rest are stopped (else they would wait on the coordinator forever), and on
Ctrl-C or a timeout all are stopped, SIGTERM then SIGKILL: no process is left behind. A
worker also exits if its parent disappears.

Results: the JSON object of ``validate`` (``verdict``, ``predicted``, ``observed``,
``numerics``), plus ``processes`` (per process: id, local devices, its shards' errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sharding_roofline.errors import ShardingRooflineError, ValidationError
from sharding_roofline.plans import Plan

__all__ = ["validate_multiprocess"]

_GRACE_S = 3.0  # between SIGTERM and SIGKILL
_NOISE = ("[Gloo]", "Gloo ")


# -- the parent --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(
    plan: Plan, hardware: str | None, topology: str | None, num_slices: int
) -> dict[str, Any]:
    einsum = plan.einsum
    return {
        "einsum": einsum.spec.equation,
        "dims": dict(einsum.dims),
        "dtype": einsum.dtype,
        "accum_dtype": einsum.accum_dtype,
        "hardware": hardware or plan.mesh.hardware.name,
        "mesh": plan.mesh.spec_text,
        "topology": topology,
        "num_slices": num_slices,
        "lhs": plan.lhs.text(),
        "rhs": plan.rhs.text(),
        "out": plan.out.text(),
        "strategy": plan.describe(),
    }


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker's process group, wait, then SIGKILL what is left; reap all."""
    for sig, wait_s in ((signal.SIGTERM, _GRACE_S), (signal.SIGKILL, _GRACE_S)):
        alive = [w for w in workers if w.poll() is None]
        if not alive:
            break
        for w in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, sig)  # the worker leads its own group (start_new_session)
        deadline = time.monotonic() + wait_s
        for w in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.poll() is None:  # pragma: no cover - SIGKILL cannot be ignored
            w.wait()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(_NOISE)]
    return "\n".join(kept[-lines:])


def validate_multiprocess(
    plan: Plan,
    *,
    processes: int,
    execute: bool = True,
    hardware: str | None = None,
    topology: str | None = None,
    num_slices: int = 1,
    timeout_s: float = 600.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Validate ``plan`` with its mesh's devices spread over ``processes`` local processes.

    ``hardware``/``topology``/``num_slices``: how the workers rebuild the plan's mesh (the
    CLI's ``--hardware`` etc.; a preset name or a .toml path; default the plan's hardware
    name). Raises ``ValidationError`` if a worker fails, the run times out or is interrupted
    (every worker is stopped first).
    """
    num_devices = plan.mesh.num_devices
    if processes < 1 or num_devices % processes:
        raise ValidationError(
            f"--processes {processes} must divide the {num_devices} devices of mesh "
            f"({plan.mesh.spec_text}); each process takes an equal share, e.g. --processes 2"
        )
    request = _request(plan, hardware, topology, num_slices)
    request.update(seed=seed, execute=execute, processes=processes)
    with tempfile.TemporaryDirectory(prefix="sr-multiprocess-") as tmp:
        folder = Path(tmp)
        spec = folder / "request.json"
        spec.write_text(json.dumps(request))
        port = _free_port()
        env = dict(os.environ)
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("JAX_NUM_CPU_DEVICES", None)
        env["SR_PARENT_PID"] = str(os.getpid())
        workers: list[subprocess.Popen[bytes]] = []
        logs = [folder / f"worker{i}.log" for i in range(processes)]
        results = [folder / f"worker{i}.json" for i in range(processes)]
        started = time.monotonic()
        try:
            for i in range(processes):
                with open(logs[i], "wb") as log:
                    workers.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "sharding_roofline.xla.multiprocess",
                                str(spec),
                                str(i),
                                str(port),
                                str(results[i]),
                            ],
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                        )
                    )
            _record_pids(workers)
            while True:
                codes = [w.poll() for w in workers]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    i = failed[0]
                    _stop(workers)
                    raise ValidationError(
                        f"validation worker {i} of {processes} exited with code {codes[i]}; "
                        f"the others were stopped. Its last output:\n{_tail(logs[i])}"
                    )
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() - started > timeout_s:
                    _stop(workers)
                    raise ValidationError(
                        f"the {processes} validation workers did not finish within "
                        f"{timeout_s:.0f} s and were stopped; use smaller shapes or fewer "
                        "devices"
                    )
                time.sleep(0.05)
        except KeyboardInterrupt:
            _stop(workers)
            raise ValidationError(
                f"interrupted: the {processes} validation workers were stopped"
            ) from None
        except BaseException:
            _stop(workers)
            raise
        outcomes = [json.loads(path.read_text()) for path in results]
    return _combine(outcomes, [w.pid for w in workers], time.monotonic() - started)


def _record_pids(workers: list[subprocess.Popen[bytes]]) -> None:
    """Tests read the workers' pids from ``SR_MULTIPROCESS_PIDFILE`` (to check none is left)."""
    path = os.environ.get("SR_MULTIPROCESS_PIDFILE")
    if path:
        Path(path).write_text("\n".join(str(w.pid) for w in workers) + "\n")


def _combine(outcomes: list[dict[str, Any]], pids: list[int], wall_s: float) -> dict[str, Any]:
    """Worker 0's validation (all workers compile the same program: checked), with every
    process's share."""
    first = outcomes[0]["validation"]
    for k, outcome in enumerate(outcomes[1:], start=1):
        other = outcome["validation"]
        for key in ("predicted", "observed", "shard_map", "verdict"):
            if other[key] != first[key]:
                raise ValidationError(
                    f"validation workers 0 and {k} disagree on {key!r}: the processes "
                    "compiled different programs (a JAX bug, or the plan was rebuilt "
                    "differently)"
                )
    out = dict(first)
    out["processes"] = [
        {
            "process": o["process"],
            "pid": pid,
            "local_devices": o["local_devices"],
            "num_devices": o["num_devices"],
            "shard_errors": o.get("shard_errors"),
        }
        for o, pid in zip(outcomes, pids, strict=True)
    ]
    out["wall_s"] = wall_s
    return out


# -- a worker ----------------------------------------------------------------------------------


def _watch_parent() -> None:
    parent = int(os.environ.get("SR_PARENT_PID", "0") or 0)
    if not parent:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)  # our parent is gone: never linger as an orphan
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _worker(spec_path: str, process_id: int, port: int, result_path: str) -> None:
    request = json.loads(Path(spec_path).read_text())
    processes = int(request["processes"])
    hold = float(os.environ.get("SR_MULTIPROCESS_HOLD_S", "0") or 0)
    if hold:  # tests: a window to interrupt the run in
        time.sleep(hold)
    if os.environ.get("SR_MULTIPROCESS_FAIL") == str(process_id):  # tests: a failing worker
        raise ValidationError(f"worker {process_id} failed on purpose (SR_MULTIPROCESS_FAIL)")

    from sharding_roofline.einsum import Einsum  # noqa: PLC0415
    from sharding_roofline.mesh import DeviceMesh  # noqa: PLC0415
    from sharding_roofline.planner import estimate  # noqa: PLC0415
    from sharding_roofline.presets import load_preset  # noqa: PLC0415

    mesh = DeviceMesh.create(
        load_preset(request["hardware"]),
        request["mesh"],
        request["topology"],
        num_slices=int(request["num_slices"]),
    )
    einsum = Einsum.create(
        request["einsum"],
        request["dims"],
        dtype=request["dtype"],
        accum_dtype=request["accum_dtype"] or None,
    )
    plan = estimate(einsum, mesh, lhs=request["lhs"], rhs=request["rhs"], out=request["out"])
    if plan.describe() != request["strategy"]:
        raise ValidationError(
            f"worker {process_id} rebuilt a different plan:\n{plan.describe()}\nexpected:\n"
            f"{request['strategy']}"
        )

    import jax  # noqa: PLC0415

    config: Any = jax.config
    distributed: Any = jax.distributed
    config.update("jax_num_cpu_devices", mesh.num_devices // processes)
    config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    try:
        outcome = _validate_here(plan, request, process_id)
    finally:
        distributed.shutdown()
    Path(result_path).write_text(json.dumps(outcome))


def _validate_here(plan: Plan, request: dict[str, Any], process_id: int) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import AxisType, Mesh  # noqa: PLC0415

    from .compare import (  # noqa: PLC0415
        FlopsCheck,
        Validation,
        Verdict,
        observed_collectives,
        predicted_collectives,
    )
    from .hlo import dot_flops  # noqa: PLC0415
    from .run import Execution, capture_stderr, jit_program, shard_map_program  # noqa: PLC0415

    devices = np.array(jax.devices()).reshape(plan.mesh.shape)  # process-major, as partitioned
    mesh = Mesh(devices, plan.mesh.axis_names, axis_types=(AxisType.Auto,) * devices.ndim)
    start = time.perf_counter()
    programs: dict[str, Any] = {}
    texts: dict[str, str] = {}
    with capture_stderr() as warnings:
        for name, build in (("jit", jit_program), ("shard_map", shard_map_program)):
            fn, inputs = build(plan, mesh)
            programs[name] = fn
            texts[name] = fn.lower(*inputs).compile().as_text()
    compile_s = time.perf_counter() - start
    predicted = predicted_collectives(plan)
    observed = observed_collectives(plan, texts["jit"], predicted)
    proof = observed_collectives(plan, texts["shard_map"], predicted)
    want, got, proved = (
        Counter(r.key for r in rs for _ in range(r.count)) for rs in (predicted, observed, proof)
    )
    reasons: list[str] = []
    if proved != want:
        reasons.append("the plan's shard_map program's collectives differ from the plan's")
    sm_flops = dot_flops(texts["shard_map"])
    flops = FlopsCheck(
        plan=plan.cost.flops,
        shard_map=sm_flops,
        shard_map_written=None,
        jit=dot_flops(texts["jit"]),
    )
    if not flops.ok:
        reasons.append(
            f"the plan's shard_map program does {sm_flops} matmul FLOPs per chip, the plan "
            f"says {plan.cost.flops:g}"
        )
    numerics: Execution | None = None
    shard_errors: dict[str, list[float]] | None = None
    if request["execute"]:
        numerics, shard_errors = _execute(plan, mesh, programs, int(request["seed"]))
        if not numerics.shard_map_ok:
            reasons.append(
                f"the plan's shard_map program computes wrong numbers across processes: max "
                f"error {numerics.shard_map_max_abs_error:.3g}"
            )
    if reasons:
        verdict = Verdict.MISMATCH
    elif got == want:
        verdict = Verdict.MATCH
    else:
        verdict = Verdict.XLA_DIFFERS
    validation = Validation(
        plan=plan,
        verdict=verdict,
        predicted=predicted,
        observed=observed,
        shard_map=proof,
        flops=flops,
        numerics=numerics,
        warnings=tuple(warnings),
        reasons=tuple(reasons),
        compile_s=compile_s,
    )
    return {
        "process": process_id,
        "num_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "shard_errors": shard_errors,
        "validation": validation.as_dict(),
    }


def _execute(
    plan: Plan, mesh: Any, programs: dict[str, Any], seed: int
) -> tuple[Any, dict[str, list[float]]]:
    """Run both programs on the same seeded inputs (each process builds only its shards),
    compare the shards it holds with numpy, and combine the errors over processes."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from .devices import named_sharding  # noqa: PLC0415
    from .run import Execution, tolerance  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    arrays = []
    for role in ("lhs", "rhs"):
        shape = plan.einsum.shape(role)
        if plan.einsum.dtype.startswith("int"):
            value = rng.integers(-4, 5, size=shape).astype(plan.einsum.dtype)
        else:
            value = np.asarray(rng.standard_normal(shape), dtype=jnp.dtype(plan.einsum.dtype))
        arrays.append(value)
    equation = plan.einsum.spec.equation
    a64, b64 = (x.astype(np.float64) for x in arrays)
    want = np.einsum(equation, a64, b64)
    scale = np.maximum(np.einsum(equation, np.abs(a64), np.abs(b64)), np.finfo(np.float64).tiny)
    inputs = [
        jax.make_array_from_callback(x.shape, named_sharding(mesh, getattr(plan, role)), _slicer(x))
        for x, role in zip(arrays, ("lhs", "rhs"), strict=True)
    ]
    expected = named_sharding(mesh, plan.out)
    start = time.perf_counter()
    local: list[float] = []
    layout: list[float] = []
    for name in ("jit", "shard_map"):
        out = programs[name](*inputs)
        abs_error, rel_error = 0.0, 0.0
        for shard in out.addressable_shards:
            got = np.asarray(shard.data, dtype=np.float64)
            diff = np.abs(got - want[shard.index])
            if diff.size:
                abs_error = max(abs_error, float(diff.max()))
                rel_error = max(rel_error, float((diff / scale[shard.index]).max()))
        local += [abs_error, rel_error]
        same = out.sharding.is_equivalent_to(expected, len(plan.einsum.shape("out")))
        layout.append(0.0 if same else 1.0)
    gathered = np.asarray(multihost_utils.process_allgather(np.array(local + layout)))
    worst = gathered.reshape(-1, len(local) + len(layout)).max(axis=0)
    execution = Execution(
        max_abs_error=float(max(worst[0], worst[2])),
        jit_max_abs_error=float(worst[0]),
        jit_max_rel_error=float(worst[1]),
        shard_map_max_abs_error=float(worst[2]),
        shard_map_max_rel_error=float(worst[3]),
        tolerance=tolerance(plan),
        jit_sharding_ok=bool(worst[4] == 0),
        shard_map_sharding_ok=bool(worst[5] == 0),
        run_s=time.perf_counter() - start,
    )
    return execution, {"jit": local[:2], "shard_map": local[2:]}


def _slicer(array: Any) -> Any:
    def piece(index: Any) -> Any:
        return array[index]

    return piece


def main(argv: list[str]) -> int:
    """``python -m sharding_roofline.xla.multiprocess REQUEST.json ID PORT RESULT.json``."""
    if len(argv) != 4:
        print(
            "usage: python -m sharding_roofline.xla.multiprocess REQUEST.json PROCESS_ID "
            "PORT RESULT.json (started by validate --processes)",
            file=sys.stderr,
        )
        return 2
    _watch_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # stopped by the parent: now
    try:
        _worker(argv[0], int(argv[1]), int(argv[2]), argv[3])
    except ShardingRooflineError as exc:
        print(f"validation worker {argv[1]}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"validation worker {argv[1]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
