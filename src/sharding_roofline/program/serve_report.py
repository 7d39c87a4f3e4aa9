"""Serving plans as text and as the ``serve`` command's JSON (render only)."""

from __future__ import annotations

from typing import Any

from ..report import mesh_dict, table
from ..units import format_bytes, format_count, format_seconds
from .evaluate import OpPlan, ProgramPlan
from .graph import OpKind, TensorKind
from .serve_plan import (
    ServePlan,
    ServeResult,
    _local_bytes,
    critical_batch,
    describe,
    model_parallel_limit,
)


def op_row(plan: ProgramPlan, op_plan: OpPlan) -> dict[str, Any]:
    """One op of one repetition: its roofline terms and collectives (``weight_hbm_s``: the
    part of its HBM time that reads weights)."""
    program = plan.program
    rate = plan.mesh.hardware.chip.hbm_bytes_per_s
    weights = sum(
        _local_bytes(plan, t, dims)
        for t, dims in op_plan.at_op
        if program.tensor(t).kind is TensorKind.PARAM and op_plan.op.kind is not OpKind.GATHER
    )  # a lookup reads the rows it gathers, not its table
    cost = op_plan.cost
    return {
        "name": op_plan.name,
        "kind": op_plan.op.kind.value,
        "equation": op_plan.op.equation,
        "flops_per_chip": cost.flops,
        "hbm_bytes_per_chip": cost.hbm_bytes,
        "time_s": {
            "compute": cost.compute_s,
            "hbm": cost.hbm_s,
            "hbm_weights": weights / rate,
            "comm": cost.comm_s,
        },
        "collectives": [
            {
                "kind": step.cost.kind.value,
                "axes": list(step.cost.axes),
                "operand": step.operand,
                "bytes_sent_per_chip": step.cost.bytes_sent_per_chip,
                "bandwidth_s": step.cost.bandwidth_s,
                "latency_s": step.cost.latency_s,
                "time_s": step.cost.time_s,
            }
            for step in op_plan.collectives
            if step.cost is not None
        ],
    }


def plan_dict(plan: ServePlan, *, max_batch: int | None, ttft: float | None) -> dict[str, Any]:
    cost = plan.cost
    limit = model_parallel_limit(plan)
    return {
        "name": plan.name,
        "step_time_s": plan.step_time_s,
        "step_time_bounds_s": {"lower_bound": plan.step_lower_s, "upper_bound": plan.step_upper_s},
        "time_s": {
            "compute": cost.compute_s,
            "hbm": cost.hbm_s,
            "hbm_weights": plan.weight_hbm_s,
            "hbm_kv_cache": plan.kv_hbm_s,
            "comm": cost.comm_lower_s,
            "comm_serial": cost.comm_s,
        },
        "comm_s_by_axes": cost.comm_s_by_axes(),
        "tokens_per_s_per_chip": plan.tokens_per_s_per_chip,
        "tokens_per_s": plan.tokens_per_s_per_chip * plan.mesh.num_devices,
        "time_to_first_token_s": ttft,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "memory_per_chip_bytes": plan.memory.as_dict(),
        "hbm_capacity_bytes": plan.capacity_bytes,
        "fits": plan.fits,
        "max_batch": max_batch,
        "bottleneck": plan.bottleneck,
        "bottleneck_detail": plan.describe_bottleneck(),
        "critical_batch": critical_batch(plan).as_dict(),
        "model_parallel_degree": plan.model_parallel_degree,
        "model_parallel_limit": limit,
        "replicas": plan.strategy.replicas(plan.mesh),
        "notes": list(plan.notes),
        "parts": {
            name: {
                "layers": part.layers,
                "time_s": {
                    "lower_bound": part.cost.lower_bound_s,
                    "compute": part.cost.compute_s,
                    "hbm": part.cost.hbm_s,
                    "comm": part.cost.comm_s,
                },
                "ops": [op_row(part, op) for op in part.ops],
            }
            for name, part in plan.parts
        },
    }


def _short(plan: ServePlan) -> dict[str, Any]:
    return {
        "name": plan.name,
        "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
        "topology": plan.mesh.topology.shape_text,
        "batch": plan.serving.batch,
        "prompt_tokens": plan.serving.context,
        "step_time_s": plan.step_time_s,
        "time_to_first_token_s": plan.step_time_s,
        "tokens_per_s_per_chip": plan.tokens_per_s_per_chip,
        "memory_per_chip_bytes": plan.memory.as_dict(),
        "fits": plan.fits,
        "bottleneck": plan.bottleneck,
    }


