"""How often XLA compiles exactly the collectives the planner predicts.

Validates every strategy the planner lists for each case of the test suite's sweep (the
``sweep`` of ``tests/data/xla_differs.json``) on simulated CPU devices, compile-only, and
prints the verdicts per case and overall: ``match`` (XLA's jit program holds the predicted
collectives), ``xla-differs`` (XLA chose another algorithm; the plan's own shard_map program
is exact) and ``mismatch`` (a planner bug).

    python benchmarks/xla_agreement.py                 # the suite's sweep (about 2.5 minutes)
    python benchmarks/xla_agreement.py --extra         # plus fixed layouts too slow for tests
    python benchmarks/xla_agreement.py --all-stored    # plus every stored-layout pair on 2x4
    python benchmarks/xla_agreement.py --write-report  # rewrite tests/data/xla_differs.json
    python benchmarks/xla_agreement.py --random 500    # a seeded random sample of requests

``--random N`` (``make bench``) draws N requests at random (seeded by ``--seed``): an einsum,
its sizes, a mesh of 8 devices, and stored lhs/rhs and requested out layouts; the planner's
best plan for each is validated, and the script prints the share of each verdict, whether the
plan or XLA's program is cheaper on the target hardware, and the distribution of XLA's bytes
sent per chip over the plan's. Results go to benchmarks/results/xla_agreement.json.

``--write-report`` records each xla-differs case with the reason it is expected (classified
by :func:`classify` from what XLA's program lacks and adds); the test suite then fails on any
xla-differs case the report does not list. It refuses to write while a case is unexplained.
"""

from __future__ import annotations

import argparse
import itertools
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

from sharding_roofline.einsum import Einsum  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.planner import Planner  # noqa: E402
from sharding_roofline.plans import Plan  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.xla.cli import validate_many  # noqa: E402
from sharding_roofline.xla.compare import Validation, agreement, plan_key  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "tests" / "data" / "xla_differs.json"
RESULTS = Path(__file__).resolve().parent / "results" / "xla_agreement.json"

#: Why XLA's program may differ from a valid plan. Keys are what the report records.
REASONS: dict[str, str] = {
    "reduce-scatter-as-all-reduces": (
        "XLA reduces the partial sums with all-reduces and slices the result only at the end. "
        "The CPU backend has no reduce-scatter op: its SPMD partitioner writes one as an "
        "all-reduce followed by a dynamic-slice, which the HLO reader folds back into a "
        "reduce-scatter only when a single all-reduce is sliced to 1/g. Here XLA reduces one "
        "axis at a time (an all-reduce per axis, one slice after the last) or merges the plan's "
        "all-reduce and reduce-scatter into all-reduces over both axes. Same result; the "
        "all-reduces move up to twice the bytes of the plan's reduce-scatters."
    ),
    "one-reduce-scatter-over-both-axes": (
        "The plan reduce-scatters over one axis onto one dimension and then over another axis "
        "onto another dimension; XLA does a single reduce-scatter over both axes that splits "
        "both dimensions at once. The bytes sent per chip are the same."
    ),
    "all-reduce-then-reshard": (
        "XLA reduces with an all-reduce (sometimes of a smaller partial product: it first splits "
        "the local matmul over a mesh axis the operands leave replicated) and then moves blocks "
        "into the requested output layout with a collective-permute, all-gather or all-to-all. "
        "Its partitioner reduce-scatters only into the tile order its own sharding propagation "
        "produces; an output split over a minor mesh axis before a major one (e.g. H_yx), or over "
        "an axis of the free dimension, needs the extra reshuffle. The plan's single "
        "reduce-scatter (or all-to-all) is cheaper and exact (its shard_map program proves it)."
    ),
    "gather-instead-of-all-to-all": (
        "To move a mesh axis from one dimension of an operand or the result to another, the plan "
        "uses an all-to-all; XLA moves it with all-gathers and collective-permutes instead "
        "(sometimes over part of an axis, shown as axes '?'), or replicates the array entirely "
        "('Involuntary full rematerialization' on stderr) and slices. Valid, and usually more "
        "bytes than the plan's all-to-all."
    ),
    "other-reshard": (
        "XLA takes a different route between the stored layouts and the layouts at the op than "
        "the plan's greedy resharding path: the same kinds of collective on other axes or at "
        "another point (e.g. gathering before a free slice rather than after it, so the same "
        "all-gather[x] moves a different number of elements), or permutes instead of gathers. "
        "Both reach the same layouts; each side's cost on the target hardware is in the "
        "validation's predicted and observed lists."
    ),
}

