"""The search over parallelism layouts for a model on a cluster.

A *layout* gives each mesh role a degree and a place on the physical topology, plus the
step's knobs: ``pp`` (pipeline stages), ``dp`` (data parallel, ZeRO-0 or ZeRO-1), ``fsdp``
(ZeRO-3), ``cp`` (context: sequence positions), ``tp`` (tensor parallelism with sequence
parallelism), ``ep`` (experts, over data axes), the microbatch count, the remat policy and
the pipeline schedule. Roles take contiguous runs of the topology's chips, major to minor
in the order ``pp, dp, fsdp, cp, tp``: the pipeline and pure data parallelism on the
outermost (slowest) links (DCN, the fat tree's spine), tensor parallelism on the innermost
(a torus's neighbours, an NVLink node). On a power-of-two topology every split of its
``log2(chips)`` bits into those five runs is a mesh.

Two steps, so that ``10^5`` layouts rank in seconds:

1. **Screen** every layout with a closed form made from the model's own programs: per op
   class (MLP, attention projections, attention core, experts, embedding and head) the
   matmul FLOPs and HBM bytes per token of one block (forward, backward, remat) from the
   block program; the collectives the book's strategies issue (TP's activations, FSDP's
   weights gathered per microbatch, DP's gradients once per step, CP's keys and values,
   EP's all-to-alls, the pipeline's sends) costed with this tool's link model over the
   layout's axes; each pass overlapped per link; the bubble ``(P-1)/(m+P-1)``; memory per
   chip (weights, gradients, optimizer state, saved activations times the microbatches in
   flight). Layouts that cannot run (sizes that do not divide) or do not fit HBM are
   rejected, counted by reason.
2. **Re-cost** the best screened layouts with the exact planner (``model.plan_model``, the
   programs' exact collectives and memory) and rank by that; the screen's error on them is
   reported, so its fidelity is visible.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..collectives import Collective, rate
from ..errors import PlanError, SpecError
from ..mesh import DeviceMesh
from ..plans import Rejected
from ..topology import Topology, parse_shape
from .autodiff import OptimizerSpec, Remat, training
from .config import ModelConfig
from .graph import OpKind, Phase
from .layers import build_layer
from .model import ModelPlan, Schedule, Training, block_spec, plan_model
from .strategies import Strategy

ROLES = ("pp", "dp", "fsdp", "cp", "tp")


@dataclass(frozen=True, slots=True)
class Layout:
    degrees: tuple[int, int, int, int, int]  # pp, dp, fsdp, cp, tp
    ep: str  # "", "fsdp", "dp", "dp+fsdp"
    microbatches: int
    remat: Remat
    schedule: Schedule
    zero: int

    def strategy(self) -> Strategy:
        pp, dp, fsdp, cp, tp = self.degrees
        ep = tuple(r for r in self.ep.split("+") if r)
        # the cp axis is a data axis that splits positions: FSDP shards the weights over it
        # too (as torchtitan's FSDP shards over its dp_shard and cp dimensions)
        return Strategy(
            pp=("pp",) if pp > 1 else (),
            dp=("dp",) if dp > 1 else (),
            fsdp=tuple(r for r, n in (("fsdp", fsdp), ("cp", cp)) if n > 1),
            cp=("cp",) if cp > 1 else (),
            tp=("tp",) if tp > 1 else (),
            sp=tp > 1,
            ep=tuple(r for r in ep if (dp if r == "dp" else fsdp) > 1),
            zero=self.zero if dp > 1 else 0,
        )

    def mesh_text(self) -> str:
        return (
            ",".join(f"{r}={n}" for r, n in zip(ROLES, self.degrees, strict=True) if n > 1) or "x=1"
        )


@dataclass(slots=True)
class _Profile:
    """Per token and per layer, what a block costs: matmul FLOPs by pass and op class, and
    the HBM traffic and saved activations as ``A + B/tp`` (measured by evaluating the block
    with and without a tp axis of 2)."""

    flops: dict[tuple[str, str], float] = field(default_factory=dict)  # (pass, class)
    hbm: tuple[float, float] = (0.0, 0.0)  # (A, B): bytes per token = A + B / tp
    saved: tuple[float, float] = (0.0, 0.0)
    transient: tuple[float, float] = (0.0, 0.0)
    #: parameters per block: each is gathered and its gradient reduced by its own
    #: collective, so their count multiplies the collectives' latency
    params: int = 0


def _profile(config: ModelConfig, seq: int, remat: Remat, hardware: Any) -> _Profile:
    """One block (the dense one; the MoE block for a mixture of experts)."""
    tokens = seq * 8  # eight sequences: room for a data axis of 2
    if config.is_moe:
        from .moe import moe_block  # noqa: PLC0415

        forward = moe_block(config, tokens, seq)
    else:
        forward = build_layer(block_spec(config, tokens, seq))
    program = training(forward, remat=remat)
    sizes = program.sizes
    profile = _Profile(params=len(program.params))
    for op in program.ops:
        if op.kind is not OpKind.EINSUM:
            continue
        flops = 2.0 * math.prod(sizes[c] for c in op.letters) * op.flops_scale / tokens
        klass = _class(op.stage, set(op.letters))
        key = ("forward" if op.phase is Phase.FORWARD else "backward", klass)
        profile.flops[key] = profile.flops.get(key, 0.0) + flops
    from .evaluate import evaluate  # noqa: PLC0415
    from .strategies import place  # noqa: PLC0415

    two = DeviceMesh.create(hardware, "x=2")
    data = evaluate(program, two, place(program, two, "fsdp=x"))  # tp = 1, half the tokens
    tp = evaluate(program, two, place(program, two, "sp=x"))  # tp = 2, all the tokens
    per_token = {"data": tokens / 2, "tp": tokens}

    def split(one: float, two_: float) -> tuple[float, float]:
        # value per token = A + B/tp: one = A + B, two_ = A + B/2
        b = 2 * (one - two_)
        return (one - b, b)

    profile.hbm = split(
        data.cost.hbm_bytes / per_token["data"], tp.cost.hbm_bytes / per_token["tp"]
    )
    profile.saved = split(
        data.memory.activations / per_token["data"], tp.memory.activations / per_token["tp"]
    )
    profile.transient = split(
        data.memory.transient / per_token["data"], tp.memory.transient / per_token["tp"]
    )
    return profile


def _class(stage: str, letters: set[str]) -> str:
    if stage == "experts":
        return "experts"
    if stage == "attn":
        return "core" if "s" in letters else "proj"
    return "mlp"


@dataclass(frozen=True, slots=True)
class Screened:
    layout: Layout
    step_s: float
    memory_bytes: float


@dataclass(slots=True)
class SearchResult:
    plans: list[ModelPlan]
    considered: int
    rejected: Counter[str]
    screened: int
    recosted: int
    seconds: float
    screen_error: list[float]
    best_reason: str = ""

    def summary(self) -> dict[str, Any]:
        errors = sorted(abs(e) for e in self.screen_error)
        return {
            "layouts_considered": self.considered,
            "layouts_screened": self.screened,
            "layouts_recosted": self.recosted,
            "rejected": dict(self.rejected),
            "seconds": self.seconds,
            "screen_median_abs_error": errors[len(errors) // 2] if errors else None,
            "why_the_best": self.best_reason,
        }

    def describe(self) -> str:
        reasons = ", ".join(f"{n:,} {why}" for why, n in self.rejected.most_common(4))
        errors = sorted(abs(e) for e in self.screen_error)
        median = f"{errors[len(errors) // 2]:.1%}" if errors else "-"
        return (
            f"search: {self.considered:,} layouts in {self.seconds:.1f} s; rejected {reasons}; "
            f"{self.screened:,} ranked by the closed-form screen, the best {self.recosted} "
            f"re-costed exactly (the screen's median error on them: {median})"
        )


def _bits(n: int) -> int | None:
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None


def search_model(
    config: ModelConfig,
    topology: Topology,
    *,
    batch_tokens: int,
    seq_len: int | None = None,
    top: int = 5,
    master_weights: bool = True,
    idle_axes: bool = True,
    recost: int = 48,
    microbatch_options: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    remats: tuple[Remat, ...] = (Remat.NONE, Remat.FULL),
) -> SearchResult:
    """Every layout of ``config`` on ``topology`` (degrees of pp, dp, fsdp, cp and tp laid
    over the physical dimensions in that order, outermost first, so tp takes the fastest
    links and pp/dp the slowest; ep over the data axes; microbatches, remat, schedule,
    ZeRO-1), screened by a closed form, the best ``recost`` re-costed exactly by
    ``plan_model``; the ``top`` that fit, fastest first.

    ``search_model(load_model_config("configs/models/llama3-70b.toml"),
    Topology.build(load_preset("tpu-v5p"), "16x16x16"), batch_tokens=2**21, seq_len=2048)``
    """
    start = time.process_time()
    hardware = topology.hardware
    num_slices = topology.num_slices
    shape = parse_shape(topology.shape_text.rsplit(" ", 1)[-1])  # one slice's, or NODESxGPUS
    chips = topology.num_devices
    total_bits = _bits(chips)
    if total_bits is None:
        raise SpecError(
            f"the layout search needs a power-of-two chip count; {chips} chips is not one "
            "(give --strategy with an explicit --mesh instead)"
        )
    seq = seq_len or config.seq_len
    if not seq:
        raise SpecError(f"model {config.name} has no seq_len; pass --seq-len")
    batch = batch_tokens
    if batch % seq:
        raise SpecError(f"--batch-tokens {batch} is not a whole number of {seq}-token sequences")
    sequences = batch // seq
    chip = hardware.chip
    peak = chip.peak_flops_per_s_for(config.dtype)
    capacity = chip.hbm_capacity_bytes
    optimizer = OptimizerSpec(master_dtype="float32" if master_weights else "")
    # a mesh with one axis per bit: every role's group is a set of these axes (rates cached)
    bit_mesh = DeviceMesh.create(
        hardware, ",".join(f"b{i}=2" for i in range(total_bits)) or "b0=1", shape,
        num_slices=num_slices,
    )  # fmt: skip
    profiles = {remat: _profile(config, seq, remat, hardware) for remat in remats}
    params = config.params()
    layer_params = params["blocks"] / config.layers
    ends_params = params["total"] - params["blocks"]
    expert_params = (
        3 * config.d * config.expert_f * config.experts * config.moe_layers / config.layers
        if config.is_moe
        else 0.0
    )
    itemsize = 2.0
    heads_k, heads_g = config.k, config.n // config.k
    rejected: Counter[str] = Counter()
    screened: list[Screened] = []
    considered = 0
    for cut in itertools.combinations(range(total_bits + len(ROLES) - 1), len(ROLES) - 1):
        counts = []
        previous = -1
        for c in (*cut, total_bits + len(ROLES) - 1):
            counts.append(c - previous - 1)
            previous = c
        degrees = (2 ** counts[0], 2 ** counts[1], 2 ** counts[2], 2 ** counts[3], 2 ** counts[4])
        pp, dp, fsdp, _, _ = degrees
        offsets = list(itertools.accumulate([0, *counts]))
        groups = {
            role: tuple(f"b{i}" for i in range(offsets[j], offsets[j + 1]))
            for j, role in enumerate(ROLES)
        }
        data = dp * fsdp
        ep_options = [""]
        if config.is_moe:
            ep_options += [
                opt for opt, deg in (("fsdp", fsdp), ("dp", dp), ("dp+fsdp", data)) if deg > 1
            ]
        for ep, micro, remat in itertools.product(ep_options, microbatch_options, remats):
            schedules = (
                (Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED) if pp > 1 else (Schedule.ONE_F_ONE_B,)
            )
            zeros = (0, 1) if dp > 1 else (0,)
            for schedule, zero in itertools.product(schedules, zeros):
                considered += 1
                layout = Layout(degrees, ep, micro, remat, schedule, zero)
                why = _cannot_run(config, layout, sequences, seq)
                if why:
                    rejected[why] += 1
                    continue
                step, memory = _screen(
                    config, layout, profiles[remat], groups, bit_mesh,
                    batch=batch, seq=seq, peak=peak, hbm_bw=chip.hbm_bytes_per_s,
                    layer_params=layer_params, ends_params=ends_params,
                    expert_params=expert_params, itemsize=itemsize, optimizer=optimizer,
                    heads=(heads_k, heads_g),
                )  # fmt: skip
                if memory > capacity:
                    rejected["do not fit HBM (screen)"] += 1
                    continue
                screened.append(Screened(layout, step, memory))
    screened.sort(key=lambda s: s.step_s)
    plans: list[ModelPlan] = []
    errors: list[float] = []
    cache: dict[object, object] = {}
    meshes: dict[str, DeviceMesh] = {}
    recosted = 0
    for item in screened[:recost]:
        layout = item.layout
        text = layout.mesh_text()
        layout_mesh = meshes.get(text)
        if layout_mesh is None:
            layout_mesh = meshes[text] = DeviceMesh.create(
                hardware, text, shape, num_slices=num_slices
            )
        training_ = Training(
            batch_tokens=batch,
            seq_len=seq,
            microbatches=layout.microbatches,
            schedule=layout.schedule,
            virtual_stages=2 if layout.schedule is Schedule.INTERLEAVED else 1,
            remat=layout.remat,
            optimizer=optimizer,
        )
        plan = plan_model(
            config, layout_mesh, layout.strategy(), training_,
            idle_axes=idle_axes, cache=cache,
        )  # fmt: skip
        recosted += 1
        if isinstance(plan, Rejected):
            rejected[f"cannot run ({plan.reason.split(':')[0]})"] += 1
            continue
        errors.append(item.step_s / plan.step_lower_s - 1)
        if not plan.fits:
            rejected["do not fit HBM (exact)"] += 1
            continue
        plans.append(plan)
    plans.sort(key=lambda p: (p.step_lower_s, p.memory.peak))
    unique: dict[str, ModelPlan] = {}
    for plan in plans:
        unique.setdefault(f"{plan.mesh.spec_text}|{plan.name}", plan)
    ranked = list(unique.values())[:top]
    if not ranked:
        raise PlanError(
            f"no layout of {config.name} fits {chips} {chip.name} chips at {batch:,} tokens "
            f"per step ({dict(rejected.most_common(3))}); add chips, or use remat, or a "
            "smaller batch per step"
        )
    result = SearchResult(
        plans=ranked,
        considered=considered,
        rejected=rejected,
        screened=len(screened),
        recosted=recosted,
        seconds=time.process_time() - start,
        screen_error=errors,
    )
    result.best_reason = _why(ranked)
    return result


def _cannot_run(config: ModelConfig, layout: Layout, sequences: int, seq: int) -> str:
    pp, dp, fsdp, cp, tp = layout.degrees
    m = layout.microbatches
    if pp > config.layers:
        return "more stages than layers"
    if pp > 1 and m < pp:
        return "fewer microbatches than stages"
    if sequences % m or (sequences // m) % (dp * fsdp):
        return "batch does not split over the data axes"
    if seq % cp:
        return "sequence does not split over cp"
    if config.f % tp or (config.is_moe and config.expert_f % tp):
        return "MLP width does not split over tp"
    if layout.ep and config.experts % _ep_degree(layout):
        return "experts do not split over ep"
    return ""


def _ep_degree(layout: Layout) -> int:
    _, dp, fsdp, _, _ = layout.degrees
    return {"": 1, "fsdp": fsdp, "dp": dp, "dp+fsdp": dp * fsdp}[layout.ep]


def _screen(
    config: ModelConfig,
    layout: Layout,
    profile: _Profile,
    groups: dict[str, tuple[str, ...]],
    mesh: DeviceMesh,
    *,
    batch: int,
    seq: int,
    peak: float,
    hbm_bw: float,
    layer_params: float,
    ends_params: float,
    expert_params: float,
    itemsize: float,
    optimizer: OptimizerSpec,
    heads: tuple[int, int],
    debug: dict[str, Any] | None = None,
) -> tuple[float, float]:
    """The closed form: (step seconds, peak memory per chip)."""
    pp, dp, fsdp, cp, tp = layout.degrees
    m = layout.microbatches
    data = dp * fsdp
    tokens = batch / m / (data * cp)  # per chip (and per stage), per microbatch
    fsdp = fsdp * cp  # the weights are sharded over the cp axis too
    layers = math.ceil(config.layers / pp)
    k, g = heads
    # one tp axis splits the KV heads, else the query groups, else nothing (replicated)
    tp_attn = tp if (k % tp == 0 or g % tp == 0) else 1
    ep = _ep_degree(layout)
    split = {"mlp": tp, "proj": tp_attn, "core": tp_attn, "experts": tp * ep}
    compute = {
        name: layers
        * tokens
        * sum(v / split[c] for (p, c), v in profile.flops.items() if p == name)
        / peak
        for name in ("forward", "backward")
    }
    hbm_per_token = profile.hbm[0] + profile.hbm[1] / tp
    hbm = layers * tokens * hbm_per_token / hbm_bw
    d = config.d
    busy: dict[str, dict[int, float]] = {"forward": {}, "backward": {}}  # per microbatch

    def add(
        kind: Collective, role_axes: tuple[str, ...], group_bytes: float, times: float, pass_: str
    ) -> None:
        if not role_axes or group_bytes <= 0:
            return
        seconds = rate(mesh, kind, role_axes).time_s(group_bytes) * times
        for resource in mesh.link_resources(role_axes):
            busy[pass_][resource] = busy[pass_].get(resource, 0.0) + seconds

    activation = tokens * d * itemsize
    # TP+SP: a gather and a scatter of the activations per sublayer, forward and backward
    for pass_ in ("forward", "backward"):
        add(Collective.ALL_GATHER, groups["tp"], activation, 2 * layers, pass_)
        add(Collective.REDUCE_SCATTER, groups["tp"], activation, 2 * layers, pass_)
    # CP: keys and values gathered (forward), their gradients scattered (backward)
    kv = 2 * tokens * config.k * config.h * itemsize / (tp if config.k % tp == 0 else 1) * cp
    add(Collective.ALL_GATHER, groups["cp"], kv, layers, "forward")
    add(Collective.REDUCE_SCATTER, groups["cp"], kv, layers, "backward")
    # FSDP (over its axes and cp's): the weights gathered forward and backward, their
    # gradients scattered
    dense_weights = (layer_params - expert_params) * itemsize / tp
    expert_weights = expert_params * itemsize / (tp * ep)
    weights = dense_weights + expert_weights
    fsdp_axes = (*groups["fsdp"], *groups["cp"])
    n = max(profile.params, 1)  # one collective per parameter (their latencies add)
    add(Collective.ALL_GATHER, fsdp_axes, weights / n, layers * n, "forward")
    add(Collective.ALL_GATHER, fsdp_axes, weights / n, layers * n, "backward")
    add(Collective.REDUCE_SCATTER, fsdp_axes, weights / n, layers * n, "backward")
    # EP: dispatch and combine, forward and backward
    if layout.ep and config.is_moe:
        slots = tokens * config.top_k * config.capacity_factor * d * itemsize
        ep_axes = tuple(a for r in layout.ep.split("+") for a in groups[r])
        moe_share = config.moe_layers / config.layers
        for pass_ in ("forward", "backward"):
            add(Collective.ALL_TO_ALL, ep_axes, slots * ep, 2 * layers * moe_share, pass_)
    hbm_share = {"forward": 1 / 3, "backward": 2 / 3}
    micro = sum(
        max([compute[p], hbm * hbm_share[p], *busy[p].values()]) for p in ("forward", "backward")
    )
    if debug is not None:
        debug.update(compute=compute, hbm=hbm, busy=busy, tokens=tokens, layers=layers)
    # once per step: DP's gradient reduction (ZeRO-1: reduce-scatter + gather of weights)
    grads = weights / fsdp
    once: dict[int, float] = {}
    if dp > 1:  # each parameter's gradient reduced by its own collective
        seconds = rate(mesh, Collective.ALL_REDUCE, groups["dp"]).time_s(grads / n) * n * layers
        for resource in mesh.link_resources(groups["dp"]):
            once[resource] = once.get(resource, 0.0) + seconds
    bubble = 0.0
    permute = 0.0
    if pp > 1:
        virtual = 2 if layout.schedule is Schedule.INTERLEAVED else 1
        bubble = (pp - 1) / (virtual * m + pp - 1)
        send = rate(mesh, Collective.COLLECTIVE_PERMUTE, groups["pp"]).time_s(
            tokens * d * itemsize / tp
        )
        permute = 2 * (pp - 1) * send * virtual
    # the head's matmul (vocabulary-parallel over tp; the embedding is a gather), per
    # microbatch: on the last stage under a pipeline, which sets the pace the bubble stretches
    # (not spread over the stages)
    micro += 6 * config.vocab * d * tokens / tp / peak
    step = m * micro / (1 - bubble) + max(once.values(), default=0.0) + permute
    # the optimizer: per step, memory-bound
    state = optimizer.state_bytes_per_param
    params_per_chip = (layers * layer_params + ends_params / pp) / (tp * fsdp)
    if config.is_moe:
        params_per_chip -= layers * expert_params * (1 - 1 / ep) / (tp * fsdp)
    optimizer_s = params_per_chip / (dp if layout.zero else 1) * (2 * state + 3 * itemsize) / hbm_bw
    step += optimizer_s
    # memory per chip
    grads_bytes = params_per_chip * itemsize
    opt_bytes = params_per_chip * state / (dp if layout.zero else 1)
    saved = layers * tokens * (profile.saved[0] + profile.saved[1] / tp)
    transient = tokens * (profile.transient[0] + profile.transient[1] / tp)
    in_flight = min(pp, m) if pp > 1 else 1
    memory = params_per_chip * itemsize + grads_bytes + opt_bytes + saved * in_flight + transient
    return step, memory


def _why(plans: list[ModelPlan]) -> str:
    if len(plans) < 2:
        return "the only layout that fits"
    best, runner = plans[0], plans[1]
    gap = runner.step_lower_s / best.step_lower_s - 1
    parts = []
    for label, a, b in (
        ("compute", best.compute_s, runner.compute_s),
        ("communication", best.comm_s, runner.comm_s),
        ("HBM", best.hbm_s, runner.hbm_s),
    ):
        if b > a * 1.02:
            parts.append(f"{label} {b - a:.3g} s less")
    if best.pipeline is None and runner.pipeline is not None:
        parts.append(f"no pipeline bubble (the next loses {runner.pipeline.bubble_fraction:.0%})")
    elif best.pipeline is not None and runner.pipeline is not None:
        ours, theirs = best.pipeline.bubble_fraction, runner.pipeline.bubble_fraction
        if abs(theirs - ours) > 0.005:
            parts.append(f"pipeline bubble {ours:.1%} against {theirs:.1%}")
    if runner.grad_reduction_s > best.grad_reduction_s * 1.02:
        parts.append(
            f"gradient reductions {runner.grad_reduction_s - best.grad_reduction_s:.3g} s less"
        )
    if not parts and best.memory.peak < runner.memory.peak * 0.98:
        parts.append(
            f"as fast, with {(runner.memory.peak - best.memory.peak) / 2**30:.3g} GiB less per chip"
        )
    detail = "; ".join(parts) or "nearly the same costs"
    return f"{gap:.1%} faster than {runner.name} on ({runner.mesh.spec_text}): {detail}"
