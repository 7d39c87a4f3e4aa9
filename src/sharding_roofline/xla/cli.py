"""The validator's side of the command line: ``validate``, ``plan --validate``, ``layer
--validate``, ``model --validate`` and ``serve --validate``.

Importing this module does not import JAX (``add_validate_arguments`` is needed to build the
parser of every command); the functions that validate import it when called.
:func:`run_validate` sets the simulated device count before JAX starts, so nothing may run a
JAX operation in the process before it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from sharding_roofline.dtypes import dtype_bytes
from sharding_roofline.errors import SpecError, ValidationError
from sharding_roofline.limits import MAX_SIMULATED_DEVICES
from sharding_roofline.plans import Plan
from sharding_roofline.program.evaluate import ProgramPlan
from sharding_roofline.report import table
from sharding_roofline.units import format_bytes, format_count, format_seconds

if TYPE_CHECKING:  # the validator imports JAX: only when a function needs it
    from sharding_roofline.program.model import ModelPlan
    from sharding_roofline.program.serve_plan import ServePlan

    from .compare import Validation
    from .program_compare import ProgramValidation

__all__ = [
    "EXECUTE_BUDGET_BYTES",
    "Progress",
    "add_validate_arguments",
    "check_execute_memory",
    "check_program_execute_memory",
    "check_validate_arguments",
    "execute_bytes",
    "format_model_validation",
    "format_program_validation",
    "format_serve_validation",
    "format_validation",
    "format_validations",
    "program_execute_bytes",
    "run_validate",
    "run_validate_many",
    "run_validate_model",
    "run_validate_program",
    "run_validate_serve",
    "serve_execute_bytes",
    "validate_many",
]


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--devices N`` and ``--execute`` (for ``validate`` and ``plan --validate``)."""
    group = parser.add_argument_group("validation on JAX's simulated CPU devices")
    group.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="simulated CPU devices to start JAX with (default: the mesh's device count; "
        "must be at least that)",
    )
    group.add_argument(
        "--processes",
        type=int,
        metavar="P",
        help="spread the mesh's devices over P local processes joined by jax.distributed "
        "(CPU collectives over gloo); validates collectives and numerics across them",
    )
    group.add_argument(
        "--execute",
        action="store_true",
        help="also run both programs on random data and compare with numpy (small shapes: "
        "execution takes seconds at hundreds of devices)",
    )


def check_validate_arguments(
    args: argparse.Namespace, *, also: Sequence[tuple[str, object]] = ()
) -> None:
    """Refuse what ``--validate`` cannot do before any work (``model`` and ``serve``): the
    validation flags (``--execute``, ``--devices``, ``--processes`` and ``also``'s, as
    ``(flag, value)``) without ``--validate``, and ``--validate`` without ``--strategy``."""
    if not getattr(args, "validate", False):
        flags = [
            ("--execute", getattr(args, "execute", False)),
            ("--devices", getattr(args, "devices", None) is not None),
            ("--processes", getattr(args, "processes", None) is not None),
            *also,
        ]
        given = [flag for flag, value in flags if value]
        if given:
            raise SpecError(
                f"{' and '.join(given)} say{'s' if len(given) == 1 else ''} how --validate "
                f"checks the plan; add --validate or drop {' and '.join(given)}"
            )
        return
    if not getattr(args, "strategy", None):
        raise SpecError(
            "--validate compiles one plan: pass --strategy (e.g. the search's best) instead "
            "of --search"
        )


