"""Whole models in training: a stack of blocks, its ends, microbatches and pipelines.

A model is planned as a few programs evaluated with the same strategy and composed by cost
algebra, not as one graph of every layer (80 layers of ~50 ops each would be slow to cost
and say nothing new):

* ``block``: one decoder block, forward and backward (``layers.build_layer``), repeated
  ``L`` times (``ProgramPlan.repeat``; a mixture-of-experts model has a dense and a MoE
  block, each repeated its number of layers);
* ``ends``: the embedding lookup, the final norm, the unembedding and the loss, forward and
  backward (tied embeddings: one parameter, its two gradients summed);
* the optimizer update of every parameter (AdamW), once per step.

A step runs ``microbatches`` microbatches (gradient accumulation): each does the forward
and backward passes; the data-parallel gradient reductions (over dp axes, not FSDP's, which
reduce-scatter every microbatch as ZeRO-3 does) run once, with the last microbatch's
backward pass. With pipeline parallelism over ``pp`` axes, each of the ``P`` stages holds
``L/P`` blocks; a schedule (GPipe, 1F1B, interleaved with ``v`` chunks) runs the
microbatches with a bubble of ``(P-1)/(v·m + P-1)`` of the step, sends each microbatch's
activations (and their gradients) to the next stage by collective-permute, and keeps as
many microbatches' activations in flight as the schedule needs (GPipe ``m``, 1F1B ``P``).
FSDP weights are gathered again by every microbatch of every stage: the book's ZeRO-3
conflict, which the costs show.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from ..collectives import Collective, collective_cost
from ..errors import PlanError, SpecError
from ..estimate import CommTerm, Cost, Overlap
from ..mesh import DeviceMesh
from ..plans import Rejected
from ..units import format_bytes
from .autodiff import OptimizerSpec, Remat, training
from .config import ModelConfig
from .evaluate import Evaluation, MemoryBreakdown, ProgramPlan
from .graph import LetterRoles, Op, OpInput, OpKind, Program, Tensor, TensorKind
from .layers import LayerKind, LayerSpec, build_layer
from .strategies import Strategy, place


class Schedule(enum.Enum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"

    @classmethod
    def parse(cls, text: str | Schedule) -> Schedule:
        if isinstance(text, Schedule):
            return text
        for item in cls:
            if item.value == text.strip().lower():
                return item
        raise SpecError(f"unknown pipeline schedule {text!r}; expected gpipe, 1f1b or interleaved")


@dataclass(frozen=True, slots=True, kw_only=True)
class Training:
    """What a training step is, besides the strategy: the batch, the sequence, the
    microbatches, the pipeline schedule, remat and the optimizer."""

    batch_tokens: int
    seq_len: int
    microbatches: int = 1
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1  # chunks per device for the interleaved schedule
    remat: Remat = Remat.NONE
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch_tokens < 1:
            raise SpecError("batch tokens and sequence length must be positive")
        if self.batch_tokens % self.seq_len:
            raise SpecError(
                f"--batch-tokens {self.batch_tokens} is not a whole number of sequences of "
                f"{self.seq_len}; use a multiple of {self.seq_len}"
            )
        sequences = self.batch_tokens // self.seq_len
        if self.microbatches < 1 or sequences % self.microbatches:
            raise SpecError(
                f"{self.microbatches} microbatches do not split the {sequences} sequences of "
                "the batch evenly; choose a divisor"
            )
        if self.virtual_stages < 1:
            raise SpecError(f"virtual stages {self.virtual_stages} must be at least 1")

    @property
    def microbatch_tokens(self) -> int:
        return self.batch_tokens // self.microbatches


def ends_program(config: ModelConfig, tokens: int, seq_len: int) -> Program:
    """Embedding lookup (ids -> x0) and the head (x_L -> norm -> logits -> loss)."""
    dims = (("b", tokens // seq_len), ("t", seq_len), ("d", config.d), ("v", config.vocab))
    dt = config.dtype
    table = "w_embed"
    head = table if config.tie_embeddings else "w_unembed"
    tensors = [
        Tensor(name="ids", letters="bt", dtype="int32", kind=TensorKind.INPUT),
        Tensor(name="x_last", letters="btd", dtype=dt, kind=TensorKind.INPUT),
        Tensor(name=table, letters="vd", dtype=dt, kind=TensorKind.PARAM),
        Tensor(name="final_norm_scale", letters="d", dtype=dt, kind=TensorKind.PARAM),
        Tensor(name="x0", letters="btd", dtype=dt, kind=TensorKind.ACTIVATION),
        Tensor(name="xn_final", letters="btd", dtype=dt, kind=TensorKind.ACTIVATION),
        Tensor(name="logits", letters="btv", dtype=dt, kind=TensorKind.ACTIVATION),
        Tensor(name="loss", letters="bt", dtype="float32", kind=TensorKind.ACTIVATION),
    ]
    if not config.tie_embeddings:
        tensors.insert(3, Tensor(name=head, letters="vd", dtype=dt, kind=TensorKind.PARAM))
    ops = (
        Op(
            name="embed",
            kind=OpKind.GATHER,
            inputs=(OpInput(tensor="ids", letters="bt"), OpInput(tensor=table, letters="vd")),
            output="x0",
            out_letters="btd",
            fn="gather",
            stage="embed",
        ),
        Op(
            name="final_norm",
            kind=OpKind.NORM,
            inputs=(
                OpInput(tensor="x_last", letters="btd"),
                OpInput(tensor="final_norm_scale", letters="d"),
            ),
            output="xn_final",
            out_letters="btd",
            fn="rmsnorm",
            reduce_letters="d",
            stage="io",
        ),
        Op(
            name="unembed",
            kind=OpKind.EINSUM,
            inputs=(OpInput(tensor="xn_final", letters="btd"), OpInput(tensor=head, letters="vd")),
            output="logits",
            out_letters="btv",
            stage="head",
        ),
        Op(
            name="loss",
            kind=OpKind.LOSS,
            inputs=(OpInput(tensor="logits", letters="btv"),),
            output="loss",
            out_letters="bt",
            fn="xent",
            stage="head",
        ),
    )
    return Program(
        name="embedding and head",
        dims=dims,
        tensors=tuple(tensors),
        ops=ops,
        roles=LetterRoles(batch="b", sequence="t", model="d", hidden=("v",)),
        outputs=("x0", "loss"),
        stages=(("embed", "matmul"), ("io", "boundary"), ("head", "matmul")),
        tokens=tokens,
    )


def block_spec(config: ModelConfig, tokens: int, seq_len: int) -> LayerSpec:
    return LayerSpec(
        kind=LayerKind.BLOCK,
        d=config.d,
        f=config.f,
        n=config.n,
        k=config.k,
        h=config.h,
        t=seq_len,
        batch_tokens=tokens,
        dtype=config.dtype,
        attention=config.attention,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipeline:
    """The pipeline of a plan: stages, microbatches, schedule, and what it costs."""

    stages: int
    microbatches: int
    schedule: Schedule
    virtual_stages: int
    bubble_fraction: float
    permute_s: float  # per step, on the critical path
    in_flight: int  # microbatches whose activations a stage holds at once


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPlan:
    """A model's training step under one strategy."""

    config: ModelConfig
    mesh: DeviceMesh
    strategy: Strategy
    training: Training
    parts: tuple[tuple[str, ProgramPlan], ...]  # repeated as the stack needs (per stage)
    step_lower_s: float
    step_upper_s: float
    compute_s: float
    comm_s: float
    hbm_s: float
    memory: MemoryBreakdown
    pipeline: Pipeline | None
    model_flops: float  # per step, all chips: 6·params·tokens + attention (no remat)
    grad_reduction_s: float  # data-parallel gradient reductions, once per step
    comm: tuple[CommTerm, ...] = ()
    #: per part, one microbatch's forward and backward passes without the data-parallel
    #: gradient reductions (those and the optimizer's update run once per step)
    microbatch_costs: tuple[tuple[str, Cost], ...] = ()
    optimizer_s: float = 0.0  # the optimizer's update, once per step (lower bound)

    @property
    def name(self) -> str:
        """The strategy with the step's microbatches, schedule and remat: what
        ``--strategy`` takes back."""
        t = self.training
        pipelined = bool(self.strategy.pp)
        return self.strategy.replace(
            mb=t.microbatches if t.microbatches > 1 else 0,
            schedule=t.schedule.value if pipelined else "",
            vs=t.virtual_stages if pipelined and t.virtual_stages > 1 else 0,
            remat=t.remat.value if t.remat.value != "none" else "",
        ).name

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.mesh.hardware.chip.hbm_capacity_bytes

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.training.batch_tokens / self.step_lower_s / self.mesh.num_devices

    @property
    def mfu(self) -> float:
        """Model FLOPs over (step time × chips × peak): what the step achieves of the chips'
        bf16 peak, counting the model's FLOPs (not remat's recomputation)."""
        peak = self.mesh.hardware.chip.peak_flops_per_s_for(self.config.dtype)
        return self.model_flops / (self.step_lower_s * self.mesh.num_devices * peak)

    @property
    def bottleneck(self) -> str:
        if self.comm_s > max(self.compute_s, self.hbm_s) and self.step_lower_s > self.compute_s:
            return "comm"
        return "compute" if self.compute_s >= self.hbm_s else "hbm"

    def describe_bottleneck(self) -> str:
        if self.bottleneck != "comm":
            return {"compute": "compute", "hbm": "HBM bandwidth"}[self.bottleneck]
        totals: dict[tuple[tuple[str, ...], str], float] = {}
        for term in self.comm:
            key = (term.axes, term.link)
            totals[key] = totals.get(key, 0.0) + term.time_s
        if not totals:
            return "communication"
        axes, link = max(totals, key=lambda key: totals[key])
        return f"communication over {'+'.join(axes)} ({link})"

    def part(self, name: str) -> ProgramPlan:
        for part_name, plan in self.parts:
            if part_name == name:
                return plan
        raise PlanError(f"plan {self.name} has no part {name!r}")


