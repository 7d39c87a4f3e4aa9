"""Validation throughput on JAX's simulated CPU devices.

    .venv/bin/python benchmarks/validation_speed.py [--quick]

* 8 devices: compile-only validations per second over every strategy of bd,df->bf on a 2x4
  mesh, both programs (XLA's jit and the plan's shard_map), from empty compile caches; and
  with only XLA's program (``prove=False``, what a sweep uses once a verdict is ``match``).
* 256 devices (a v5e 16x16) and 512 devices (a v5p 8x8x8): the time of one validation, and
  JAX's start-up at that device count.

JAX fixes its device count when it starts, so each device count runs in its own process.
Results go to benchmarks/results/validation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "validation_speed.json"
SRC = str(Path(__file__).resolve().parents[1] / "src")

_CHILD = """
import json, sys, time
sys.path.insert(0, {src!r})
start = time.perf_counter()
from sharding_roofline.xla.devices import ensure_devices
ensure_devices({devices})
import jax
jax.devices()
started = time.perf_counter() - start
from sharding_roofline import DeviceMesh, Einsum, Planner, load_preset
from sharding_roofline.xla.compare import validate_plan
from sharding_roofline.xla.run import clear_cache
mesh = DeviceMesh.create(load_preset({hardware!r}), {mesh!r}, {topology!r})
einsum = Einsum.create({einsum!r}, {dims!r})
plans = Planner(einsum, mesh, check_memory=False).search(top={top}).strategies
# one validation first, so the steady state excludes JAX's one-time tracing set-up
validate_plan(plans[-1])
clear_cache()
out = {{"devices": {devices}, "startup_s": started, "strategies": len(plans)}}
for prove in (True, False):
    clear_cache()
    t0 = time.perf_counter()
    verdicts = [validate_plan(p, prove=prove).verdict.value for p in plans]
    seconds = time.perf_counter() - t0
    out["prove" if prove else "jit_only"] = {{
        "seconds": seconds,
        "per_validation_s": seconds / len(plans),
        "validations_per_s": len(plans) / seconds,
        "verdicts": {{v: verdicts.count(v) for v in sorted(set(verdicts))}},
    }}
print(json.dumps(out))
"""

CASES = [
    {"devices": 8, "hardware": "tpu-v5e", "topology": "2x4", "mesh": "x=2,y=4",
     "einsum": "bd,df->bf", "dims": "b=1024,d=1024,f=2048", "top": None},
    {"devices": 256, "hardware": "tpu-v5e", "topology": "16x16", "mesh": "x=16,y=16",
     "einsum": "bd,df->bf", "dims": "b=8192,d=8192,f=32768", "top": 4},
    {"devices": 512, "hardware": "tpu-v5p", "topology": "8x8x8", "mesh": "x=8,y=8,z=8",
     "einsum": "bd,df->bf", "dims": "b=16384,d=8192,f=32768", "top": 4},
]  # fmt: skip


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    code = _CHILD.format(src=SRC, **case)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the {case['devices']}-device run failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 devices only")
    args = parser.parse_args()
    results = []
    for case in CASES[:1] if args.quick else CASES:
        row = run_case(case)
        results.append({**case, **row})
        prove, jit = row["prove"], row["jit_only"]
        print(
            f"{row['devices']:4d} devices ({case['hardware']} {case['topology']}): JAX starts in "
            f"{row['startup_s']:.2f} s; {row['strategies']} strategies: "
            f"{prove['per_validation_s'] * 1e3:.0f} ms per validation with both programs "
            f"({prove['validations_per_s']:.1f}/s), {jit['per_validation_s'] * 1e3:.0f} ms with "
            f"XLA's only ({jit['validations_per_s']:.1f}/s); verdicts {prove['verdicts']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": results}, indent=2
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