def _start_devices(
    args: argparse.Namespace,
    plans: Sequence[Plan | ProgramPlan | ModelPlan],
    *,
    check_memory: bool = True,
) -> None:
    from .devices import ensure_devices  # noqa: PLC0415 (imports JAX)

    needed = max(plan.mesh.num_devices for plan in plans)
    asked = getattr(args, "devices", None)
    if asked is not None and not 1 <= asked <= MAX_SIMULATED_DEVICES:
        raise ValidationError(
            f"--devices {asked} is outside 1 to {MAX_SIMULATED_DEVICES}, the simulated CPU "
            f"devices the validator starts; pass --devices {needed} (the mesh's count) or leave "
            "it out"
        )
    if needed > MAX_SIMULATED_DEVICES:
        raise ValidationError(
            f"the mesh has {needed} devices, more than the {MAX_SIMULATED_DEVICES} simulated "
            "CPU devices the validator starts; validate a smaller mesh of the same shape"
        )
    if check_memory and getattr(args, "execute", False):
        for plan in plans:
            if isinstance(plan, ProgramPlan):
                check_program_execute_memory(plan)
            elif isinstance(plan, Plan):
                check_execute_memory(plan)
    if asked is not None and asked < needed:
        raise ValidationError(
            f"--devices {asked} is fewer than the {needed} devices of the mesh "
            f"({plans[0].mesh.spec_text}); pass --devices {needed} or more, or leave it out"
        )
    ensure_devices(asked if asked is not None else needed)


#: The most host memory ``--execute`` may use (simulated devices share the host's RAM).
EXECUTE_BUDGET_BYTES = 4 * 1024**3


def execute_bytes(plan: Plan) -> int:
    """An estimate of the host memory ``--execute`` needs for ``plan``: the global inputs in
    their dtype and as float64 (numpy's reference), the reference, its scale and each
    program's result as float64, and on the simulated devices every chip's local operands
    and result, three times over for the resharded copies."""
    einsum = plan.einsum
    elements = {role: math.prod(einsum.shape(role)) for role in ("lhs", "rhs", "out")}
    itemsize = dtype_bytes(einsum.dtype)
    host = (elements["lhs"] + elements["rhs"]) * (itemsize + 8) + elements["out"] * 8 * 4
    axis_size = {axis.name: axis.size for axis in plan.mesh.axes}
    local = sum(
        math.prod(spec.local_shape(einsum.shape(role), axis_size))
        for role, spec in (("lhs", plan.lhs), ("rhs", plan.rhs), ("out", plan.out))
    )
    devices = plan.mesh.num_devices * local * max(itemsize, dtype_bytes(einsum.accum_dtype)) * 3
    return int(host + devices)


def program_execute_bytes(plan: ProgramPlan) -> int:
    """An estimate of the host memory ``execute=True`` needs for a program plan: every
    tensor of the program in float32 three times (the reference, and the jit and shard_map
    programs across the simulated devices, resharded copies included, about the global
    size), and each result again as float64 for the comparison."""
    program = plan.program
    every = sum(program.elements(t.name) for t in program.tensors)
    results = sum(program.elements(name) for name in program.outputs)
    return int(every * 4 * 3 + results * 8 * 3)


def check_program_execute_memory(
    plan: ProgramPlan, budget_bytes: int = EXECUTE_BUDGET_BYTES
) -> None:
    """Refuse ``--execute`` of a program plan that would need more than ``budget_bytes``."""
    need = program_execute_bytes(plan)
    if need > budget_bytes:
        raise ValidationError(
            f"--execute on {plan.program.name} would need about {format_bytes(need)} of host "
            f"memory, more than the {format_bytes(budget_bytes)} it may use; drop --execute "
            "(compiling needs no data) or validate smaller sizes with the same strategy"
        )


def check_execute_memory(plan: Plan, budget_bytes: int = EXECUTE_BUDGET_BYTES) -> None:
    """Refuse ``--execute`` before running anything when it would need more than
    ``budget_bytes`` of host memory (an estimate: ``execute_bytes``)."""
    need = execute_bytes(plan)
    if need > budget_bytes:
        raise ValidationError(
            f"--execute on {plan.einsum} would need about {format_bytes(need)} of host memory, "
            f"more than the {format_bytes(budget_bytes)} it may use; drop --execute (compiling "
            "needs no data) or validate smaller sizes with the same shardings"
        )


