"""The ``estimate-fn`` and ``estimate-hlo`` commands (shared/cli_contract.md).

Importing this module does not import JAX: ``estimate-hlo`` never needs it, and
``estimate-fn`` imports it in its handler, after fixing the simulated device count and
before importing the user's module (which may import JAX itself).

``--json`` errors are one object ``{"error", "fix"}`` on stdout, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sharding_roofline.dtypes import canonical_dtype
from sharding_roofline.errors import (
    SpecError,
    UnknownNameError,
    ValidationError,
)
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.sharding import ShardingSpec

__all__ = [
    "ESTIMATE_COMMANDS",
    "add_estimate_parsers",
    "parse_arg_specs",
    "parse_shardings",
    "run_estimate_command",
]

ESTIMATE_COMMANDS = ("estimate-fn", "estimate-hlo")

_ARG_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[\s*([0-9,\s]*)\]\s*$")


def add_estimate_parsers(sub: Any, mesh_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register both subcommands on the CLI's subparsers (``mesh_args`` adds --hardware,
    --topology, --num-slices, --mesh and --json)."""
    fn = sub.add_parser(
        "estimate-fn",
        help="estimate a jitted JAX function (MODULE:FUNCTION) on the target, from what XLA "
        "compiles for it",
    )
    fn.add_argument("function", metavar="MODULE:FUNCTION", help="e.g. mymodel:train_step")
    fn.add_argument(
        "--args",
        required=True,
        help="the positional arguments' types: 'bf16[8,1024],bf16[1024,4096]' (f32[] scalar)",
    )
    fn.add_argument(
        "--in-shardings",
        help="one PartitionSpec per argument, ';'-separated: 'x,None;None,y' (None or an "
        "empty entry: replicated; default all replicated)",
    )
    fn.add_argument(
        "--out-shardings",
        help="the output's PartitionSpec (';'-separated for a tuple); default: XLA chooses",
    )
    mesh_args(fn)
    _common(fn)

    hlo = sub.add_parser(
        "estimate-hlo", help="estimate a saved compiled HLO module (any XLA dump) on the target"
    )
    hlo.add_argument("file", metavar="FILE.txt", help="HLO text of one compiled module")
    mesh_args(hlo)
    hlo.add_argument(
        "--dtypes",
        choices=("auto", "cpu", "printed"),
        default="auto",
        help="auto (default): undo the CPU's bf16->f32 widening if the module was compiled "
        "for CPU; cpu: always; printed: cost the types as printed (TPU/GPU dumps)",
    )
    hlo.add_argument(
        "--logical-hlo",
        metavar="SPMD.txt",
        help="the same compile's module after spmd-partitioning (logical collective types)",
    )
    _common(hlo)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top", type=int, default=25, help="ops shown in the human table (default 25; 0: all)"
    )


# -- parsing ---------------------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_arg_specs(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``"bf16[8,1024],f32[]"`` -> ``[("bfloat16", (8, 1024)), ("float32", ())]``."""
    specs = []
    for k, part in enumerate(_split_top(text)):
        match = _ARG_RE.match(part)
        if match is None:
            raise SpecError(
                f"--args entry {k} {part!r} is not DTYPE[d1,d2,...]; write e.g. "
                "'bf16[8,1024],bf16[1024,4096]' (f32[] for a scalar)"
            )
        dtype = canonical_dtype(match.group(1))
        dims = tuple(int(d) for d in match.group(2).replace(" ", "").split(",") if d)
        if any(d < 1 for d in dims):
            raise SpecError(f"--args entry {k} {part!r}: every dimension must be >= 1")
        specs.append((dtype, dims))
    return specs


def parse_shardings(
    text: str | None, shapes: list[tuple[int, ...]] | None, mesh: DeviceMesh, what: str
) -> list[ShardingSpec]:
    """``"x,None;None,y"`` -> one ``ShardingSpec`` per array, checked against its shape."""
    if text is None:
        return [ShardingSpec.replicated(len(s)) for s in shapes or []]
    entries = [e.strip() for e in text.split(";")]
    if shapes is not None and len(entries) != len(shapes):
        raise SpecError(
            f"{what} {text!r} has {len(entries)} ';'-separated entries but there are "
            f"{len(shapes)} arguments; give one PartitionSpec per argument (None for "
            "replicated), e.g. 'x,None;None,y'"
        )
    axis_size = {a.name: a.size for a in mesh.axes}
    out = []
    for k, entry in enumerate(entries):
        shape = shapes[k] if shapes is not None else None
        spec = ShardingSpec.parse(
            None if entry in ("", "None") else entry, rank=len(shape) if shape else None
        )
        if shape is not None:
            spec.check(shape=shape, axis_size=axis_size, what=f"{what} entry {k}")
        out.append(spec)
    return out


