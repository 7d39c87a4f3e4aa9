"""How often XLA compiles exactly the collectives the program planner predicts for a layer.

Validates program plans (a whole layer: MLP, gated MLP, GQA attention, the pre-norm block;
forward, or forward and backward) on simulated CPU devices: XLA's jit program of the layer
as plain JAX (``jax.vjp`` for the backward) with the plan's layouts pinned, against the plan
and against the plan's own shard_map program (``sharding_roofline.xla.program_compare``).

    python benchmarks/layer_agreement.py --random 300     # the seeded random sweep (make bench)
    python benchmarks/layer_agreement.py                  # the suite's sweep (tests/xla)
    python benchmarks/layer_agreement.py --write-report   # rewrite tests/data/xla_differs_programs.json

``--random N`` draws N forward+backward cases at random (seeded by ``--seed``): a layer kind
(attention materialized or, in 3 of 10, flash: scores kept on chip and recomputed in the
backward), its sizes, a mesh of 8 devices in one of five shapes, a named strategy (sometimes with random
``stage.letter=axes`` pins or a ZeRO stage), a remat policy, sometimes an AdamW update; every
``--execute-every``-th case also runs the reference and both programs on random data (float32)
and checks the numbers. It prints the share of each verdict, who is cheaper when XLA differs
(the plan's collectives or XLA's, timed on the plan's hardware), and why XLA differs
(:func:`classify`); the results go to benchmarks/results/layer_agreement.json.

The suite's sweep (``sweep`` in tests/data/xla_differs_programs.json) is every named strategy of
2x4 (TPU v5e) and 2x2x2 (TPU v5p) meshes, for the four layers, forward and forward+backward.
``--write-report`` records each case's verdict and, for xla-differs, what XLA lacks and adds
and the reason; ``tests/xla/test_xla_programs.py`` fails on any case that disagrees with it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sharding_roofline.xla.devices import ensure_devices

ensure_devices(8)  # before anything runs a JAX operation

from sharding_roofline.errors import ShardingRooflineError  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.program.autodiff import training  # noqa: E402
from sharding_roofline.program.evaluate import ProgramPlan, evaluate  # noqa: E402
from sharding_roofline.program.graph import Phase, Program  # noqa: E402
from sharding_roofline.program.layers import LayerKind, LayerSpec, build_layer  # noqa: E402
from sharding_roofline.program.strategies import Strategy, named_strategies, place  # noqa: E402
from sharding_roofline.xla.program_compare import (  # noqa: E402
    ProgramValidation,
    program_agreement,
    validate_program,
)

REPORT = Path(__file__).resolve().parents[1] / "tests" / "data" / "xla_differs_programs.json"
RESULTS = Path(__file__).resolve().parent / "results" / "layer_agreement.json"

#: Why XLA's program may differ from a valid plan (keys are what the report records).
REASONS: dict[str, str] = {
    "contributions-reduced-one-by-one": (
        "A tensor read by several matmuls (x by the gate and up projections, or by Q, K and "
        "V) gets one gradient contribution from each, each a partial sum over the axes that "
        "split the contracted letters. The plan adds the partial sums first and reduces once "
        "(evaluate.py's gradient accumulation, as frameworks do); XLA's CPU pipeline reduces "
        "every contribution on its own (one all-reduce or reduce-scatter each, combined into "
        "one tuple op), "
        "because it has no all-reduce reassociation pass (GPU and TPU pipelines rewrite "
        "all-reduce(a) + all-reduce(b) into all-reduce(a + b)). Plan cheaper."
    ),
    "all-reduce-instead-of-reduce-scatter": (
        "Where the plan reduce-scatters partial sums into a sequence-parallel layout, XLA "
        "all-reduces them and slices later: after the sum of a tensor's gradient "
        "contributions (the dynamic-slice then follows an add, not the all-reduce, so it is no "
        "reduce-scatter), or when the slice covers more mesh axes than the reduction (a "
        "tensor-parallel axis that splits no head letter). The CPU backend has no "
        "reduce-scatter op at all (jax_notes.md §3.5): an all-reduce reads as one only when "
        "its result is sliced to exactly 1/g. XLA's all-reduces move about twice the bytes."
    ),
    "reduction-order": (
        "A partial sum unreduced over two axes (a norm scale's gradient under FSDP and "
        "sequence parallelism: summed over the batch on one axis and the sequence on another) "
        "is reduced by the same collectives in the other order: the plan reduce-scatters first "
        "and all-reduces the smaller shard, XLA all-reduces the whole vector first. Same kinds "
        "and axes, other element counts."
    ),
    "one-all-reduce-per-contracted-letter": (
        "A matmul that contracts two letters split over different axes (the attention output "
        "projection's KV heads k and query groups g under tp over three axes) leaves partial "
        "sums over all of them. The plan reduces them with one all-reduce over the axes "
        "together; XLA's partitioner reduces each contracted dimension on its own, so two "
        "all-reduces of the full result (more bytes and one more latency)."
    ),
    "reduce-scatter-into-home": (
        "An input's gradient gets a contribution that is a partial sum (its matmul contracts a "
        "split letter: Q's query groups over a tp axis) and others that are not (K and V, "
        "whose fewer heads the axis does not split). The plan all-reduces the partial one into "
        "the others' layout, adds, and slices the sum into the input's sequence-parallel home; "
        "XLA reduce-scatters the partial one straight into the home and slices the others. "
        "XLA cheaper (a reduce-scatter instead of an all-reduce): a better plan for mixed "
        "partial and reduced contributions under sequence parallelism."
    ),
    "other-reshard": (
        "Between a tensor's home and its layout at an op (random stage.letter pins make "
        "these moves long: a letter moved between mesh axes, or onto a different letter), XLA "
        "takes another route than the plan's greedy resharding path: collective-permutes and "
        "all-to-alls over other axes instead of the plan's all-gathers and all-to-alls, the same "
        "kinds of collective on arrays of other sizes (gathering before a free slice rather "
        "than after it), or a partial sum reduced by another collective. Both reach the same "
        "layouts; each side's cost on the target hardware is in the validation."
    ),
}

_REDUCTIONS = {"all-reduce", "reduce-scatter"}
_MOVES = {"all-gather", "all-to-all", "collective-permute"}


def _tokens(difference: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``-all-reduce[y]@down/forward +...`` -> (lacks, adds) as (kind, axes) pairs."""
    lacks, adds = [], []
    for token in difference.split():
        kind, _, rest = token[1:].partition("[")
        axes = rest.split("]")[0]
        (lacks if token.startswith("-") else adds).append((kind, axes))
    return lacks, adds


