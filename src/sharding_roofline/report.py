"""Plans, rankings, collectives and hardware as text tables and as JSON-ready dicts.

The dict shapes are the CLI's stable ``--json`` interface (``shared/cli_contract.md``):
fields may be added, never renamed or removed. Human text is free to evolve.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .collectives import CollectiveCost
from .crossover import Crossover, crossover
from .estimate import Overlap
from .hardware import HardwareSpec
from .mesh import DeviceMesh
from .plans import Plan, Ranking, Step
from .units import format_bytes, format_count, format_flops, format_rate, format_seconds

# -- dicts (JSON) -----------------------------------------------------------------------------


def collective_dict(
    cost: CollectiveCost, *, operand: str | None = None, notation: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": cost.kind.value,
        "axes": list(cost.axes),
        "group_size": cost.group_size,
        "dtype": cost.dtype,
        "elements_in_per_chip": cost.elements_in_per_chip,
        "elements_out_per_chip": cost.elements_out_per_chip,
        "bytes_sent_per_chip": cost.bytes_sent_per_chip,
        "time_s": cost.time_s,
        "bandwidth_s": cost.bandwidth_s,
        "latency_s": cost.latency_s,
        "bound": cost.bound.value,
        "link": cost.link,
        "combine": cost.combine.value,
    }
    if operand is not None:
        out = {"operand": operand, **out}
    if notation:
        out["notation"] = notation
    return out


def mesh_dict(mesh: DeviceMesh) -> dict[str, Any]:
    """The mesh's fields of every JSON object (built once per mesh: a ranking repeats it)."""
    cached = mesh.memo.get("mesh_dict")
    if cached is None:
        cached = mesh.memo["mesh_dict"] = _mesh_dict(mesh)
    return dict(cached)


def _mesh_dict(mesh: DeviceMesh) -> dict[str, Any]:
    return {
        "hardware": mesh.hardware.name,
        "topology": mesh.topology.shape_text,
        "mesh": {axis.name: axis.size for axis in mesh.axes},
        "num_devices": mesh.num_devices,
        "mesh_axes": {name: mesh.describe_axis(name) for name in mesh.axis_names},
    }


def plan_dict(
    plan: Plan, *, overlap: Overlap = Overlap.FULL, crossover_dim: str | None = None
) -> dict[str, Any]:
    """One estimate object: the shape ``estimate --json`` prints."""
    cost = plan.cost
    spec = plan.einsum.spec
    chip = plan.mesh.hardware.chip
    link = cost.bottleneck_link
    cross: Crossover = crossover(plan, crossover_dim)
    return {
        "einsum": spec.equation,
        "dims": dict(plan.einsum.dims),
        "dtype": plan.einsum.dtype,
        "accum_dtype": plan.einsum.accum_dtype,
        **mesh_dict(plan.mesh),
        "lhs": plan.lhs.text(),
        "rhs": plan.rhs.text(),
        "out": plan.out.text(),
        "strategy": plan.strategy,
        "steps": plan.describe().splitlines()[1:],
        "overlap": overlap.value,
        "time_s": {
            "compute": cost.compute_s,
            "hbm": cost.hbm_s,
            "comm": cost.comm_s,
            "lower_bound": cost.lower_bound_s,
            "upper_bound": cost.upper_bound_s,
            "estimate": cost.time_s(overlap),
        },
        "bottleneck": cost.bottleneck.value,
        "bottleneck_link": None if link is None else {"axes": list(link[0]), "link": link[1]},
        "per_chip": {
            "flops": cost.flops,
            "hbm_bytes": cost.hbm_bytes,
            "peak_memory_bytes": plan.peak_memory_bytes,
            "comm_bytes_sent": cost.comm_bytes_sent_per_chip,
        },
        "arithmetic_intensity_flops_per_byte": cost.arithmetic_intensity_flops_per_byte,
        "critical_intensity_flops_per_byte": chip.critical_intensity_flops_per_byte(
            plan.einsum.dtype
        ),
        "fits_in_hbm": plan.peak_memory_bytes <= chip.hbm_capacity_bytes,
        "hbm_capacity_bytes": chip.hbm_capacity_bytes,
        "comm_s_by_axes": cost.comm_s_by_axes(),
        "comm_s_by_link": cost.comm_s_by_link(),
        "collectives": [
            collective_dict(
                step.cost, operand=step.operand, notation=step.notation(spec.operand(step.operand))
            )
            for step in plan.collectives
            if step.cost is not None
        ],
        "crossover": cross.as_dict(),
    }


