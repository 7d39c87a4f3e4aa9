"""How fast the model-layout search is: LLaMA-3-405B on 8,192 chips, and smaller cases.

Target (the models issue): a search over at least 100,000 parallelism layouts for
LLaMA-3-405B on 8,192 chips ranked in under 10 s on one core. Measured in CPU seconds
(one core) beside the baseline measured in the same run: one exact ``plan_model`` of the
search's best layout, cold (empty caches), times the number of layouts considered, which is
what costing every layout exactly would take. The ratio says how much the closed-form
screen saves.

    python benchmarks/model_search_speed.py   # prints the table, writes results/model_search_speed.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sharding_roofline import load_preset
from sharding_roofline.program.config import load_model_config
from sharding_roofline.program.model import plan_model
from sharding_roofline.program.model_search import search_model
from sharding_roofline.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "model_search_speed.json"
CASES = [
    # (model, hardware, topology, slices, batch tokens, sequence): the target case first
    ("llama3-405b", "tpu-v5p", "16x16x16", 2, 16 * 2**20, 8192),
    ("llama3-405b", "tpu-7x", "16x16x32", 1, 16 * 2**20, 8192),
    ("llama3-70b", "tpu-v5p", "16x16x16", 1, 4 * 2**20, 4096),
    ("llama3-70b", "h100", "128x8", 1, 4 * 2**20, 4096),
    ("mixtral-8x7b", "h100", "64x8", 1, 4 * 2**20, 4096),
]


def main() -> int:
    rows = []
    ok = True
    for name, hardware, shape, slices, batch, seq in CASES:
        config = load_model_config(ROOT / "configs" / "models" / f"{name}.toml")
        topology = Topology.build(load_preset(hardware), shape, num_slices=slices)
        start = time.process_time()
        result = search_model(config, topology, batch_tokens=batch, seq_len=seq)
        search_s = time.process_time() - start
        best = result.plans[0]
        start = time.process_time()
        plan_model(config, best.mesh, best.strategy, best.training)  # cold: no cache
        exact_s = time.process_time() - start
        brute_s = exact_s * result.considered
        row = {
            "model": name,
            "hardware": hardware,
            "topology": shape if slices == 1 else f"{slices}x({shape})",
            "chips": topology.num_devices,
            "layouts": result.considered,
            "screened": result.screened,
            "recosted": result.recosted,
            "search_s": search_s,
            "one_exact_plan_s": exact_s,
            "every_layout_exactly_s": brute_s,
            "search_over_every_layout_exactly": search_s / brute_s,
            "screen_median_error": sorted(abs(e) for e in result.screen_error)[
                len(result.screen_error) // 2
            ]
            if result.screen_error
            else None,
            "best": best.name,
            "best_mesh": best.mesh.spec_text,
            "best_step_s": best.step_lower_s,
            "best_mfu": best.mfu,
        }
        if name == "llama3-405b" and topology.num_devices == 8192:
            row["target"] = result.considered >= 100_000 and search_s < 10.0
            ok = ok and row["target"]
        rows.append(row)
    print("model layout search, CPU seconds on one core; baseline: one exact plan x layouts")
    print(
        f"{'case':<40} {'layouts':>8} {'search':>8} {'1 exact':>8} {'all exact':>10} "
        f"{'ratio':>7}  target"
    )
    for r in rows:
        target = {True: "ok (>=100k in <10 s)", False: "MISSED"}.get(r.get("target"), "")
        case = f"{r['model']} {r['hardware']} {r['topology']} ({r['chips']})"
        print(
            f"{case:<40} {r['layouts']:>8,} {r['search_s']:>7.2f}s "
            f"{r['one_exact_plan_s'] * 1e3:>6.1f}ms {r['every_layout_exactly_s']:>9.0f}s "
            f"{r['search_over_every_layout_exactly']:>7.4f}  {target}"
        )
        print(f"{'':<40} best: {r['best']} on {r['best_mesh']} (MFU {r['best_mfu']:.1%})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"about": __doc__.strip().splitlines()[0], "cases": rows}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
