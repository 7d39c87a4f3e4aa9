"""Program plans and rankings as text and as JSON-ready dicts (render only).

The dict shapes are the ``layer`` command's stable ``--json`` interface
(``shared/cli_contract.md``): fields may be added, never renamed or removed.
"""

from __future__ import annotations

from typing import Any

from ..report import collective_dict, collectives_summary_steps, mesh_dict, table
from ..sharding import ShardingSpec, unreduced_suffix
from ..units import format_bytes, format_count, format_flops, format_seconds
from .analysis import critical_batch, max_model_parallel
from .evaluate import OpPlan, ProgramPlan
from .search import ProgramRanking


def op_notation(op_plan: OpPlan) -> str:
    """``q_proj: xn1[B_x, T, D] · w_q[D, K_y, G, H] -> q[B_x, T, K_y, G, H]`` at the op."""
    op = op_plan.op
    inputs = " · ".join(
        ShardingSpec(dims).notation(name, item.letters)
        for (name, dims), item in zip(op_plan.at_op, op.inputs, strict=True)
    )
    out = ShardingSpec(op_plan.out_local).notation(op.output, op.out_letters)
    fn = f"{op.fn} " if op.fn and op.kind.value != "einsum" else ""
    return f"{fn}{inputs} -> {out}{unreduced_suffix(op_plan.unreduced)}"


def _time_dict(
    lower: float, upper: float, compute: float, hbm: float, comm: float
) -> dict[str, float]:
    return {
        "compute": compute,
        "hbm": hbm,
        "comm": comm,
        "lower_bound": lower,
        "upper_bound": upper,
    }


def op_dict(op_plan: OpPlan) -> dict[str, Any]:
    cost = op_plan.cost
    op = op_plan.op
    return {
        "name": op.name,
        "phase": op.phase.value,
        "stage": op.stage,
        "kind": op.kind.value,
        "equation": op.equation,
        "at_op": op_notation(op_plan),
        "time_s": _time_dict(
            cost.lower_bound_s, cost.upper_bound_s, cost.compute_s, cost.hbm_s, cost.comm_s
        ),
        "flops": cost.flops,
        "vector_flops": cost.vector_flops,
        "hbm_bytes": cost.hbm_bytes,
        "collectives": [
            collective_dict(
                step.cost,
                operand=step.operand,
                notation=step.notation(_letters(op_plan, step.operand)),
            )
            for step in op_plan.collectives
            if step.cost is not None
        ],
    }


def _letters(op_plan: OpPlan, tensor: str) -> str:
    for item in op_plan.op.inputs:
        if item.tensor == tensor:
            return item.letters
    return op_plan.op.out_letters


def program_plan_dict(plan: ProgramPlan) -> dict[str, Any]:
    """One strategy: the shape of each ``layer --json`` strategy."""
    cost = plan.cost
    cross = critical_batch(plan)
    link = plan.bottleneck_link
    return {
        "name": plan.name,
        "time_s": _time_dict(
            cost.lower_bound_s, cost.upper_bound_s, cost.compute_s, cost.hbm_s, cost.comm_s
        ),
        "passes": {
            name: _time_dict(c.lower_bound_s, c.upper_bound_s, c.compute_s, c.hbm_s, c.comm_s)
            for name, c in plan.passes
        },
        "bottleneck": plan.bottleneck.value,
        "bottleneck_link": None if link is None else {"axes": list(link[0]), "link": link[1]},
        "memory_per_chip_bytes": plan.memory.as_dict(),
        "fits": plan.fits,
        "hbm_capacity_bytes": plan.mesh.hardware.chip.hbm_capacity_bytes,
        "tokens_per_s_per_chip": plan.tokens_per_s_per_chip,
        "critical_batch_tokens_per_chip": cross.tokens_per_chip,
        "critical_batch_tokens": cross.tokens,
        "critical_batch_note": cross.note,
        "max_model_parallel": max_model_parallel(plan),
        "per_chip": {
            "flops": cost.flops,
            "vector_flops": cost.vector_flops,
            "hbm_bytes": cost.hbm_bytes,
            "comm_bytes_sent": cost.comm_bytes_sent_per_chip,
        },
        "notes": list(plan.placement.notes),
        "ops": [op_dict(op) for op in plan.ops],
    }


def ranking_dict(ranking: ProgramRanking, *, mode: str) -> dict[str, Any]:
    program = ranking.program
    out: dict[str, Any] = {
        "program": program.name,
        "dims": dict(program.dims),
        "tokens": program.tokens,
        "params": program.num_params,
        "backward": program.has_backward,
        **mesh_dict(ranking.mesh),
        "mode": mode,
        "overlap": ranking.overlap.value,
        "num_candidates": ranking.num_candidates,
        "seconds": ranking.seconds,
        "strategies": [program_plan_dict(plan) for plan in ranking.strategies],
        "rejected": [{"strategy": r.strategy, "reason": r.reason} for r in ranking.rejected],
    }
    if mode == "search":
        named = ranking.best_named
        out["best_named"] = None if named is None else named.name
        out["beats_best_named_by"] = ranking.beats
    return out


# -- text --------------------------------------------------------------------------------------