def alternatives_dict(ranking: Ranking) -> list[dict[str, Any]]:
    """The runner-up algorithms an estimate considered (compact: layouts at the op, the
    collectives and their times)."""
    return [
        {
            "at_op": str(plan.operation),
            "collectives": collectives_summary(plan),
            "time_s": {
                "compute": plan.cost.compute_s,
                "comm": plan.cost.comm_s,
                "lower_bound": plan.cost.lower_bound_s,
                "upper_bound": plan.cost.upper_bound_s,
            },
        }
        for plan in ranking.strategies[1:]
    ]


def format_alternatives(ranking: Ranking) -> str:
    if len(ranking.strategies) < 2:
        return ""
    rows = [
        [
            str(plan.operation),
            collectives_summary(plan),
            format_seconds(plan.cost.time_s(ranking.overlap)),
            format_seconds(plan.cost.comm_s),
        ]
        for plan in ranking.strategies[1:]
    ]
    return "alternatives considered:\n" + table(rows, ["at the op", "collectives", "time", "comm"])


def ranking_dict(ranking: Ranking, *, crossover_dim: str | None = None) -> dict[str, Any]:
    return {
        "einsum": ranking.einsum.spec.equation,
        "dims": dict(ranking.einsum.dims),
        **mesh_dict(ranking.mesh),
        "overlap": ranking.overlap.value,
        "num_candidates": ranking.num_candidates,
        "num_valid": ranking.num_valid,
        "num_rejected": ranking.num_rejected,
        "strategies": [
            plan_dict(plan, overlap=ranking.overlap, crossover_dim=crossover_dim)
            for plan in ranking.strategies
        ],
        "rejected": [{"strategy": r.strategy, "reason": r.reason} for r in ranking.rejected],
    }


def hardware_dict(spec: HardwareSpec) -> dict[str, Any]:
    chip = spec.chip
    out: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "kind": spec.kind.value,
        "notes": spec.notes,
        "chip": {
            "name": chip.name,
            "peak_flops_per_s": dict(chip.peak_flops_per_s),
            "vector_flops_per_s": dict(chip.vector_flops_per_s),
            "hbm_bytes_per_s": chip.hbm_bytes_per_s,
            "hbm_capacity_bytes": chip.hbm_capacity_bytes,
            "critical_intensity_flops_per_byte": {
                dtype: chip.critical_intensity_flops_per_byte(dtype)
                for dtype in chip.peak_flops_per_s
            },
            "source": chip.source,
        },
        "scale_out": [
            {
                "name": level.name,
                "link": level.link.value,
                "children": level.children,
                "bytes_per_s_per_chip_per_direction": level.bytes_per_s_per_chip_per_direction,
                "latency_s": level.latency_s,
                "source": level.source,
            }
            for level in spec.scale_out
        ],
    }
    if spec.ici is not None:
        ici = spec.ici
        out["ici"] = {
            "link_bytes_per_s_per_direction": ici.link_bytes_per_s_per_direction,
            "link_bytes_per_s_bidirectional": ici.link_bytes_per_s_bidirectional,
            "links_per_chip": ici.links_per_chip,
            "num_torus_dims": ici.num_torus_dims,
            "max_shape": list(ici.max_shape),
            "wraparound": ici.wraparound.value,
            "hop_latency_s": ici.hop_latency_s,
            "max_cubes": ici.max_cubes,
            "source": ici.source,
        }
    if spec.nvlink is not None:
        nv = spec.nvlink
        out["nvlink"] = {
            "gpus_per_domain": nv.gpus_per_domain,
            "bytes_per_s_per_gpu_per_direction": nv.bytes_per_s_per_gpu_per_direction,
            "latency_s": nv.latency_s,
            "ring_base_latency_s": nv.ring_base_latency_s,
            "source": nv.source,
        }
    return out


# -- text --------------------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain monospace table; numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [
        all(_looks_numeric(r[i]) for r in rows) if rows else False for i in range(len(header))
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-.") and text not in ("-",)


