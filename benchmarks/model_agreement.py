"""How often XLA compiles exactly the collectives the model planner predicts for a whole model.

Validates model plans (a small dense model and a small mixture of experts: the embedding,
every block, the head and the loss, forward and backward, AdamW) on 8 simulated CPU devices
(``sharding_roofline.xla.model_validate``): XLA's jit training step with the plan's
shardings against the plan, and the plan's own step (a shard_map replay of its parts,
composed) against the plan's collectives, each unrolled and as a ``lax.scan`` over the
layers. Pipelined plans go to ``validate_pipeline`` (a GPipe shard_map over the pipeline
axis, ``ppermute`` between stages).

    python benchmarks/model_agreement.py                # the sweep, numerics every 4th case
    python benchmarks/model_agreement.py --execute-every 1

For each case it checks what issue 10 asks: the collectives per layer times L match the plan
(a scan's trip count counted), the matmul FLOPs equal XLA's dot count, and (on executed
cases) both steps compute the unsharded reference's numbers. It prints the share of each
verdict, whether every xla-differs step is its layers' own programs composed (so every
difference is a layer's, explained in docs/validation.md), and writes
benchmarks/results/model_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sharding_roofline.xla.devices import ensure_devices

ensure_devices(8)  # before anything runs a JAX operation

from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.program.autodiff import Remat  # noqa: E402
from sharding_roofline.program.config import ModelConfig  # noqa: E402
from sharding_roofline.program.model import ModelPlan, Training, plan_model  # noqa: E402
from sharding_roofline.xla.model_pipeline import validate_pipeline  # noqa: E402
from sharding_roofline.xla.model_validate import validate_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "model_agreement.json"

_SMALL = {"d": 32, "f": 64, "n": 4, "k": 2, "h": 8, "vocab": 64, "attention": "materialized"}
MODELS = {
    "dense": ModelConfig(name="tiny-dense", layers=2, **_SMALL),  # type: ignore[arg-type]
    "dense-4": ModelConfig(name="tiny-dense-4", layers=4, **_SMALL),  # type: ignore[arg-type]
    "moe": ModelConfig(
        name="tiny-moe",
        layers=2,
        experts=4,
        top_k=2,
        expert_f=32,
        **_SMALL,  # type: ignore[arg-type]
    ),
}
SEQ, BATCH = 16, 8  # 128 tokens

#: (model, mesh, strategy, remat): the named strategies of issue 10 on two mesh shapes
CASES: list[tuple[str, str, str, Remat]] = [
    *(
        ("dense", mesh, strategy, Remat.NONE)
        for mesh in ("x=2,y=4", "x=4,y=2")
        for strategy in (
            "dp=x+y",
            "fsdp=x+y",
            "dp=x,tp=y",
            "dp=x,sp=y",
            "fsdp=x,tp=y",
            "fsdp=x,sp=y",
            "dp=x+y,cp=y",
            "fsdp=x+y,cp=y",
        )
    ),
    ("dense", "x=2,y=4", "fsdp=x,tp=y", Remat.FULL),
    ("dense", "x=2,y=4", "dp=x,sp=y", Remat.DOTS),
    ("dense-4", "x=2,y=4", "fsdp=x,tp=y", Remat.NONE),
    *(
        ("moe", mesh, strategy, Remat.NONE)
        for mesh in ("x=2,y=4", "x=4,y=2")
        for strategy in ("dp=x+y,ep=y", "dp=x+y,ep=x", "fsdp=x,tp=y,ep=x", "fsdp=x+y,ep=y")
    ),
]
#: pipelined: (model, mesh, strategy, microbatches)
PIPELINES = [
    ("dense", "x=2,y=4", "pp=x,dp=y", 2),
    ("dense-4", "x=2,y=4", "pp=x,dp=y", 2),
    ("dense-4", "x=4,y=2", "pp=x,dp=y", 4),
    ("moe", "x=2,y=4", "pp=x,dp=y,ep=y", 2),
]


def _mesh(spec: str) -> DeviceMesh:
    shape = "x".join(part.split("=")[1] for part in spec.split(","))
    return DeviceMesh.create(load_preset("tpu-v5e"), spec, shape)


def _plan(model: str, mesh: str, strategy: str, remat: Remat, microbatches: int) -> ModelPlan:
    plan = plan_model(
        MODELS[model],
        _mesh(mesh),
        strategy,
        Training(batch_tokens=BATCH * SEQ, seq_len=SEQ, microbatches=microbatches, remat=remat),
    )
    if not isinstance(plan, ModelPlan):
        raise SystemExit(f"{model} {mesh} {strategy}: rejected: {plan.reason}")
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute-every", type=int, default=4, help="run numerics every Nth")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    index = 0
    for model, mesh, strategy, remat in CASES:
        for scan in (False, True):
            execute = args.execute_every > 0 and index % args.execute_every == 0
            index += 1
            plan = _plan(model, mesh, strategy, remat, 1)
            v = validate_model(plan, scan=scan, execute=execute)
            blocks = [row for row in v.per_op if row.part != "ends"]
            per_layer = sum(sum(r.count for r in row.predicted) for row in blocks)
            block_ops = sum(
                len(op.collectives) for name, p in plan.parts if name != "ends" for op in p.ops
            )
            loops = sorted({r.count for r in (v.shard_map or ()) if r.count > 1})
            row = {
                "model": model,
                "mesh": mesh,
                "strategy": strategy,
                "remat": remat.value,
                "scan": scan,
                "verdict": v.verdict.value,
                "difference": v.difference,
                "composes": v.composes,
                "layers": plan.config.layers,
                "block_collectives_per_layer": block_ops,
                "block_collectives_counted": per_layer,
                "layers_times_block": per_layer == plan.config.layers * block_ops,
                "scan_trip_counts": loops,
                "flops_plan": v.flops.plan,
                "flops_jit": v.flops.jit,
                "flops_shard_map": v.flops.shard_map,
                "flops_agree": v.flops.plan == v.flops.jit == v.flops.shard_map,
                "numerics": None if v.numerics is None else v.numerics.as_dict(),
                "reasons": list(v.reasons),
                "compile_s": round(v.compile_s, 2),
            }
            rows.append(row)
            numerics = ""
            if v.numerics is not None:
                numerics = (
                    f" numerics plan {v.numerics.shard_map_max_rel_error:.1e}"
                    f" xla {v.numerics.jit_max_rel_error:.1e}"
                )
            print(
                f"{model:8} {mesh:8} {strategy:18} {remat.value:8} "
                f"{'scan' if scan else 'unrolled':8} {v.verdict.value:12} "
                f"L x block {'ok' if row['layers_times_block'] else 'NO'} "
                f"flops {'ok' if row['flops_agree'] else 'NO'}{numerics} {v.difference}",
                flush=True,
            )
    pipes: list[dict[str, Any]] = []
    for model, mesh, strategy, microbatches in PIPELINES:
        pv = validate_pipeline(_plan(model, mesh, strategy, Remat.NONE, microbatches), execute=True)
        pipes.append(
            {"model": model, "mesh": mesh, "strategy": strategy, "microbatches": microbatches}
            | pv.as_dict()
        )
        print(
            f"{model:8} {mesh:8} {strategy:18} mb={microbatches} pipeline "
            f"{'ok' if pv.ok else 'FAILED'} sends {pv.forward_sends}+{pv.backward_sends} "
            f"max rel error {pv.max_rel_error:.1e} {'; '.join(pv.reasons)}",
            flush=True,
        )
    verdicts = Counter(row["verdict"] for row in rows)
    differs = [row for row in rows if row["verdict"] == "xla-differs"]
    executed = [row["numerics"] for row in rows if row["numerics"] is not None]
    summary = {
        "cases": len(rows),
        "verdicts": dict(verdicts),
        "xla_differs_composed_of_layers": sum(bool(row["composes"]) for row in differs),
        "layers_times_block": sum(row["layers_times_block"] for row in rows),
        "flops_agree": sum(row["flops_agree"] for row in rows),
        "executed": len(executed),
        "numerics_ok": sum(bool(n["ok"]) for n in executed),
        "max_rel_error_plan": max((n["shard_map_max_rel_error"] for n in executed), default=None),
        "max_rel_error_xla": max((n["jit_max_rel_error"] for n in executed), default=None),
        "pipelines": len(pipes),
        "pipelines_ok": sum(bool(p["ok"]) for p in pipes),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"summary": summary, "cases": rows, "pipelines": pipes}, indent=1) + "\n"
    )
    failed = verdicts.get("mismatch", 0) + len(pipes) - summary["pipelines_ok"]
    failed += len(rows) - summary["layers_times_block"] + len(rows) - summary["flops_agree"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
