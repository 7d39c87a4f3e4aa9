"""Planner speed, measured against the alternatives a user has today, in the same run.

    .venv/bin/python benchmarks/planner_speed.py [--quick]

1. Ranking every strategy of 3- and 4-letter einsums on 2-, 3- and 4-axis meshes of a v5p
   16x16x16 (one core): wall time and strategy estimates per second.
2. The same candidates three ways, per candidate: our estimate; (a) compiling the candidate
   with XLA on simulated CPU devices and reading its collectives from the HLO; (b)
   ``jax.experimental.roofline`` on a ``shard_map`` version of the candidate.
3. Peak memory of a sweep of 100,000+ strategies (streamed through a bounded heap) against
   one search, and against keeping every result.

Targets (issue 5): >= 50,000 estimates/s on one core; >= 100x faster per candidate than (b)
and >= 2,000x faster than (a); every strategy of a 3-letter einsum on a 3-axis mesh ranked in
under 100 ms; every ranking case >= 10,000 estimates/s from empty caches. A speed target is
judged on the worst of our figures, warm, cold (empty caches) and with each candidate built
into a full Plan, never on the best one alone. The script prints each ratio, writes
benchmarks/results/planner_speed.json and exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

jax.config.update("jax_num_cpu_devices", 8)

from sharding_roofline import DeviceMesh, Einsum, Planner, load_preset  # noqa: E402
from sharding_roofline.reshard import reshard_path  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "planner_speed.json"
V5P = "tpu-v5p"
RANKING_CASES = [
    ("3 letters, 2 axes", "bd,df->bf", "b=8192,d=8192,f=32768", "x=16,y=256"),
    ("3 letters, 3 axes", "bd,df->bf", "b=8192,d=8192,f=32768", "x=16,y=16,z=16"),
    ("3 letters, 4 axes", "bd,df->bf", "b=8192,d=8192,f=32768", "w=4,x=4,y=16,z=16"),
    ("4 letters, 2 axes", "btd,df->btf", "b=64,t=4096,d=8192,f=32768", "x=16,y=256"),
    ("4 letters, 3 axes", "btd,df->btf", "b=64,t=4096,d=8192,f=32768", "x=16,y=16,z=16"),
    ("4 letters, 4 axes", "btd,df->btf", "b=64,t=4096,d=8192,f=32768", "w=4,x=4,y=16,z=16"),
    ("5 letters, 4 axes", "bhqd,bhkd->bhqk", "b=64,h=32,q=4096,k=4096,d=128", "w=4,x=4,y=16,z=16"),
]
TARGET_ESTIMATES_PER_S = 50_000
TARGET_VS_ROOFLINE = 100
TARGET_VS_XLA = 2_000
TARGET_RANK_3X3_S = 0.100
TARGET_COLD_ESTIMATES_PER_S = 10_000


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def clear_caches(mesh: DeviceMesh) -> None:
    mesh.memo.clear()  # collective rates per axis group
    reshard_path.cache_clear()  # resharding paths, shared across searches


def time_search(
    einsum: Einsum, mesh: DeviceMesh, *, repeats: int, top: int | None = 10
) -> tuple[float, float, int]:
    """(cold, warm, strategies): seconds to enumerate and rank every strategy with every
    cache empty, and the best of ``repeats`` more with the caches a previous search left."""
    clear_caches(mesh)
    gc.collect()
    start = time.perf_counter()
    count = Planner(einsum, mesh, check_memory=False).search(top=top).num_candidates
    cold = time.perf_counter() - start
    warm = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        Planner(einsum, mesh, check_memory=False).search(top=top)
        warm = min(warm, time.perf_counter() - start)
    return cold, warm, count


def ranking_speed(repeats: int) -> list[dict[str, Any]]:
    v5p = load_preset(V5P)
    rows = []
    for label, equation, dims, mesh_text in RANKING_CASES:
        mesh = DeviceMesh.create(v5p, mesh_text, "16x16x16")
        einsum = Einsum.create(equation, dims)
        cold, warm, count = time_search(einsum, mesh, repeats=repeats)
        rows.append(
            {
                "case": label,
                "einsum": equation,
                "mesh": mesh_text,
                "strategies": count,
                "cold_s": cold,
                "warm_s": warm,
                "cold_estimates_per_s": count / cold,
                "warm_estimates_per_s": count / warm,
            }
        )
        print(
            f"  {label:18} {mesh_text:18} {count:6d} strategies: cold {cold * 1e3:7.1f} ms "
            f"({count / cold:8,.0f}/s), warm {warm * 1e3:7.1f} ms ({count / warm:8,.0f}/s)"
        )
    return rows


def sweep_speed(num_sizes: int) -> dict[str, Any]:
    """A notebook-style sweep: one problem, the batch swept, every strategy ranked each time
    (top 10 built into full plans), starting from empty caches."""
    mesh = DeviceMesh.create(load_preset(V5P), "w=4,x=4,y=16,z=16", "16x16x16")
    clear_caches(mesh)
    total = 0
    start = time.perf_counter()
    for i in range(num_sizes):
        einsum = Einsum.create(
            "bhqd,bhkd->bhqk", {"b": 64 * (i + 1), "h": 32, "q": 4096, "k": 4096, "d": 128}
        )
        total += Planner(einsum, mesh, check_memory=False).search(top=10).num_candidates
    seconds = time.perf_counter() - start
    print(
        f"  {num_sizes} batch sizes x bhqd,bhkd->bhqk on w=4,x=4,y=16,z=16: {total:,} strategies "
        f"in {seconds:.2f} s = {total / seconds:,.0f} estimates/s"
    )
    return {
        "sizes": num_sizes,
        "strategies": total,
        "seconds": seconds,
        "estimates_per_s": total / seconds,
    }


def per_candidate(limit: int) -> dict[str, Any]:
    """Ours vs XLA compile vs jax.experimental.roofline on the same candidates (8 devices)."""
    from absl import logging as absl_logging
    from jax.experimental import roofline

    from sharding_roofline.xla.devices import jax_mesh
    from sharding_roofline.xla.hlo import read_collectives
    from sharding_roofline.xla.run import jit_program, shard_map_program

    absl_logging.set_verbosity(absl_logging.ERROR)  # roofline warns of rules it lacks (psum)
    logging.getLogger("absl").setLevel(logging.ERROR)
    mesh = DeviceMesh.create(load_preset("h100"), "x=2,y=4", "1x8")
    einsum = Einsum.create("bd,df->bf", "b=1024,d=1024,f=1024")
    planner = Planner(einsum, mesh, check_memory=False)
    # ours: every candidate estimated and ranked (warm: as in a sweep; cold: empty caches),
    # and with every candidate also built into a full Plan object (collective records,
    # book notation), as `plan` does for the strategies it shows
    cold_s, warm_s, count = time_search(einsum, mesh, repeats=20, top=1)
    ours_per = warm_s / count
    _, full_s, _ = time_search(einsum, mesh, repeats=5, top=None)
    full_per = full_s / count
    plans = list(planner.search(top=None).strategies)[:limit]
    jmesh = jax_mesh(mesh)
    xla_times, roofline_times = [], []
    for plan in plans:
        fn, args = jit_program(plan, jmesh)
        start = time.perf_counter()
        text = fn.lower(*args).compile().as_text()
        read_collectives(text)
        xla_times.append(time.perf_counter() - start)
        fn, args = shard_map_program(plan, jmesh)
        start = time.perf_counter()
        roofline.roofline(fn.__wrapped__, mesh=jmesh)(*args)
        roofline_times.append(time.perf_counter() - start)
    xla_per = statistics.median(xla_times)
    roofline_per = statistics.median(roofline_times)
    result = {
        "candidates_timed": len(plans),
        "ours_s_per_candidate": ours_per,
        "ours_cold_s_per_candidate": cold_s / count,
        "ours_with_full_plan_s_per_candidate": full_per,
        "xla_compile_s_per_candidate": xla_per,
        "roofline_s_per_candidate": roofline_per,
        "speedup_vs_xla": xla_per / ours_per,
        "speedup_vs_xla_cold": xla_per / (cold_s / count),
        "speedup_vs_xla_with_full_plan": xla_per / full_per,
        "speedup_vs_roofline": roofline_per / ours_per,
        "speedup_vs_roofline_cold": roofline_per / (cold_s / count),
        "speedup_vs_roofline_with_full_plan": roofline_per / full_per,
    }
    print(
        f"  ours, estimate and rank      : {ours_per * 1e6:8.1f} us per candidate ({count} candidates; {cold_s / count * 1e6:.1f} us from empty caches)"
    )
    print(f"  ours, each built into a Plan : {full_per * 1e6:8.1f} us per candidate")
    print(
        f"  (a) XLA compile + HLO read   : {xla_per * 1e6:8.0f} us per candidate (median of {len(plans)})"
    )
    print(
        f"  (b) jax.experimental.roofline: {roofline_per * 1e6:8.0f} us per candidate (shard_map program)"
    )
    print(
        f"  => {xla_per / ours_per:,.0f}x faster than (a), {roofline_per / ours_per:,.0f}x faster than (b) "
        f"(cold: {xla_per * count / cold_s:,.0f}x and {roofline_per * count / cold_s:,.0f}x; "
        f"with full Plan objects: {xla_per / full_per:,.0f}x and {roofline_per / full_per:,.0f}x)"
    )
    return result


_SWEEP = """
import sys, time, tracemalloc
sys.path.insert(0, {src!r})
from sharding_roofline import DeviceMesh, Einsum, Planner, load_preset
mesh = DeviceMesh.create(load_preset("tpu-v5p"), "w=4,x=4,y=16,z=16", "16x16x16")
sizes = {sizes!r}
keep_all = {keep_all!r}
tracemalloc.start()
total = 0
kept = []
for b in sizes:
    einsum = Einsum.create("bhqd,bhkd->bhqk", dict(b=b, h=32, q=4096, k=4096, d=128))
    ranking = Planner(einsum, mesh, check_memory=False).search(top=None if keep_all else 5)
    total += ranking.num_candidates
    if keep_all:
        kept.append(ranking)