def format_collective(cost: CollectiveCost, notation: str = "", links: str = "") -> str:
    """A collective for people; ``links`` says what its axes are (``y=4: ici line of 4``)."""
    lines = []
    if notation:
        lines.append(notation)
    lines.append(
        f"{cost.kind.value} over {'+'.join(cost.axes) or '(no axes)'} (group of {cost.group_size}, "
        f"{cost.link or 'no link'}): {format_seconds(cost.time_s)}, {cost.bound.value}-bound"
    )
    if links:
        lines.append(f"  links: {links}")
    lines.append(
        f"  per chip: {format_count(cost.elements_in_per_chip)} elements in, "
        f"{format_count(cost.elements_out_per_chip)} out ({cost.dtype}); sends "
        f"{format_bytes(cost.bytes_sent_per_chip)}"
    )
    lines.append(
        f"  bandwidth term {format_seconds(cost.bandwidth_s)}, latency term "
        f"{format_seconds(cost.latency_s)}"
    )
    return "\n".join(lines)


def format_plan(
    plan: Plan, *, overlap: Overlap = Overlap.FULL, crossover_dim: str | None = None
) -> str:
    cost = plan.cost
    chip = plan.mesh.hardware.chip
    dtype = plan.einsum.dtype
    lines = [
        f"{plan.einsum} on {plan.mesh}",
        plan.describe(),
        "",
        f"per chip: {format_flops(cost.flops)}, {format_bytes(cost.hbm_bytes)} HBM traffic, "
        f"peak memory {format_bytes(plan.peak_memory_bytes)} "
        f"of {format_bytes(chip.hbm_capacity_bytes)}",
        f"intensity {cost.arithmetic_intensity_flops_per_byte:.4g} FLOP/B vs critical "
        f"{chip.critical_intensity_flops_per_byte(dtype):.4g} ({chip.name}, {dtype})",
        f"compute {format_seconds(cost.compute_s)} | HBM {format_seconds(cost.hbm_s)} | comm "
        f"{format_seconds(cost.comm_s)}",
        f"time: {format_seconds(cost.lower_bound_s)} (full overlap) .. "
        f"{format_seconds(cost.upper_bound_s)} (no overlap); "
        f"bottleneck: {cost.describe_bottleneck()}",
    ]
    if plan.peak_memory_bytes > chip.hbm_capacity_bytes:
        lines.append(
            f"WARNING: needs {format_bytes(plan.peak_memory_bytes)} per chip, more than the "
            f"{format_bytes(chip.hbm_capacity_bytes)} of HBM; shard the operands further"
        )
    rows = [
        [
            step.operand,
            step.cost.kind.value,
            "+".join(step.cost.axes),
            step.cost.link,
            format_bytes(step.cost.bytes_sent_per_chip),
            format_seconds(step.cost.time_s),
            step.cost.bound.value,
        ]
        for step in plan.collectives
        if step.cost is not None
    ]
    if rows:
        lines += [
            "",
            table(rows, ["operand", "collective", "axes", "link", "sent/chip", "time", "bound"]),
        ]
    cross = crossover(plan, crossover_dim)
    lines += ["", f"crossover: {cross.note}"]
    return "\n".join(lines)


_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A"}


def collectives_summary(plan: Plan) -> str:
    """``AG_x(lhs) RS_y(out)``: each collective, its axes and the array it moves."""
    return collectives_summary_steps(plan.collectives)


def collectives_summary_steps(steps: Iterable[Step]) -> str:
    """``AG_x(w_in) RS_y(h)``: each collective, its axes and the tensor it moves."""
    parts = []
    for step in steps:
        if step.cost is not None:
            short = _SHORT.get(step.cost.kind.value, "CP")
            parts.append(f"{short}_{'+'.join(step.cost.axes)}({step.label})")
    return " ".join(parts) or "none"


def crossover_text(cross: Crossover) -> str:
    """``B=13,130`` (a whole number of elements, or 4 digits below 100); ``none``."""
    if cross.size is None:
        return "none"
    size = f"{cross.size:,.0f}" if cross.size >= 100 else f"{cross.size:.4g}"
    return f"{cross.dimension.upper()}={size}"