def model_flops(config: ModelConfig, training_: Training) -> float:
    """The step's model FLOPs, all chips: every matmul of forward and backward once (no
    remat), from the programs themselves (6·params·tokens plus attention)."""
    tokens = training_.batch_tokens
    block = training(build_layer(block_spec(config, tokens, training_.seq_len)))
    ends = training(ends_program(config, tokens, training_.seq_len))
    dense = config.layers - config.moe_layers
    total = dense * _global_flops(block) + _global_flops(ends)
    if config.moe_layers:
        from .moe import moe_block  # noqa: PLC0415

        total += config.moe_layers * _global_flops(
            training(moe_block(config, tokens, training_.seq_len))
        )
    return total


def _global_flops(program: Program) -> float:
    sizes = program.sizes
    return sum(
        2.0 * math.prod(sizes[c] for c in op.letters) * op.flops_scale
        for op in program.ops
        if op.kind is OpKind.EINSUM
    )


def _pp_axes(strategy: Strategy) -> tuple[str, ...]:
    return strategy.pp


def plan_model(
    config: ModelConfig,
    mesh: DeviceMesh,
    strategy: Strategy | str,
    training_: Training,
    *,
    overlap: Overlap = Overlap.FULL,
    idle_axes: bool = True,
    cache: dict[object, object] | None = None,
) -> ModelPlan | Rejected:
    """The model's training step under ``strategy`` (``fsdp=x,tp=y,pp=z`` with
    ``mb=``/``schedule=``... in ``Training``); ``Rejected`` with the reason when it cannot
    run. ``cache`` reuses evaluations across calls (a search)."""
    strategy = Strategy.parse(strategy)
    strategy.check(mesh)
    cache = {} if cache is None else cache
    pp_axes = strategy.pp
    stages = math.prod(mesh.axis_size(a) for a in pp_axes) if pp_axes else 1
    if config.layers % stages and config.layers >= stages:
        # uneven stages: the largest stage sets the pace (ceil)
        pass
    if stages > config.layers:
        return Rejected(
            strategy=strategy.name,
            reason=f"{stages} pipeline stages exceed the model's {config.layers} layers",
        )
    m = training_.microbatches
    if pp_axes and m < stages:
        return Rejected(
            strategy=strategy.name,
            reason=(
                f"{m} microbatches cannot fill {stages} pipeline stages; use at least "
                f"{stages} (more shrink the bubble)"
            ),
        )
    tokens = training_.microbatch_tokens
    seq = training_.seq_len
    layers_per_stage = math.ceil(config.layers / stages)
    dense_layers = config.layers - config.moe_layers
    parts: list[tuple[str, ProgramPlan, int]] = []
    programs: list[tuple[str, Program, int]] = []
    block = training(
        build_layer(block_spec(config, tokens, seq)), remat=training_.remat, optimizer=True
    )
    if dense_layers:
        programs.append(("block", block, math.ceil(dense_layers / stages)))
    if config.moe_layers:
        from .moe import moe_block  # noqa: PLC0415

        moe = training(moe_block(config, tokens, seq), remat=training_.remat, optimizer=True)
        programs.append(("moe block", moe, math.ceil(config.moe_layers / stages)))
    ends = training(ends_program(config, tokens, seq), optimizer=True)
    programs.append(("ends", ends, 1))
    del layers_per_stage
    for name, program, count in programs:
        key = (name, program.dims, strategy, training_.remat, idle_axes, mesh.spec_text)
        plan = cache.get(key)
        if plan is None:
            evaluation = cache.setdefault(
                ("evaluation", name, program.dims, training_.remat, mesh.spec_text),
                Evaluation(program, mesh, training_.optimizer, overlap, exclude_widen=pp_axes),
            )
            assert isinstance(evaluation, Evaluation)
            plan = evaluation(place(program, mesh, strategy, idle_axes=idle_axes))
            cache[key] = plan
        if isinstance(plan, Rejected):
            return Rejected(strategy=strategy.name, reason=f"{name}: {plan.reason}")
        assert isinstance(plan, ProgramPlan)
        parts.append((name, plan, count))
    return _compose(config, mesh, strategy, training_, parts=parts, stages=stages)