def run_validate(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Validate one plan as the CLI asked (``--devices``, ``--execute``); the JSON object."""
    if (getattr(args, "processes", None) or 1) > 1:
        from .multiprocess import validate_multiprocess  # noqa: PLC0415 (starts no JAX here)

        return validate_multiprocess(
            plan,
            processes=args.processes,
            execute=True,
            hardware=args.hardware,
            topology=args.topology,
            num_slices=args.num_slices,
        )
    _start_devices(args, [plan])
    from .compare import validate_plan  # noqa: PLC0415 (imports JAX)

    execute = bool(getattr(args, "execute", False))
    return validate_plan(plan, execute=execute, unguided=True).as_dict()


def run_validate_program(args: argparse.Namespace, plan: ProgramPlan) -> dict[str, Any]:
    """Validate one program plan (``layer --validate``: ``--devices``, ``--execute``); its
    JSON object (:meth:`ProgramValidation.as_dict`). Call it before anything in the process
    runs a JAX operation (it sets the simulated device count)."""
    _start_devices(args, [plan])
    from .program_compare import validate_program  # noqa: PLC0415 (imports JAX)

    return validate_program(plan, execute=bool(getattr(args, "execute", False))).as_dict()


def run_validate_model(args: argparse.Namespace, plan: ModelPlan) -> dict[str, Any]:
    """Validate a whole model's training step (``model --validate``: ``--devices``,
    ``--execute``, ``--scan``): :func:`~.model_validate.validate_model`'s JSON object, or
    :func:`~.model_pipeline.validate_pipeline`'s (``"pipeline": true``) for a pipelined plan.
    Call it before anything in the process runs a JAX operation."""
    if getattr(args, "processes", None):
        raise ValidationError(
            f"--processes {args.processes}: whole models validate in one process; drop "
            "--processes (validate a layer across processes with layer --validate)"
        )
    _start_devices(args, [plan], check_memory=False)
    execute = bool(getattr(args, "execute", False))
    if plan.pipeline is not None:
        from .model_pipeline import validate_pipeline  # noqa: PLC0415 (imports JAX)

        return {"pipeline": True, **validate_pipeline(plan, execute=execute).as_dict()}
    from .model_validate import validate_model  # noqa: PLC0415 (imports JAX)

    scan = bool(getattr(args, "scan", False))
    return {"pipeline": False, **validate_model(plan, scan=scan, execute=execute).as_dict()}


def serve_execute_bytes(plan: ServePlan) -> int:
    """An estimate of the host memory ``serve --validate --execute`` needs: its largest part's
    (the parts run one after another, :func:`program_execute_bytes`), and for a dense decode
    block the numpy reference's inputs in float32 and float64 on top."""
    need = 0
    for name, layer, _ in plan._one:
        part = program_execute_bytes(layer)
        if name == "block" and plan.serving.is_decode:
            program = layer.program
            given = (*program.inputs, *program.params)
            part += sum(program.elements(t.name) for t in given) * (4 + 8)
        need = max(need, part)
    return need


