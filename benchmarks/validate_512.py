"""Compile-only validation on 512 simulated CPU devices (an 8x8x8 TPU v5p mesh).

JAX fixes the simulated device count when it starts, and the test suite's process runs 256,
so this runs in its own process:

    python benchmarks/validate_512.py            # ~1 minute; prints each verdict and its time

It validates the best strategies of a few requests (data parallel + FSDP weights, a
contracting dimension over all 512 chips, attention heads) and prints the time to start JAX,
to compile each plan's two programs, and the verdicts. No program is executed: at 512
devices a single execution takes seconds and gigabytes (jax_notes.md §1.2).
"""

from __future__ import annotations

import resource
import sys
import time

START = time.perf_counter()

from sharding_roofline.xla.devices import ensure_devices  # noqa: E402

ensure_devices(512)

import jax  # noqa: E402

from sharding_roofline.einsum import Einsum  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.planner import Planner  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.xla.compare import agreement, validate_plan  # noqa: E402

REQUESTS = [
    ("bd,df->bf", "b=65536,d=8192,f=32768", "x+y,None", "z,None", None),
    ("bd,df->bf", "b=8192,d=65536,f=8192", "None,x+y+z", "x+y+z,None", None),
    ("btd,df->btf", "b=512,t=2048,d=8192,f=32768", "x,y,None", "None,z", None),
    ("bhqd,bhkd->bhqk", "b=64,h=64,q=2048,k=2048,d=128", "x,y+z,None,None", None, None),
]


def main() -> int:
    devices = len(jax.devices("cpu"))
    started = time.perf_counter() - START
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=8,y=8,z=8")
    print(f"{devices} simulated CPU devices; imports and backend start {started:.1f}s")
    print(f"{mesh}")
    validations = []
    for equation, dims, lhs, rhs, out in REQUESTS:
        einsum = Einsum.create(equation, dims, accum_dtype="float32")
        planner = Planner(einsum, mesh, lhs=lhs, rhs=rhs, out=out, check_memory=False)
        for plan in planner.search(top=3).strategies:
            t0 = time.perf_counter()
            v = validate_plan(plan)
            seconds = time.perf_counter() - t0
            validations.append(v)
            xla = "?" if v.xla_time_s is None else f"{v.xla_time_s * 1e6:.1f}us"
            print(
                f"{seconds:5.2f}s  {v.verdict.value:<11} plan comm {v.plan_time_s * 1e6:8.1f}us"
                f"  XLA comm {xla:>9}  {plan.strategy}"
            )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = time.perf_counter() - START
    print(f"\n{agreement(validations)}; total {total:.1f}s; peak RSS {peak_mib:.0f} MiB")
    return 1 if any(v.verdict.value == "mismatch" for v in validations) else 0


if __name__ == "__main__":
    sys.exit(main())