_MOVES = {"collective-permute", "all-gather", "all-to-all"}
_REDUCTIONS = {"all-reduce", "reduce-scatter"}


def classify(v: Validation) -> str:
    """The reason an xla-differs verdict is expected ("unexplained" if no rule fits)."""
    tokens = v.difference.split()
    lacks = [t[1:].split("[")[0] for t in tokens if t.startswith("-")]
    adds = [t[1:].split("[")[0] for t in tokens if t.startswith("+")]
    lacks_set, adds_set = set(lacks), set(adds)
    plan_moves = {s.kind.value for s in v.plan.collectives if s.operand != "out" and s.kind}
    if lacks_set <= _REDUCTIONS and adds_set == {"all-reduce"}:
        return "reduce-scatter-as-all-reduces"
    if lacks_set == {"reduce-scatter"} and adds == ["reduce-scatter"] and len(lacks) > 1:
        return "one-reduce-scatter-over-both-axes"
    if (
        lacks_set <= _REDUCTIONS
        and "all-reduce" in adds_set
        and adds_set - {"all-reduce"}
        and adds_set <= _MOVES | _REDUCTIONS
    ):
        return "all-reduce-then-reshard"
    if "all-to-all" in lacks_set and adds_set & {"all-gather", "collective-permute"}:
        return "gather-instead-of-all-to-all"
    if lacks_set | adds_set <= _MOVES | _REDUCTIONS and (plan_moves or adds_set & _MOVES):
        return "other-reshard"
    return "unexplained"


def plans_for(case: dict[str, Any]) -> list[Plan]:
    """Every strategy the planner lists for one sweep case."""
    mesh = DeviceMesh.create(load_preset(case["hardware"]), case["mesh"], case.get("topology"))
    einsum = Einsum.create(
        case["einsum"], case["dims"], dtype=case["dtype"], accum_dtype=case["accum_dtype"]
    )
    planner = Planner(
        einsum, mesh, lhs=case["lhs"], rhs=case["rhs"], out=case["out"], check_memory=False
    )
    return list(planner.search(top=None).strategies)


def _layouts(rank: int, axes: tuple[str, ...]) -> list[str]:
    """Every layout of a rank-``rank`` array over ``axes`` (each axis on one dim or none)."""
    out: set[str] = set()
    for targets in itertools.product(range(rank + 1), repeat=len(axes)):
        for order in itertools.permutations(axes):
            dims: list[list[str]] = [[] for _ in range(rank)]
            for axis in order:
                target = targets[axes.index(axis)]
                if target < rank:
                    dims[target].append(axis)
            out.add(",".join("+".join(d) if d else "None" for d in dims))
    return sorted(out)


def _case(case_id: str, einsum: str, dims: str, **layouts: str | None) -> dict[str, Any]:
    """A sweep case; ``layouts`` gives lhs/rhs/out and, for 2x2x2, ``mesh="x=2,y=2,z=2"``."""
    mesh = layouts.pop("mesh", None) or "x=2,y=4"
    return {
        "id": case_id,
        "hardware": "tpu-v5e" if mesh == "x=2,y=4" else "tpu-v5p",
        "mesh": mesh,
        "einsum": einsum,
        "dims": dims,
        "dtype": "bfloat16",
        "accum_dtype": "float32",
        "lhs": layouts.get("lhs"),
        "rhs": layouts.get("rhs"),
        "out": layouts.get("out"),
        "prove": True,
    }


#: Fixed-layout requests whose every strategy takes 0.3-0.5 s to validate: outside the suite.
EXTRA_CASES = [
    _case("bd-2x4-fsdp", "bd,df->bf", "b=64,d=32,f=128", lhs="x,None", rhs="y,None"),
    _case(
        "bhqd-2x4-reshard",
        "bhqd,bhkd->bhqk",
        "b=4,h=8,q=16,k=16,d=32",
        lhs="x,y,None,None",
        rhs="None,y,x,None",
        out="x,y,None,None",
    ),
    _case(
        "btd-2x2x2-reshard",
        "btd,df->btf",
        "b=8,t=16,d=32,f=64",
        lhs="x,y,z",
        rhs="z,x",
        out="y,None,x",
        mesh="x=2,y=2,z=2",
    ),
]