def _fmt_tokens(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_ranking(ranking: ProgramRanking, *, mode: str, details: bool = False) -> str:
    program = ranking.program
    mesh = ranking.mesh
    chip = mesh.hardware.chip
    lines = [
        f"{program.name}: {', '.join(f'{c}={n}' for c, n in program.dims)}; "
        f"{program.tokens:,} tokens per step; {format_count(program.num_params)} parameters",
        f"on {mesh} ({mesh.num_devices} chips, {format_bytes(chip.hbm_capacity_bytes)} HBM each)",
    ]
    if mode == "search":
        lines.append(
            f"layout search: {ranking.num_candidates:,} stage layouts in "
            f"{ranking.seconds:.2f} s; named strategies below for comparison"
        )
    lines.append("")
    rows = []
    for rank, plan in enumerate(ranking.strategies, 1):
        rows.append(_row(str(rank), plan))
    header = [
        "#", "strategy", "time", "compute", "comm", "bottleneck", "memory/chip", "crit. batch/chip",
        "max tp",
    ]  # fmt: skip
    lines.append(table(rows, header))
    if mode == "search":
        named = ranking.best_named
        beats = ranking.beats
        if named is not None and beats is not None:
            lines.append("")
            if beats > 1e-9:
                lines.append(
                    f"the best layout beats the best named strategy ({named.name}, "
                    f"{format_seconds(named.time_s)}) by {beats:.1%}"
                )
            else:
                lines.append(
                    f"no layout beats the best named strategy ({named.name}, "
                    f"{format_seconds(named.time_s)})"
                )
            named_rows = [_row("", plan) for plan in ranking.named]
            lines += ["", "named strategies:", table(named_rows, header)]
    noted = [p for p in (*ranking.strategies, *ranking.named) if p.placement.notes]
    if noted:
        lines += ["", "* notes:"]
        seen: set[str] = set()
        for plan in noted:
            if plan.name not in seen:
                seen.add(plan.name)
                lines += [f"  {plan.name}: {note}" for note in plan.placement.notes]
    if ranking.strategies:
        lines += ["", "best: " + format_plan(ranking.best, ops=details)]
    if ranking.rejected:
        lines += ["", "cannot run or do not fit:"]
        lines += [f"  {r.strategy}: {r.reason}" for r in ranking.rejected]
    return "\n".join(lines)


def _row(rank: str, plan: ProgramPlan) -> list[str]:
    cost = plan.cost
    cross = critical_batch(plan)
    mp = max_model_parallel(plan)
    memory = format_bytes(plan.memory.peak) + ("" if plan.fits else " (!)")
    return [
        rank,
        plan.name + (" *" if plan.placement.notes else ""),
        f"{format_seconds(cost.lower_bound_s)}..{format_seconds(cost.upper_bound_s)}",
        format_seconds(cost.compute_s),
        format_seconds(cost.comm_s),
        plan.describe_bottleneck(),
        memory,
        _fmt_tokens(cross.tokens_per_chip),
        "-" if mp is None else f"{mp:.3g}",
    ]


def format_plan(plan: ProgramPlan, *, ops: bool = True) -> str:
    """One strategy: time, memory and crossovers, and (``ops``) each op at its layout with
    its collectives."""
    cost = plan.cost
    memory = plan.memory
    chip = plan.mesh.hardware.chip
    cross = critical_batch(plan)
    mp = max_model_parallel(plan)
    lines = [
        f"strategy {plan.name}",
        f"  time {format_seconds(cost.lower_bound_s)} (each pass overlapped) .. "
        f"{format_seconds(cost.upper_bound_s)} (no overlap); bottleneck: "
        f"{plan.describe_bottleneck()}; {plan.tokens_per_s_per_chip:,.0f} tokens/s per chip",
        f"  per chip: {format_flops(cost.flops)} on the matrix units, "
        f"{format_flops(cost.vector_flops)} on the vector units, "
        f"{format_bytes(cost.hbm_bytes)} HBM traffic, "
        f"{format_bytes(cost.comm_bytes_sent_per_chip)} sent",
        f"  memory per chip: params {format_bytes(memory.params)}, grads "
        f"{format_bytes(memory.grads)}, optimizer {format_bytes(memory.optimizer)}, activations "
        f"{format_bytes(memory.activations)}, transient {format_bytes(memory.transient)} "
        f"(at {memory.transient_op or '-'}) = {format_bytes(memory.peak)} of "
        f"{format_bytes(chip.hbm_capacity_bytes)}" + ("" if plan.fits else "  DOES NOT FIT"),
        f"  critical batch: {cross.note}",
    ]
    if mp is not None:
        lines.append(
            f"  tensor parallelism stays compute-bound up to a degree of {mp:.3g} (the tp "
            "collectives' time equals the matmuls')"
        )
    for note in plan.placement.notes:
        lines.append(f"  note: {note}")
    if not ops:
        lines.append("  (--details lists every op at its layout with its collectives)")
        return "\n".join(lines)
    rows = []
    for op_plan in plan.ops:
        c = op_plan.cost
        rows.append(
            [
                op_plan.op.phase.value[:3],
                op_plan.op.name,
                op_notation(op_plan),
                collectives_summary_steps(op_plan.collectives),
                format_seconds(c.compute_s),
                format_seconds(c.hbm_s),
                format_seconds(c.comm_s),
            ]
        )
    lines += [
        "",
        table(rows, ["pass", "op", "at the op", "collectives", "compute", "hbm", "comm"]),
    ]
    return "\n".join(lines)
