"""Does the model search find the best layout? Its default against costing every layout exactly.

``search_model`` screens every layout with a closed form and re-costs only the best 48 exactly
(``plan_model``). This script runs each search twice: as shipped, and with every screened
layout re-costed exactly (``recost`` = all of them: the exhaustive answer, independent of the
screen's ranking). It prints, per case, the default search's best step against the exhaustive
best (the gap is what the screen's errors cost a user), where the exhaustive best sat in the
screen's order, the screen's median error over all layouts, and both searches' CPU time.

    python benchmarks/model_search_recall.py          # results in benchmarks/results/model_search_recall.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sharding_roofline.presets import load_preset
from sharding_roofline.program.config import load_model_config
from sharding_roofline.program.model_search import search_model
from sharding_roofline.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "model_search_recall.json"

#: (config, hardware, topology, batch tokens, sequence): dense and MoE, TPU and GPU
CASES = [
    ("llama3-8b", "tpu-v5p", "4x4x4", 2**20, 4096),
    ("llama3-8b", "h100", "8x8", 2**20, 4096),
    ("llama3-70b", "h100", "32x8", 2**21, 4096),
    ("llama3-70b", "tpu-v5p", "8x8x8", 2**21, 4096),
    ("mixtral-8x7b", "h100", "16x8", 2**20, 4096),
    ("mixtral-8x7b", "tpu-v5p", "4x4x8", 2**20, 4096),
]


def main() -> int:
    rows: list[dict[str, Any]] = []
    for name, hardware, shape, batch, seq in CASES:
        config = load_model_config(ROOT / "configs" / "models" / f"{name}.toml")
        topology = Topology.build(load_preset(hardware), shape)
        start = time.process_time()
        default = search_model(config, topology, batch_tokens=batch, seq_len=seq, top=1)
        default_s = time.process_time() - start
        start = time.process_time()
        every = search_model(config, topology, batch_tokens=batch, seq_len=seq, top=1, recost=10**9)
        every_s = time.process_time() - start
        best, truth = default.plans[0], every.plans[0]
        gap = best.step_lower_s / truth.step_lower_s - 1
        errors = sorted(abs(e) for e in every.screen_error)
        row = {
            "case": f"{name} on {hardware} {shape}, {batch:,} tokens",
            "layouts_screened": every.screened,
            "default_best": f"{best.name} on {best.mesh.spec_text}",
            "default_best_step_s": best.step_lower_s,
            "exhaustive_best": f"{truth.name} on {truth.mesh.spec_text}",
            "exhaustive_best_step_s": truth.step_lower_s,
            "gap": gap,
            "screen_median_abs_error_all": statistics.median(errors) if errors else None,
            "default_cpu_s": default_s,
            "exhaustive_cpu_s": every_s,
        }
        rows.append(row)
        print(
            f"{row['case']:48} screened {every.screened:6,}  default best "
            f"{best.step_lower_s:8.4f} s  exhaustive {truth.step_lower_s:8.4f} s  gap "
            f"{gap:+6.2%}  screen median error {row['screen_median_abs_error_all']:.1%}  "
            f"cpu {default_s:5.1f} s vs {every_s:6.1f} s",
            flush=True,
        )
    summary = {
        "cases": len(rows),
        "default_finds_the_exhaustive_best": sum(row["gap"] <= 1e-9 for row in rows),
        "largest_gap": max(row["gap"] for row in rows),
    }
    print(json.dumps(summary, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
