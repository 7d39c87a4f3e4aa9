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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from sharding_roofline.errors import ValidationError
from sharding_roofline.program.evaluate import ProgramPlan
from sharding_roofline.program.graph import TensorKind
from sharding_roofline.program.serve_plan import ServePlan
from sharding_roofline.sharding import ShardingSpec

from .compare import Verdict
from .devices import jax_mesh, named_sharding
from .program_compare import ProgramValidation, validate_program
from .programs import jit_program

__all__ = ["DecodeValidation", "decode_layer", "numpy_decode_step", "validate_decode"]

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


def validate_decode(plan: ServePlan, *, execute: bool = True, seed: int = 0) -> DecodeValidation:
    """Validate one layer of ``plan``'s decode block (``validate_program``) and, with
    ``execute``, run XLA's program against ``numpy_decode_step`` on random data."""
    layer = decode_layer(plan)
    validation = validate_program(layer, execute=execute)
    if not execute:
        return DecodeValidation(validation=validation)
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
    error = max(
        float(np.max(np.abs(np.asarray(got[name], dtype=np.float64) - expected)))
        / max(float(np.max(np.abs(expected))), 1e-30)
        for name, expected in want.items()
    )
    return DecodeValidation(validation=validation, numpy_rel_error=error)