def classify(v: ProgramValidation) -> str:
    """The reason an xla-differs verdict is expected ("unexplained" if no rule fits)."""
    lacks, adds = _tokens(v.kinds_difference)
    lacked = {k for k, _ in lacks}
    added = {k for k, _ in adds}
    if not lacks and not adds:  # the same collectives by kind and axes: other sizes
        differing = {k for k, _ in _tokens(v.difference)[0] + _tokens(v.difference)[1]}
        if differing <= _REDUCTIONS:
            return "reduction-order"
        return "other-reshard" if differing <= _MOVES | _REDUCTIONS else "unexplained"
    if (
        lacked == {"all-reduce"}
        and added == {"all-reduce"}
        and all(
            set(a.split("+")) == set().union(*(set(b.split("+")) for _, b in adds))
            for _, a in lacks
        )
    ):
        return "one-all-reduce-per-contracted-letter"
    lacks_all, adds_all = _tokens(v.difference)
    if (
        {k for k, _ in lacks_all} <= _REDUCTIONS
        and {k for k, _ in adds_all} <= _REDUCTIONS
        and len(adds) > len(lacks)
    ):
        return "contributions-reduced-one-by-one"
    if {k for k, _ in lacks_all} <= {"reduce-scatter", "all-reduce"} and (
        {k for k, _ in adds_all} <= {"all-reduce"}
    ):
        return "all-reduce-instead-of-reduce-scatter"
    if lacked == {"all-reduce"} and added == {"reduce-scatter"} and len(lacks) == len(adds):
        return "reduce-scatter-into-home"
    if lacked <= _REDUCTIONS and added <= _REDUCTIONS and v.xla_time_s is not None:
        if v.xla_time_s < v.plan_time_s:
            return "reduce-scatter-into-home"
        return "all-reduce-instead-of-reduce-scatter"
    if (lacked | added) <= _MOVES | _REDUCTIONS and (lacked | added) & _MOVES:
        return "other-reshard"
    return "unexplained"