def _import_function(target: str) -> Callable[..., Any]:
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name or not attr:
        raise SpecError(
            f"{target!r} is not MODULE:FUNCTION; write e.g. mymodel:train_step (a module "
            "importable from the current directory or PYTHONPATH)"
        )
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UnknownNameError(
            f"cannot import module {module_name!r} ({exc}); run from the directory that "
            "contains it, or add that directory to PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ValidationError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}. Fix the "
            "module so that it imports cleanly"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(
                n
                for n in dir(module)
                if callable(getattr(module, n, None)) and not n.startswith("_")
            )
            raise UnknownNameError(
                f"module {module_name!r} has no {attr!r}; its public callables are: "
                f"{', '.join(names[:20]) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{target!r} is a {type(obj).__name__}, not a function; name a function")
    return obj  # type: ignore[no-any-return]


# -- running ---------------------------------------------------------------------------------


def _mesh(args: argparse.Namespace) -> DeviceMesh:
    return DeviceMesh.create(
        load_preset(args.hardware), args.mesh, args.topology, num_slices=args.num_slices
    )


def run_estimate_command(args: argparse.Namespace) -> int:
    """Run ``estimate-fn`` / ``estimate-hlo`` (``cli.main`` reports our errors, as JSON
    ``{"error", "fix"}`` on stdout under ``--json``)."""
    estimate = _estimate_hlo(args) if args.command == "estimate-hlo" else _estimate_fn(args)
    from .hlo_cost import format_program  # noqa: PLC0415 (light, but only when printing)

    if args.json:
        data = estimate.as_dict()
        if args.command == "estimate-fn":
            data["function"] = args.function
            data["args"] = args.args
            data["in_shardings"] = args.in_shardings
            data["out_shardings"] = args.out_shardings
        print(json.dumps(data, indent=2))
    else:
        top = None if args.top == 0 else args.top
        print(f"{args.command} {estimate.source}\n" + format_program(estimate, top=top))
    return 0


def _estimate_hlo(args: argparse.Namespace) -> Any:
    from .hlo.walk import collective_hints_from  # noqa: PLC0415
    from .hlo_cost import estimate_hlo  # noqa: PLC0415

    mesh = _mesh(args)
    path = Path(args.file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(
            f"cannot read HLO file {str(path)!r} ({exc.strerror}); give the path of a text "
            "dump (compiled.as_text(), or an XLA --xla_dump_to *.txt file)"
        ) from None
    if "HloModule" not in text and "ENTRY" not in text:
        raise SpecError(
            f"{str(path)!r} does not look like HLO text (no HloModule or ENTRY line); give "
            "compiled.as_text() or an XLA dump's *.txt file"
        )
    hints = None
    if args.logical_hlo:
        try:
            hints = collective_hints_from(Path(args.logical_hlo).read_text())
        except OSError as exc:
            raise SpecError(
                f"cannot read --logical-hlo {args.logical_hlo!r} ({exc.strerror}); give the "
                "module dumped after spmd-partitioning"
            ) from None
    cpu = {"auto": None, "cpu": True, "printed": False}[args.dtypes]
    return estimate_hlo(text, mesh, cpu_upcast=cpu, collective_hints=hints, source=str(path))


def _estimate_fn(args: argparse.Namespace) -> Any:
    mesh = _mesh(args)
    specs = parse_arg_specs(args.args)
    shapes = [shape for _, shape in specs]
    ins = parse_shardings(args.in_shardings, shapes, mesh, "--in-shardings")
    outs = (
        parse_shardings(args.out_shardings, None, mesh, "--out-shardings")
        if (args.out_shardings)
        else None
    )
    from .devices import ensure_devices  # noqa: PLC0415 (imports JAX, starts nothing)

    ensure_devices(mesh.num_devices)  # before the user's module can start JAX
    fn = _import_function(args.function)
    import jax  # noqa: PLC0415

    from .estimate_fn import estimate_jitted  # noqa: PLC0415

    sds: Any = jax.ShapeDtypeStruct
    shaped = [sds(shape, dtype) for dtype, shape in specs]
    out_shardings: Any = None
    if outs is not None:
        out_shardings = outs[0].text() if len(outs) == 1 else tuple(s.text() for s in outs)
    return estimate_jitted(
        fn,
        *shaped,
        mesh=mesh,
        in_shardings=tuple(s.text() for s in ins),
        out_shardings=out_shardings,
    )
