"""Model plans as text and as the ``model`` command's JSON (render only)."""

from __future__ import annotations

import argparse
from typing import Any

from ..estimate import Cost
from ..report import mesh_dict, table
from ..units import format_bytes, format_count, format_seconds
from .analysis import critical_batch
from .config import ModelConfig
from .model import ModelPlan


def plan_dict(plan: ModelPlan) -> dict[str, Any]:
    block = plan.parts[0][1]
    cross = critical_batch(block)
    data: dict[str, Any] = {
        "name": plan.name,
        "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
        "step_time_s": {
            "lower_bound": plan.step_lower_s,
            "upper_bound": plan.step_upper_s,
            "compute": plan.compute_s,
            "hbm": plan.hbm_s,
            "comm": plan.comm_s,
            "gradient_reduction": plan.grad_reduction_s,
        },
        "mfu": plan.mfu,
        "tokens_per_s_per_chip": plan.tokens_per_s_per_chip,
        "memory_per_chip_bytes": plan.memory.as_dict(),
        "fits": plan.fits,
        "hbm_capacity_bytes": plan.mesh.hardware.chip.hbm_capacity_bytes,
        "bottleneck": plan.bottleneck,
        "bottleneck_detail": plan.describe_bottleneck(),
        "critical_batch_tokens_per_chip": cross.tokens_per_chip,
        "microbatches": plan.training.microbatches,
        "remat": plan.training.remat.value,
        "components": {
            name: {
                "layers": part.layers,
                # one microbatch's forward and backward passes, without the gradient
                # reductions and the optimizer update (once per step)
                "time_s": {
                    "lower_bound": cost.lower_bound_s,
                    "upper_bound": cost.upper_bound_s,
                    "compute": cost.compute_s,
                    "comm": cost.comm_s,
                },
                "comm_s_by_axes": cost.comm_s_by_axes(),
                "memory_per_chip_bytes": part.memory.as_dict(),
            }
            for (name, part), (_, cost) in zip(plan.parts, _costs(plan), strict=True)
        },
    }
    if plan.pipeline is not None:
        p = plan.pipeline
        data["pipeline"] = {
            "stages": p.stages,
            "microbatches": p.microbatches,
            "schedule": p.schedule.value,
            "virtual_stages": p.virtual_stages,
            "bubble_fraction": p.bubble_fraction,
            "stage_permutes_s": p.permute_s,
            "microbatches_in_flight": p.in_flight,
        }
    return data


def model_dict(
    config: ModelConfig,
    plans: list[ModelPlan],
    args: argparse.Namespace,
    *,
    search: Any = None,
) -> dict[str, Any]:
    params = config.params()
    training_ = plans[0].training if plans else None
    tokens = training_.batch_tokens if training_ else args.batch_tokens
    strategies = [plan_dict(plan) for plan in plans]
    if getattr(args, "calibrated", False):
        for data, figure in zip(strategies, _calibrated(plans), strict=True):
            data["calibrated"] = figure.as_dict()
    out: dict[str, Any] = {
        "model": {
            "name": config.name,
            "params": params["total"],
            "active_params": params["active"],
            "flops_per_token": plans[0].model_flops / tokens if plans else None,
            "layers": config.layers,
            "experts": config.experts,
            "attention": config.attention,
            "source": config.source,
            "ignored_fields": list(config.ignored),
        },
        "batch_tokens": tokens,
        "seq_len": training_.seq_len if training_ else args.seq_len,
        "strategies": strategies,
    }
    if plans:
        out.update(mesh_dict(plans[0].mesh))
    if search is not None:
        out["search"] = search.summary()
    if getattr(args, "train_tokens", None) and plans:
        best = plans[0]
        steps = args.train_tokens / tokens
        out["training_days"] = steps * best.step_lower_s / 86400
    return out


