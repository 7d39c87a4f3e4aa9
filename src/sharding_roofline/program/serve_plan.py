"""Serving plans: a model's prefill or decode step on a mesh under a serving strategy.

``plan_serving`` places each program of the step (``serving.serving_parts``: the blocks,
repeated, and the ends) with ``serve_strategies.place_serving``, evaluates it with the one
evaluator (``evaluate.Evaluation``) and composes the costs by cost algebra, as the training
model does. Nothing here restates the book's formulas; they come out of the programs:

* the **step time** is the composed ``Cost``'s lower bound (every op's slower of compute and
  HBM, summed; collectives overlapped on their links): for decode that is the book's
  ``B·KV/W + max(2·B·P/C, P_bytes/W)`` per chip, because the attention einsums read the
  cache at about one FLOP per byte (always HBM-bound) while each weight matmul is the larger
  of its FLOPs and its weight bytes; ``step_upper_s`` adds everything (no overlap);
* **time to first token**: a prefill step's time (``ServeResult.prefill`` for decode);
* **tokens/s per chip**, **memory per chip** (weights as stored, the KV cache where it
  lives, the largest transient of any op), the **largest batch that fits** (``max_batch``)
  and the **bottleneck** (compute, HBM, split into weights and KV cache, or a link);
* ``critical_batch``: the token batch above which the weight matmuls are compute-bound,
  solved from the plan (their FLOPs and activation bytes grow with the batch, their weight
  bytes do not): ``C/W_hbm`` times bytes per weight over 2, the book's 240 on v5e in bf16,
  120 with int8 weights, ``E/k`` times that for experts;
* ``model_parallel_limit``: the model-parallel degree at which the collectives over the
  model axes (bandwidth terms; their bytes do not shrink with the degree) take as long as
  the weights' HBM reads (which do): the book's ``Y > F/(B·β)``, ``β = W_hbm/W_ici``.

``latency_throughput`` sweeps the batch for one strategy (the figure in
``plot/serving.py``); ``serve`` runs a strategy or the search and adds the prefill behind
the time to first token, on the same mesh or on a separate prefill pool (disaggregated).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

from ..errors import PlanError, SpecError
from ..estimate import Bottleneck, Cost, Overlap
from ..mesh import DeviceMesh
from ..plans import Rejected
from ..reshard import Dims
from ..units import format_bytes, format_seconds
from .config import ModelConfig
from .evaluate import Evaluation, ProgramPlan
from .graph import OpKind, Program, TensorKind
from .serve_strategies import ServeStrategy, place_serving, serving_candidates
from .serving import ServePart, ServePhase, Serving, kv_bytes_per_token, serving_parts


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeMemory:
    """Bytes per chip: weights as stored, the KV cache where it lives, and the activations
    (the largest transient of any op: resharded inputs, its result and its moved copy)."""

    weights: float
    kv_cache: float
    activations: float
    #: ``(component, tensor, bytes)``, largest first
    items: tuple[tuple[str, str, float], ...] = ()

    @property
    def peak(self) -> float:
        return self.weights + self.kv_cache + self.activations

    def as_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "peak": self.peak,
        }

    def overflow(self, capacity: float) -> str:
        over = self.peak - capacity
        return (
            f"needs {format_bytes(self.peak)} per chip, {format_bytes(over)} more than the "
            f"{format_bytes(capacity)} of HBM (weights {format_bytes(self.weights)}, KV cache "
            f"{format_bytes(self.kv_cache)}, activations {format_bytes(self.activations)})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CriticalBatch:
    """The token batch above which the weight matmuls are compute-bound (``None``: never).

    ``tokens`` counts every byte the matmuls move (weights and the activations that grow
    with the batch); ``weights_only`` only their weights, the book's ``2BDF/2DF`` form
    (``C/W_hbm`` for bf16). Both are global per step; ``per_replica`` divides by the
    replicas (the book's rule is per replica)."""

    tokens: float | None
    weights_only: float | None
    replicas: int = 1

    @property
    def per_replica(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.replicas

    def as_dict(self) -> dict[str, float | None]:
        return {
            "tokens": self.tokens,
            "tokens_per_replica": self.per_replica,
            "weights_only_tokens": self.weights_only,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServePlan:
    """One serving step of a model under one strategy (``config`` is None for a single
    program planned by ``plan_program``)."""

    config: ModelConfig | None
    mesh: DeviceMesh
    strategy: ServeStrategy
    serving: Serving
    #: ``(part name, its plan repeated over its layers)``
    parts: tuple[tuple[str, ProgramPlan], ...]
    cost: Cost
    memory: ServeMemory
    #: HBM bytes per chip per step read from the weights and from the KV cache
    weight_bytes_read: float
    kv_bytes_read: float
    kv_bytes_per_token: float
    overlap: Overlap = Overlap.FULL
    notes: tuple[str, ...] = ()
    _one: tuple[tuple[str, ProgramPlan, int], ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def step_time_s(self) -> float:
        """The step, overlapped as far as the hardware allows (the ``--overlap`` policy)."""
        return self.cost.time_s(self.overlap)

    @property
    def step_lower_s(self) -> float:
        return self.cost.lower_bound_s

    @property
    def step_upper_s(self) -> float:
        return self.cost.upper_bound_s

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.serving.tokens / self.step_time_s / self.mesh.num_devices

    @property
    def time_to_first_token_s(self) -> float | None:
        """A prefill step's time: the prompts' first tokens come out of it (decode: None)."""
        return None if self.serving.is_decode else self.step_time_s

    @property
    def capacity_bytes(self) -> float:
        return self.mesh.hardware.chip.hbm_capacity_bytes

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.capacity_bytes

    @property
    def weight_hbm_s(self) -> float:
        return self.weight_bytes_read / self.mesh.hardware.chip.hbm_bytes_per_s

    @property
    def kv_hbm_s(self) -> float:
        return self.kv_bytes_read / self.mesh.hardware.chip.hbm_bytes_per_s

    @property
    def bottleneck(self) -> str:
        """``compute``, ``hbm`` or ``comm``: what bounds the step."""
        return {Bottleneck.COMPUTE: "compute", Bottleneck.HBM: "hbm", Bottleneck.COMM: "comm"}[
            self.cost.bottleneck
        ]

    def describe_bottleneck(self) -> str:
        kind = self.cost.bottleneck
        if kind is Bottleneck.HBM:
            total = self.cost.hbm_s or 1.0
            return (
                f"HBM bandwidth (weights {self.weight_hbm_s / total:.0%}, KV cache "
                f"{self.kv_hbm_s / total:.0%} of the bytes)"
            )
        return self.cost.describe_bottleneck()

    def part(self, name: str) -> ProgramPlan:
        for part_name, plan in self.parts:
            if part_name == name:
                return plan
        raise PlanError(f"serving plan {self.name} has no part {name!r}")

    @property
    def model_parallel_degree(self) -> int:
        return math.prod(self.mesh.axis_size(a) for a in (*self.strategy.tp, *self.strategy.d))


# -- planning -----------------------------------------------------------------------------------


def _local_bytes(plan: ProgramPlan, tensor: str, dims: Dims) -> float:
    program = plan.program
    info = program.tensor(tensor)
    sizes = program.sizes
    elements = 1
    for letter, axes in zip(info.letters, dims, strict=True):
        elements *= sizes[letter] // math.prod(plan.mesh.axis_size(a) for a in axes)
    return float(elements * info.itemsize)


def _reads(plan: ProgramPlan, cache: tuple[str, ...]) -> tuple[float, float]:
    """HBM bytes one repetition reads per chip: (weights, KV cache), at the ops' layouts
    (an embedding lookup reads its rows, not the table: not counted)."""
    program = plan.program
    weights = kv = 0.0
    for op_plan in plan.ops:
        if op_plan.op.kind is OpKind.GATHER:
            continue
        for tensor, dims in op_plan.at_op:
            info = program.tensor(tensor)
            if info.on_chip:
                continue
            if info.kind is TensorKind.PARAM:
                weights += _local_bytes(plan, tensor, dims)
            elif tensor in cache:
                kv += _local_bytes(plan, tensor, dims)
    return weights, kv


def plan_serving(
    config: ModelConfig,
    mesh: DeviceMesh,
    strategy: ServeStrategy | str,
    serving: Serving,
    *,
    overlap: Overlap = Overlap.FULL,
    cache: dict[object, object] | None = None,
) -> ServePlan | Rejected:
    """The step of ``serving`` under ``strategy``; ``Rejected`` with the reason when the
    layout does not divide the model's sizes. A malformed strategy raises ``SpecError``."""
    return plan_parts(
        serving_parts(config, serving),
        mesh,
        strategy,
        serving,
        config=config,
        overlap=overlap,
        cache=cache,
    )


def plan_program(
    program: Program,
    mesh: DeviceMesh,
    strategy: ServeStrategy | str,
    serving: Serving,
    *,
    cache: tuple[str, ...] = (),
    overlap: Overlap = Overlap.FULL,
) -> ServePlan | Rejected:
    """One program (a decode MLP, the book's single-layer settings) as a serving step."""
    part = ServePart(name=program.name, program=program, count=1, cache=cache)
    return plan_parts((part,), mesh, strategy, serving, config=None, overlap=overlap)


def plan_parts(
    parts: tuple[ServePart, ...],
    mesh: DeviceMesh,
    strategy: ServeStrategy | str,
    serving: Serving,
    *,
    config: ModelConfig | None,
    overlap: Overlap = Overlap.FULL,
    cache: dict[object, object] | None = None,
) -> ServePlan | Rejected:
    strategy = ServeStrategy.parse(strategy)
    strategy.check(mesh)
    pieces = batch_pieces(mesh, strategy, serving)
    if serving.batch % pieces:
        return Rejected(
            strategy=strategy.name,
            reason=(
                f"the batch of {serving.batch} sequences does not split {pieces} ways (the "
                f"axes {strategy.name} splits the sequences over); use a batch that is a "
                f"multiple of {pieces}"
            ),
        )
    evaluated: list[tuple[ServePart, ProgramPlan]] = []
    for part in parts:
        placement = place_serving(part, mesh, strategy, serving)
        key = ("evaluation", part.name, part.program.dims, serving, mesh.spec_text, overlap)
        evaluation = None if cache is None else cache.get(key)
        if not isinstance(evaluation, Evaluation):
            evaluation = Evaluation(part.program, mesh, overlap=overlap)
            if cache is not None:
                cache[key] = evaluation
        result = evaluation(placement)
        if isinstance(result, Rejected):
            return Rejected(strategy=strategy.name, reason=f"{part.name}: {result.reason}")
        evaluated.append((part, result))
    return _compose(config, mesh, strategy, serving, evaluated=evaluated, overlap=overlap)


def _compose(
    config: ModelConfig | None,
    mesh: DeviceMesh,
    strategy: ServeStrategy,
    serving: Serving,
    *,
    evaluated: list[tuple[ServePart, ProgramPlan]],
    overlap: Overlap,
) -> ServePlan:
    total = Cost.zero()
    weights = kv = activations = 0.0
    weight_reads = kv_reads = 0.0
    items: list[tuple[str, str, float]] = []
    repeated: list[tuple[str, ProgramPlan]] = []
    notes: list[str] = []
    for part, plan in evaluated:
        stack = plan.repeat(part.count) if part.count > 1 else plan
        repeated.append((part.name, stack))
        total = total + stack.cost
        weights += stack.memory.params
        activations = max(activations, plan.memory.transient)
        for component, tensor, size in plan.memory.items:
            if component == "params":
                items.append(("weights", f"{part.name}.{tensor}", size * part.count))
        for tensor in part.cache:
            size = _local_bytes(plan, tensor, plan.home(tensor)) * part.count
            kv += size
            items.append(("kv_cache", f"{part.name}.{tensor}", size))
        w, c = _reads(plan, part.cache)
        weight_reads += w * part.count
        kv_reads += c * part.count
        notes += [n for n in plan.placement.notes if n not in notes]
    items.sort(key=lambda item: -item[2])
    return ServePlan(
        config=config,
        mesh=mesh,
        strategy=strategy,
        serving=serving,
        parts=tuple(repeated),
        cost=total,
        memory=ServeMemory(
            weights=weights, kv_cache=kv, activations=activations, items=tuple(items)
        ),
        weight_bytes_read=weight_reads,
        kv_bytes_read=kv_reads,
        kv_bytes_per_token=kv_bytes_per_token(tuple(part for part, _ in evaluated), serving),
        overlap=overlap,
        notes=tuple(notes),
        _one=tuple((part.name, plan, part.count) for part, plan in evaluated),
    )


def require(plan: ServePlan | Rejected, config: ModelConfig | None = None) -> ServePlan:
    """``plan``, or a ``PlanError`` saying why the strategy cannot serve ``config``."""
    if isinstance(plan, Rejected):
        what = "the program" if config is None else config.name
        raise PlanError(
            f"serving strategy {plan.strategy} cannot run {what}: {plan.reason}"
            + (
                ""
                if "; use" in plan.reason
                else "; choose axes whose sizes divide the model's (heads, widths, batch), "
                "or use --search"
            )
        )
    return plan


# -- what a plan implies ------------------------------------------------------------------------


def weight_matmuls(
    plan: ServePlan, ops: Collection[str] | None = None
) -> tuple[float, float, float]:
    """Per chip, per step, over the einsums that read a weight (those named in ``ops``, if
    given): (their compute seconds, their weights' HBM seconds, their other HBM seconds:
    activations in and out)."""
    compute = weight_s = other_s = 0.0
    rate = plan.mesh.hardware.chip.hbm_bytes_per_s
    for _, one, count in plan._one:
        program = one.program
        for op_plan in one.ops:
            if op_plan.op.kind is not OpKind.EINSUM or (
                ops is not None and op_plan.name not in ops
            ):
                continue
            params = [
                (t, dims) for t, dims in op_plan.at_op if program.tensor(t).kind is TensorKind.PARAM
            ]
            if not params:
                continue
            w = sum(_local_bytes(one, t, dims) for t, dims in params) / rate
            compute += count * op_plan.cost.compute_s
            weight_s += count * w
            other_s += count * (op_plan.cost.hbm_s - w)
    return compute, weight_s, other_s


def critical_batch(plan: ServePlan, ops: Collection[str] | None = None) -> CriticalBatch:
    """The token batch above which the step's weight matmuls (those named in ``ops``, e.g.
    the experts') turn compute-bound, solved from the plan: each such einsum's FLOPs and
    activation bytes scale with the batch, its weight bytes do not, so
    ``C·B/B₀ = W_w + A·B/B₀`` at ``B = B₀·W_w/(C - A)``."""
    compute, weight_s, other_s = weight_matmuls(plan, ops)
    tokens = plan.serving.tokens
    replicas = plan.strategy.replicas(plan.mesh)
    if compute == 0:
        return CriticalBatch(tokens=None, weights_only=None, replicas=replicas)
    exact = tokens * weight_s / (compute - other_s) if compute > other_s else None
    return CriticalBatch(tokens=exact, weights_only=tokens * weight_s / compute, replicas=replicas)


def model_parallel_limit(plan: ServePlan) -> float | None:
    """The model-parallel degree ``Y*`` above which the collectives over the model axes
    take longer than the work that model parallelism splits: their bandwidth terms (they
    move activations, whose bytes a ring moves whatever its size) against the larger of the
    matmuls' compute and the weights' HBM reads (both split ``Y`` ways): ``Y* = Y·T_split /
    T_ici``. Decode is weight-bound, so this is the book's ``F/(B·β)``, ``β = W_hbm/W_ici``
    (inference.md: 64 for F = 16384, B = 32, β = 8); prefill is compute-bound, so it is the
    training rule ``M_Y·F·W_ici/C``. ``None`` without model-parallel collectives."""
    axes = set(plan.strategy.tp) | set(plan.strategy.d)
    if not axes:
        return None
    ici = 0.0
    compute = 0.0
    for _, one, count in plan._one:
        for op_plan in one.ops:
            if op_plan.op.kind is OpKind.EINSUM:
                compute += count * op_plan.cost.compute_s
            for step in op_plan.collectives:
                cost = step.cost
                if cost is not None and cost.group_size > 1 and set(cost.axes) <= axes:
                    ici += count * cost.bandwidth_s
    if ici == 0:
        return None
    return plan.model_parallel_degree * max(compute, plan.weight_hbm_s) / ici


def batch_pieces(mesh: DeviceMesh, strategy: ServeStrategy, serving: Serving) -> int:
    """How many ways the strategy splits the sequences: over the replicas (and FSDP axes),
    over ``kvb`` at the attention core, and with ``sp`` over the tp axes between blocks
    (decode, whose only token letter is the batch)."""
    axes = [*strategy.dp, *strategy.fsdp]
    if serving.is_decode:
        axes += [*strategy.kvb]
        if strategy.sp:
            axes += [*strategy.tp]
    cp = set(strategy.cp)
    return math.prod(mesh.axis_size(a) for a in dict.fromkeys(axes) if a not in cp)


def batch_step(plan: ServePlan) -> int:
    """The batch must be a multiple of this (``batch_pieces`` of the plan's strategy)."""
    return batch_pieces(plan.mesh, plan.strategy, plan.serving)


def max_batch(
    plan: ServePlan, *, cache: dict[object, object] | None = None, limit: int = 1 << 20
) -> int:
    """The largest batch (sequences) of this step that fits in HBM under the plan's
    strategy: the weights stay, the KV cache and activations grow with the batch; from the
    plan's own memory, checked by planning at that batch (0: even one step's weights do not
    fit). A batch the layout cannot split (a mixture of experts' capacity slots over the
    expert axes) steps down to one it can."""
    if plan.config is None:
        raise PlanError("max_batch replans the model at other batches: plan it by its config")
    config = plan.config
    capacity = plan.capacity_bytes
    step = batch_step(plan)

    def near(guess: int) -> ServePlan | None:
        """A plan at ``guess`` or the nearest batch below it that the layout divides."""
        tries = [guess - i * step for i in range(8)]
        tries += [guess // (step << k) * (step << k) for k in range(1, 16)]
        for batch in dict.fromkeys(tries):
            if batch < step:
                continue
            trial = plan_serving(
                config,
                plan.mesh,
                plan.strategy,
                plan.serving.with_batch(batch),
                overlap=plan.overlap,
                cache=cache,
            )
            if not isinstance(trial, Rejected):
                return trial
        return None

    current = plan
    best = plan.serving.batch if plan.fits else 0
    for _ in range(8):
        fixed = current.memory.weights
        per_sequence = (current.memory.kv_cache + current.memory.activations) / (
            current.serving.batch
        )
        if fixed >= capacity or per_sequence <= 0:
            return best
        guess = min(limit, int((capacity - fixed) / per_sequence)) // step * step
        if guess < step or guess == current.serving.batch:
            return max(best, guess if current.fits else 0)
        trial = near(guess)
        if trial is None:
            return best
        if trial.fits:
            return max(best, trial.serving.batch)
        current = trial
    return best


# -- curves and results -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CurvePoint:
    """One batch of the sweep: the step and its parts (per chip)."""

    batch: int
    step_time_s: float
    tokens_per_s_per_chip: float
    fits: bool
    bottleneck: str
    memory_peak_bytes: float
    compute_s: float
    weight_compute_s: float  # the weight matmuls' part of compute_s
    weight_hbm_s: float
    kv_hbm_s: float
    hbm_s: float
    comm_s: float

    @classmethod
    def of(cls, plan: ServePlan) -> CurvePoint:
        return cls(
            weight_compute_s=weight_matmuls(plan)[0],
            batch=plan.serving.batch,
            step_time_s=plan.step_time_s,
            tokens_per_s_per_chip=plan.tokens_per_s_per_chip,
            fits=plan.fits,
            bottleneck=plan.bottleneck,
            memory_peak_bytes=plan.memory.peak,
            compute_s=plan.cost.compute_s,
            weight_hbm_s=plan.weight_hbm_s,
            kv_hbm_s=plan.kv_hbm_s,
            hbm_s=plan.cost.hbm_s,
            comm_s=plan.cost.comm_lower_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeCurve:
    """Latency against throughput over the batch, for one model, mesh and strategy."""

    label: str
    strategy: str
    points: tuple[CurvePoint, ...]
    critical_batch: float | None  # tokens per step: compute-bound above
    #: the same counting only the weights' bytes (the book's C/W_hbm form: 240 bf16 on v5e)
    critical_batch_weights_only: float | None
    max_batch: int  # the largest batch that fits (0: none)
    capacity_bytes: float
    #: the step at the largest batch that fits (None if none does)
    max_batch_point: CurvePoint | None = None
    tokens_per_sequence: int = 1  # prefill: the prompt length (the batch counts prompts)


def latency_throughput(
    config: ModelConfig,
    mesh: DeviceMesh,
    strategy: ServeStrategy | str,
    serving: Serving,
    batches: list[int] | None = None,
) -> ServeCurve:
    """Decode (or prefill) steps of ``strategy`` at each batch (by default powers of two
    times the batch step, up to past the critical batch and the largest that fits)."""
    strategy = ServeStrategy.parse(strategy)
    cache: dict[object, object] = {}
    base = require(plan_serving(config, mesh, strategy, serving, cache=cache), config)
    crit = critical_batch(base)
    fit = max_batch(base, cache=cache)
    step = batch_step(base)
    if batches is None:
        per_token = 1 if serving.is_decode else serving.context
        top = max(fit, (crit.tokens or 0) / per_token, serving.batch) * 2
        batches = []
        b = step
        while b <= max(top, step):
            batches.append(b)
            b *= 2
    points = []
    for b in sorted(set(batches)):
        if b % step:
            raise SpecError(
                f"batch {b} does not split over the axes that split the batch in "
                f"{strategy.name} ({step} ways); use multiples of {step}"
            )
        plan = require(
            plan_serving(config, mesh, strategy, serving.with_batch(b), cache=cache), config
        )
        points.append(CurvePoint.of(plan))
    fit_point = None
    if fit:
        at_fit = plan_serving(config, mesh, strategy, serving.with_batch(fit), cache=cache)
        fit_point = CurvePoint.of(require(at_fit, config))
    phase = "decode" if serving.is_decode else "prefill"
    return ServeCurve(
        label=(
            f"{config.name} {phase} on {mesh.hardware.name} {mesh.topology.shape_text}, "
            f"context {serving.context:,}, weights {serving.weights}, KV {serving.kv}"
        ),
        strategy=strategy.name,
        points=tuple(points),
        critical_batch=crit.tokens,
        critical_batch_weights_only=crit.weights_only,
        max_batch=fit,
        capacity_bytes=base.capacity_bytes,
        max_batch_point=fit_point,
        tokens_per_sequence=1 if serving.is_decode else serving.context,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Disaggregated:
    """Prefill and decode on two pools (two meshes): how many prefill pools keep one decode
    pool busy, and the time to move a sequence's cache between them."""

    prefill: ServePlan
    decode: ServePlan
    decode_tokens: int  # tokens generated per request (median)
    #: prefill pools per decode pool so that both stay busy: the book's ``P/G =
    #: B·T_prefill / (b_prefill·T_step·n_decode)`` (3 for LLaMA-3-70B at batch 32)
    prefill_per_decode: float
    kv_transfer_s: float | None  # one prompt's cache over the prefill pool's scale-out links


def disaggregate(prefill: ServePlan, decode: ServePlan, decode_tokens: int) -> Disaggregated:
    if decode_tokens < 1:
        raise SpecError(f"--decode-tokens {decode_tokens} must be at least 1")
    ratio = (decode.serving.batch * prefill.step_time_s) / (
        prefill.serving.batch * decode.step_time_s * decode_tokens
    )
    levels = prefill.mesh.hardware.scale_out
    transfer = None
    if levels:
        rate = levels[-1].bytes_per_s_per_chip_per_direction * prefill.mesh.num_devices
        transfer = prefill.kv_bytes_per_token * prefill.serving.context / rate
    return Disaggregated(
        prefill=prefill,
        decode=decode,
        decode_tokens=decode_tokens,
        prefill_per_decode=ratio,
        kv_transfer_s=transfer,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeResult:
    """What ``serve`` found: plans best first (those that fit before those that do not),
    the candidates rejected and why, and for decode the prefill behind the time to first
    token (one prompt, on the same mesh or the prefill pool)."""

    config: ModelConfig
    serving: Serving
    plans: tuple[ServePlan, ...]
    max_batches: tuple[int, ...]
    rejected: tuple[Rejected, ...] = ()
    prefill: ServePlan | None = None
    disaggregated: Disaggregated | None = None
    searched: int = 0

    @property
    def best(self) -> ServePlan:
        return self.plans[0]

    def time_to_first_token_s(self, plan: ServePlan) -> float | None:
        if not plan.serving.is_decode:
            return plan.step_time_s
        return None if self.prefill is None else self.prefill.step_time_s


def rank(plans: list[ServePlan]) -> list[ServePlan]:
    """Plans that fit first, then by step time (at a fixed batch, also by tokens/s/chip)."""
    return sorted(plans, key=lambda p: (not p.fits, p.step_time_s, p.name))


def search_serving(
    config: ModelConfig,
    mesh: DeviceMesh,
    serving: Serving,
    *,
    overlap: Overlap = Overlap.FULL,
    cache: dict[object, object] | None = None,
) -> tuple[list[ServePlan], list[Rejected]]:
    """Every candidate layout (``serving_candidates``), ranked."""
    cache = {} if cache is None else cache
    plans: list[ServePlan] = []
    rejected: list[Rejected] = []
    for candidate in serving_candidates(
        mesh, decode=serving.is_decode, moe=config.is_moe, kv_heads=config.k
    ):
        result = plan_serving(config, mesh, candidate, serving, overlap=overlap, cache=cache)
        if isinstance(result, Rejected):
            rejected.append(result)
        else:
            plans.append(result)
    return rank(plans), rejected


def serve(
    config: ModelConfig,
    mesh: DeviceMesh,
    serving: Serving,
    *,
    strategy: ServeStrategy | str | None = None,
    top: int = 5,
    prompt: int | None = None,
    prefill_mesh: DeviceMesh | None = None,
    decode_tokens: int | None = None,
    overlap: Overlap = Overlap.FULL,
) -> ServeResult:
    """Plan ``serving`` under ``strategy``, or search (``strategy=None``) and keep the
    ``top`` plans. For decode, also the best prefill of one ``prompt`` (default: the context)
    on ``prefill_mesh`` (default: the same mesh) for the time to first token; with a
    ``prefill_mesh`` and ``decode_tokens``, the disaggregated pools' balance."""
    if top < 1:
        raise SpecError(f"--top {top} must be at least 1")
    cache: dict[object, object] = {}
    rejected: list[Rejected] = []
    searched = 0
    if strategy is not None:
        plans = [require(plan_serving(config, mesh, strategy, serving, overlap=overlap), config)]
    else:
        found, rejected = search_serving(config, mesh, serving, overlap=overlap, cache=cache)
        searched = len(found) + len(rejected)
        if not found:
            reasons = "; ".join(f"{r.strategy}: {r.reason}" for r in rejected[:3])
            raise PlanError(
                f"no serving layout of {config.name} divides on mesh ({mesh.spec_text}): "
                f"{reasons}; use a mesh whose axes divide the heads and widths"
            )
        plans = found[:top]
    maxima = tuple(max_batch(plan, cache=cache) for plan in plans)
    prefill = None
    disaggregated = None
    if serving.is_decode:
        pre_serving = serving.with_phase(ServePhase.PREFILL, context=prompt or serving.context)
        pre_serving = pre_serving.with_batch(1)
        pre_mesh = prefill_mesh or mesh
        found, _ = search_serving(config, pre_mesh, pre_serving, overlap=overlap)
        if found:
            prefill = found[0]
            if prefill_mesh is not None:
                disaggregated = disaggregate(prefill, plans[0], decode_tokens or 512)
    return ServeResult(
        config=config,
        serving=serving,
        plans=tuple(plans),
        max_batches=maxima,
        rejected=tuple(rejected),
        prefill=prefill,
        disaggregated=disaggregated,
        searched=searched,
    )


def describe(plan: ServePlan) -> str:
    """A few lines on one plan: time, throughput, memory, bottleneck."""
    memory = plan.memory
    lines = [
        f"{plan.name} on mesh ({plan.mesh.spec_text})",
        f"  step {format_seconds(plan.step_time_s)} (no overlap "
        f"{format_seconds(plan.step_upper_s)}): compute {format_seconds(plan.cost.compute_s)}, "
        f"HBM {format_seconds(plan.cost.hbm_s)} (weights {format_seconds(plan.weight_hbm_s)}, "
        f"KV cache {format_seconds(plan.kv_hbm_s)}), communication "
        f"{format_seconds(plan.cost.comm_lower_s)}; bottleneck {plan.describe_bottleneck()}",
        f"  memory per chip: weights {format_bytes(memory.weights)}, KV cache "
        f"{format_bytes(memory.kv_cache)}, activations {format_bytes(memory.activations)} = "
        f"{format_bytes(memory.peak)} of {format_bytes(plan.capacity_bytes)}"
        + ("" if plan.fits else " (does not fit)"),
    ]
    return "\n".join(lines)