def _dp_grad_terms(plan: ProgramPlan, dp: tuple[str, ...]) -> list[CommTerm]:
    """The backward pass's reductions of parameter gradients over data-parallel axes
    (run once per step, not once per microbatch)."""
    program = plan.program
    params = {g for f, g in program.gradients if program.tensor(f).kind is TensorKind.PARAM}
    terms: list[CommTerm] = []
    for op in plan.ops:
        for step in op.steps_out:
            cost = step.cost
            if (
                cost is not None
                and step.operand in params
                and cost.kind in (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER)
                and set(cost.axes) <= set(dp)
            ):
                terms.append(
                    CommTerm(
                        cost.axes,
                        cost.link,
                        cost.time_s,
                        cost.bytes_sent_per_chip,
                        plan.mesh.link_resources(cost.axes),
                    )
                )
    return terms


def _without(cost: Cost, drop: list[CommTerm]) -> Cost:
    remaining = list(cost.comm)
    for term in drop:
        if term in remaining:
            remaining.remove(term)
    return Cost(
        flops=cost.flops,
        hbm_bytes=cost.hbm_bytes,
        compute_s=cost.compute_s,
        hbm_s=cost.hbm_s,
        comm=tuple(remaining),
        local_s=cost.local_s,
        vector_flops=cost.vector_flops,
        peak_memory_bytes=cost.peak_memory_bytes,
    )