def run_validate_serve(args: argparse.Namespace, plan: ServePlan) -> dict[str, Any]:
    """Validate a serving step (``serve --validate``: ``--devices``, ``--execute``): one
    layer of each part, :meth:`~.serving.ServeValidation.as_dict`. Call it before anything
    in the process runs a JAX operation (it sets the simulated device count)."""
    if getattr(args, "processes", None):
        raise ValidationError(
            f"--processes {args.processes}: serving steps validate in one process; drop "
            "--processes (validate a layer across processes with layer --validate)"
        )
    execute = bool(getattr(args, "execute", False))
    if execute:
        need = serve_execute_bytes(plan)
        if need > EXECUTE_BUDGET_BYTES:
            raise ValidationError(
                f"--execute on the {plan.serving.phase.value} step of "
                f"{plan.config.name if plan.config else 'the program'} (batch "
                f"{plan.serving.batch}, context {plan.serving.context}) would need about "
                f"{format_bytes(need)} of host memory, more than the "
                f"{format_bytes(EXECUTE_BUDGET_BYTES)} the simulated devices may use; drop "
                "--execute (compiling needs no data) or validate a smaller --batch, --context "
                "or config (e.g. configs/models/tiny-dense.toml) with the same strategy"
            )
    parts = [layer for _, layer, _ in plan._one]
    _start_devices(args, parts, check_memory=False)
    import jax  # noqa: PLC0415

    from .serving import validate_serving  # noqa: PLC0415 (imports JAX)

    try:
        return validate_serving(plan, execute=execute).as_dict()
    except jax.errors.JaxRuntimeError as exc:  # e.g. the host out of memory
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ValidationError(
            f"XLA could not compile or run the {plan.serving.phase.value} step on "
            f"{plan.mesh.num_devices} simulated CPU devices: {first}; drop --execute or "
            "validate a smaller --batch, --context or config with the same strategy"
        ) from None


def run_validate_many(
    args: argparse.Namespace, plans: Sequence[Plan], *, progress: bool = True
) -> list[dict[str, Any]]:
    """Validate several plans (``plan --validate``); one JSON object each, in order."""
    if not plans:
        return []
    _start_devices(args, plans)
    execute = bool(getattr(args, "execute", False))
    return [v.as_dict() for v in validate_many(plans, execute=execute, progress=progress)]


# -- sweeps --------------------------------------------------------------------------------