def format_ranking(ranking: Ranking, *, crossover_dim: str | None = None) -> str:
    lines = [
        f"{ranking.einsum} on {ranking.mesh}",
        f"{ranking.num_valid} valid strategies of {ranking.num_candidates} candidates "
        f"({ranking.num_rejected} rejected); ranked by {ranking.overlap.value}-overlap time",
        "",
    ]
    rows = []
    for rank, plan in enumerate(ranking.strategies, 1):
        cost = plan.cost
        cross = crossover(plan, crossover_dim)
        rows.append(
            [
                str(rank),
                plan.strategy,
                str(plan.operation),
                collectives_summary(plan),
                format_seconds(cost.time_s(ranking.overlap)),
                format_seconds(cost.compute_s),
                format_seconds(cost.comm_s),
                cost.describe_bottleneck(),
                crossover_text(cross),
            ]
        )
    header = [
        "#", "strategy", "at the op", "collectives", "time", "compute", "comm", "bottleneck",
        "crossover",
    ]  # fmt: skip
    lines.append(table(rows, header))
    lines.append("")
    lines.append("best strategy:")
    lines.append(format_plan(ranking.best, overlap=ranking.overlap, crossover_dim=crossover_dim))
    if ranking.rejected:
        lines += ["", "rejected:"]
        lines += [f"  {r.strategy}: {r.reason}" for r in ranking.rejected]
    return "\n".join(lines)


def format_hardware(spec: HardwareSpec) -> str:
    chip = spec.chip
    lines = [f"{spec.name}: {spec.description}", f"chip: {chip.name}"]
    for dtype, peak in chip.peak_flops_per_s.items():
        lines.append(
            f"  {dtype:<14} {format_rate(peak, 'FLOP')}  critical intensity "
            f"{chip.critical_intensity_flops_per_byte(dtype):.4g} FLOP/B"
        )
    for dtype, rate in chip.vector_flops_per_s.items():
        lines.append(f"  {dtype:<14} {format_rate(rate, 'FLOP')} on the vector units")
    lines.append(
        f"  HBM {format_bytes(chip.hbm_capacity_bytes)} at {format_rate(chip.hbm_bytes_per_s)}"
    )
    lines.append(f"  source: {chip.source}")
    if spec.ici is not None:
        ici = spec.ici
        lines.append(
            f"ICI: {ici.num_torus_dims}D torus, {ici.links_per_chip} links/chip at "
            f"{format_rate(ici.link_bytes_per_s_per_direction)} each way "
            f"({format_rate(ici.link_bytes_per_s_bidirectional)} bidirectional), "
            f"{format_seconds(ici.hop_latency_s)}/hop; pod {'x'.join(map(str, ici.max_shape))}; "
            f"wraparound: {ici.wraparound.value}"
            + (f"; slices of up to {ici.max_cubes} 4x4x4 cubes" if ici.max_cubes else "")
        )
        lines.append(f"  source: {ici.source}")
    if spec.nvlink is not None:
        nv = spec.nvlink
        lines.append(
            f"NVLink: {nv.gpus_per_domain} GPUs per domain at "
            f"{format_rate(nv.bytes_per_s_per_gpu_per_direction)} per GPU each way, "
            f"{format_seconds(nv.latency_s)}/step"
            + (
                f" plus {format_seconds(nv.ring_base_latency_s)} once per ring collective"
                if nv.ring_base_latency_s
                else ""
            )
        )
        lines.append(f"  source: {nv.source}")
    for level in spec.scale_out:
        children = "unbounded" if level.children == 0 else f"{level.children} children"
        lines.append(
            f"{level.name} ({level.link.value}): {children}, "
            f"{format_rate(level.bytes_per_s_per_chip_per_direction)} per chip each way, "
            f"{format_seconds(level.latency_s)}/step"
        )
        lines.append(f"  source: {level.source}")
    if spec.notes:
        lines.append(f"notes: {spec.notes}")
    return "\n".join(lines)


def format_hardware_list(specs: list[HardwareSpec]) -> str:
    rows = []
    for spec in specs:
        chip = spec.chip
        bf16 = chip.peak_flops_per_s.get("bfloat16")
        if spec.ici is not None:
            link = f"ICI {format_rate(spec.ici.link_bytes_per_s_per_direction)}/link"
        elif spec.nvlink is not None:
            link = f"NVLink {format_rate(spec.nvlink.bytes_per_s_per_gpu_per_direction)}/GPU"
        else:  # pragma: no cover - every preset has one
            link = "-"
        rows.append(
            [
                spec.name,
                spec.kind.value,
                format_rate(bf16, "FLOP") if bf16 else "-",
                format_rate(chip.hbm_bytes_per_s),
                format_bytes(chip.hbm_capacity_bytes),
                f"{chip.critical_intensity_flops_per_byte('bfloat16'):.0f}" if bf16 else "-",
                link,
            ]
        )
    return table(
        rows, ["name", "kind", "bf16 peak", "HBM bw", "HBM", "crit. int.", "chip link (each way)"]
    )
