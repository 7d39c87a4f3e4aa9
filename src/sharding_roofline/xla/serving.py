"""Validate a decode step on simulated CPU devices: collectives and numerics.

One layer of a serving plan's decode block (``program.serve_plan``) is an ordinary
``ProgramPlan``, so the programs' validator checks it (``xla.program_compare``,
``xla.programs``: the interpreter of ``xla.program_jax``): XLA's ``jit`` program with the
plan's layouts pinned at every op, the plan's own ``shard_map`` program replaying its steps,
their compiled collectives against the plan's, and both programs' numbers against the
program run unsharded. The verdict is that validator's: ``match`` (XLA's own program issues
the plan's collectives), ``xla-differs`` (only the plan's program does: XLA chose others, e.g.
an all-gather and a slice where the plan moves an axis by all-to-all), ``mismatch`` (not even
the plan's program, or wrong numbers).

This module adds a check of the decode program itself: XLA's program, run on random data
(the block's input, the KV cache, the weights), is compared with a decode step of a GQA block
written directly in numpy (``numpy_decode_step``), independent of the program's ops. The
scores are not scaled by ``1/sqrt(H)`` (the programs leave that constant factor out), and the
reference does the same.

``validate_serving`` checks a whole serving step as the ``serve --validate`` command does:
one layer of each of the plan's parts (the block, or the MoE block, and the embedding and
head), decode or prefill. A prefill under flash attention counts the causal scores and
context at half their FLOPs (the kernel skips the masked blocks); the compiled program
computes them whole, so its FLOPs are checked against the same plan with those ops whole
(the layouts and collectives do not depend on it). The numpy reference is a dense decode
block's; a prefill's or an MoE block's numbers are checked against the program run
unsharded only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from sharding_roofline.errors import ValidationError
from sharding_roofline.plans import Rejected
from sharding_roofline.program.evaluate import Evaluation, ProgramPlan
from sharding_roofline.program.graph import TensorKind
from sharding_roofline.program.serve_plan import ServePlan
from sharding_roofline.sharding import ShardingSpec

from .compare import Verdict
from .devices import jax_mesh, named_sharding
from .program_compare import ProgramValidation, validate_program
from .programs import jit_program

__all__ = [
    "DecodeValidation",
    "PartValidation",
    "ServeValidation",
    "decode_layer",
    "numpy_decode_step",
    "validate_decode",
    "validate_serving",
]

EPS = 1e-6  # the interpreter's RMSNorm epsilon


def decode_layer(plan: ServePlan) -> ProgramPlan:
    """One layer of the plan's dense decode block (the plan's parts are repeated)."""
    if not plan.serving.is_decode:
        raise ValidationError(
            f"serving plan {plan.name}: validate_decode checks decode steps; plan one without "
            "--prefill"
        )
    for name, one, _ in plan._one:
        if name == "block":
            return one
    names = ", ".join(name for name, _ in plan.parts)
    raise ValidationError(
        f"serving plan {plan.name} has no dense decode block (parts: {names}); validate a "
        "dense model (the numpy reference is a dense GQA block)"
    )


def numpy_decode_step(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decode step of a GQA block written directly in numpy (not from the program):
    RMSNorm, Q/K/V projections, attention of each query group over its KV head's cache,
    O projection, residual, RMSNorm, SwiGLU MLP, residual; and the new token's key and
    value."""
    v = {name: np.asarray(array, dtype=np.float64) for name, array in values.items()}

    def norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale
        return out

    def silu(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / (1 + np.exp(-x))
        return out

    x = v["x"]
    xn = norm(x, v["norm1_scale"])
    q = np.einsum("bd,dkgh->bkgh", xn, v["w_q"])
    k_new = np.einsum("bd,dkh->bkh", xn, v["w_k"])
    v_new = np.einsum("bd,dkh->bkh", xn, v["w_v"])
    scores = np.einsum("bkgh,bskh->bkgs", q, v["k_cache"])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    ctx = np.einsum("bkgs,bskh->bkgh", probs, v["v_cache"])
    h = x + np.einsum("bkgh,kghd->bd", ctx, v["w_o"])
    hn = norm(h, v["norm2_scale"])
    gated = silu(np.einsum("bd,df->bf", hn, v["w_gate"])) * np.einsum("bd,df->bf", hn, v["w_up"])
    out = h + np.einsum("bf,fd->bd", gated, v["w_down"])
    return {"block_out": out, "k_new": k_new, "v_new": v_new}


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeValidation:
    """The programs' validator's judgement of one decode layer, and (executed) XLA's program
    against the numpy decode step: ``numpy_rel_error`` is max |got - want| / max |want|."""

    validation: ProgramValidation
    numpy_rel_error: float | None = None

    @property
    def verdict(self) -> Verdict:
        return self.validation.verdict

    @property
    def numerics_ok(self) -> bool | None:
        """Both programs agree with the unsharded program and XLA's with numpy (float32)."""
        numerics = self.validation.numerics
        if numerics is None or self.numpy_rel_error is None:
            return None
        return numerics.ok and self.numpy_rel_error <= numerics.tolerance

    def as_dict(self) -> dict[str, Any]:
        """The programs' validator's object, and the numpy reference's error and verdict."""
        return {
            **self.validation.as_dict(),
            "numpy_rel_error": self.numpy_rel_error,
            "numerics_ok": self.numerics_ok,
        }


def _random_values(layer: ProgramPlan, seed: int) -> dict[str, np.ndarray]:
    """Activations and the cache ~ N(0, 1); weights scaled to keep activations O(1); norm
    scales near 1."""
    program = layer.program
    rng = np.random.default_rng(seed)
    values = {}
    for tensor in program.tensors:
        if tensor.kind not in (TensorKind.INPUT, TensorKind.PARAM):
            continue
        shape = program.shape(tensor.name)
        value = rng.standard_normal(shape)
        if tensor.kind is TensorKind.PARAM:
            value = value / math.sqrt(shape[0]) if len(shape) > 1 else 1.0 + 0.1 * value
        values[tensor.name] = value.astype(np.float32)
    return values


def _numpy_rel_error(layer: ProgramPlan, seed: int) -> float:
    """XLA's program of a dense decode layer on random data against ``numpy_decode_step``:
    max |got - want| / max |want| over the block's output and the new key and value."""
    mesh = jax_mesh(layer.mesh)
    values = _random_values(layer, seed)
    placed = {
        name: jax.device_put(value, named_sharding(mesh, ShardingSpec(layer.home(name))))
        for name, value in values.items()
    }
    fn, _ = jit_program(layer, dtype="float32")
    params = {t.name: placed[t.name] for t in layer.program.params}
    inputs = {t.name: placed[t.name] for t in layer.program.inputs}
    got = fn(params, inputs, {})
    want = numpy_decode_step(values)
    return max(
        float(np.max(np.abs(np.asarray(got[name], dtype=np.float64) - expected)))
        / max(float(np.max(np.abs(expected))), 1e-30)
        for name, expected in want.items()
    )


def validate_decode(plan: ServePlan, *, execute: bool = True, seed: int = 0) -> DecodeValidation:
    """Validate one layer of ``plan``'s decode block (``validate_program``) and, with
    ``execute``, run XLA's program against ``numpy_decode_step`` on random data."""
    layer = decode_layer(plan)
    validation = validate_program(layer, execute=execute)
    if not execute:
        return DecodeValidation(validation=validation)
    return DecodeValidation(validation=validation, numpy_rel_error=_numpy_rel_error(layer, seed))


# -- a whole serving step (serve --validate) ---------------------------------------------------

_SEVERITY = {Verdict.MATCH: 0, Verdict.XLA_DIFFERS: 1, Verdict.MISMATCH: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class PartValidation:
    """One layer of one part of a serving step (``layers`` of it run per step), judged by
    the programs' validator; ``planned_flops`` is the plan's own per-chip figure where it
    counts some matmuls at a fraction (flash attention's causal half), else None."""

    part: str
    layers: int
    validation: ProgramValidation
    planned_flops: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "layers": self.layers,
            "planned_flops": self.planned_flops,
            **self.validation.as_dict(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeValidation:
    """A serving step's parts validated one layer each; ``numpy_rel_error`` is XLA's dense
    decode block against ``numpy_decode_step`` (executed decode of a dense model only)."""

    plan: ServePlan
    parts: tuple[PartValidation, ...]
    numpy_rel_error: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> Verdict:
        """The worst part's: ``mismatch`` over ``xla-differs`` over ``match``."""
        return max((p.validation.verdict for p in self.parts), key=_SEVERITY.__getitem__)

    @property
    def numerics_ok(self) -> bool | None:
        """Every part's programs agree with the unsharded program, and the dense decode
        block with numpy; None when not executed."""
        checks = [p.validation.numerics for p in self.parts]
        if any(n is None for n in checks):
            return None
        ok = all(n is not None and n.ok for n in checks)
        if self.numpy_rel_error is not None:
            tolerance = min(n.tolerance for n in checks if n is not None)
            ok = ok and self.numpy_rel_error <= tolerance
        return ok

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "verdict": self.verdict.value,
            "phase": plan.serving.phase.value,
            "model": None if plan.config is None else plan.config.name,
            "strategy": plan.name,
            "batch": plan.serving.batch,
            "context": plan.serving.context,
            "hardware": plan.mesh.hardware.name,
            "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
            "parts": [p.as_dict() for p in self.parts],
            "numpy_rel_error": self.numpy_rel_error,
            "numerics_ok": self.numerics_ok,
            "notes": list(self.notes),
        }


def whole_flops(layer: ProgramPlan) -> ProgramPlan:
    """``layer`` with every op's matmul FLOPs counted whole (``flops_scale`` 1), at the same
    placement: what the compiled program computes (a masked matmul is computed whole)."""
    ops = tuple(dataclasses.replace(op, flops_scale=1.0) for op in layer.program.ops)
    program = dataclasses.replace(layer.program, ops=ops)
    result = Evaluation(program, layer.mesh, overlap=layer.overlap)(layer.placement)
    if isinstance(result, Rejected):  # the same placement of the same shapes: cannot happen
        raise ValidationError(f"{layer.program.name}: {result.reason}")
    return result


def validate_serving(plan: ServePlan, *, execute: bool = False, seed: int = 0) -> ServeValidation:
    """Validate one layer of each part of ``plan`` (decode or prefill) with the programs'
    validator and, with ``execute``, a dense decode block against ``numpy_decode_step``."""
    parts: list[PartValidation] = []
    notes: list[str] = []
    numpy_error = None
    for name, planned_layer, count in plan._one:
        layer = planned_layer
        planned = None
        if any(op.flops_scale != 1.0 for op in layer.program.ops):
            halved = ", ".join(
                f"{op.name} at {op.flops_scale:g}x"
                for op in layer.program.ops
                if op.flops_scale != 1.0
            )
            planned = layer.cost.flops / layer.layers
            layer = whole_flops(layer)
            notes.append(
                f"{name}: the plan counts {halved} their FLOPs (flash attention "
                f"skips the causal mask's upper half: {planned:,.0f} matmul FLOPs per chip); "
                f"the compiled program computes them whole, so XLA's FLOPs are checked "
                f"against the plan with them whole ({layer.cost.flops / layer.layers:,.0f})"
            )
        validation = validate_program(layer, execute=execute)
        parts.append(
            PartValidation(part=name, layers=count, validation=validation, planned_flops=planned)
        )
        if execute and name == "block" and plan.serving.is_decode:
            numpy_error = _numpy_rel_error(layer, seed)
    if execute and numpy_error is None:
        why = (
            "a prefill step"
            if not plan.serving.is_decode
            else "a mixture-of-experts block"
            if any(name != "ends" for name, _, _ in plan._one)
            else "no block"
        )
        notes.append(
            f"numbers checked against the program run unsharded only: the numpy reference "
            f"is a dense decode block's, and this is {why}"
        )
    return ServeValidation(
        plan=plan, parts=tuple(parts), numpy_rel_error=numpy_error, notes=tuple(notes)
    )
