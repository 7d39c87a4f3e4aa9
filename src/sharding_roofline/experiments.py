"""Experiment configs: a TOML file of hardware summaries, collectives and plans to run, and
the report they produce (``make run`` runs ``configs/demo.toml``).

The config is read as strictly as a hardware preset (a regular file of at most 1 MiB in
UTF-8): an unknown key names the file, the table and the valid keys, and every value is
checked as the CLI checks it (``top >= 1``, ``0 <= validate <= top``, an ``overlap`` the
estimator knows, a ``crossover_dim`` that is a letter of the einsum, shapes of whole numbers,
plan names whose figure files do not collide). Names and labels are printed with control
characters escaped. Every output path is checked before anything is computed, and files are
written atomically; an existing file is replaced only with ``force``.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .collectives import collective_cost, parse_collective
from .einsum import Einsum, EinsumSpec
from .errors import ConfigError, ShardingRooflineError
from .estimate import Overlap
from .files import (
    check_output_dir,
    check_output_path,
    read_config_text,
    slug,
    write_text_atomic,
)
from .mesh import DeviceMesh
from .planner import Planner
from .presets import build_dataclass, load_preset
from .report import collective_dict, format_hardware_list, format_ranking, ranking_dict, table
from .sharding import ShardingSpec, parse_array_shape
from .units import format_bytes, format_seconds

#: The most strategies a plan job may list (``top``).
MAX_TOP = 1000


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``), so a
    name from a config cannot move the cursor or clear the terminal when printed."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", printable(self.label))
        parse_collective(self.op)
        parse_array_shape(self.shape, what="shape")


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", printable(self.name))
        where = f"plan {self.name!r}"
        if not self.name.strip():
            raise ConfigError(f"{where}: name is empty; give each plan a name")
        if not 1 <= self.top <= MAX_TOP:
            raise ConfigError(
                f"{where}: top = {self.top}, but a plan lists 1 to {MAX_TOP} strategies; "
                "write e.g. top = 5"
            )
        if not 0 <= self.validate <= self.top:
            raise ConfigError(
                f"{where}: validate = {self.validate}, but it counts strategies of the top "
                f"{self.top} to check against XLA: 0 (none) to {self.top}"
            )
        overlaps = [o.value for o in Overlap]
        if self.overlap not in overlaps:
            raise ConfigError(
                f"{where}: overlap = {self.overlap!r} is not one of {', '.join(overlaps)} "
                "(full: compute and communication overlap; none: they add)"
            )
        spec = EinsumSpec.parse(self.einsum)
        if self.crossover_dim and self.crossover_dim.lower() not in spec.letters:
            raise ConfigError(
                f"{where}: crossover_dim = {self.crossover_dim!r} is not a letter of "
                f"{self.einsum!r}; use one of {', '.join(spec.letters)}"
            )


#: The commands a ``[[command]]`` job may run (they print a report and take ``--json``).
COMMANDS = ("plan", "estimate", "layer", "model", "crossover", "collective")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandJob:
    """One CLI command, as it is typed after ``sharding-roofline`` (``layer``, ``model``,
    ...): its report goes into the experiment's, its JSON into ``results.json``."""

    args: tuple[str, ...]
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", printable(self.label))
        if not self.args or self.args[0] not in COMMANDS:
            first = self.args[0] if self.args else "(nothing)"
            raise ConfigError(
                f"command {self.label or first!r}: args must start with one of "
                f"{', '.join(COMMANDS)}, got {first!r}; write e.g. "
                'args = ["model", "--config", "configs/models/llama3-8b.toml", ...]'
            )
        if "--json" in self.args or any(a in ("--plot", "--out-dir") for a in self.args):
            raise ConfigError(
                f"command {self.label or self.args[0]!r}: leave out --json, --plot and "
                "--out-dir (the experiment writes the report, results.json and figures)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Experiment:
    title: str = ""
    figures: bool = True
    #: also draw ``plot.chip_comparison`` (a fixed problem on four chips, not this config's)
    chip_comparison: bool = False
    hardware: tuple[str, ...] = ()
    collective: tuple[CollectiveJob, ...] = ()
    plan: tuple[PlanJob, ...] = ()
    command: tuple[CommandJob, ...] = ()


def load_experiment(path: str | Path) -> Experiment:
    file = Path(path)
    text = read_config_text(file, what="experiment config")
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{file.name}: not valid TOML: {exc}") from None
    experiment = build_dataclass(Experiment, data, filename=file.name, table="")
    object.__setattr__(experiment, "title", printable(experiment.title))
    slugs: dict[str, str] = {}
    for job in experiment.plan:
        slug = figure_slug(job.name)
        if slug in slugs:
            raise ConfigError(
                f"{file.name}: plans {slugs[slug]!r} and {job.name!r} would write the same "
                f"figure files ({slug}_*.png); give them names that differ in letters or digits"
            )
        slugs[slug] = job.name
    return experiment


def figure_slug(name: str) -> str:
    """The file-name stem of a plan's figures (``"TPU v5e 4x4" -> "tpu-v5e-4x4"``)."""
    return slug(name)


def _mesh(job: CollectiveJob | PlanJob) -> DeviceMesh:
    return DeviceMesh.create(
        load_preset(job.hardware), job.mesh, job.topology or None, num_slices=job.num_slices
    )


def run_collective(job: CollectiveJob) -> dict[str, Any]:
    mesh = _mesh(job)
    shape = parse_array_shape(job.shape, what="shape")
    spec = ShardingSpec.parse(job.spec or None, rank=len(shape))
    axis_size = {a.name: a.size for a in mesh.axes}
    spec.check(shape=shape, axis_size=axis_size, what="A")
    elements = 1
    for size in spec.local_shape(shape, axis_size):
        elements *= size
    axes = tuple(a.strip() for a in job.axes.split(",") if a.strip())
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


def run_command(job: CommandJob) -> tuple[str, Any]:
    """The command's text report and its JSON, as ``sharding-roofline ARGS [--json]``
    prints them; an error is raised as the command would report it."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from .cli import main  # noqa: PLC0415 (the CLI imports this module lazily too)

    outputs = []
    for extra in (("--json",), ()):  # JSON first: an error comes back as {error, fix}
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main([*job.args, *extra])
        outputs.append(buffer.getvalue())
        if code != 0:
            detail = outputs[-1].strip()
            if extra:
                detail = json.loads(detail).get("error", detail)
            raise ConfigError(
                f"command {job.label or job.args[0]!r} ({' '.join(job.args)}) failed: "
                f"{detail or 'see its message above'}"
            )
    return outputs[1].rstrip(), json.loads(outputs[0])


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


def _output_files(experiment: Experiment) -> list[str]:
    """Every file ``run_config`` may write for ``experiment`` (names only)."""
    files = ["report.md", "results.json"]
    if experiment.figures and experiment.plan:
        from .plot.demo import demo_figure_names  # noqa: PLC0415 (matplotlib when drawing)

        names = [job.name for job in experiment.plan]
        files += demo_figure_names(names, chips=experiment.chip_comparison)
    return files


def run_config(path: str | Path, out_dir: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Run every job of the config, print the report, and write it to ``out_dir``.

    Every output path is checked first (a file in place of ``out_dir``, an existing file
    without ``force``), so a bad path costs nothing; the directory is created only then."""
    experiment = load_experiment(path)
    out = check_output_dir(out_dir, force=force)
    if out.is_dir():
        for name in _output_files(experiment):
            check_output_path(out / name, force=force)
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
        cross = plan_job.crossover_dim.lower() or None
        results["plans"].append(
            {"name": plan_job.name, **ranking_dict(ranking, crossover_dim=cross)}
        )
        sections.append(
            f"## Plan: {plan_job.name}\n\n" + format_ranking(ranking, crossover_dim=cross)
        )
    if experiment.command:
        results["commands"] = []
    for command_job in experiment.command:
        text, data = run_command(command_job)
        title = command_job.label or command_job.args[0]
        results["commands"].append({"label": title, "args": list(command_job.args), **data})
        sections.append(
            f"## {title}\n\n    sharding-roofline {shlex.join(command_job.args)}\n\n{text}"
        )
    to_validate = [
        (job, rankings[job.name].strategies[: job.validate])
        for job in experiment.plan
        if job.validate > 0
    ]
    if to_validate:
        sections.append(_validate(to_validate, results))
    out.mkdir(exist_ok=True)
    if experiment.figures and rankings:
        from .plot import save_demo_figures  # noqa: PLC0415 (matplotlib only when drawing)

        figures = save_demo_figures(rankings, out, chips=experiment.chip_comparison, force=force)
        results["figures"] = [str(path) for path in figures]
        sections.append("## Figures\n\n" + "\n".join(f"- {path}" for path in figures))
    text = "\n\n".join(sections) + "\n"
    print(text)
    try:
        results_text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise ShardingRooflineError(
            "the results hold a non-finite number, which JSON cannot represent; check the "
            "hardware numbers of the config"
        ) from None
    write_text_atomic(check_output_path(out / "report.md", force=force), text)
    write_text_atomic(check_output_path(out / "results.json", force=force), results_text)
    print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results