print(total, tracemalloc.get_traced_memory()[1])
"""


def sweep_memory(num_sizes: int) -> dict[str, Any]:
    """Peak traced memory of a sweep, each variant in a fresh process (no shared caches)."""
    src = str(Path(__file__).resolve().parents[1] / "src")

    def run(sizes: list[int], keep_all: bool) -> tuple[int, int]:
        code = _SWEEP.format(src=src, sizes=sizes, keep_all=keep_all)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        total, peak = out.stdout.split()
        return int(total), int(peak)

    sizes = [64 * (i + 1) for i in range(num_sizes)]
    one_total, one_peak = run(sizes[:1], keep_all=False)
    sweep_total, sweep_peak = run(sizes, keep_all=False)
    kept_total, kept_peak = run(sizes[: max(1, num_sizes // 4)], keep_all=True)
    print(f"  one search      : {one_total:7d} strategies, peak {one_peak / 2**20:6.1f} MiB")
    print(
        f"  streamed sweep  : {sweep_total:7d} strategies, peak {sweep_peak / 2**20:6.1f} MiB ({sweep_peak / one_peak:.2f}x one search)"
    )
    print(
        f"  keeping every plan of a quarter of that sweep: {kept_total:7d} strategies, peak {kept_peak / 2**20:6.1f} MiB"
    )
    return {
        "one_search": {"strategies": one_total, "peak_bytes": one_peak},
        "streamed_sweep": {"strategies": sweep_total, "peak_bytes": sweep_peak},
        "keep_every_plan": {"strategies": kept_total, "peak_bytes": kept_peak},
        "sweep_over_one_search": sweep_peak / one_peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and candidates (CI smoke run)"
    )
    args = parser.parse_args()
    pinned = pin_to_one_core()
    print(f"planner speed ({pinned}; Python {platform.python_version()}, JAX {jax.__version__})")
    print("1. ranking every strategy on a v5p 16x16x16:")
    rows = ranking_speed(repeats=2 if args.quick else 7)
    print("2. per candidate, same candidates (bd,df->bf on an 8-GPU H100 node, mesh x=2,y=4):")
    versus = per_candidate(limit=6 if args.quick else 30)
    print("   a sweep, as in a notebook:")
    sweep = sweep_speed(num_sizes=4 if args.quick else 24)
    print("3. memory of a large sweep (bhqd,bhkd->bhqk on w=4,x=4,y=16,z=16, batch swept):")
    memory = sweep_memory(num_sizes=4 if args.quick else 24)

    rank_3x3 = next(r for r in rows if r["case"] == "3 letters, 3 axes")["cold_s"]
    # A speed target is met only by the worst of our three figures: warm (caches filled, as
    # in a sweep), cold (empty caches, as a first `plan` call) and with every candidate built
    # into a full Plan (as `plan` does for what it shows), not by the best one alone.
    figures = ("", "_cold", "_with_full_plan")
    worst_vs_roofline = min(versus[f"speedup_vs_roofline{f}"] for f in figures)
    worst_vs_xla = min(versus[f"speedup_vs_xla{f}"] for f in figures)
    cold_per_s = min(r["cold_estimates_per_s"] for r in rows)
    checks = {
        f"sweep estimates/s >= {TARGET_ESTIMATES_PER_S:,} (from empty caches)": sweep[
            "estimates_per_s"
        ]
        >= TARGET_ESTIMATES_PER_S,
        f">= {TARGET_VS_ROOFLINE}x faster per candidate than jax.experimental.roofline, warm, "
        f"cold and with full Plans (worst {worst_vs_roofline:,.0f}x)": worst_vs_roofline
        >= TARGET_VS_ROOFLINE,
        f">= {TARGET_VS_XLA:,}x faster per candidate than an XLA compile, warm, cold and with "
        f"full Plans (worst {worst_vs_xla:,.0f}x)": worst_vs_xla >= TARGET_VS_XLA,
        f"3 letters x 3 axes ranked in < {TARGET_RANK_3X3_S * 1e3:.0f} ms from empty caches": rank_3x3
        < TARGET_RANK_3X3_S,
        f"every ranking case >= {TARGET_COLD_ESTIMATES_PER_S:,} estimates/s from empty caches "
        f"(worst {cold_per_s:,.0f}/s)": cold_per_s >= TARGET_COLD_ESTIMATES_PER_S,
        "streamed sweep memory within 2x of one search": memory["sweep_over_one_search"] < 2.0,
    }
    print("targets:")
    for name, ok in checks.items():
        print(f"  [{'pass' if ok else 'MISS'}] {name}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    RESULTS.write_text(
        json.dumps(
            {
                "commit": commit,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {
                    "cpus": os.cpu_count(),
                    "pinned": pinned,
                    "python": platform.python_version(),
                },
                "quick": args.quick,
                "ranking": rows,
                "sweep": sweep,
                "per_candidate": versus,
                "sweep_memory": memory,
                "targets": checks,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
