"""How fast the program planner is: every named strategy of a transformer block with its
backward pass, and the layout search over a block on 3-axis meshes.

Targets (the programs issue): every named strategy of a block with backward costed in under
50 ms; the layout search over a block on a 3-axis mesh in under 1 s. Both are measured
cold (a new evaluation, empty caches) and, as the baseline measured in the same run, beside
the time the single-einsum planner takes to rank every strategy of the block's largest
matmul on the same mesh: the ratio says what planning a whole layer costs against one
einsum.

    python benchmarks/layer_speed.py            # prints the table, writes results/layer_speed.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from sharding_roofline import (
    DeviceMesh,
    Einsum,
    LayerSpec,
    Planner,
    build_layer,
    compare,
    load_preset,
    named_strategies,
    search,
    training,
)

RESULTS = Path(__file__).resolve().parent / "results" / "layer_speed.json"
BLOCK = {"d": 8192, "f": 28672, "n": 64, "k": 8, "h": 128, "t": 8192}  # LLaMA-3-70B
CASES = [
    ("tpu-v5p", "16x16x16", "x=16,y=16,z=16", 4 * 2**20),
    ("tpu-v5p", "8x8x8", "x=8,y=8,z=8", 2**20),
    ("h100", "16x8", "node=16,gpu=8", 2**20),
]
REPEATS = 5


def _median_s(run, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> int:
    rows = []
    ok = True
    for hardware, topology, mesh_text, tokens in CASES:
        mesh = DeviceMesh.create(load_preset(hardware), mesh_text, topology)
        spec = LayerSpec.from_dims("block", BLOCK, batch_tokens=tokens)
        program = training(build_layer(spec))
        strategies = named_strategies(mesh)
        sequences = tokens // BLOCK["t"]
        matmul = Einsum.create(
            "btd,df->btf", f"b={sequences},t={BLOCK['t']},d={BLOCK['d']},f={BLOCK['f']}"
        )

        def one_einsum(matmul: Einsum = matmul, mesh: DeviceMesh = mesh) -> None:
            Planner(matmul, mesh, check_memory=False).search(top=None)

        def named(program=program, mesh=mesh, strategies=strategies) -> None:
            compare(program, mesh, strategies)

        def layout_search(program=program, mesh=mesh) -> None:
            search(program, mesh, top=5)

        baseline = _median_s(one_einsum)
        named_s = _median_s(named)
        search_s = _median_s(layout_search, repeats=3)
        ranking = search(program, mesh, top=5)
        row = {
            "hardware": hardware,
            "topology": topology,
            "mesh": mesh_text,
            "ops": len(program.ops),
            "named_strategies": len(strategies),
            "one_einsum_all_strategies_s": baseline,
            "named_strategies_s": named_s,
            "named_per_strategy_s": named_s / len(strategies),
            "search_s": search_s,
            "search_candidates": ranking.num_candidates,
            "named_over_one_einsum": named_s / baseline,
            "search_over_one_einsum": search_s / baseline,
            "best": ranking.best.name,
            "beats_best_named_by": ranking.beats,
            "named_under_50ms": named_s < 0.050,
            "search_under_1s": search_s < 1.0,
        }
        ok = ok and row["named_under_50ms"] and row["search_under_1s"]
        rows.append(row)
    print("block forward+backward (LLaMA-3-70B sizes), CPU seconds, median; cold caches")
    print(
        f"{'mesh':<26} {'ops':>4} {'named':>6} {'all named':>10} {'search':>8} "
        f"{'one einsum':>11} {'named/1':>8} {'search/1':>9}  targets"
    )
    for r in rows:
        targets = (
            ("ok" if r["named_under_50ms"] else "MISSED <50ms")
            + ", "
            + ("ok" if r["search_under_1s"] else "MISSED <1s")
        )
        print(
            f"{r['hardware'] + ' ' + r['mesh']:<26} {r['ops']:>4} {r['named_strategies']:>6} "
            f"{r['named_strategies_s'] * 1e3:>8.1f}ms {r['search_s']:>7.2f}s "
            f"{r['one_einsum_all_strategies_s'] * 1e3:>9.1f}ms {r['named_over_one_einsum']:>8.2f} "
            f"{r['search_over_one_einsum']:>9.1f}  {targets}"
        )
        print(
            f"{'':<26} best: {r['best']} (beats the best named by {r['beats_best_named_by']:.1%})"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"about": __doc__.strip().splitlines()[0], "cases": rows}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
