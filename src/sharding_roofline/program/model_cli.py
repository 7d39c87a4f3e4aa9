"""The ``model`` command: a whole model's training step under a strategy, or the search.

``sharding-roofline model --config configs/models/llama3-70b.toml --hardware tpu-v5p
--topology 16x16x8 --mesh x=16,y=16,z=8 [--num-slices 2] --batch-tokens 4194304
--seq-len 8192 [--strategy fsdp=x+y,sp=z | --search [--top N]] [--remat ...] [--json]
[--validate [--scan] [--execute] [--devices N]]``

Importing this module imports nothing heavy (the parser is built at start-up); the command
imports the planner when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import SpecError, fix_of

if TYPE_CHECKING:
    from ..mesh import DeviceMesh
    from .model import ModelPlan


def add_model_parser(sub: Any, mesh_args: Any) -> None:
    model = sub.add_parser(
        "model",
        help="a whole model's training step: strategy, step time, MFU, memory; or the search",
        description="Plan a model's training step (blocks, embedding, head, optimizer) on a mesh.",
    )
    mesh_args(model, mesh_required=False)
    model.add_argument("--config", required=True, help="configs/models/NAME.toml or a config.json")
    model.add_argument("--batch-tokens", type=int, required=True, help="tokens per step (global)")
    model.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's)")
    mode = model.add_mutually_exclusive_group()
    mode.add_argument(
        "--strategy",
        help="e.g. fsdp=x+y,tp=z or dp=slice,fsdp=x,tp=y,pp=z,mb=16 (axes of --mesh; "
        "without it, of the topology: x,y,z on a TPU slice, slice over DCN, node,gpu on GPUs)",
    )
    mode.add_argument("--search", action="store_true", help="search parallelism layouts")
    model.add_argument("--top", type=int, default=5, help="search results to show (default 5)")
    model.add_argument("--microbatches", type=int, help="gradient accumulation steps (default 1)")
    model.add_argument(
        "--schedule", choices=("gpipe", "1f1b", "interleaved"), help="pipeline schedule"
    )
    model.add_argument("--remat", help="none, full (recompute each block) or dots")
    model.add_argument(
        "--master-weights",
        choices=("float32", "none"),
        default="float32",
        help="AdamW's fp32 master copy (default) or none (the book's 10 bytes per parameter)",
    )
    model.add_argument(
        "--train-tokens",
        type=float,
        help="also print how many days training this many tokens takes",
    )
    model.add_argument("--no-idle-axes", action="store_true", help="no widening over idle axes")
    model.add_argument(
        "--calibrated",
        action="store_true",
        help="also print the calibrated step, tokens/s, MFU and memory (fitted to public "
        "measurements; presets without data say so) beside the roofline",
    )
    model.add_argument(
        "--validate",
        action="store_true",
        help="compile the plan's whole training step (embedding, blocks, head, loss, "
        "backward, AdamW) on JAX's simulated CPU devices and compare its collectives and "
        "FLOPs (and with --execute its numbers) with the plan; a small config only",
    )
    model.add_argument(
        "--scan",
        action="store_true",
        help="with --validate: run the blocks as a lax.scan over stacked layers (else unrolled)",
    )
    from ..xla.cli import add_validate_arguments  # noqa: PLC0415 (imports no JAX)

    add_validate_arguments(model)


def _training(args: argparse.Namespace, config: Any, strategy: Any) -> Any:
    from .autodiff import OptimizerSpec, Remat  # noqa: PLC0415
    from .model import Schedule, Training  # noqa: PLC0415

    seq = args.seq_len or config.seq_len
    if not seq:
        raise SpecError(f"model {config.name} has no seq_len; pass --seq-len")
    microbatches = args.microbatches or strategy.mb or 1
    schedule = Schedule.parse(args.schedule or strategy.schedule or "1f1b")
    remat = Remat.parse(args.remat or strategy.remat or "none")
    return Training(
        batch_tokens=args.batch_tokens,
        seq_len=seq,
        microbatches=microbatches,
        schedule=schedule,
        virtual_stages=strategy.vs or (2 if schedule is Schedule.INTERLEAVED else 1),
        remat=remat,
        optimizer=OptimizerSpec(master_dtype="" if args.master_weights == "none" else "float32"),
    )


def run_model(args: argparse.Namespace, mesh: DeviceMesh | None) -> tuple[dict[str, Any], str]:
    from ..plans import Rejected  # noqa: PLC0415
    from .config import load_model_config  # noqa: PLC0415
    from .model import plan_model  # noqa: PLC0415
    from .model_report import format_model_plans, model_dict  # noqa: PLC0415
    from .strategies import Strategy  # noqa: PLC0415

    config = load_model_config(args.config)
    from ..xla.cli import check_validate_arguments  # noqa: PLC0415 (imports no JAX)

    check_validate_arguments(args, also=[("--scan", args.scan)])
    if args.search:
        from ..presets import load_preset  # noqa: PLC0415
        from ..topology import Topology  # noqa: PLC0415
        from .model_search import search_model  # noqa: PLC0415

        if args.top < 1:
            raise SpecError(f"--top {args.top} must be at least 1")
        if args.topology:
            topology = Topology.build(
                load_preset(args.hardware), args.topology, num_slices=args.num_slices
            )
        elif mesh is not None:
            topology = mesh.topology
        else:
            raise SpecError("model --search needs --topology (e.g. 16x16x16, or 64x8 GPU nodes)")
        result = search_model(
            config,
            topology,
            batch_tokens=args.batch_tokens,
            seq_len=args.seq_len,
            top=args.top,
            master_weights=args.master_weights != "none",
            idle_axes=not args.no_idle_axes,
        )
        return model_dict(config, result.plans, args, search=result), format_model_plans(
            config, result.plans, args, search=result
        )
    if mesh is None:
        raise SpecError(
            "model --strategy needs --mesh (named axes, e.g. x=16,y=16,z=8) or --topology "
            "(whose dimensions are then the axes)"
        )
    if not args.strategy:
        raise SpecError("model needs --strategy (e.g. fsdp=x+y,sp=z) or --search (to find one)")
    strategy = Strategy.parse(args.strategy)
    plan = plan_model(
        config, mesh, strategy, _training(args, config, strategy), idle_axes=not args.no_idle_axes
    )
    if isinstance(plan, Rejected):
        message = f"strategy {strategy.name} cannot train {config.name}: {plan.reason}"
        raise SpecError(
            message,
            fix=fix_of(plan.reason)
            or "change the strategy's axes, --batch-tokens or --microbatches so that each "
            "split divides evenly, or run --search to see the layouts that do",
        )
    plans: list[ModelPlan] = [plan]
    data, text = model_dict(config, plans, args), format_model_plans(config, plans, args)
    if args.validate:
        from ..xla.cli import format_model_validation, run_validate_model  # noqa: PLC0415

        validation = run_validate_model(args, plan)
        data["validation"] = validation
        text += "\n\nvalidation against XLA of the training step:\n"
        text += format_model_validation(validation)
    return data, text