def all_stored_cases() -> list[dict[str, Any]]:
    """Every pair of stored operand layouts for bd,df->bf on 2x4, output free (slow)."""
    layouts = _layouts(2, ("x", "y"))
    cases = []
    for lhs, rhs in itertools.product(layouts, layouts):
        case = _case(f"bd-2x4-stored-{lhs}-{rhs}", "bd,df->bf", "b=64,d=32,f=128", lhs=lhs, rhs=rhs)
        cases.append({**case, "prove": False})
    return cases


def run(cases: list[dict[str, Any]]) -> tuple[dict[str, list[Validation]], float]:
    results: dict[str, list[Validation]] = {}
    start = time.perf_counter()
    for case in cases:
        plans = plans_for(case)
        t0 = time.perf_counter()
        validations = validate_many(plans, prove=case["prove"], progress=True)
        results[case["id"]] = validations
        counts = agreement(validations)
        print(
            f"{case['id']:<34} {len(plans):>5} strategies  "
            + "  ".join(f"{k} {n:>4}" for k, n in counts.items())
            + f"  {time.perf_counter() - t0:6.1f}s",
            flush=True,
        )
    return results, time.perf_counter() - start


RANDOM_EINSUMS = {
    "bd,df->bf": "bdf",
    "btd,df->btf": "btdf",
    "bhqd,bhkd->bhqk": "bhqdk",
    "bsd,dnh->bsnh": "bsdnh",
}
RANDOM_MESHES = [
    ("h100", "1x8", (("x", 8),)),
    ("h100", "1x8", (("x", 2), ("y", 4))),
    ("tpu-v5e", "2x4", (("x", 2), ("y", 4))),
    ("tpu-v5e", "4x2", (("x", 4), ("y", 2))),
    ("tpu-v5p", "2x2x2", (("x", 2), ("y", 2), ("z", 2))),
]


def _random_layout(
    rng: random.Random, letters: str, axes: tuple[tuple[str, int], ...], sizes: dict[str, int]
) -> str:
    """Each mesh axis to one dimension of the array (or none), keeping sizes divisible."""
    dims: list[list[str]] = [[] for _ in letters]
    for name, size in axes:
        choice = rng.randrange(len(letters) + 1)
        if choice < len(letters):
            pieces = size
            for other in dims[choice]:
                pieces *= dict(axes)[other]
            if sizes[letters[choice]] % pieces == 0:
                dims[choice].append(name)
    return ",".join("+".join(d) if d else "None" for d in dims)


def random_requests(count: int, seed: int) -> list[Plan]:
    """``count`` random requests and the planner's best plan for each."""
    rng = random.Random(seed)
    plans = []
    while len(plans) < count:
        equation = rng.choice(list(RANDOM_EINSUMS))
        hardware, topology, axes = rng.choice(RANDOM_MESHES)
        sizes = {c: rng.choice([16, 32, 64, 128, 256]) for c in RANDOM_EINSUMS[equation]}
        einsum = Einsum.create(
            equation, sizes, dtype="bfloat16", accum_dtype=rng.choice(["bfloat16", "float32"])
        )
        spec = einsum.spec
        mesh = DeviceMesh.create(
            load_preset(hardware), ",".join(f"{n}={s}" for n, s in axes), topology
        )
        layouts = {
            role: _random_layout(rng, spec.operand(role), axes, sizes)
            for role in ("lhs", "rhs", "out")
        }
        plans.append(
            Planner(einsum, mesh, **layouts, check_memory=False).estimate(alternatives=0).best
        )
    return plans