# -- the suite's sweep ----------------------------------------------------------------------------

SUITE_MESHES: dict[str, tuple[str, str, str]] = {
    "2x4": ("tpu-v5e", "x=2,y=4", "2x4"),
    "2x2x2": ("tpu-v5p", "x=2,y=2,z=2", "2x2x2"),
}
#: small sizes: every letter divides over 8 devices where a strategy splits it
SUITE_SIZES: dict[str, int] = {"d": 64, "f": 128, "n": 8, "k": 4, "h": 8, "t": 16}
SUITE_TOKENS = 256
SUITE_MODES = ("forward", "train")


def suite_spec(kind: str) -> LayerSpec:
    return LayerSpec.from_dims(kind, SUITE_SIZES, batch_tokens=SUITE_TOKENS)


def suite_program(kind: str, mode: str) -> Program:
    forward = build_layer(suite_spec(kind))
    return forward if mode == "forward" else training(forward)


def suite_mesh(mesh_id: str) -> DeviceMesh:
    hardware, axes, topology = SUITE_MESHES[mesh_id]
    return DeviceMesh.create(load_preset(hardware), axes, topology)


def suite_cases() -> list[tuple[str, ProgramPlan]]:
    """``(case id, plan)`` for every case of the suite's sweep, in a stable order."""
    out = []
    for mesh_id in SUITE_MESHES:
        mesh = suite_mesh(mesh_id)
        for kind in (k.value for k in LayerKind):
            for mode in SUITE_MODES:
                program = suite_program(kind, mode)
                for strategy in named_strategies(mesh):
                    plan = evaluate(program, mesh, place(program, mesh, strategy))
                    out.append((f"{mesh_id}-{kind}-{mode}-{strategy.name}", plan))
    return out


def run_suite(write: bool) -> int:
    start = time.perf_counter()
    validations: dict[str, ProgramValidation] = {}
    for case_id, plan in suite_cases():
        t0 = time.perf_counter()
        v = validate_program(plan, prove=True)
        validations[case_id] = v
        note = "" if v.verdict.value == "match" else f"  {classify(v)}: {v.kinds_difference}"
        print(f"{case_id:<48} {v.verdict.value:<12} {time.perf_counter() - t0:5.1f}s{note}")
    elapsed = time.perf_counter() - start
    counts = program_agreement(list(validations.values()))
    total = len(validations)
    print(
        f"\n{total} cases in {elapsed:.0f}s: "
        + ", ".join(f"{k} {n} ({100 * n / total:.1f}%)" for k, n in counts.items())
    )
    unexplained = [
        cid
        for cid, v in validations.items()
        if v.verdict.value == "xla-differs" and classify(v) == "unexplained"
    ]
    for cid, v in validations.items():
        if v.verdict.value == "mismatch":
            print(f"MISMATCH {cid}: {'; '.join(v.reasons)}")
    for cid in unexplained:
        print(f"UNEXPLAINED {cid}: {validations[cid].difference}")
    if write:
        if unexplained or counts["mismatch"]:
            print("not writing the report: explain the cases above first", file=sys.stderr)
            return 1
        report = {
            "about": (
                "Program validation sweep of tests/xla/test_xla_programs.py: every named "
                "strategy of each mesh, for each layer, forward and forward+backward, validated "
                "against XLA (jax " + _jax_version() + ", simulated CPU devices). Every "
                "xla-differs case is listed with what XLA's jit program lacks and adds (per "
                "op) and why. Regenerate with: python benchmarks/layer_agreement.py "
                "--write-report"
            ),
            "jax": _jax_version(),
            "sweep": {
                "meshes": {k: list(v) for k, v in SUITE_MESHES.items()},
                "sizes": SUITE_SIZES,
                "batch_tokens": SUITE_TOKENS,
                "modes": list(SUITE_MODES),
            },
            "agreement": counts,
            "reasons": REASONS,
            "xla_differs": {
                cid: {"reason": classify(v), "difference": v.difference}
                for cid, v in validations.items()
                if v.verdict.value == "xla-differs"
            },
        }
        REPORT.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {REPORT}")
    return 1 if counts["mismatch"] else 0