def _compose(
    config: ModelConfig,
    mesh: DeviceMesh,
    strategy: Strategy,
    training_: Training,
    *,
    parts: list[tuple[str, ProgramPlan, int]],
    stages: int,
) -> ModelPlan:
    m = training_.microbatches
    dp = strategy.dp
    forward = Cost.zero()
    backward = Cost.zero()  # one microbatch, without the once-per-step gradient reductions
    grads: list[CommTerm] = []
    optimizer = Cost.zero()
    repeated: list[tuple[str, ProgramPlan]] = []
    microbatch_costs: list[tuple[str, Cost]] = []
    memory_parts: list[MemoryBreakdown] = []
    for name, plan, count in parts:
        stack = plan.repeat(count) if count > 1 else plan
        repeated.append((name, stack))
        reduce_once = _dp_grad_terms(plan, dp) if m > 1 or stages > 1 else []
        forward = forward + stack.pass_cost("forward")
        back = stack.pass_cost("backward")
        if reduce_once:
            scaled = [t * count for t in reduce_once]
            back = _without(back, scaled)
            grads += scaled
        backward = backward + back
        optimizer = optimizer + stack.pass_cost("optimizer")
        microbatch_costs.append((name, stack.pass_cost("forward").then(back)))
        memory_parts.append(stack.memory)
    pipeline: Pipeline | None = None
    permute_s = 0.0
    in_flight = 1
    bubble = 0.0
    if stages > 1:
        virtual = training_.virtual_stages if training_.schedule is Schedule.INTERLEAVED else 1
        bubble = (stages - 1) / (virtual * m + stages - 1)
        in_flight = m if training_.schedule is Schedule.GPIPE else stages
        permute_s = _stage_permutes(mesh, strategy, config, training_) * virtual
        pipeline = Pipeline(
            stages=stages,
            microbatches=m,
            schedule=training_.schedule,
            virtual_stages=virtual,
            bubble_fraction=bubble,
            permute_s=permute_s,
            in_flight=in_flight,
        )
    per_microbatch_lower = forward.lower_bound_s + backward.lower_bound_s
    per_microbatch_upper = forward.upper_bound_s + backward.upper_bound_s
    grad_reduction = Cost(comm=tuple(grads))
    # the last microbatch's backward pass overlaps the gradient reductions
    last_backward = backward + grad_reduction
    lower = (m - 1) * per_microbatch_lower + forward.lower_bound_s + last_backward.lower_bound_s
    upper = m * per_microbatch_upper + grad_reduction.comm_s
    if stages > 1:
        # m microbatches through P stages: the step stretches by 1/(1 - bubble), and each
        # microbatch's activations hop between stages (forward and backward)
        lower = lower / (1 - bubble) + permute_s
        upper = upper / (1 - bubble) + permute_s
    lower += optimizer.lower_bound_s
    upper += optimizer.upper_bound_s
    memory = _sum_memory(memory_parts, in_flight=in_flight)
    compute = m * (forward.compute_s + backward.compute_s) + optimizer.compute_s
    comm = m * (forward.comm_s + backward.comm_s) + grad_reduction.comm_s + optimizer.comm_s
    hbm = m * (forward.hbm_s + backward.hbm_s) + optimizer.hbm_s
    return ModelPlan(
        config=config,
        mesh=mesh,
        strategy=strategy,
        training=training_,
        parts=tuple(repeated),
        step_lower_s=lower,
        step_upper_s=upper,
        compute_s=compute,
        comm_s=comm + permute_s,
        hbm_s=hbm,
        memory=memory,
        pipeline=pipeline,
        model_flops=model_flops(config, training_),
        grad_reduction_s=grad_reduction.comm_s,
        comm=forward.comm + backward.comm + tuple(grads) + optimizer.comm,
        microbatch_costs=tuple(microbatch_costs),
        optimizer_s=optimizer.lower_bound_s,
    )