def format_model_plans(
    config: ModelConfig, plans: list[ModelPlan], args: argparse.Namespace, *, search: Any = None
) -> str:
    params = config.params()
    lines = [
        f"{config.name}: {format_count(params['total'])} parameters"
        + (f" ({format_count(params['active'])} active)" if config.is_moe else "")
        + f", {config.layers} layers; {args.batch_tokens:,} tokens per step",
    ]
    if plans:
        mesh = plans[0].mesh
        flops = plans[0].model_flops / args.batch_tokens
        lines.append(
            f"{format_count(flops)}FLOP per token (6 per parameter per token for the matmuls, "
            f"plus attention, {config.attention} kernel)"
        )
        lines.append(
            f"on {mesh.hardware.name} {mesh.topology.shape_text} ({mesh.num_devices} chips)"
        )
    if search is not None:
        lines.append(search.describe())
    lines.append("")
    rows = []
    for rank, plan in enumerate(plans, 1):
        cross = critical_batch(plan.parts[0][1])
        rows.append(
            [
                str(rank),
                plan.name,
                plan.mesh.spec_text,
                f"{format_seconds(plan.step_lower_s)}..{format_seconds(plan.step_upper_s)}",
                f"{plan.mfu:.1%}",
                f"{plan.tokens_per_s_per_chip:,.0f}",
                format_bytes(plan.memory.peak) + ("" if plan.fits else " (!)"),
                plan.describe_bottleneck(),
                "-" if cross.tokens_per_chip is None else f"{cross.tokens_per_chip:,.0f}",
            ]
        )
    header = [
        "#", "strategy", "mesh", "step", "MFU", "tokens/s/chip", "memory/chip", "bottleneck",
        "crit. batch/chip",
    ]  # fmt: skip
    lines.append(table(rows, header))
    if plans:
        lines += ["", "best: " + describe(plans[0])]
        if search is not None and search.best_reason:
            lines.append(f"  why it wins: {search.best_reason}")
        if getattr(args, "calibrated", False):
            lines += ["  " + line for line in _calibrated(plans[:1])[0].describe()]
        if getattr(args, "train_tokens", None):
            steps = args.train_tokens / args.batch_tokens
            days = steps * plans[0].step_lower_s / 86400
            lines.append(
                f"training {args.train_tokens:.3g} tokens: {steps:,.0f} steps, {days:,.1f} days at "
                f"this step time ({plans[0].mfu:.1%} MFU)"
            )
    return "\n".join(lines)


def _costs(plan: ModelPlan) -> tuple[tuple[str, Cost], ...]:
    return plan.microbatch_costs or tuple((name, part.cost) for name, part in plan.parts)


def _calibrated(plans: list[ModelPlan]) -> list[Any]:
    """``calibration.calibrate_model_plan`` of each plan (imported only with --calibrated)."""
    from ..calibration import calibrate_model_plan  # noqa: PLC0415

    return [calibrate_model_plan(plan) for plan in plans]


def describe(plan: ModelPlan) -> str:
    memory = plan.memory
    lines = [
        f"{plan.name} on mesh ({plan.mesh.spec_text})",
        f"  step {format_seconds(plan.step_lower_s)} (overlapped) .. "
        f"{format_seconds(plan.step_upper_s)}; MFU {plan.mfu:.1%}; "
        f"{plan.tokens_per_s_per_chip:,.0f} tokens/s per chip; bottleneck "
        f"{plan.describe_bottleneck()}",
        f"  memory per chip: params {format_bytes(memory.params)}, grads "
        f"{format_bytes(memory.grads)}, optimizer {format_bytes(memory.optimizer)}, activations "
        f"{format_bytes(memory.activations)}, transient {format_bytes(memory.transient)} = "
        f"{format_bytes(memory.peak)} of "
        f"{format_bytes(plan.mesh.hardware.chip.hbm_capacity_bytes)}",
        "  mesh axes: "
        + "; ".join(plan.mesh.describe_axis(axis.name) for axis in plan.mesh.axes if axis.size > 1),
    ]
    where = " per stage" if plan.pipeline is not None else ""
    for (name, part), (_, cost) in zip(plan.parts, _costs(plan), strict=True):
        lines.append(
            f"  {name} x{part.layers}{where}: {format_seconds(cost.lower_bound_s)} per "
            f"microbatch, forward and backward (compute {format_seconds(cost.compute_s)}, "
            f"comm {format_seconds(cost.comm_s)})"
        )
    if plan.optimizer_s:
        lines.append(f"  optimizer update once per step: {format_seconds(plan.optimizer_s)}")
    if plan.pipeline is not None:
        p = plan.pipeline
        lines.append(
            f"  pipeline: {p.stages} stages, {p.microbatches} microbatches, {p.schedule.value}"
            + (f" x{p.virtual_stages}" if p.virtual_stages > 1 else "")
            + f": bubble {p.bubble_fraction:.1%}, stage sends {format_seconds(p.permute_s)}, "
            f"{p.in_flight} microbatches' activations in flight"
        )
    if plan.grad_reduction_s:
        lines.append(
            f"  data-parallel gradient reductions once per step: "
            f"{format_seconds(plan.grad_reduction_s)}"
        )
    return "\n".join(lines)