# -- the random sweep -----------------------------------------------------------------------------

RANDOM_MESHES = [
    ("h100", "x=8", "1x8"),
    ("tpu-v5e", "x=2,y=4", "2x4"),
    ("tpu-v5e", "x=4,y=2", "4x2"),
    ("tpu-v5p", "x=2,y=2,z=2", "2x2x2"),
    ("h100", "x=2,y=4", "1x8"),
]
HEADS = [(4, 2), (4, 4), (8, 2), (8, 4), (8, 8), (16, 4)]


def _random_spec(rng: random.Random) -> LayerSpec:
    kind = rng.choice(list(LayerKind))
    d = rng.choice([32, 64, 128])
    f = rng.choice([64, 128, 256])
    n, k = rng.choice(HEADS)
    h = rng.choice([8, 16])
    attention = kind in (LayerKind.ATTENTION, LayerKind.BLOCK)
    t = rng.choice([8, 16, 32]) if attention or rng.random() < 0.7 else 0
    sequences = rng.choice([8, 16, 32])
    tokens = sequences * t if t else rng.choice([64, 128, 256, 512])
    return LayerSpec(
        kind=kind,
        d=d,
        f=f if kind is not LayerKind.ATTENTION else 0,
        n=n if attention else 0,
        k=k if attention else 0,
        h=h if attention else 0,
        t=t,
        batch_tokens=tokens,
        mlp=rng.choice(["gated", "plain"]) if kind is LayerKind.BLOCK else "gated",
        attention="flash" if attention and rng.random() < 0.3 else "materialized",
    )


def _random_strategy(rng: random.Random, program: Program, mesh: DeviceMesh) -> str:
    base = rng.choice(named_strategies(mesh))
    parts = [base.name] if base.name != "replicated" else []
    if base.dp and rng.random() < 0.2:
        parts.append(f"zero={rng.choice([1, 2])}")
    if rng.random() < 0.35:
        axes = [a.name for a in mesh.axes if a.size > 1]
        for _ in range(rng.choice([1, 2])):
            stage = rng.choice([s for s, kind in program.stages if kind != "optimizer"])
            letters = sorted(
                {
                    c
                    for op in program.ops
                    if op.stage == stage and op.phase is Phase.FORWARD
                    for c in op.letters
                }
            )
            letter = rng.choice(letters)
            chosen = [a for a in axes if rng.random() < 0.4] or ["-"]
            parts.append(f"{stage}.{letter}={'+'.join(chosen)}")
    return ",".join(parts)


def random_cases(count: int, seed: int) -> list[tuple[str, ProgramPlan, dict[str, Any]]]:
    """``count`` random forward+backward plans (invalid draws are drawn again)."""
    rng = random.Random(seed)
    out: list[tuple[str, ProgramPlan, dict[str, Any]]] = []
    while len(out) < count:
        spec = _random_spec(rng)
        hardware, axes, topology = rng.choice(RANDOM_MESHES)
        mesh = DeviceMesh.create(load_preset(hardware), axes, topology)
        remat = rng.choices(["none", "full", "dots"], weights=[6, 2, 2])[0]
        optimizer = rng.random() < 0.1
        try:
            program = training(build_layer(spec), remat=remat, optimizer=optimizer)
            strategy = _random_strategy(rng, program, mesh)
            plan = evaluate(program, mesh, place(program, mesh, Strategy.parse(strategy)))
        except ShardingRooflineError:
            continue
        sizes = dict(program.dims)
        layer = spec.kind.value + ("" if spec.kind is not LayerKind.BLOCK else f"/{spec.mlp}")
        info = {
            "layer": layer + ("/flash" if spec.attention == "flash" else ""),
            "dims": sizes,
            "hardware": hardware,
            "mesh": axes,
            "strategy": strategy,
            "remat": remat,
            "optimizer": optimizer,
        }
        case_id = f"{len(out):03d} {info['layer']} {axes} {strategy or 'replicated'} remat={remat}"
        out.append((case_id, plan, info))
    return out


