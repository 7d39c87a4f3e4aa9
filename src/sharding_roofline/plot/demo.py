"""The figures of ``make run`` (``save_demo_figures``) and the chip comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..collectives import Collective, rate
from ..crossover import crossover, default_dimension
from ..einsum import Einsum
from ..files import slug
from ..mesh import DeviceMesh
from ..planner import plan
from ..plans import Plan, Ranking
from ..presets import load_preset
from ..report import collectives_summary
from ._figure import InlineFigure, Plans, problem_text, save_figure
from .breakdowns import save_breakdown
from .messages import CollectiveCase, save_collective_sweep
from .roofs import group_text, save_roofline
from .sweeps import crossover_panels, save_crossover_sweep

#: The chips of ``chip_comparison``: title -> (preset, topology of 8 chips).
COMPARED_CHIPS: dict[str, tuple[str, str]] = {
    "TPU v5e (2x4, no wraparound)": ("tpu-v5e", "2x4"),
    "TPU v5p (2x2x2, no wraparound)": ("tpu-v5p", "2x2x2"),
    "H100 (one 8-GPU node)": ("h100", "1x8"),
    "B200 (one 8-GPU node)": ("b200", "1x8"),
}


def chip_comparison(
    chips: Mapping[str, tuple[str, str]] = COMPARED_CHIPS, *, einsum: Einsum | None = None
) -> InlineFigure:
    """``crossover_panels`` over the batch of the book's FSDP strategy (batch and weights
    stored sharded over ``x``, the batch split over ``x`` at the op, so the weights are
    all-gathered: ``AG_x(B)``) of ``einsum`` (default ``bd,df->bf``, D=8192, F=32768) on 8
    chips of each of ``chips``."""
    einsum = einsum or Einsum.create("bd,df->bf", "b=65536,d=8192,f=32768")
    panels: dict[str, Plans] = {}
    for title, (preset, topology) in chips.items():
        mesh = DeviceMesh.create(load_preset(preset), "x=8", topology)
        ranking = plan(einsum, mesh, lhs="x,None", rhs="x,None", out="x,None", top=None)
        panels[title] = [ranking.find(b="x", d="", f="")]
    return crossover_panels(panels, labels=["FSDP: AllGather the weights, AG_x(B)"])


def _distinct_talkers(plans: Sequence[Plan], most: int = 3) -> list[Plan]:
    """The best plans that communicate, one per distinct (collectives, times)."""
    seen: dict[tuple[Any, ...], Plan] = {}
    for item in plans:
        cost = item.cost
        if cost.comm_s > 0:
            key = (collectives_summary(item), cost.compute_s, cost.hbm_s, cost.comm_s)
            seen.setdefault(key, item)
    return list(seen.values())[:most]


def _telling(plans: Sequence[Plan]) -> str:
    """The batch if some plan crosses over along it, else the first letter that does."""
    letters = [default_dimension(plans[0])]
    letters += [c for c in plans[0].einsum.spec.letters if c != letters[0]]
    for letter in letters:
        if any(crossover(p, letter).size is not None for p in plans):
            return letter
    return letters[0]


def _named(rankings: Mapping[str, Ranking] | Sequence[Ranking]) -> dict[str, Ranking]:
    if isinstance(rankings, Mapping):
        return dict(rankings)
    return {f"{r.mesh.hardware.name} {r.mesh.spec_text}": r for r in rankings}


def demo_figure_names(names: Sequence[str], *, chips: bool = True) -> list[str]:
    """Every file ``save_demo_figures`` may write for rankings named ``names`` (so a caller
    can check them all before computing anything)."""
    files = [f"{slug(name)}_{kind}.png" for name in names for kind in _PER_RANKING]
    files.append("collectives.png")
    if chips:
        files.append("chips_crossover.png")
    return files


_PER_RANKING = ("breakdown", "roofline", "crossover")


def save_demo_figures(
    rankings: Mapping[str, Ranking] | Sequence[Ranking],
    out_dir: str | Path,
    *,
    chips: bool = True,
    force: bool = False,
) -> list[Path]:
    """The figures of ``make run``: per ranking its breakdown, roofline (top 5) and the
    crossover of its best strategies that communicate (each titled with the ranking's
    name); AllGather time over every mesh axis of the rankings; and, with ``chips``,
    ``chip_comparison`` (a fixed problem, not the rankings'). Returns the PNG paths written;
    an existing file is replaced only with ``force``."""
    out = Path(out_dir)
    named = _named(rankings)
    written: list[Path] = []
    cases: dict[tuple[str, float, float], CollectiveCase] = {}  # equal links: one line
    for name, ranking in named.items():
        stem = slug(name)
        problem = problem_text(ranking.strategies[0])
        written.append(
            save_breakdown(
                ranking, out / f"{stem}_breakdown.png", force=force, title=f"{name}\n{problem}"
            )
        )
        top = list(ranking.strategies[:5])
        path = out / f"{stem}_roofline.png"
        written.append(save_roofline(path, plans=top, force=force, title=f"{name}\n{problem}"))
        talking = _distinct_talkers(ranking.strategies)
        if talking:
            path = out / f"{stem}_crossover.png"
            letter = _telling(talking)
            title = f"{name}: compute vs communication as {letter.upper()} grows\n{problem}"
            written.append(
                save_crossover_sweep(path, talking, dimension=letter, force=force, title=title)
            )
        mesh = ranking.mesh
        for axis in (a.name for a in mesh.axes if a.size > 1):
            link = rate(mesh, Collective.ALL_GATHER, (axis,))
            key = (mesh.hardware.name, link.s_per_byte, link.latency_s)
            text = group_text(mesh, (axis,))
            if key in cases:
                old = cases[key]
                label = f"{old.label.partition(' (')[0]}, {text}"
                cases[key] = CollectiveCase(label=label, mesh=old.mesh, axes=old.axes)
            else:
                label = f"{mesh.hardware.chip.name}: {text}"
                cases[key] = CollectiveCase(label=label, mesh=mesh, axes=(axis,))
    if cases:
        path = out / "collectives.png"
        written.append(save_collective_sweep(path, list(cases.values()), force=force))
    if chips:
        written.append(save_figure(chip_comparison(), out / "chips_crossover.png", force=force))
    return written
