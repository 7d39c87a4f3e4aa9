"""Experiment configs: a TOML file of hardware summaries, collectives and plans to run, and
the report they produce (``make run`` runs ``configs/demo.toml``).

The config is read as strictly as a hardware preset: an unknown key names the file, the
table and the valid keys.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .collectives import collective_cost, parse_collective
from .einsum import Einsum
from .errors import ConfigError
from .estimate import Overlap
from .mesh import DeviceMesh
from .planner import Planner
from .presets import build_dataclass, load_preset
from .report import collective_dict, format_hardware_list, format_ranking, ranking_dict, table
from .sharding import ShardingSpec
from .units import format_bytes, format_seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveJob:
    """One collective to cost (as the ``collective`` command takes it)."""

    hardware: str
    mesh: str
    op: str
    axes: str
    shape: str
    label: str = ""
    topology: str = ""
    num_slices: int = 1
    spec: str = ""
    dtype: str = "bfloat16"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanJob:
    """One einsum to plan (as the ``plan`` command takes it)."""

    name: str
    hardware: str
    mesh: str
    einsum: str
    dims: str
    topology: str = ""
    num_slices: int = 1
    dtype: str = "bfloat16"
    accum_dtype: str = ""
    lhs: str = ""
    rhs: str = ""
    out: str = ""
    top: int = 5
    overlap: str = "full"
    crossover_dim: str = ""
    validate: int = 0  # how many of the top strategies to check against XLA (0: none)


@dataclass(frozen=True, slots=True, kw_only=True)
class Experiment:
    title: str = ""
    figures: bool = True
    hardware: tuple[str, ...] = ()
    collective: tuple[CollectiveJob, ...] = ()
    plan: tuple[PlanJob, ...] = ()


def load_experiment(path: str | Path) -> Experiment:
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment config {str(file)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file.name}: not valid TOML: {exc}") from None
    return build_dataclass(Experiment, data, filename=file.name, table="")


def _mesh(job: CollectiveJob | PlanJob) -> DeviceMesh:
    return DeviceMesh.create(
        load_preset(job.hardware), job.mesh, job.topology or None, num_slices=job.num_slices
    )


def run_collective(job: CollectiveJob) -> dict[str, Any]:
    mesh = _mesh(job)
    shape = tuple(int(s) for s in job.shape.split(","))
    spec = ShardingSpec.parse(job.spec or None, rank=len(shape))
    axis_size = {a.name: a.size for a in mesh.axes}
    spec.check(shape=shape, axis_size=axis_size, what="A")
    elements = 1
    for size in spec.local_shape(shape, axis_size):
        elements *= size
    axes = tuple(a.strip() for a in job.axes.split(","))
    cost = collective_cost(
        mesh, parse_collective(job.op), axes, elements_in_per_chip=elements, dtype=job.dtype
    )
    return {"label": job.label, "mesh": str(mesh), **collective_dict(cost)}


def run_plan(job: PlanJob) -> Any:
    mesh = _mesh(job)
    einsum = Einsum.create(
        job.einsum, job.dims, dtype=job.dtype, accum_dtype=job.accum_dtype or None
    )
    planner = Planner(
        einsum,
        mesh,
        lhs=job.lhs or None,
        rhs=job.rhs or None,
        out=job.out or None,
        overlap=Overlap(job.overlap),
    )
    return planner.search(top=job.top)


def _validate(jobs: list[tuple[PlanJob, tuple[Any, ...]]], results: dict[str, Any]) -> str:
    """Check the chosen strategies against XLA on simulated devices; the report section."""
    from .xla.cli import format_validations, validate_many  # noqa: PLC0415 (imports JAX)
    from .xla.devices import ensure_devices  # noqa: PLC0415

    ensure_devices(max(plan.mesh.num_devices for _, plans in jobs for plan in plans))
    parts = ["## Validation against XLA (compile-only, simulated CPU devices)"]
    for job, plans in jobs:
        validations = validate_many(plans, progress=True)
        for entry in results["plans"]:
            if entry["name"] == job.name:
                entry["validation"] = [v.as_dict() for v in validations]
        parts.append(f"### {job.name}\n\n" + format_validations(validations))
    return "\n\n".join(parts)


def run_config(path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run every job of the config, print the report, and write it to ``out_dir``."""
    experiment = load_experiment(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    results: dict[str, Any] = {"title": experiment.title, "collectives": [], "plans": []}
    if experiment.title:
        sections.append(f"# {experiment.title}")
    if experiment.hardware:
        specs = [load_preset(name) for name in experiment.hardware]
        sections.append("## Hardware\n\n" + format_hardware_list(specs))
    if experiment.collective:
        rows = []
        for job in experiment.collective:
            row = run_collective(job)
            results["collectives"].append(row)
            rows.append(
                [
                    job.label or f"{job.op} over {job.axes}",
                    format_bytes(row["bytes_sent_per_chip"]),
                    format_seconds(row["time_s"]),
                    row["bound"],
                    row["link"],
                ]
            )
        sections.append(
            "## Collectives\n\n" + table(rows, ["collective", "sent/chip", "time", "bound", "link"])
        )
    rankings = {}
    for plan_job in experiment.plan:
        ranking = run_plan(plan_job)
        rankings[plan_job.name] = ranking
        results["plans"].append({"name": plan_job.name, **ranking_dict(ranking)})
        sections.append(f"## Plan: {plan_job.name}\n\n" + format_ranking(ranking))
    to_validate = [
        (job, rankings[job.name].strategies[: job.validate])
        for job in experiment.plan
        if job.validate > 0
    ]
    if to_validate:
        sections.append(_validate(to_validate, results))
    if experiment.figures and rankings:
        from .plot import save_demo_figures  # noqa: PLC0415 (matplotlib only when drawing)

        figures = save_demo_figures(rankings, out)
        results["figures"] = [str(path) for path in figures]
        sections.append("## Figures\n\n" + "\n".join(f"- {path}" for path in figures))
    text = "\n\n".join(sections) + "\n"
    print(text)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results