def _stage_permutes(
    mesh: DeviceMesh, strategy: Strategy, config: ModelConfig, training_: Training
) -> float:
    """Seconds per step of the pipeline's boundary sends: each microbatch's activations
    ``[tokens/data, d]`` go to the next stage and their gradient comes back, on the
    critical path once per stage boundary and microbatch... of which the schedule overlaps
    all but the first fill and last drain: ``2·(P-1)`` sends on the critical path."""
    axes = strategy.pp
    data = math.prod(mesh.axis_size(a) for a in (*strategy.dp, *strategy.fsdp))
    tp = math.prod(mesh.axis_size(a) for a in strategy.tp) if strategy.sp else 1
    elements = training_.microbatch_tokens * config.d // max(data * tp, 1)
    cost = collective_cost(
        mesh, Collective.COLLECTIVE_PERMUTE, axes, elements_in_per_chip=elements, dtype=config.dtype
    )
    stages = math.prod(mesh.axis_size(a) for a in axes)
    return 2 * (stages - 1) * cost.time_s


def _sum_memory(parts: list[MemoryBreakdown], *, in_flight: int) -> MemoryBreakdown:
    items: list[tuple[str, str, float]] = []
    for part in parts:
        items += list(part.items)
    items.sort(key=lambda item: -item[2])
    transient = max((p.transient for p in parts), default=0.0)
    return MemoryBreakdown(
        params=sum(p.params for p in parts),
        grads=sum(p.grads for p in parts),
        optimizer=sum(p.optimizer for p in parts),
        activations=in_flight * sum(p.activations for p in parts),
        transient=transient,
        items=tuple(items),
        transient_op=max(parts, key=lambda p: p.transient).transient_op if parts else "",
    )


def overflow_reason(plan: ModelPlan) -> str:
    capacity = plan.mesh.hardware.chip.hbm_capacity_bytes
    return (
        plan.memory.overflow(capacity)
        if plan.memory.peak > capacity
        else (f"fits: {format_bytes(plan.memory.peak)} of {format_bytes(capacity)}")
    )