class Progress:
    """A plain progress bar on stderr that appears only once a sweep has run ``after_s``
    seconds. On a terminal it redraws one line; elsewhere (CI logs) it prints a line at most
    every ``every_s`` seconds."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "validating",
        stream: TextIO | None = None,
        after_s: float = 2.0,
        every_s: float = 10.0,
        width: int = 30,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.after_s = after_s
        self.every_s = every_s
        self.width = width
        self.start = time.perf_counter()
        self.last_line = -1.0
        self.shown = False
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, done: int, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        eta = elapsed / done * (self.total - done) if done else 0.0
        tail = f" {note}" if note else ""
        return (
            f"{self.label} [{bar}] {done}/{self.total} {elapsed:.0f}s elapsed, "
            f"~{eta:.0f}s left{tail}"
        )

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if now - self.start < self.after_s:
            return
        if self.tty:
            self.stream.write("\r" + self.line(done, note))
        elif now - self.last_line >= self.every_s or done == self.total:
            self.stream.write(self.line(done, note) + "\n")
            self.last_line = now
        else:
            return
        self.shown = True
        self.stream.flush()

    def close(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def validate_many(
    plans: Iterable[Plan],
    execute: bool = False,
    progress: bool = True,
    *,
    prove: bool = True,
    stream: TextIO | None = None,
    unguided: bool = False,
) -> list[Validation]:
    """Validate plans, results in order (compiled programs are cached, so repeats are free).
    ``unguided`` also judges each against XLA's unguided program (one compile per request).

    With ``progress``, a bar appears on stderr (or ``stream``) once the sweep passes 2 s.
    (Compiling in two processes was only 1.2x faster on 2 cores, so there is no pool.)
    """
    from .compare import agreement, validate_plan  # noqa: PLC0415 (imports JAX)

    items = list(plans)
    bar = Progress(len(items), stream=stream) if progress else None
    out: list[Validation] = []

    def advance(validation: Validation) -> None:
        out.append(validation)
        if bar is not None:
            counts = agreement(out)
            bar.update(len(out), " ".join(f"{k}={n}" for k, n in counts.items() if n))

    try:
        for plan in items:
            advance(validate_plan(plan, execute=execute, prove=prove, unguided=unguided))
    finally:
        if bar is not None:
            bar.close()
    return out


# -- text ----------------------------------------------------------------------------------


def _as_dict(v: Validation | dict[str, Any]) -> dict[str, Any]:
    return v if isinstance(v, dict) else v.as_dict()


def _time(value: float | None) -> str:
    return "?" if value is None else format_seconds(value)


def _collective_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        axes = "?" if r["axes"] is None else "+".join(r["axes"]) or "-"
        count = r.get("count", 1)
        rows.append(
            [
                r["kind"] + (f" x{count}" if count != 1 else ""),
                axes,
                r["operand"] or "?",
                r["dtype"],
                format_count(r["elements_in_per_chip"]),
                format_count(r["elements_out_per_chip"]),
                format_bytes(r["bytes_sent_per_chip"]),
                _time(r["time_s"]),
            ]
        )
    return rows


_HEADER = ["collective", "axes", "operand", "dtype", "in/chip", "out/chip", "sent/chip", "time"]

_MEANING = {
    "match": "XLA compiles the same collectives the plan predicts",
    "xla-differs": "XLA chose another valid algorithm; the plan's own program is exact",
    "mismatch": "the plan's own program disagrees with the plan (a planner bug)",
}


def _record_text(record: dict[str, Any]) -> str:
    axes = "+".join(record["axes"]) if record.get("axes") else "?"
    return f"{record['kind']}[{axes}]"


def format_validation(v: Validation | dict[str, Any]) -> str:
    """A validation (or its ``as_dict()``/``run_validate`` object) for people."""
    d = _as_dict(v)
    mesh = ",".join(f"{k}={n}" for k, n in d["mesh"].items())
    lines = [
        f"{d['strategy']}   ({d['einsum']} on {d['hardware']} {mesh})",
        f"verdict: {d['verdict']} ({_MEANING[d['verdict']]})",
    ]
    for reason in d["reasons"]:
        lines.append(f"  - {reason}")
    for title, key in (("predicted (the plan)", "predicted"), ("observed (XLA's jit)", "observed")):
        records = d[key]
        lines.append("")
        lines.append(f"{title}:")
        lines.append(
            "  none" if not records else _indent(table(_collective_rows(records), _HEADER))
        )
    sm = d.get("shard_map")
    if sm is not None and sm != d["predicted"] and d["verdict"] == "mismatch":
        proof = _indent(table(_collective_rows(sm), _HEADER))
        lines += ["", "the plan's shard_map program:", proof]
    lines.append("")
    lines.append(
        f"communication on {d['hardware']}: plan {_time(d['plan_time_s'])}, "
        f"XLA {_time(d['xla_time_s'])}"
    )
    u = d.get("unguided")
    if u is not None:
        lines.append(
            f"XLA unguided (stored and output layouts only): {u['verdict']}, its collectives "
            f"{_time(u['xla_time_s'])}"
            + (
                ""
                if u["verdict"] == "match"
                else " (" + (", ".join(_record_text(r) for r in u["observed"]) or "none") + ")"
            )
        )
    f = d["flops"]
    sm_flops = "not compiled" if f["shard_map"] is None else format_count(f["shard_map"])
    lines.append(
        f"matmul FLOPs per chip: plan {format_count(f['plan'])}, plan's program {sm_flops}, "
        f"XLA {format_count(f['jit'])}" + ("" if f["ok"] else "  <- differs")
    )
    n = d.get("numerics")
    if n is not None:
        lines.append(
            f"numerics: {'ok' if n['ok'] else 'WRONG'}: max abs error {n['max_abs_error']:.3g} "
            f"(relative {n['max_rel_error']:.3g}, tolerance {n['tolerance']:g}); output layout "
            f"{'ok' if n['out_sharding_ok'] else 'WRONG'}"
        )
    if d.get("processes"):
        per = d["processes"][0]["local_devices"]
        lines.append(
            f"ran across {len(d['processes'])} processes of {per} devices each "
            "(jax.distributed, CPU collectives over gloo)"
        )
    for warning in d["warnings"]:
        lines.append(f"XLA warning: {warning[:300]}")
    return "\n".join(lines)


def format_validations(validations: Sequence[Validation | dict[str, Any]]) -> str:
    """A table of several validations (``plan --validate``), then the agreement counts."""
    dicts = [_as_dict(v) for v in validations]
    rows = [
        [
            str(rank),
            d["verdict"],
            d["strategy"],
            _time(d["plan_time_s"]),
            _time(d["xla_time_s"]),
            "remat" if any("rematerialization" in w for w in d["warnings"]) else "",
        ]
        for rank, d in enumerate(dicts, start=1)
    ]
    header = ["#", "verdict", "strategy", "plan comm", "XLA comm", "XLA warnings"]
    counts: dict[str, int] = {}
    for d in dicts:
        counts[d["verdict"]] = counts.get(d["verdict"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return table(rows, header) + f"\n{len(dicts)} validated: {summary}"


def format_program_validation(v: ProgramValidation | dict[str, Any]) -> str:
    """A program validation (or its ``as_dict()``) for people: the verdict and why, the
    collectives op by op (plan and XLA side by side), communication time, matmul FLOPs per
    chip and, when executed, the numbers."""
    d = v if isinstance(v, dict) else v.as_dict()
    mesh = ",".join(f"{k}={n}" for k, n in d["mesh"].items())
    lines = [
        f"{d['strategy']}   ({d['program']} on {d['hardware']} {mesh}, {d['num_ops']} ops)",
        f"verdict: {d['verdict']} ({_MEANING[d['verdict']]})",
    ]
    lines += [f"  - {reason}" for reason in d["reasons"]]
    keys = ("op", "pass")
    lines += _per_op_lines(d, keys, "collectives per op (elements in->out per chip):", "program")
    lines += _totals_lines(d, own="plan's program", reference="jax.vjp unsharded")
    return "\n".join(lines)


def _per_op_lines(d: dict[str, Any], keys: Sequence[str], heading: str, xla: str) -> list[str]:
    """The plan's collectives and XLA's side by side, one row per ``keys`` (op and pass, or
    part, op and pass), "same" where they agree."""
    rows = [
        [
            *(row[key] or "?" for key in keys),
            ", ".join(row["predicted"]) or "-",
            "same" if row["agrees"] else ", ".join(row["observed"]) or "-",
        ]
        for row in d["per_op"]
    ]
    if not rows:
        return ["", "collectives: none (neither the plan nor XLA communicates)"]
    return ["", heading, _indent(table(rows, [*keys, "plan", f"XLA's jit {xla}"]))]


def _totals_lines(d: dict[str, Any], *, own: str, reference: str) -> list[str]:
    """Communication time on the hardware, matmul FLOPs per chip (the plan's, its own
    program's, XLA's), the numbers when executed, XLA's warnings."""
    f = d["flops"]
    own_flops = "not compiled" if f["shard_map"] is None else format_count(f["shard_map"])
    lines = [
        "",
        f"communication on {d['hardware']}: plan {_time(d['plan_time_s'])}, "
        f"XLA {_time(d['xla_time_s'])}",
        f"matmul FLOPs per chip: plan {format_count(f['plan'])}, {own} {own_flops}, "
        f"XLA {format_count(f['jit'])}"
        + ("" if f["ok"] else f"  <- the {own} differs")
        + ("" if f["jit_agrees"] else "  (XLA's differ)"),
    ]
    n = d.get("numerics")
    if n is not None:
        lines.append(
            f"numerics ({n['dtype']}, against {reference}): "
            f"{'ok' if n['ok'] else 'WRONG'}: max relative error {own} "
            f"{n['shard_map_max_rel_error']:.3g}, XLA's {n['jit_max_rel_error']:.3g} "
            f"(tolerance {n['tolerance']:g})"
        )
    lines += [f"XLA warning: {warning[:300]}" for warning in d["warnings"]]
    return lines


