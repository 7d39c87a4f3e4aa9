"""The ``layer`` command: plan one transformer layer, forward or forward and backward.

``sharding-roofline layer --layer block --dims d=8192,f=28672,n=64,k=8,h=128,t=8192
--batch-tokens 1048576 --hardware tpu-v5p --topology 16x16x16 --mesh x=16,y=16,z=16
[--strategy fsdp=x+y+z | --compare | --search] [--backward] [--remat ...] [--json]``

A layer can also be read from a TOML file (``--config configs/layers/NAME.toml``) holding
``layer``, ``dims``, ``batch_tokens`` and optionally ``dtype``, ``mlp``, ``activation``,
``causal_flops`` and ``source``; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, SpecError

if TYPE_CHECKING:  # the planning modules load when the command runs, not at start-up
    from ..mesh import DeviceMesh
    from .graph import Program
    from .layers import LayerSpec
    from .search import ProgramRanking

#: ``LayerKind``'s values (a test checks they agree), so building the parser imports nothing
LAYERS = ("mlp", "gated-mlp", "attention", "block")
OVERLAPS = ("full", "none")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerConfig:
    """A layer described in a TOML file (``configs/layers/*.toml``)."""

    layer: str
    dims: str
    batch_tokens: int = 0
    dtype: str = "bfloat16"
    mlp: str = "gated"
    activation: str = ""
    causal_flops: str = "full"
    attention: str = "materialized"
    source: str = ""


def load_layer_config(path: str) -> LayerConfig:
    from ..presets import build_dataclass  # noqa: PLC0415

    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"layer config {path!r} is not a file; give a .toml file like "
            "configs/layers/llama3-70b-block.toml"
        )
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file.name}: not valid TOML: {exc}") from None
    return build_dataclass(LayerConfig, data, filename=file.name, table="")


def add_layer_parser(sub: Any, mesh_args: Any) -> None:
    """Register ``layer`` on the CLI's subparsers (``mesh_args`` adds --hardware etc.)."""
    layer = sub.add_parser(
        "layer",
        help="plan one transformer layer (MLP, gated MLP, attention, block), forward or training",
        description="Rank sharding strategies for one transformer layer on a mesh.",
    )
    mesh_args(layer)
    layer.add_argument("--config", help="a layer TOML (configs/layers/...); flags override it")
    layer.add_argument("--layer", choices=LAYERS, help="which layer (default: block)")
    layer.add_argument(
        "--dims",
        help="hyperparameters: d (model), f (MLP), n (query heads), k (KV heads), h (head "
        "dim), t (sequence), e.g. d=8192,f=28672,n=64,k=8,h=128,t=8192",
    )
    layer.add_argument("--batch-tokens", type=int, help="tokens per step (global)")
    layer.add_argument("--dtype", help="parameter and activation dtype (default bfloat16)")
    layer.add_argument(
        "--attention",
        choices=("materialized", "flash"),
        help="materialized (scores through HBM, as plain JAX; default) or flash (a fused "
        "kernel: scores on chip, recomputed in the backward pass)",
    )
    mode = layer.add_mutually_exclusive_group()
    mode.add_argument("--strategy", help="one placement, e.g. fsdp=x+y+z or fsdp=x,sp=y")
    mode.add_argument(
        "--compare", action="store_true", help="the book's named strategies side by side (default)"
    )
    mode.add_argument(
        "--search", action="store_true", help="search every stage's layout; compare with the named"
    )
    layer.add_argument("--top", type=int, default=5, help="how many search results (default 5)")
    layer.add_argument(
        "--layers",
        type=int,
        default=1,
        help="a stack of this many identical layers: time and persistent memory scale, and "
        "whether it fits is judged for the stack (default 1)",
    )
    layer.add_argument(
        "--backward", action="store_true", help="forward and backward (training); default forward"
    )
    layer.add_argument(
        "--remat",
        default="none",
        help="with --backward: none (save activations), full (recompute the layer), dots "
        "(save matmul outputs)",
    )
    layer.add_argument(
        "--optimizer-step",
        action="store_true",
        help="with --backward: include the AdamW update (and ZeRO's gather of the new weights)",
    )
    layer.add_argument(
        "--zero", type=int, choices=(0, 1, 2), default=None, help="ZeRO stage of the dp axes"
    )
    layer.add_argument(
        "--master-weights",
        choices=("float32", "none"),
        default="float32",
        help="AdamW's master copy of the weights (default float32; none: the book's 10 B/param)",
    )
    layer.add_argument(
        "--no-idle-axes",
        action="store_true",
        help="do not widen gathers over idle replicated axes (the book's one-axis comparisons)",
    )
    layer.add_argument(
        "--overlap",
        choices=OVERLAPS,
        default="full",
        help="rank by full overlap (each pass's max, default) or none (sums)",
    )
    layer.add_argument("--details", action="store_true", help="also print the best plan op by op")
    layer.add_argument(
        "--validate",
        action="store_true",
        help="compile the best plan's program (forward, and backward with --backward) on JAX's "
        "simulated CPU devices and compare its collectives, FLOPs (and with --execute its "
        "numbers) with the plan",
    )
    from ..xla.cli import add_validate_arguments  # noqa: PLC0415 (imports no JAX)

    add_validate_arguments(layer)


def layer_spec(args: argparse.Namespace) -> LayerSpec:
    from ..einsum import parse_dims  # noqa: PLC0415
    from .layers import LayerSpec  # noqa: PLC0415

    config = load_layer_config(args.config) if args.config else None
    kind = args.layer or (config.layer if config else "block")
    dims_text = args.dims or (config.dims if config else None)
    if not dims_text:
        raise SpecError(
            "layer needs --dims (e.g. --dims d=8192,f=28672,n=64,k=8,h=128,t=8192) or --config"
        )
    tokens = args.batch_tokens or (config.batch_tokens if config else 0)
    if not tokens:
        raise SpecError("layer needs --batch-tokens (tokens per step, e.g. 1048576) or a config")
    if tokens < 1:
        raise SpecError(f"--batch-tokens {tokens} must be a positive number of tokens")
    options: dict[str, str] = {}
    if config:
        options = {
            "mlp": config.mlp,
            "activation": config.activation,
            "causal_flops": config.causal_flops,
            "attention": config.attention,
        }
    if args.attention:
        options["attention"] = args.attention
    return LayerSpec.from_dims(
        kind,
        parse_dims(dims_text),
        batch_tokens=tokens,
        dtype=args.dtype or (config.dtype if config else "bfloat16"),
        **options,
    )


def layer_program(args: argparse.Namespace) -> Program:
    from .autodiff import Remat, training  # noqa: PLC0415
    from .layers import build_layer  # noqa: PLC0415

    forward = build_layer(layer_spec(args))
    if not args.backward:
        if args.remat != "none" or args.optimizer_step:
            raise SpecError("--remat and --optimizer-step need --backward (a training step)")
        return forward
    return training(forward, remat=Remat.parse(args.remat), optimizer=args.optimizer_step)


def run_layer(args: argparse.Namespace, mesh: DeviceMesh) -> tuple[dict[str, Any], str]:
    """The ``layer`` command: its JSON object and its text."""
    from ..estimate import Overlap  # noqa: PLC0415
    from .autodiff import OptimizerSpec  # noqa: PLC0415
    from .report import format_ranking, ranking_dict  # noqa: PLC0415
    from .search import compare, search  # noqa: PLC0415
    from .strategies import Strategy, named_strategies  # noqa: PLC0415

    program = layer_program(args)
    optimizer = OptimizerSpec(master_dtype="" if args.master_weights == "none" else "float32")
    overlap = Overlap(args.overlap)
    idle = not args.no_idle_axes
    zero = args.zero or 0
    layers = args.layers
    if layers < 1:
        raise SpecError(f"--layers {layers} must be at least 1")
    ranking: ProgramRanking
    if args.search:
        if args.top < 1:
            raise SpecError(f"--top {args.top} must be at least 1")
        ranking = search(
            program, mesh, top=args.top, optimizer=optimizer, overlap=overlap, idle_axes=idle,
            zero=zero, layers=layers,
        )  # fmt: skip
        mode = "search"
    elif args.strategy:
        strategy = Strategy.parse(args.strategy)
        if args.zero is not None:
            strategy = Strategy(
                dp=strategy.dp, fsdp=strategy.fsdp, tp=strategy.tp, sp=strategy.sp,
                zero=args.zero, pins=strategy.pins,
            )  # fmt: skip
        ranking = compare(
            program, mesh, [strategy], optimizer=optimizer, overlap=overlap, idle_axes=idle,
            layers=layers,
        )  # fmt: skip
        if not ranking.strategies:
            raise SpecError(
                f"strategy {strategy.name} cannot run {program.name}: "
                + "; ".join(r.reason for r in ranking.rejected)
            )
        mode = "strategy"
    else:
        strategies = named_strategies(mesh)
        if args.zero is not None:
            strategies = [
                Strategy(dp=s.dp, fsdp=s.fsdp, tp=s.tp, sp=s.sp, zero=args.zero if s.dp else 0)
                for s in strategies
            ]
        ranking = compare(
            program, mesh, strategies, optimizer=optimizer, overlap=overlap, idle_axes=idle,
            layers=layers,
        )  # fmt: skip
        if not ranking.strategies:
            raise SpecError(
                f"no named strategy can run {program.name} on {mesh}: "
                + "; ".join(r.reason for r in ranking.rejected[:3])
            )
        mode = "compare"
    data = ranking_dict(ranking, mode=mode)
    text = format_ranking(ranking, mode=mode, details=args.details or mode == "strategy")
    if getattr(args, "validate", False):
        if layers != 1:
            raise SpecError(
                f"--validate compiles one layer; drop --layers {layers} (a stack of identical "
                "layers repeats the same collectives)"
            )
        from ..xla.cli import format_program_validation, run_validate_program  # noqa: PLC0415

        result = run_validate_program(args, ranking.best)
        data["validation"] = result
        text += "\n\nvalidation against XLA of the best plan:\n" + format_program_validation(result)
    return data, text