def random_sample(count: int, seed: int) -> int:
    plans = random_requests(count, seed)
    start = time.perf_counter()
    validations = validate_many(plans, prove=True, progress=True, unguided=True)
    elapsed = time.perf_counter() - start
    counts = agreement(validations)
    print(f"{count} random requests (seed {seed}), validated in {elapsed:.0f}s:")
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
    # against XLA's unguided program (stored and output layouts only, nothing pinned at the op)
    unguided = Counter(v.unguided.verdict for v in validations if v.unguided is not None)
    print("  against XLA unguided (stored and output layouts only):")
    for verdict in ("match", "plan-cheaper", "same", "xla-cheaper", "uncosted"):
        n = unguided.get(verdict, 0)
        print(f"    {verdict:12} {n:5d}  {100 * n / count:5.1f}%")
    xla_cheaper = [
        v for v in validations if v.unguided is not None and v.unguided.verdict == "xla-cheaper"
    ]
    for v in xla_cheaper[:10]:
        u = v.unguided
        if u is None or u.xla_time_s is None:
            continue
        print(
            f"    xla-cheaper: {plan_key(v.plan)}: plan {u.plan_time_s * 1e6:.2f} us, XLA "
            f"{u.xla_time_s * 1e6:.2f} us ({', '.join(r.label() for r in u.observed)})"
        )
    ratios = []
    for v in validations:
        planned = sum(r.bytes_sent_per_chip for r in v.predicted)
        observed = sum(r.bytes_sent_per_chip for r in v.observed)
        if planned > 0:
            ratios.append(observed / planned)
    zero = sum(1 for v in validations if not v.predicted)
    quantiles = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios
    print(
        f"  XLA bytes sent per chip / plan's, over the {len(ratios)} plans that communicate: "
        f"min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; "
        f"deciles {', '.join(f'{q:.2f}' for q in quantiles)}"
    )
    print(f"  ({zero} plans need no communication)")
    for reason, n in Counter(classify(v) for v in differs).most_common():
        print(f"  xla-differs: {n:>5} {reason}")
    for v in validations:
        if v.verdict.value == "mismatch":
            print(f"MISMATCH {plan_key(v.plan)}: {'; '.join(v.reasons)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "jax": _jax_version(),
                "seed": seed,
                "requests": count,
                "seconds": elapsed,
                "verdicts": counts,
                "xla_differs_cost": dict(cheaper),
                "unguided": {
                    verdict: unguided.get(verdict, 0) / count
                    for verdict in ("match", "plan-cheaper", "same", "xla-cheaper", "uncosted")
                },
                "verdict_shares": {verdict: n / count for verdict, n in counts.items()},
                "bytes_ratio": {
                    "min": min(ratios),
                    "median": statistics.median(ratios),
                    "max": max(ratios),
                    "deciles": quantiles,
                },
                "reasons": dict(Counter(classify(v) for v in differs)),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 1 if counts["mismatch"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-report", action="store_true", help=f"rewrite {REPORT}")
    parser.add_argument("--extra", action="store_true", help="add slower fixed-layout cases")
    parser.add_argument(
        "--all-stored", action="store_true", help="add every stored-layout pair (~30 minutes)"
    )
    parser.add_argument(
        "--random", type=int, metavar="N", help="validate N random requests instead"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    args = parser.parse_args(argv)
    if args.random:
        return random_sample(args.random, args.seed)
    report = json.loads(REPORT.read_text())
    cases = list(report["sweep"])
    cases += EXTRA_CASES if args.extra else []
    cases += all_stored_cases() if args.all_stored else []
    results, elapsed = run(cases)
    every = [v for vs in results.values() for v in vs]
    counts = agreement(every)
    total = len(every)
    print(
        f"\n{total} strategies in {elapsed:.0f}s ({elapsed / max(total, 1) * 1000:.0f} ms each): "
        + ", ".join(f"{k} {n} ({100 * n / max(total, 1):.1f}%)" for k, n in counts.items())
    )
    reasons = Counter(classify(v) for v in every if v.verdict.value == "xla-differs")
    for reason, n in reasons.most_common():
        print(f"  xla-differs: {n:>5} {reason}")
    for v in every:
        if v.verdict.value == "mismatch":
            print(f"MISMATCH {plan_key(v.plan)}: {'; '.join(v.reasons)}")
        elif v.verdict.value == "xla-differs" and classify(v) == "unexplained":
            print(f"UNEXPLAINED {plan_key(v.plan)}: {v.difference}")
    if args.write_report:
        if reasons.get("unexplained"):
            print("not writing the report: explain the cases above first", file=sys.stderr)
            return 1
        suite = {case["id"] for case in report["sweep"]}
        report["jax"] = _jax_version()
        report["agreement"] = {cid: agreement(vs) for cid, vs in results.items() if cid in suite}
        report["reasons"] = REASONS
        report["xla_differs"] = {
            cid: {
                plan_key(v.plan): {"reason": classify(v), "difference": v.difference}
                for v in vs
                if v.verdict.value == "xla-differs"
            }
            for cid, vs in results.items()
            if cid in suite
        }
        REPORT.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {REPORT}")
    return 1 if counts["mismatch"] else 0


def _jax_version() -> str:
    import jax

    return str(jax.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