def random_sample(count: int, seed: int, execute_every: int) -> int:
    cases = random_cases(count, seed)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    validations: list[ProgramValidation] = []
    for i, (case_id, plan, info) in enumerate(cases):
        execute = execute_every > 0 and i % execute_every == 0
        t0 = time.perf_counter()
        v = validate_program(plan, execute=execute, prove=True)
        validations.append(v)
        reason = classify(v) if v.verdict.value == "xla-differs" else ""
        numerics = None if v.numerics is None else v.numerics.ok
        rows.append(
            {
                "case": case_id,
                **info,
                "verdict": v.verdict.value,
                "reason": reason,
                "difference": v.kinds_difference,
                "plan_time_s": v.plan_time_s,
                "xla_time_s": v.xla_time_s,
                "flops_plan": v.flops.plan,
                "flops_xla": v.flops.jit,
                "numerics_ok": numerics,
                "reasons": list(v.reasons) if v.verdict.value == "mismatch" else [],
            }
        )
        num = "" if numerics is None else f" numerics {'ok' if numerics else 'WRONG'}"
        print(
            f"{case_id:<70} {v.verdict.value:<12} {time.perf_counter() - t0:5.1f}s{num}"
            + (f"  {reason}" if reason else ""),
            flush=True,
        )
    elapsed = time.perf_counter() - start
    counts = program_agreement(validations)
    print(f"\n{count} random forward+backward cases (seed {seed}), validated in {elapsed:.0f}s:")
    for verdict, n in counts.items():
        print(f"  {verdict:12} {n:5d}  {100 * n / count:5.1f}%")
    differs = [v for v in validations if v.verdict.value == "xla-differs"]
    cheaper = Counter(
        "plan cheaper"
        if v.plan_time_s < v.xla_time_s
        else "same cost"
        if v.plan_time_s == v.xla_time_s
        else "XLA cheaper"
        for v in differs
        if v.xla_time_s is not None
    )
    unknown = sum(1 for v in differs if v.xla_time_s is None)
    print(
        f"  of the xla-differs: {dict(cheaper)}"
        + (f", {unknown} with sub-axis groups we do not cost" if unknown else "")
    )
    ratios = [v.xla_time_s / v.plan_time_s for v in differs if v.xla_time_s and v.plan_time_s > 0]
    if ratios:
        print(
            f"  XLA's collective time / the plan's when they differ: min {min(ratios):.2f}, "
            f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}"
        )
    reasons = Counter(classify(v) for v in differs)
    for reason, n in reasons.most_common():
        print(f"  xla-differs: {n:>5} {reason}")
    executed = [v for v in validations if v.numerics is not None]
    wrong = sum(1 for v in executed if not v.numerics or not v.numerics.shard_map_ok)
    print(f"  numerics: {len(executed)} executed, {wrong} with the plan's program wrong")
    flops_agree = sum(1 for v in validations if v.jit_flops_agree)
    print(f"  XLA's dot FLOPs per chip equal the plan's in {flops_agree} of {count}")
    for row in rows:
        if row["verdict"] == "mismatch":
            print(f"MISMATCH {row['case']}: {'; '.join(row['reasons'])}")
        elif row["reason"] == "unexplained":
            print(f"UNEXPLAINED {row['case']}: {row['difference']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "jax": _jax_version(),
                "seed": seed,
                "cases": count,
                "seconds": elapsed,
                "verdicts": counts,
                "xla_differs_cost": dict(cheaper),
                "xla_over_plan_time": {
                    "min": min(ratios),
                    "median": statistics.median(ratios),
                    "max": max(ratios),
                }
                if ratios
                else None,
                "reasons": dict(reasons),
                "numerics": {"executed": len(executed), "wrong": wrong},
                "xla_dot_flops_agree": flops_agree,
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 1 if counts["mismatch"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-report", action="store_true", help=f"rewrite {REPORT}")
    parser.add_argument("--random", type=int, metavar="N", help="validate N random cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument(
        "--execute-every",
        type=int,
        default=5,
        metavar="K",
        help="with --random, also run every K-th case and check its numbers (0: never)",
    )
    args = parser.parse_args(argv)
    if args.random:
        return random_sample(args.random, args.seed, args.execute_every)
    return run_suite(args.write_report)


def _jax_version() -> str:
    import jax

    return str(jax.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