def format_model_validation(d: dict[str, Any]) -> str:
    """A model validation (:func:`run_validate_model`'s object) for people: the verdict and
    why, the collectives per part, op and pass (the plan's, each block's times its layers,
    and XLA's), FLOPs, whether XLA's step is its layers' programs composed, the numbers."""
    if d["pipeline"]:
        return _format_pipeline_validation(d)
    mesh = ",".join(f"{k}={n}" for k, n in d["mesh"].items())
    loop = "lax.scan over the layers" if d["scan"] else "unrolled"
    lines = [
        f"{d['strategy']}   ({d['model']}, {d['layers']} layers {loop}, on {d['hardware']} {mesh})",
        f"verdict: {d['verdict']} ({_MEANING[d['verdict']]})",
    ]
    lines += [f"  - {reason}" for reason in d["reasons"]]
    if d["composes"] is not None:
        lines.append(
            "XLA's step is its layers' own jit programs composed: "
            + ("yes (every difference is a layer's)" if d["composes"] else "NO")
        )
    heading = "collectives per op, whole step (elements in->out per chip, x count):"
    lines += _per_op_lines(d, ("part", "op", "pass"), heading, "step")
    lines += _totals_lines(d, own="plan's step", reference="the unsharded step")
    return "\n".join(lines)


