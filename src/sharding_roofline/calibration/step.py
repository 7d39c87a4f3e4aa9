"""A whole training step, calibrated: ``calibrate_model_plan(plan) -> CalibratedModelTime``.

The roofline's model plan (``program.model.plan_model``) gives every op of one microbatch
on the slowest pipeline stage, at its local shapes and with its collectives. This module
re-times them with the preset's calibration and composes the step the way a measured
framework runs it (``model.TrainingStepFit``, docs/calibration.md "Training step model"):

1. ``step_features``: per microbatch slot, the calibrated matmul seconds (each einsum as
   a GEMM, ``calibrated_matmul``), the memory-bound ops' HBM seconds, and the calibrated
   per-microbatch collectives (tensor-parallel and FSDP traffic, one call each); per step,
   the gradient reductions and the optimizer's collectives, each fused into one bucket
   per (op, mesh axes) as frameworks bucket them, and the optimizer's own time. Memory:
   the planner's breakdown.
2. ``step_time_s`` and ``memory_bytes``: the fitted formulas.
3. ``calibrate_model_plan``: both, beside the roofline, with intervals and the source; a
   preset without a training-step calibration (every TPU, and the GPUs without Playbook
   runs) gets the roofline and the reason.

Pure Python; no JAX. The planner is imported only for its types.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..collectives import Collective
from ..dtypes import canonical_dtype, dtype_bytes
from ..errors import SpecError
from ..mesh import DeviceMesh
from ..program.evaluate import OpPlan
from ..program.graph import Op, OpKind, Phase, Program, TensorKind
from ..units import format_bytes, format_seconds
from .apply import SHIPPED, _resolve, _Shipped, calibrated_collective
from .model import (
    Calibration,
    MemoryOverheadFit,
    RatioInterval,
    StallFit,
    TrainingStepFit,
    matmul_terms_s,
)

if TYPE_CHECKING:
    from ..program.model import ModelPlan

#: Parts of a model plan that are not repeated decoder blocks (the embedding and head).
ENDS_PART = "ends"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFeatures:
    """What the calibrated step formula reads from one model plan (seconds are calibrated
    where the preset has fits, else the roofline's; ``uncalibrated`` lists those).

    Per microbatch slot of the slowest pipeline stage: ``matmul_s``, ``vector_s`` (the
    memory-bound ops at their HBM roofline), ``comm_s`` (the per-microbatch collectives
    one after another), ``layers`` (decoder blocks on the stage) and ``tp_ring_steps``
    (the tensor-parallel group's size minus one). Per step: ``gradient_s`` (the bucketed
    gradient reductions), ``optimizer_s`` (the update and its bucketed collectives).
    ``stages`` and ``microbatches`` set the pipeline's ``m + P - 1`` slots.

    Memory per chip, from the planner: ``persistent_bytes`` (parameters, gradients and
    optimizer state), ``local_params`` (parameters held, for a gradient-accumulation
    buffer), ``activation_bytes`` and ``transient_bytes``.
    """

    matmul_s: float
    vector_s: float
    comm_s: float
    layers: int
    tp_ring_steps: int
    gradient_s: float
    optimizer_s: float
    stages: int
    microbatches: int
    persistent_bytes: float
    local_params: float
    activation_bytes: float
    transient_bytes: float
    uncalibrated: tuple[str, ...] = ()
    #: NVLink domains (nodes) the mesh spans; sets the stall probability (``StallFit``)
    nodes: int = 1
    #: the data-parallel degree (replicas over the ``dp`` axes) and the ZeRO stage: a
    #: pipelined data-parallel run with ZeRO-0 has its own stall hazard (``StallFit``)
    data_parallel: int = 1
    zero: int = 0

    @property
    def zero0_data_parallel(self) -> bool:
        """Data-parallel with the optimizer state replicated (ZeRO-0)."""
        return self.data_parallel > 1 and self.zero == 0

    @property
    def slots(self) -> int:
        """Microbatch slots of the step: ``m + P - 1`` (``m`` without pipelining)."""
        return self.microbatches + self.stages - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class _Rates:
    """Caches of calibrated figures across plans (a benchmark costs thousands), keyed by
    the calibration's ``id``; ``owners`` keeps each calibration alive so that no id is
    reused while its entries exist."""

    matmul: dict[tuple[object, ...], float] = field(default_factory=dict)
    collective: dict[tuple[object, ...], tuple[float, bool]] = field(default_factory=dict)
    owners: dict[int, object] = field(default_factory=dict)

    def owner(self, calibration: Calibration | None) -> int:
        key = id(calibration)
        self.owners.setdefault(key, calibration)
        return key


_RATES = _Rates()


def _gemm(
    op: Op, sizes: dict[str, int], sigma: dict[str, tuple[str, ...]], mesh: DeviceMesh
) -> tuple[int, int, int, int]:
    """``(batch, m, n, k)`` of a two-input einsum op at its local shapes (letters in both
    inputs and the output are batch, in one input and the output free, in both inputs
    only contracted)."""
    local = {
        c: sizes[c] // math.prod(mesh.axis_size(a) for a in sigma.get(c, ())) for c in op.letters
    }
    lhs, rhs = op.inputs[0].letters, op.inputs[1].letters
    out = op.out_letters
    batch = math.prod(local[c] for c in lhs if c in rhs and c in out)
    m = math.prod(local[c] for c in lhs if c in out and c not in rhs)
    n = math.prod(local[c] for c in rhs if c in out and c not in lhs)
    k = math.prod(local[c] for c in lhs if c in rhs and c not in out)
    return batch, m, n, k


def _matmul_s(
    op_plan: OpPlan,
    program: Program,
    sizes: dict[str, int],
    mesh: DeviceMesh,
    calibration: Calibration | None,
) -> float | None:
    """Calibrated seconds of one einsum op at its local shapes, moving the HBM bytes the
    planner counts for it (flash attention keeps its scores on chip) and doing
    ``flops_scale`` of the GEMM's FLOPs (a causal kernel skips the masked half); None
    without a GEMM fit for its dtypes."""
    op = op_plan.op
    lhs = program.tensor(op.inputs[0].tensor).dtype
    rhs = program.tensor(op.inputs[1].tensor).dtype
    fit = calibration.matmul_fit(lhs, rhs) if calibration is not None else None
    if fit is None:
        return None
    batch, m, n, k = _gemm(op, sizes, dict(op_plan.sigma), mesh)
    hbm_bytes = op_plan.cost.hbm_bytes
    key = (_RATES.owner(calibration), mesh.hardware.name, batch, m, n, k, lhs, rhs, hbm_bytes)
    found = _RATES.matmul.get(key)
    if found is None:
        chip = mesh.hardware.chip
        floor_s, compute_s, hbm_s = matmul_terms_s(
            fit,
            m=m,
            n=n,
            k=k,
            batch=batch,
            peak_flops_per_s=min(chip.peak_flops_per_s_for(lhs), chip.peak_flops_per_s_for(rhs)),
            hbm_bytes_per_s=chip.hbm_bytes_per_s,
            hbm_bytes=hbm_bytes,
        )
        found = floor_s + max(op.flops_scale * compute_s, hbm_s)
        _RATES.matmul[key] = found
    return found


def _collective_s(
    mesh: DeviceMesh,
    kind: Collective,
    axes: tuple[str, ...],
    *,
    elements: int,
    dtype: str,
    calibration: Calibration | None,
) -> tuple[float, bool]:
    """(seconds, calibrated?) of one collective: the calibrated time where the preset has
    a fit for it, else the roofline's."""
    key = (
        _RATES.owner(calibration),
        mesh.spec_text,
        mesh.hardware.name,
        kind,
        axes,
        elements,
        dtype,
    )
    found = _RATES.collective.get(key)
    if found is None:
        figure = calibrated_collective(
            mesh, kind, axes, elements_in_per_chip=elements, dtype=dtype, calibration=calibration
        )
        found = (figure.time_s, figure.calibrated_s is not None)
        _RATES.collective[key] = found
    return found


def step_features(
    plan: ModelPlan,
    calibration: Calibration | None,
    *,
    gradient_reduce_dtype: str = "",
    microbatches: int | None = None,
) -> StepFeatures:
    """The calibrated terms of ``plan``'s step (``StepFeatures``).

    ``gradient_reduce_dtype`` is the dtype gradients are reduced in (default: as the plan
    holds them). ``microbatches`` runs the step with that many microbatches instead of the
    plan's: the planner refuses fewer microbatches than pipeline stages, which frameworks
    run (with a large bubble); plan with ``m = P`` and pass the real ``m`` here. Its
    in-flight activations shrink to ``min(m, P)`` microbatches.
    """
    mesh = plan.mesh
    strategy = plan.strategy
    fsdp = set(strategy.fsdp)
    reduce_dtype = canonical_dtype(gradient_reduce_dtype) if gradient_reduce_dtype else ""
    matmul_s = vector_s = comm_s = optimizer_s = 0.0
    buckets: dict[tuple[str, Collective, tuple[str, ...], str], int] = defaultdict(int)
    missing: dict[str, None] = {}
    layers = 0
    for name, part in plan.parts:
        count = part.layers
        if name != ENDS_PART:
            layers += count
        program = part.program
        sizes = program.sizes
        params = {g for f, g in program.gradients if program.tensor(f).kind is TensorKind.PARAM}
        for op_plan in part.ops:
            op = op_plan.op
            if op.phase is Phase.OPTIMIZER:
                optimizer_s += count * op_plan.cost.local_s
            elif op.kind is OpKind.EINSUM:
                seconds = _matmul_s(op_plan, program, sizes, mesh, calibration)
                if seconds is None:
                    dtype = program.tensor(op.inputs[0].tensor).dtype
                    missing[f"{dtype} matmuls"] = None
                    matmul_s += count * op_plan.cost.local_s
                else:
                    matmul_s += count * seconds
            else:
                vector_s += count * op_plan.cost.local_s
            for step in op_plan.collectives:
                cost = step.cost
                if cost is None or cost.group_size <= 1:
                    continue
                if op.phase is Phase.OPTIMIZER:
                    buckets["optimizer", cost.kind, cost.axes, cost.dtype] += (
                        count * cost.elements_in_per_chip
                    )
                    continue
                gradient = (
                    step in op_plan.steps_out
                    and step.operand in params
                    and cost.kind in (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER)
                    and not fsdp & set(cost.axes)
                )
                if gradient:  # once per step, bucketed (FSDP's run every microbatch)
                    dtype = reduce_dtype or cost.dtype
                    buckets["gradient", cost.kind, cost.axes, dtype] += (
                        count * cost.elements_in_per_chip
                    )
                    continue
                seconds, calibrated = _collective_s(
                    mesh,
                    cost.kind,
                    cost.axes,
                    elements=cost.elements_in_per_chip,
                    dtype=cost.dtype,
                    calibration=calibration,
                )
                if not calibrated:
                    missing[f"{cost.kind.value} over {'+'.join(cost.axes)}"] = None
                comm_s += count * seconds
    gradient_s = 0.0
    for (role, kind, axes, dtype), elements in buckets.items():
        seconds, calibrated = _collective_s(
            mesh, kind, axes, elements=elements, dtype=dtype, calibration=calibration
        )
        if not calibrated:
            missing[f"{kind.value} over {'+'.join(axes)}"] = None
        if role == "gradient":
            gradient_s += seconds
        else:
            optimizer_s += seconds
    stages = plan.pipeline.stages if plan.pipeline is not None else 1
    in_flight = plan.pipeline.in_flight if plan.pipeline is not None else 1
    m = plan.training.microbatches if microbatches is None else microbatches
    if m < 1:
        raise SpecError(f"microbatches={m} must be at least 1")
    activations = plan.memory.activations
    if microbatches is not None and stages > 1:
        activations *= min(m, stages) / in_flight
    memory = plan.memory
    tp_size = math.prod(mesh.axis_size(a) for a in strategy.tp)
    nvlink = mesh.hardware.nvlink
    per_node = nvlink.gpus_per_domain if nvlink is not None else mesh.num_devices
    return StepFeatures(
        matmul_s=matmul_s,
        vector_s=vector_s,
        comm_s=comm_s,
        layers=max(layers, 1),
        tp_ring_steps=tp_size - 1,
        gradient_s=gradient_s,
        optimizer_s=optimizer_s,
        stages=stages,
        microbatches=m,
        persistent_bytes=memory.params + memory.grads + memory.optimizer,
        local_params=memory.params / dtype_bytes(plan.config.dtype),
        activation_bytes=activations,
        transient_bytes=memory.transient,
        uncalibrated=tuple(missing),
        nodes=max(1, math.ceil(mesh.num_devices / max(per_node, 1))),
        data_parallel=math.prod(mesh.axis_size(a) for a in strategy.dp),
        zero=strategy.zero,
    )


# -- the formulas ----------------------------------------------------------------------------


def slot_time_s(fit: TrainingStepFit, features: StepFeatures) -> float:
    """One microbatch slot on the slowest stage (``TrainingStepFit``'s formula)."""
    pipelined = features.stages > 1
    device = features.matmul_s + fit.vector_time_factor * features.vector_s
    comm = features.comm_s
    exposed = device + comm - fit.hidden_fraction * min(device, comm)
    per_layer = fit.host_floor_per_layer_s
    if pipelined:
        per_layer += fit.pipeline_tp_floor_per_layer_step_s * features.tp_ring_steps
    floor = features.layers * per_layer
    return max(exposed, floor) + (fit.pipeline_send_s if pipelined else 0.0)


def step_time_s(fit: TrainingStepFit, features: StepFeatures) -> float:
    """The calibrated step time (``TrainingStepFit``'s formula)."""
    return (
        features.slots * slot_time_s(fit, features)
        + (1.0 - fit.gradient_hidden_fraction) * features.gradient_s
        + features.optimizer_s
        + fit.fixed_step_s
    )


def stall_exchanges(features: StepFeatures) -> int:
    """Stage-to-stage exchanges a stalled slot waits on: 2 for a stage with two pipeline
    neighbours (``P >= 3``), else 1."""
    return 2 if features.stages >= 3 else 1


def stall_time_s(stall: StallFit, features: StepFeatures) -> float:
    """What a stalled step loses: ``(m + P - 1)·exchanges·stall_per_exchange_s``."""
    return features.slots * stall_exchanges(features) * stall.stall_per_exchange_s


def stall_probability(
    stall: StallFit, features: StepFeatures, *, memory_bytes: float, capacity_bytes: float
) -> float:
    """``StallFit``'s probability that this run stalls."""
    hazard = stall.hazard_per_node(
        pipelined=features.stages > 1, zero0_data_parallel=features.zero0_data_parallel
    )
    calm = (1.0 - hazard) ** features.nodes
    if memory_bytes > stall.memory_pressure_fraction * capacity_bytes:
        calm *= 1.0 - stall.memory_pressure_probability
    return 1.0 - calm


def memory_bytes(fit: MemoryOverheadFit, features: StepFeatures) -> float:
    """The calibrated memory per chip (``MemoryOverheadFit``'s formula)."""
    persistent = (
        features.persistent_bytes + fit.grad_accumulation_bytes_per_param * features.local_params
    )
    moving = features.activation_bytes + features.transient_bytes
    return fit.persistent_factor * persistent + fit.activation_factor * moving + fit.workspace_bytes


# -- beside the roofline ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibratedModelTime:
    """A model plan's calibrated step beside its roofline.

    ``roofline_*`` are the plan's figures (datasheet peaks, perfect overlap). The
    calibrated ones (``step_s``, ``tokens_per_s_per_chip``, ``mfu``,
    ``memory_per_chip_bytes``, ``fits``) are None when the preset has no training-step
    calibration; ``source`` then says why. Intervals are ``(low, high)``: the 10th-90th
    percentile of measured/predicted over the calibration runs (out of fold), applied to
    the figure. ``breakdown_s`` splits the calibrated step into its terms.
    """

    roofline_step_s: float
    roofline_tokens_per_s_per_chip: float
    roofline_mfu: float
    roofline_memory_per_chip_bytes: float
    step_s: float | None
    step_interval_s: tuple[float, float] | None
    tokens_per_s_per_chip: float | None
    tokens_per_s_interval: tuple[float, float] | None
    mfu: float | None
    memory_per_chip_bytes: float | None
    memory_interval_bytes: tuple[float, float] | None
    capacity_bytes: float | None
    fits: bool | None
    breakdown_s: tuple[tuple[str, float], ...]
    source: str
    uncalibrated: tuple[str, ...] = ()
    #: the probability that the run stalls (``StallFit``) and what a stall costs; how much
    #: of it the step carries is ``breakdown_s``'s "stall" (the fit's ``decision``)
    stall_probability: float | None = None
    stall_s: float | None = None

    @property
    def is_calibrated(self) -> bool:
        return self.step_s is not None

    @property
    def stall_included(self) -> bool | None:
        """Whether the calibrated step carries any of the stall (None without a stall fit)."""
        if self.stall_probability is None:
            return None
        return dict(self.breakdown_s).get("stall", 0.0) > 0.0

    @property
    def unstalled_step_s(self) -> float | None:
        """The calibrated step without any of the stall (None when not calibrated)."""
        if self.step_s is None:
            return None
        return self.step_s - dict(self.breakdown_s).get("stall", 0.0)

    def as_dict(self) -> dict[str, object]:
        """The ``model`` JSON's ``calibrated`` object (None fields stay null)."""
        return {
            "step_time_s": self.step_s,
            "mfu": self.mfu,
            "tokens_per_s_per_chip": self.tokens_per_s_per_chip,
            "memory_per_chip_bytes": self.memory_per_chip_bytes,
            "fits": self.fits,
            "capacity_bytes": self.capacity_bytes,
            "interval": {
                "step_time_s": list(self.step_interval_s) if self.step_interval_s else None,
                "tokens_per_s_per_chip": (
                    list(self.tokens_per_s_interval) if self.tokens_per_s_interval else None
                ),
                "memory_per_chip_bytes": (
                    list(self.memory_interval_bytes) if self.memory_interval_bytes else None
                ),
                "quantiles": [0.1, 0.9],
            },
            "breakdown_s": dict(self.breakdown_s),
            "roofline": {
                "step_time_s": self.roofline_step_s,
                "mfu": self.roofline_mfu,
                "tokens_per_s_per_chip": self.roofline_tokens_per_s_per_chip,
                "memory_per_chip_bytes": self.roofline_memory_per_chip_bytes,
            },
            "stall": {
                "probability": self.stall_probability,
                "stall_s": self.stall_s,
                "included": self.stall_included,
                "unstalled_step_time_s": self.unstalled_step_s,
            },
            "source": self.source,
            "uncalibrated": list(self.uncalibrated),
        }

    def describe(self) -> list[str]:
        """Report lines: each calibrated figure beside its roofline, then the source."""
        step = format_seconds(self.roofline_step_s)
        if self.step_s is None or self.tokens_per_s_per_chip is None:
            return [
                f"calibrated: none ({self.source}); roofline step {step}, "
                f"{self.roofline_tokens_per_s_per_chip:,.0f} tokens/s per chip, "
                f"MFU {self.roofline_mfu:.1%}"
            ]
        lines = []
        low, high = self.step_interval_s or (self.step_s, self.step_s)
        lines.append(
            f"calibrated step {format_seconds(self.step_s)} ({format_seconds(low)}.."
            f"{format_seconds(high)}), roofline {step}"
        )
        t_low, t_high = self.tokens_per_s_interval or (0.0, 0.0)
        lines.append(
            f"calibrated {self.tokens_per_s_per_chip:,.0f} tokens/s per chip ({t_low:,.0f}.."
            f"{t_high:,.0f}), roofline {self.roofline_tokens_per_s_per_chip:,.0f}; MFU "
            f"{self.mfu or 0.0:.1%}, roofline {self.roofline_mfu:.1%}"
        )
        if self.memory_per_chip_bytes is not None:
            m_low, m_high = self.memory_interval_bytes or (0.0, 0.0)
            verdict = "fits" if self.fits else "out of memory"
            capacity = format_bytes(self.capacity_bytes or 0.0)
            lines.append(
                f"calibrated memory {format_bytes(self.memory_per_chip_bytes)} per chip "
                f"({format_bytes(m_low)}..{format_bytes(m_high)}), roofline "
                f"{format_bytes(self.roofline_memory_per_chip_bytes)}: {verdict} "
                f"(limit {capacity})"
            )
        if self.stall_probability is not None and self.stall_s is not None:
            unstalled = self.unstalled_step_s or 0.0
            carried = self.step_s - unstalled
            if carried <= 0.0:
                which = "the unstalled one"
            elif carried >= self.stall_s * (1 - 1e-9):
                which = "the stalled one"
            else:
                which = "their expectation"
            lines.append(
                f"stall risk {self.stall_probability:.0%}: unstalled step "
                f"{format_seconds(unstalled)}, stalled {format_seconds(unstalled + self.stall_s)}"
                f"; the calibrated step is {which}"
            )
        terms = ", ".join(f"{name} {format_seconds(value)}" for name, value in self.breakdown_s)
        lines.append(f"calibrated step terms: {terms}")
        if self.uncalibrated:
            lines.append("at the roofline (no calibration data): " + ", ".join(self.uncalibrated))
        lines.append(f"calibration: {self.source}")
        return lines


def _scaled(point: float, interval: RatioInterval) -> tuple[float, float]:
    """``[point·low_ratio, point·high_ratio]``, widened to contain the point."""
    return point * min(interval.low_ratio, 1.0), point * max(interval.high_ratio, 1.0)


def calibrate_model_plan(
    plan: ModelPlan,
    *,
    calibration: Calibration | _Shipped | None = SHIPPED,
    microbatches: int | None = None,
) -> CalibratedModelTime:
    """``plan``'s step, tokens/s, MFU and memory, calibrated, beside its roofline.

    ``calibration``: ``SHIPPED`` (the preset's file), a ``Calibration`` (e.g. from
    ``load_calibration(path)``) or None (roofline only). ``microbatches`` runs fewer
    microbatches than the plan (see ``step_features``).
    """
    if microbatches is not None and microbatches < 1:
        raise SpecError(f"microbatches={microbatches} must be at least 1")
    hardware = plan.mesh.hardware
    chips = plan.mesh.num_devices
    m_plan = plan.training.microbatches
    m = m_plan if microbatches is None else microbatches
    batch_tokens = plan.training.microbatch_tokens * m
    flops = plan.model_flops * m / m_plan
    peak = hardware.chip.peak_flops_per_s_for(plan.config.dtype)
    roofline_step = plan.step_lower_s
    if microbatches is not None and plan.pipeline is not None:
        stages = plan.pipeline.stages
        roofline_step *= (m + stages - 1) / (m_plan + stages - 1)
    roofline_tokens = batch_tokens / roofline_step / chips
    roofline_mfu = flops / (roofline_step * chips * peak)
    resolved = _resolve(hardware, calibration)
    reason = ""
    if resolved is None:
        reason = f"no calibration data for {hardware.name}: roofline only"
    elif resolved.step is None or resolved.memory is None:
        reason = (
            f"no training-step calibration for {hardware.name} (its file holds GEMM and "
            "collective fits only; the step was fitted on H100 Playbook runs): roofline only"
        )
    if resolved is None or resolved.step is None or resolved.memory is None:
        return CalibratedModelTime(
            roofline_step_s=roofline_step,
            roofline_tokens_per_s_per_chip=roofline_tokens,
            roofline_mfu=roofline_mfu,
            roofline_memory_per_chip_bytes=plan.memory.peak,
            step_s=None,
            step_interval_s=None,
            tokens_per_s_per_chip=None,
            tokens_per_s_interval=None,
            mfu=None,
            memory_per_chip_bytes=None,
            memory_interval_bytes=None,
            capacity_bytes=None,
            fits=None,
            breakdown_s=(),
            source=reason,
        )
    fit, memory_fit = resolved.step, resolved.memory
    features = step_features(
        plan, resolved, gradient_reduce_dtype=fit.gradient_reduce_dtype, microbatches=microbatches
    )
    step = step_time_s(fit, features)
    low, high = _scaled(step, fit.interval)
    memory = memory_bytes(memory_fit, features)
    m_low, m_high = _scaled(memory, memory_fit.interval)
    stall_p: float | None = None
    stall_s: float | None = None
    stalled = 0.0
    if resolved.stall is not None:
        stall_s = stall_time_s(resolved.stall, features)
        stall_p = stall_probability(
            resolved.stall,
            features,
            memory_bytes=memory,
            capacity_bytes=memory_fit.capacity_bytes,
        )
        # the fit's summary of the two outcomes; the interval reaches each outcome that
        # has at least a 10% chance
        base = step
        share = resolved.stall.share(stall_p, (base + stall_s) / base)
        stalled = share * stall_s
        step = base + stalled
        low, high = _scaled(step, fit.interval)
        if stall_p < 0.9:
            low = min(low, base * min(fit.interval.low_ratio, 1.0))
        if stall_p >= 0.1:
            high = max(high, base + stall_s)
    slot = slot_time_s(fit, features)
    device = features.matmul_s + fit.vector_time_factor * features.vector_s
    useful = features.microbatches
    breakdown = (
        ("matmuls", useful * features.matmul_s),
        ("memory-bound ops", useful * fit.vector_time_factor * features.vector_s),
        ("exposed communication, host floor, stage sends", useful * max(0.0, slot - device)),
        ("pipeline bubble", (features.stages - 1) * slot),
        (
            "gradient reductions",
            (1.0 - fit.gradient_hidden_fraction) * features.gradient_s,
        ),
        ("optimizer", features.optimizer_s),
        ("fixed", fit.fixed_step_s),
        ("stall", stalled),
    )
    where = resolved.path or f"{resolved.preset}.json"
    source = (
        f"{where}: {fit.framework}; step fit {fit.data_source}; memory fit "
        f"{memory_fit.data_source}; fitted {resolved.source.fitted_on} by "
        f"{resolved.source.command!r}"
    )
    tokens = batch_tokens / step / chips
    return CalibratedModelTime(
        roofline_step_s=roofline_step,
        roofline_tokens_per_s_per_chip=roofline_tokens,
        roofline_mfu=roofline_mfu,
        roofline_memory_per_chip_bytes=plan.memory.peak,
        step_s=step,
        step_interval_s=(low, high),
        tokens_per_s_per_chip=tokens,
        tokens_per_s_interval=(batch_tokens / high / chips, batch_tokens / low / chips),
        mfu=flops / (step * chips * peak),
        memory_per_chip_bytes=memory,
        memory_interval_bytes=(m_low, m_high),
        capacity_bytes=memory_fit.capacity_bytes,
        fits=memory <= memory_fit.capacity_bytes,
        breakdown_s=breakdown,
        source=source,
        uncalibrated=features.uncalibrated,
        stall_probability=stall_p,
        stall_s=stall_s,
    )
