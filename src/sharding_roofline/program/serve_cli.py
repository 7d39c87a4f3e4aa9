"""The ``serve`` command: a model's prefill or decode step on a mesh, by strategy or search.

``sharding-roofline serve --config configs/models/llama3-70b.toml --hardware tpu-v5e
--topology 4x8 --batch 64 --context 8192 [--weights int8] [--kv int8] [--compute bfloat16]
[--prefill | --decode] [--strategy tp=x+y,kvb=y | --search [--top N]] [--prompt T]
[--prefill-topology 4x4 [--prefill-mesh x=4,y=4] [--decode-tokens 512]] [--json]
[--plot FILE [--force]] [--validate [--execute] [--devices N]]``

Without ``--mesh`` the topology's dimensions are the axes (``x=4,y=8``), as for ``model``.
Without ``--strategy`` the command searches. Importing this module imports nothing heavy;
the planner loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SpecError

if TYPE_CHECKING:
    from ..mesh import DeviceMesh


def add_serve_parser(sub: Any, mesh_args: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="inference: a model's decode (or prefill) step, KV cache, latency and throughput",
        description="Plan a model's serving step (prefill or decode with a KV cache) on a mesh: "
        "step time, time to first token, tokens/s per chip, memory, the largest batch that fits.",
    )
    mesh_args(serve, mesh_required=False)
    serve.add_argument("--config", required=True, help="configs/models/NAME.toml or a config.json")
    serve.add_argument("--batch", type=int, required=True, help="sequences per step")
    serve.add_argument(
        "--context",
        type=int,
        help="decode: KV cache positions each sequence attends to; prefill: prompt tokens "
        "(default: the config's seq_len)",
    )
    serve.add_argument(
        "--prompt", type=int, help="prompt tokens of the prefill behind the time to first token"
    )
    serve.add_argument("--weights", default="bfloat16", help="weight dtype (bf16, int8, fp8)")
    serve.add_argument("--kv", default="bfloat16", help="KV cache dtype (bf16, int8, fp8)")
    serve.add_argument(
        "--compute", default="bfloat16", help="activation and matmul dtype (default bfloat16)"
    )
    serve.add_argument(
        "--attention",
        choices=("flash", "materialized"),
        help="flash (scores on chip; default) or materialized (scores through HBM)",
    )
    phase = serve.add_mutually_exclusive_group()
    phase.add_argument("--prefill", action="store_true", help="plan the prefill step")
    phase.add_argument("--decode", action="store_true", help="plan the decode step (default)")
    mode = serve.add_mutually_exclusive_group()
    mode.add_argument(
        "--strategy",
        help="e.g. tp=x+y, tp=x+y,kvb=y (KV cache over the batch), tp=y,d=x (2D "
        "weight-stationary), dp=x,tp=y (replicas), tp=x+y,ep=x (experts)",
    )
    mode.add_argument("--search", action="store_true", help="compare every layout (default)")
    serve.add_argument("--top", type=int, default=5, help="search results to show (default 5)")
    serve.add_argument(
        "--overlap",
        choices=("full", "none"),
        default="full",
        help="compute, HBM and communication overlapped (full, default) or added (none)",
    )
    serve.add_argument(
        "--prefill-topology",
        help="a separate prefill pool (disaggregated serving): its slice, e.g. 4x4",
    )
    serve.add_argument("--prefill-mesh", help="the prefill pool's axes (default: its topology's)")
    serve.add_argument(
        "--decode-tokens",
        type=int,
        default=512,
        help="tokens generated per request, for the prefill:decode pool ratio (default 512)",
    )
    serve.add_argument(
        "--plot", metavar="FILE.png", help="also draw latency against throughput over the batch"
    )
    serve.add_argument("--force", action="store_true", help="replace an existing --plot file")
    serve.add_argument(
        "--validate",
        action="store_true",
        help="compile one layer of each part of the --strategy plan's step (the block, the "
        "embedding and head) on JAX's simulated CPU devices and compare its collectives and "
        "FLOPs (and with --execute its numbers, a dense decode block's also against numpy) "
        "with the plan",
    )
    from ..xla.cli import add_validate_arguments  # noqa: PLC0415 (imports no JAX)

    add_validate_arguments(serve)


def _pool(args: argparse.Namespace, mesh: DeviceMesh) -> DeviceMesh | None:
    from ..mesh import DeviceMesh  # noqa: PLC0415
    from ..topology import Topology, default_mesh_text  # noqa: PLC0415

    if not args.prefill_topology and not args.prefill_mesh:
        return None
    hardware = mesh.hardware
    axes = args.prefill_mesh
    if not axes:
        axes = default_mesh_text(Topology.build(hardware, args.prefill_topology))
    return DeviceMesh.create(hardware, axes, args.prefill_topology)


def run_serve(
    args: argparse.Namespace, mesh: DeviceMesh
) -> tuple[dict[str, Any], str, Path | None, Any]:
    """The command's JSON object, its text, where to plot (checked first) and the result."""
    from ..estimate import Overlap  # noqa: PLC0415
    from ..files import FIGURE_FORMATS, check_output_path  # noqa: PLC0415
    from ..xla.cli import check_validate_arguments  # noqa: PLC0415 (imports no JAX)
    from .config import load_model_config  # noqa: PLC0415
    from .serve_plan import serve  # noqa: PLC0415
    from .serve_report import format_serve, serve_dict  # noqa: PLC0415
    from .serving import ServePhase, Serving  # noqa: PLC0415

    check_validate_arguments(args)
    plot = None
    if args.plot:  # checked before any work, so a bad path costs nothing
        plot = check_output_path(args.plot, force=args.force, formats=FIGURE_FORMATS)
    config = load_model_config(args.config)
    context = args.context or config.seq_len
    if not context:
        raise SpecError(f"model {config.name} has no seq_len; pass --context (e.g. 8192)")
    if args.prompt is not None and args.prompt < 1:
        raise SpecError(f"--prompt {args.prompt} must be a positive number of tokens")
    serving = Serving(
        phase=ServePhase.PREFILL if args.prefill else ServePhase.DECODE,
        batch=args.batch,
        context=context,
        weights=args.weights,
        kv=args.kv,
        compute=args.compute,
        attention=args.attention or "flash",
    )
    pool = _pool(args, mesh)
    if pool is not None and args.prefill:
        raise SpecError(
            "--prefill-topology describes the prefill pool behind a decode plan; drop "
            "--prefill (the pool's prefill is planned with the decode step)"
        )
    result = serve(
        config,
        mesh,
        serving,
        strategy=args.strategy,
        top=args.top,
        prompt=args.prompt,
        prefill_mesh=pool,
        decode_tokens=args.decode_tokens,
        overlap=Overlap(args.overlap),
    )
    data, text = serve_dict(result), format_serve(result)
    if args.validate:
        from ..xla.cli import format_serve_validation, run_validate_serve  # noqa: PLC0415

        validation = run_validate_serve(args, result.best)
        if result.prefill is not None:  # the time to first token's: the search's best
            validation["notes"].append(
                f"the time to first token's prefill ({result.prefill.name}, found by search) "
                "is not validated here; validate it with --prefill --batch 1 --context "
                f"{result.prefill.serving.context} --strategy {result.prefill.name} --validate"
            )
        data["validation"] = validation
        text += f"\n\nvalidation against XLA of the {serving.phase.value} step:\n"
        text += format_serve_validation(validation)
    return data, text, plot, result


def save_serve_plot(result: Any, path: Path, *, force: bool) -> Path:
    from ..plot.serving import save_latency_throughput  # noqa: PLC0415 (matplotlib)
    from .serve_plan import latency_throughput  # noqa: PLC0415

    best = result.best
    curve = latency_throughput(best.config, best.mesh, best.strategy, best.serving)
    return save_latency_throughput(curve, path, force=force)


def serve_command(args: argparse.Namespace, mesh: DeviceMesh, emit: Any) -> int:
    data, text, plot, result = run_serve(args, mesh)
    emit(args, data, text)
    if plot is not None:
        written = save_serve_plot(result, plot, force=args.force)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 0
