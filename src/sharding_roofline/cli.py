"""The ``sharding-roofline`` command line. ``--json`` output is the stable interface
(``shared/cli_contract.md``); human output may evolve. Our errors print one line on stderr
and exit 1; usage errors exit 2; neither prints a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .collectives import Collective, collective_cost, parse_collective
from .einsum import Einsum
from .errors import ShardingRooflineError, SpecError
from .estimate import Overlap
from .files import FIGURE_FORMATS, check_output_path
from .mesh import DeviceMesh
from .planner import Planner
from .plans import Plan
from .presets import list_presets, load_preset
from .program.cli import add_layer_parser
from .program.model_cli import add_model_parser
from .program.serve_cli import add_serve_parser
from .report import (
    alternatives_dict,
    collective_dict,
    format_alternatives,
    format_collective,
    format_hardware,
    format_hardware_list,
    format_plan,
    format_ranking,
    hardware_dict,
    mesh_dict,
    plan_dict,
    ranking_dict,
)
from .sharding import ShardingSpec, parse_array_shape, subscript, unreduced_suffix
from .xla.cli import add_validate_arguments
from .xla.estimate_cli import ESTIMATE_COMMANDS, add_estimate_parsers

_LETTERS = "ijklmnopqrstuvwxyz"


def _mesh_args(parser: argparse.ArgumentParser, *, mesh_required: bool = True) -> None:
    parser.add_argument(
        "--hardware", required=True, help="a preset (see 'hardware list') or a .toml path"
    )
    parser.add_argument(
        "--topology", help="TPU slice (4x4x8) or GPU NODESxGPUS (32x8); default: the mesh shape"
    )
    parser.add_argument(
        "--num-slices", type=int, default=1, help="TPU slices joined over DCN (default 1)"
    )
    parser.add_argument(
        "--mesh", required=mesh_required, help="named axes, major to minor: x=4,y=4"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _einsum_args(parser: argparse.ArgumentParser, *, required_specs: bool) -> None:
    _mesh_args(parser)
    parser.add_argument(
        "--einsum",
        required=True,
        help="two-operand equation, quoted: --einsum 'bd,df->bf' (unquoted, the shell reads "
        "> as a redirect)",
    )
    parser.add_argument(
        "--dims", required=True, help="global size of every letter: b=8192,d=8192,f=32768"
    )
    parser.add_argument("--dtype", default="bfloat16", help="operand dtype (default bfloat16)")
    parser.add_argument(
        "--accum-dtype", help="dtype of the result and its reductions (default: --dtype)"
    )
    for role in ("lhs", "rhs", "out"):
        parser.add_argument(
            f"--{role}",
            required=required_specs,
            help=f"PartitionSpec of the {role} (e.g. x,None; x+y for two axes; None replicated)",
        )
    parser.add_argument(
        "--overlap",
        choices=[o.value for o in Overlap],
        default=Overlap.FULL.value,
        help="how compute and communication combine: full (max, default) or none (sum)",
    )
    parser.add_argument(
        "--crossover-dim", help="letter whose crossover size to report (default: the batch)"
    )
    parser.add_argument(
        "--at-op",
        metavar="LETTER=AXES,...",
        help="pin letters' layouts at the op (the strategy itself), e.g. b=x,d=None,f=y",
    )
    parser.add_argument(
        "--no-idle-axes",
        action="store_true",
        help="do not widen gathers over idle replicated axes (the book's one-axis comparisons)",
    )
    parser.add_argument(
        "--axes", metavar="A,B", help="the only mesh axes collectives may run over, e.g. x"
    )
    parser.add_argument(
        "--names",
        metavar="LHS,RHS,OUT",
        help="what to call the operands and the result in printed layouts (default lhs,rhs,out)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the strategy breakdown to this file (.png, .pdf or .svg)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --plot file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sharding-roofline",
        description="Plan and cost sharded einsums on TPU and GPU meshes (after the scaling book).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    hw = sub.add_parser("hardware", help="list or show hardware presets")
    hw_sub = hw.add_subparsers(dest="hardware_command", required=True, metavar="ACTION")
    hw_list = hw_sub.add_parser("list", help="the shipped presets")
    hw_list.add_argument("--json", action="store_true")
    hw_show = hw_sub.add_parser("show", help="one preset, with every number's source")
    hw_show.add_argument("name", help="a preset name or a .toml path")
    hw_show.add_argument("--json", action="store_true")

    coll = sub.add_parser("collective", help="the cost of one collective on one array")
    _mesh_args(coll)
    coll.add_argument("--op", required=True, help=", ".join(k.value for k in Collective))
    coll.add_argument("--axes", required=True, help="mesh axes the collective runs over: y or x,y")
    coll.add_argument("--shape", required=True, help="the array's global shape: 2048,8192")
    coll.add_argument(
        "--spec", default="", help="its PartitionSpec before the collective (default replicated)"
    )
    coll.add_argument("--dtype", default="bfloat16")
    coll.add_argument(
        "--dim",
        type=int,
        help="array dimension to scatter onto (reduce-scatter) or move the axes to (all-to-all)",
    )

    est = sub.add_parser("estimate", help="cost one sharding strategy")
    _einsum_args(est, required_specs=True)

    pl = sub.add_parser("plan", help="rank every strategy (fix any of --lhs/--rhs/--out)")
    _einsum_args(pl, required_specs=False)
    pl.add_argument("--top", type=int, default=10, help="how many strategies to show (default 10)")
    pl.add_argument("--explain", action="store_true", help="also list rejected candidates and why")
    pl.add_argument(
        "--no-memory-check", action="store_true", help="keep strategies that overflow HBM"
    )
    pl.add_argument(
        "--validate",
        action="store_true",
        help="also check the shown strategies against XLA on simulated devices",
    )
    add_validate_arguments(pl)

    val = sub.add_parser(
        "validate", help="check one strategy against what XLA compiles on simulated devices"
    )
    _einsum_args(val, required_specs=True)
    add_validate_arguments(val)

    cross = sub.add_parser(
        "crossover",
        help="when one strategy turns compute-bound: against HBM, communication, an axis size",
        description="For the best strategy with the given layouts (any left free, as plan): "
        "the size of a letter at which one chip's matmul turns compute-bound (HBM vs "
        "compute), the size at which communication equals compute, and the largest size "
        "of each mesh axis (a TP degree) before its collectives dominate.",
    )
    _einsum_args(cross, required_specs=False)
    cross.add_argument("--dim", help="the letter to scale (default: the batch, or --crossover-dim)")
    add_layer_parser(sub, _mesh_args)
    add_model_parser(sub, _mesh_args)
    add_serve_parser(sub, _mesh_args)
    add_estimate_parsers(sub, _mesh_args)

    run = sub.add_parser("run", help="run an experiment config (make run: configs/demo.toml)")
    run.add_argument("config", help="path of a .toml experiment config")
    run.add_argument("--out-dir", default="out", help="where to write the report and figures")
    run.add_argument("--force", action="store_true", help="replace files already in --out-dir")
    return parser


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """Usage errors are raised, so that ``--json`` can print them as JSON."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        if wants_json:
            print(json.dumps({"error": str(exc), "fix": f"see {exc.parser.prog} --help"}))
        else:
            exc.parser.print_usage(sys.stderr)
            print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except ShardingRooflineError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "fix": exc.fix}))
        else:
            print(f"sharding-roofline: error: {exc}", file=sys.stderr)
            if exc.fix and exc.fix not in str(exc):
                print(f"  fix: {exc.fix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sharding-roofline: interrupted (Ctrl-C); nothing more was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "hardware":
        return _hardware(args)
    if args.command == "collective":
        return _collective(args)
    if args.command in ("estimate", "plan", "validate"):
        return _plan(args)
    if args.command == "crossover":
        return _crossover(args)
    if args.command == "layer":
        from .program.cli import run_layer  # noqa: PLC0415

        data, text = run_layer(args, make_mesh(args))
        _emit(args, data, text)
        return 0
    if args.command == "model":
        from .program.model_cli import run_model  # noqa: PLC0415

        if args.strategy and not args.mesh and args.topology:
            from .topology import Topology, default_mesh_text  # noqa: PLC0415

            topo = Topology.build(
                load_preset(args.hardware), args.topology, num_slices=args.num_slices
            )
            args.mesh = default_mesh_text(topo)
        mesh = make_mesh(args) if args.mesh else None
        data, text = run_model(args, mesh)
        _emit(args, data, text)
        return 0
    if args.command == "serve":
        from .program.serve_cli import serve_command  # noqa: PLC0415

        if not args.mesh:
            if not args.topology:
                raise SpecError("serve needs --topology (e.g. 4x8) or --mesh (e.g. x=4,y=8)")
            from .topology import Topology, default_mesh_text  # noqa: PLC0415

            topo = Topology.build(
                load_preset(args.hardware), args.topology, num_slices=args.num_slices
            )
            args.mesh = default_mesh_text(topo)
        return serve_command(args, make_mesh(args), _emit)
    if args.command in ESTIMATE_COMMANDS:
        from .xla.estimate_cli import run_estimate_command  # noqa: PLC0415

        return run_estimate_command(args)
    if args.command == "run":
        from .experiments import run_config  # noqa: PLC0415 (only this command needs it)

        run_config(args.config, args.out_dir, force=args.force)
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _emit(
    args: argparse.Namespace,
    data: dict[str, Any] | Callable[[], dict[str, Any]],
    text: str | Callable[[], str],
) -> None:
    """Print the JSON object (``--json``) or the text; either may be given as a function,
    so that only the one printed is built."""
    if args.json:
        # one line: json's C encoder (an indent would take its pure-Python path, 5x slower
        # on a ranking of hundreds of plans); pipe into `python -m json.tool` or jq to read
        print(json_text(data() if callable(data) else data))
    else:
        print(text() if callable(text) else text)


def json_text(data: dict[str, Any]) -> str:
    """``data`` as JSON, refusing NaN and infinities (JSON has none: a parser would choke
    on the ``Infinity`` Python writes by default)."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        bad = _non_finite(data)
        raise ShardingRooflineError(
            f"the result holds a non-finite number ({bad}), which JSON cannot represent; "
            "check the hardware numbers (a rate or bandwidth near 0 or overflowing)"
        ) from None


def _non_finite(value: Any, where: str = "") -> str:
    """The path of the first NaN or infinity in ``value`` (``strategies[0].time_s.comm``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'value'} = {value}"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _non_finite(item, f"{where}[{index}]")
            if found:
                return found
    return ""


def _hardware(args: argparse.Namespace) -> int:
    if args.hardware_command == "list":
        specs = [load_preset(name) for name in list_presets()]
        _emit(args, {"presets": [hardware_dict(s) for s in specs]}, format_hardware_list(specs))
        return 0
    spec = load_preset(args.name)
    _emit(args, hardware_dict(spec), format_hardware(spec))
    return 0


def make_mesh(args: argparse.Namespace) -> DeviceMesh:
    return DeviceMesh.create(
        load_preset(args.hardware), args.mesh, args.topology, num_slices=args.num_slices
    )


def _collective(args: argparse.Namespace) -> int:
    mesh = make_mesh(args)
    kind = parse_collective(args.op)
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    if not axes:
        raise SpecError("--axes names no mesh axis; give one or more, e.g. --axes y or --axes x,y")
    ordered = mesh.ordered(axes)
    shape = parse_array_shape(args.shape)
    axis_size = {a.name: a.size for a in mesh.axes}
    spec = ShardingSpec.parse(args.spec or None, rank=len(shape))
    letters = _LETTERS[: len(shape)]
    spec.check(shape=shape, axis_size=axis_size, what="A", letters=letters)
    after, unreduced = _collective_after(
        kind, spec=spec, axes=ordered, shape=shape, axis_size=axis_size, dim=args.dim
    )
    elements = 1
    for size in spec.local_shape(shape, axis_size):
        elements *= size
    cost = collective_cost(mesh, kind, ordered, elements_in_per_chip=elements, dtype=args.dtype)
    before = spec.notation("A", letters) + unreduced_suffix(ordered if unreduced else ())
    notation = f"{kind.book_name}_{subscript(ordered)} {before} -> {after.notation('A', letters)}"
    data = {
        **collective_dict(cost, notation=notation),
        **mesh_dict(mesh),
        "shape": list(shape),
        "spec": spec.text(),
        "spec_after": after.text(),
    }
    links = "; ".join(mesh.describe_axis(axis) for axis in ordered)
    _emit(args, data, f"{mesh}\n" + format_collective(cost, notation, links))
    return 0


def _collective_after(
    kind: Collective,
    *,
    spec: ShardingSpec,
    axes: tuple[str, ...],
    shape: tuple[int, ...],
    axis_size: dict[str, int],
    dim: int | None,
) -> tuple[ShardingSpec, bool]:
    """The array's sharding after the collective, checking the request makes sense."""
    used = set(spec.axes)
    group = 1
    for a in axes:
        group *= axis_size[a]
    if kind in (Collective.ALL_GATHER, Collective.ALL_TO_ALL):
        missing = [a for a in axes if a not in used]
        if missing:
            raise SpecError(
                f"{kind.value} over {'+'.join(axes)} needs the array sharded over "
                f"{', '.join(missing)}, but --spec {spec.text()!r} does not use it; gathering or "
                "moving an axis the array is replicated over does nothing"
            )
    if kind in (Collective.REDUCE_SCATTER, Collective.ALL_REDUCE):
        clash = [a for a in axes if a in used]
        if clash:
            raise SpecError(
                f"{kind.value} over {'+'.join(axes)} reduces partial sums held across "
                f"{', '.join(clash)}, so --spec must not shard a dimension over it (got "
                f"{spec.text()!r}); give the layout of the unreduced array"
            )
    if kind is Collective.ALL_GATHER:
        return spec.without(axes), False
    if kind is Collective.ALL_REDUCE:
        return spec, True
    if kind is Collective.COLLECTIVE_PERMUTE:
        return spec, False
    local = spec.local_shape(shape, axis_size)
    source = next((i for i, d in enumerate(spec.dims) if set(axes) & set(d)), None)
    if dim is None:
        dim = next((i for i, n in enumerate(local) if n % group == 0 and i != source), None)
        if dim is None:
            raise SpecError(
                f"no dimension of {tuple(shape)} (local {local}) divides into {group} pieces for "
                f"{kind.value} over {'+'.join(axes)}; choose sizes divisible by {group}"
            )
    if not 0 <= dim < len(shape):
        raise SpecError(
            f"--dim {dim} is out of range for a rank-{len(shape)} array (0..{len(shape) - 1})"
        )
    if local[dim] % group:
        raise SpecError(
            f"--dim {dim} has local size {local[dim]}, which does not split into {group} pieces "
            f"for {kind.value} over {'+'.join(axes)}"
        )
    base = spec.without(axes) if kind is Collective.ALL_TO_ALL else spec
    return base.with_axes(dim, axes), kind is Collective.REDUCE_SCATTER


def make_einsum(args: argparse.Namespace) -> Einsum:
    return Einsum.create(
        args.einsum,
        args.dims,
        dtype=args.dtype,
        accum_dtype=args.accum_dtype,
        names=getattr(args, "names", None),
    )


def _choices(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy pins and limits that ``estimate``, ``plan`` and ``validate`` share."""
    return {
        "at_op": args.at_op,
        "idle_axes": not args.no_idle_axes,
        "axes": args.axes,
    }


def _crossover(args: argparse.Namespace) -> int:
    from .crossover import axis_limit, crossover, hbm_crossover  # noqa: PLC0415

    mesh = make_mesh(args)
    einsum = make_einsum(args)
    letter = (args.dim or args.crossover_dim or "").lower() or None
    if letter is not None:
        einsum.size(letter)
    planner = Planner(
        einsum,
        mesh,
        lhs=args.lhs,
        rhs=args.rhs,
        out=args.out,
        overlap=Overlap(args.overlap),
        check_memory=False,
        **_choices(args),
    )
    best = planner.search(top=1).best
    hbm = hbm_crossover(best, letter)
    comm = crossover(best, letter)
    axes = {axis: axis_limit(best, axis) for axis in mesh.axis_names if mesh.axis_size(axis) > 1}
    data = {
        "einsum": einsum.spec.equation,
        "dims": dict(einsum.dims),
        **mesh_dict(mesh),
        "strategy": best.strategy,
        "at_op": str(best.operation),
        "hbm": hbm.as_dict(),
        "comm": comm.as_dict(),
        "axis_limits": axes,
    }
    lines = [
        f"{einsum} on {mesh}",
        best.describe(),
        "",
        f"HBM vs compute: {hbm.note}",
        f"communication vs compute: {comm.note}",
    ]
    for axis, limit in axes.items():
        if limit is None:
            lines.append(f"axis {axis}: no collective runs over it (or it splits no letter)")
        else:
            now = mesh.axis_size(axis)
            state = "compute-bound" if now < limit else "communication-bound"
            lines.append(
                f"axis {axis} (size {now}): its collectives take as long as the matmul at a size "
                f"of {limit:.4g}; at {now} they are {state}"
            )
    _emit(args, data, "\n".join(lines))
    return 0


def _plan(args: argparse.Namespace) -> int:
    plot_path = None
    if args.plot:  # checked before any work, so a bad path costs nothing
        plot_path = check_output_path(args.plot, force=args.force, formats=FIGURE_FORMATS)
    mesh = make_mesh(args)
    einsum = make_einsum(args)
    overlap = Overlap(args.overlap)
    if args.crossover_dim:
        einsum.size(args.crossover_dim.lower())
    cross = args.crossover_dim.lower() if args.crossover_dim else None
    if args.command in ("estimate", "validate"):
        planner = Planner(
            einsum,
            mesh,
            lhs=args.lhs,
            rhs=args.rhs,
            out=args.out,
            overlap=overlap,
            check_memory=False,
            **_choices(args),
        )
        ranking = planner.estimate(alternatives=4)
        best = ranking.best
        plans = [best]
        if args.command == "validate":
            from .xla.cli import format_validation, run_validate  # noqa: PLC0415 (starts JAX)

            result = run_validate(args, best)
            _emit(
                args,
                result,
                format_plan(best, overlap=overlap) + "\n\n" + format_validation(result),
            )
            _plot(args, plot_path, plans, overlap)
            return 1 if result["verdict"] == "mismatch" else 0
        data = plan_dict(best, overlap=overlap, crossover_dim=cross)
        data["alternatives"] = alternatives_dict(ranking)
        text = format_plan(best, overlap=overlap, crossover_dim=cross)
        extra = format_alternatives(ranking)
        _emit(args, data, text + ("\n\n" + extra if extra else ""))
    else:
        planner = Planner(
            einsum,
            mesh,
            lhs=args.lhs,
            rhs=args.rhs,
            out=args.out,
            overlap=overlap,
            check_memory=not args.no_memory_check,
            **_choices(args),
        )
        ranking = planner.search(top=max(1, args.top), explain=args.explain)
        plans = list(ranking.strategies)
        if args.validate:
            from .xla.cli import format_validations, run_validate_many  # noqa: PLC0415

            results = run_validate_many(args, plans)
            _emit(
                args,
                lambda: {**ranking_dict(ranking, crossover_dim=cross), "validation": results},
                lambda: (
                    format_ranking(ranking, crossover_dim=cross)
                    + "\n\n"
                    + format_validations(results)
                ),
            )
            if any(r["verdict"] == "mismatch" for r in results):
                return 1
        else:
            _emit(
                args,
                lambda: ranking_dict(ranking, crossover_dim=cross),
                lambda: format_ranking(ranking, crossover_dim=cross),
            )
    _plot(args, plot_path, plans, overlap)
    return 0


def _plot(args: argparse.Namespace, path: Path | None, plans: list[Plan], overlap: Overlap) -> None:
    """Draw ``--plot`` (its path was checked before any work) and say where it went."""
    if path is None:
        return
    from .plot import save_breakdown  # noqa: PLC0415 (matplotlib only when plotting)

    written = save_breakdown(plans, path, overlap=overlap, force=args.force)
    print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