def serve_dict(result: ServeResult) -> dict[str, Any]:
    config = result.config
    serving = result.serving
    params = config.params()
    best = result.best
    out: dict[str, Any] = {
        "model": {
            "name": config.name,
            "params": params["total"],
            "active_params": params["active"],
            "layers": config.layers,
            "experts": config.experts,
            "kv_bytes_per_token": best.kv_bytes_per_token,
            "source": config.source,
        },
        "phase": serving.phase.value,
        "batch": serving.batch,
        "context": serving.context,
        "dtypes": {"weights": serving.weights, "kv": serving.kv, "compute": serving.compute},
        "attention": serving.attention,
        **mesh_dict(best.mesh),
        "strategies": [
            plan_dict(plan, max_batch=fit, ttft=result.time_to_first_token_s(plan))
            for plan, fit in zip(result.plans, result.max_batches, strict=True)
        ],
    }
    if result.searched:
        out["search"] = {
            "candidates": result.searched,
            "rejected": [{"strategy": r.strategy, "reason": r.reason} for r in result.rejected],
        }
    if result.prefill is not None:
        out["prefill"] = _short(result.prefill)
    if result.disaggregated is not None:
        d = result.disaggregated
        out["disaggregated"] = {
            "prefill_mesh": {axis.name: axis.size for axis in d.prefill.mesh.axes},
            "decode_mesh": {axis.name: axis.size for axis in d.decode.mesh.axes},
            "decode_tokens": d.decode_tokens,
            "prefill_pools_per_decode_pool": d.prefill_per_decode,
            "kv_transfer_s": d.kv_transfer_s,
        }
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else format_seconds(seconds)


def format_serve(result: ServeResult) -> str:
    config = result.config
    serving = result.serving
    best = result.best
    mesh = best.mesh
    params = config.params()
    phase = (
        f"decode: {serving.batch:,} sequences, one new token each against {serving.context:,} "
        "cached positions"
        if serving.is_decode
        else f"prefill: {serving.batch:,} prompts of {serving.context:,} tokens"
    )
    lines = [
        f"{config.name}: {format_count(params['total'])} parameters"
        + (f" ({format_count(params['active'])} active)" if config.is_moe else "")
        + f", {config.layers} layers; KV cache {best.kv_bytes_per_token:,.0f} bytes per token",
        f"{phase}; weights {serving.weights}, KV {serving.kv}, compute {serving.compute}",
        f"on {mesh.hardware.name} {mesh.topology.shape_text} ({mesh.num_devices} chips)",
    ]
    if result.searched:
        lines.append(
            f"searched {result.searched} layouts ({len(result.rejected)} do not divide the model)"
        )
    lines.append("")
    rows = []
    for rank, (plan, fit) in enumerate(zip(result.plans, result.max_batches, strict=True), 1):
        rows.append(
            [
                str(rank),
                plan.name,
                format_seconds(plan.step_time_s),
                f"{plan.tokens_per_s_per_chip:,.1f}",
                _ms(result.time_to_first_token_s(plan)),
                format_bytes(plan.memory.peak) + ("" if plan.fits else " (!)"),
                f"{fit:,}",
                plan.describe_bottleneck(),
            ]
        )
    header = [
        "#", "strategy", "step", "tokens/s/chip", "TTFT", "memory/chip", "max batch",
        "bottleneck",
    ]  # fmt: skip
    lines.append(table(rows, header))
    lines += ["", "best: " + describe(best)]
    crit = critical_batch(best)
    if crit.tokens is not None:
        lines.append(
            f"  weight matmuls compute-bound above {crit.tokens:,.0f} tokens per step "
            f"({crit.weights_only:,.0f} counting only weight bytes, the book's C/W_hbm form)"
        )
    limit = model_parallel_limit(best)
    if limit is not None:
        lines.append(
            f"  model parallelism {best.model_parallel_degree}-way; its collectives outlast the "
            f"weights' HBM reads beyond {limit:,.1f}-way (bandwidth terms)"
        )
    for note in best.notes:
        lines.append(f"  note: {note}")
    if result.prefill is not None:
        pre = result.prefill
        lines.append(
            f"time to first token: {format_seconds(pre.step_time_s)} (prefill of one "
            f"{pre.serving.context:,}-token prompt, {pre.name} on {pre.mesh.topology.shape_text})"
        )
    if result.disaggregated is not None:
        d = result.disaggregated
        lines.append(
            f"disaggregated: {d.prefill_per_decode:.2f} prefill pools per decode pool keep both "
            f"busy ({d.decode_tokens} tokens per request)"
            + (
                ""
                if d.kv_transfer_s is None
                else f"; one prompt's cache moves in {format_seconds(d.kv_transfer_s)}"
            )
        )
    rows = []
    for name, part in best.parts:
        for op_plan in part.ops:
            row = op_row(part, op_plan)
            t = row["time_s"]
            if not row["flops_per_chip"] and not row["collectives"]:
                continue
            rows.append(
                [
                    f"{name}.{op_plan.name}",
                    format_seconds(t["compute"]),
                    format_seconds(t["hbm"]),
                    format_seconds(t["hbm_weights"]),
                    format_seconds(t["comm"]),
                    ", ".join(f"{c['kind']} {'+'.join(c['axes'])}" for c in row["collectives"])
                    or "-",
                ]
            )
    lines += [
        "",
        "per op, one layer (x the part's layers):",
        table(rows, ["op", "compute", "HBM", "of it weights", "comm", "collectives"]),
    ]
    return "\n".join(lines)