def _format_pipeline_validation(d: dict[str, Any]) -> str:
    """A pipelined plan's validation: the stage sends against the plan's, the numbers."""
    lines = [
        f"{d['strategy']}   ({d['model']}, {d['stages']} stages, {d['microbatches']} "
        "microbatches; GPipe as a shard_map with ppermute between stages)",
        f"pipeline: {'ok' if d['ok'] else 'FAILED'}",
    ]
    lines += [f"  - {reason}" for reason in d["reasons"]]
    lines.append(
        f"stage sends per direction: XLA {d['forward_sends']} forward, {d['backward_sends']} "
        f"backward (m + P - 2 = {d['expected_sends_per_direction']}), "
        f"{format_count(d['plan_elements_per_send'])} elements per chip each (the plan's)"
    )
    lines.append(
        f"send time: plan {_time(d['plan_permute_s'])}, XLA's sends "
        f"{_time(d['observed_permute_s'])}"
    )
    if d["max_rel_error"] is not None:
        lines.append(
            f"numerics against the microbatched unsharded step: max relative error "
            f"{d['max_rel_error']:.3g} (tolerance {d['tolerance']:g})"
        )
    return "\n".join(lines)


def format_serve_validation(d: dict[str, Any]) -> str:
    """A serving step's validation (:func:`run_validate_serve`'s object) for people: the
    overall verdict, then each part's (one layer, :func:`format_program_validation`), the
    numpy decode reference and the notes."""
    mesh = ",".join(f"{k}={n}" for k, n in d["mesh"].items())
    lines = [
        f"{d['phase']} step of {d['model']}: {d['strategy']} on {d['hardware']} {mesh}, "
        f"batch {d['batch']}, context {d['context']}; one layer of each part",
        f"verdict: {d['verdict']} ({_MEANING[d['verdict']]})",
    ]
    for part in d["parts"]:
        layers = part["layers"]
        runs = "once per step" if layers == 1 else f"one layer of {layers} per step"
        lines.append("")
        lines.append(f"part {part['part']} ({runs}):")
        body = format_program_validation(part).splitlines()
        lines += [f"  {line}" if line else "" for line in body]
    if d["numpy_rel_error"] is not None:
        lines.append("")
        lines.append(
            "XLA's decode block against a decode step written in numpy: max relative error "
            f"{d['numpy_rel_error']:.3g}" + ("" if d["numerics_ok"] else "  <- WRONG")
        )
    if d["notes"]:
        lines.append("")
        lines += [f"note: {note}" for note in d["notes"]]
    return "\n".join(lines)


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
