"""Serving: forward-only programs for prefill and decode, the KV cache as tensors.

Inference runs a model two ways (inference.md):

* **prefill**: a prompt of ``T`` tokens per sequence goes through the model at once and
  writes its keys and values, the **KV cache**; the decoder block is the training block's
  forward pass (``layers.build_layer``) whose ``k`` and ``v`` projections *are* the cache
  (written once, in the cache's dtype, and kept where they are produced);
* **decode** (generation): one new token per sequence attends to a cache of ``S``
  positions. The block (``decode_block``) reads ``x[b, d]`` and the cache tensors
  ``k_cache[b, s, k, h]`` and ``v_cache[b, s, k, h]`` (program inputs that live in their
  own layout, ``serve_strategies.place_serving``), writes the new token's ``k_new[b, k, h]``
  and ``v_new[b, k, h]`` (its cache entry: their HBM bytes are the cache update) and runs
  ``QK^T`` and ``AV`` over the cache in its own stage (``kv``), so that the cache can be
  split over the batch where the projections split heads (the book's ``KV[2, B_Z, S, K_Y,
  H]`` with its two all-to-alls).

Letters are the book's: ``b`` sequences, ``t`` prompt positions (prefill), ``s`` cache
positions, ``d`` model width, ``f`` MLP width, ``k`` KV heads, ``g`` query heads per KV head
(``N = K·G``), ``h`` head dim, ``v`` vocabulary, ``e`` experts, ``c`` expert capacity slots.

Dtypes are independent (``Serving``): weights (``weights``: bf16, int8, fp8 ...) are read
from HBM at their own size; the KV cache at ``kv``; activations, and with them every matmul's
arithmetic, at ``compute`` (the evaluator times a matmul at the peak of its first operand,
which in every serving einsum is an activation): int8 weights with bf16 compute read one
byte per weight and multiply at the bf16 peak, the book's ``B_crit = 120`` on v5e.

Norms in the decode programs are written as what a sharded norm does: a vector reduction of
the squares over ``d`` (``REDUCE`` of ``x·x``: a partial sum wherever ``d`` is split,
all-reduced as a ``[b]`` vector) and the elementwise scale (``rmsnorm_apply``); so a layout
that splits ``d`` between blocks (2D weight-stationary) pays a tiny all-reduce, not a gather
of the activations.

Each part of a model (``serving_parts``): the dense block, the mixture-of-experts block
(``decode_moe_block``; prefill uses ``moe.moe_block``), each repeated its number of layers,
and the ends (embedding lookup, final norm, unembedding; the logits are the output, and
sampling from them is not costed).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from ..dtypes import canonical_dtype
from ..errors import SpecError
from .config import ModelConfig
from .graph import LetterRoles, Op, OpInput, OpKind, Program, Tensor, TensorKind
from .layers import LayerKind, LayerSpec, _Builder, build_layer


class ServePhase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"

    @classmethod
    def parse(cls, text: str | ServePhase) -> ServePhase:
        if isinstance(text, ServePhase):
            return text
        key = text.strip().lower()
        aliases = {"generate": "decode", "generation": "decode"}
        for item in cls:
            if item.value == aliases.get(key, key):
                return item
        raise SpecError(f"unknown serving phase {text!r}; expected prefill or decode")


@dataclass(frozen=True, slots=True, kw_only=True)
class Serving:
    """What one serving step is: the phase, the batch of sequences, the context, dtypes.

    ``context`` is the KV cache length ``S`` a decode step attends to, or the prompt length
    ``T`` a prefill step processes."""

    phase: ServePhase = ServePhase.DECODE
    batch: int
    context: int
    weights: str = "bfloat16"
    kv: str = "bfloat16"
    compute: str = "bfloat16"
    #: "flash": the scores stay on chip (a fused kernel); "materialized": they go through HBM
    attention: str = "flash"

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", ServePhase.parse(self.phase))
        for name in ("batch", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--batch" if name == "batch" else "--context"
                raise SpecError(
                    f"serving {name}={value!r} must be a positive whole number; pass {flag} "
                    f"N (e.g. {flag} {64 if name == 'batch' else 8192})"
                )
        for name in ("weights", "kv", "compute"):
            object.__setattr__(self, name, canonical_dtype(getattr(self, name)))
        if self.attention not in ("flash", "materialized"):
            raise SpecError(f"serving attention={self.attention!r}; use flash or materialized")

    @property
    def is_decode(self) -> bool:
        return self.phase is ServePhase.DECODE

    @property
    def tokens(self) -> int:
        """Tokens processed per step: one per sequence (decode), the prompts (prefill)."""
        return self.batch if self.is_decode else self.batch * self.context

    def with_batch(self, batch: int) -> Serving:
        return dataclasses.replace(self, batch=batch)

    def with_phase(self, phase: ServePhase | str, *, context: int | None = None) -> Serving:
        return dataclasses.replace(
            self, phase=ServePhase.parse(phase), context=context or self.context
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServePart:
    """One program of a model's serving step, repeated ``count`` times."""

    name: str
    program: Program
    count: int
    #: the tensors that are the KV cache: stored where attention reads them (decode) or
    #: where their projection writes them (prefill); their bytes are the cache's memory
    cache: tuple[str, ...] = ()
    #: decode: the new token's cache entries, written into the cache's layout
    cache_writes: tuple[str, ...] = ()


# -- the decode block ----------------------------------------------------------------------


def _spec(config: ModelConfig, serving: Serving, batch_tokens: int, t: int) -> LayerSpec:
    return LayerSpec(
        kind=LayerKind.BLOCK,
        d=config.d,
        f=config.f,
        n=config.n,
        k=config.k,
        h=config.h,
        t=t,
        batch_tokens=batch_tokens,
        dtype=serving.compute,
        param_dtype=serving.weights,
        attention=serving.attention,
    )


def _decode_builder(config: ModelConfig, serving: Serving) -> _Builder:
    builder = _Builder(_spec(config, serving, serving.batch, 1))
    builder.tok = "b"  # one token per sequence: the batch letter is the token letter
    return builder


def _norm(builder: _Builder, name: str, x: str, *, scale: str, out: str, stage: str) -> str:
    """RMSNorm as a sharded norm computes it: the per-token sum of squares over ``d``
    (``x·x``, a vector contraction reading ``x`` once: a partial sum over any axes splitting
    ``d``), then the scale."""
    compute = builder.spec.dtype
    builder.tensors[scale] = Tensor(name=scale, letters="d", dtype=compute, kind=TensorKind.PARAM)
    letters = builder.tensors[x].letters
    tokens = letters.replace("d", "")
    stats = builder.tensor(name + "_ss", tokens, TensorKind.ACTIVATION, dtype="float32")
    builder.ops.append(
        Op(
            name=name + "_ss",
            kind=OpKind.REDUCE,
            inputs=(OpInput(tensor=x, letters=letters), OpInput(tensor=x, letters=letters)),
            output=stats,
            out_letters=tokens,
            stage=stage,
        )
    )
    builder.tensor(out, letters, TensorKind.ACTIVATION)
    builder.ops.append(
        Op(
            name=name,
            kind=OpKind.POINTWISE,
            inputs=(
                OpInput(tensor=x, letters=letters),
                OpInput(tensor=stats, letters=tokens),
                OpInput(tensor=scale, letters="d"),
            ),
            output=out,
            out_letters=letters,
            fn="rmsnorm_apply",
            stage=stage,
        )
    )
    return out


def _decode_attention(builder: _Builder, x: str, serving: Serving) -> str:
    """GQA attention of one new token per sequence against the cache; returns its output."""
    st = "attn"
    builder.param("w_q", "dkgh")
    builder.param("w_k", "dkh")
    builder.param("w_v", "dkh")
    builder.param("w_o", "kghd")
    q = builder.einsum("q_proj", (x, "bd"), ("w_q", "dkgh"), "q", "bkgh", st)
    # the new token's key and value: its cache entry, written in the cache's dtype
    for name, weight, out in (("k_proj", "w_k", "k_new"), ("v_proj", "w_v", "v_new")):
        builder.einsum(name, (x, "bd"), (weight, "dkh"), out, "bkh", st)
        builder.tensors[out] = dataclasses.replace(builder.tensors[out], dtype=serving.kv)
    for name in ("k_cache", "v_cache"):
        builder.tensor(name, "bskh", TensorKind.INPUT, dtype=serving.kv)
    scores = builder.einsum("scores", (q, "bkgh"), ("k_cache", "bskh"), "scores", "bkgs", "kv")
    flash = serving.attention == "flash"
    if flash:  # a fused kernel keeps the scores and probabilities on chip
        builder.tensors[scores] = dataclasses.replace(builder.tensors[scores], on_chip=True)
    probs = builder.pointwise(
        "softmax",
        fn="softmax",
        inputs=(scores,),
        out="probs",
        stage="kv",
        kind=OpKind.SOFTMAX,
        reduce="s",
    )
    if flash:
        builder.tensors[probs] = dataclasses.replace(builder.tensors[probs], on_chip=True)
    ctx = builder.einsum("context", (probs, "bkgs"), ("v_cache", "bskh"), "context", "bkgh", "kv")
    return builder.einsum("o_proj", (ctx, "bkgh"), ("w_o", "kghd"), "attn_out", "bd", st)


def _attention_dims(config: ModelConfig, serving: Serving) -> list[tuple[str, int]]:
    return [
        ("b", serving.batch),
        ("d", config.d),
        ("s", serving.context),
        ("k", config.k),
        ("g", config.n // config.k),
        ("h", config.h),
    ]


def _decode_program(
    name: str,
    builder: _Builder,
    *,
    dims: list[tuple[str, int]],
    out: str,
    stages: tuple[tuple[str, str], ...],
    roles: LetterRoles,
) -> Program:
    return Program(
        name=name,
        dims=tuple(dims),
        tensors=tuple(builder.tensors.values()),
        ops=tuple(builder.ops),
        roles=roles,
        outputs=(out, "k_new", "v_new"),
        stages=stages,
        tokens=builder.spec.batch_tokens,
    )


_DECODE_STAGES = (("io", "boundary"), ("attn", "matmul"), ("kv", "matmul"), ("mlp", "matmul"))


def decode_block(config: ModelConfig, serving: Serving) -> Program:
    """One dense decoder block's decode step: norm, attention over the cache, residual,
    norm, gated MLP, residual, for ``serving.batch`` sequences of one new token."""
    serving = serving.with_phase(ServePhase.DECODE)
    builder = _decode_builder(config, serving)
    x = builder.tensor("x", "bd", TensorKind.INPUT)
    n1 = _norm(builder, "norm1", x, scale="norm1_scale", out="xn1", stage="io")
    a = _decode_attention(builder, n1, serving)
    r1 = builder.pointwise("residual1", fn="add", inputs=(x, a), out="resid1", stage="io")
    n2 = _norm(builder, "norm2", r1, scale="norm2_scale", out="xn2", stage="io")
    m = builder.mlp(n2)
    y = builder.pointwise("residual2", fn="add", inputs=(r1, m), out="block_out", stage="io")
    dims = [*_attention_dims(config, serving), ("f", config.f)]
    roles = LetterRoles(batch="b", sequence="b", model="d", hidden=("f", "k", "g"))
    return _decode_program(
        "decode block", builder, dims=dims, out=y, stages=_DECODE_STAGES, roles=roles
    )


def decode_moe_block(config: ModelConfig, serving: Serving) -> Program:
    """One mixture-of-experts block's decode step: attention over the cache as in
    ``decode_block``, then the router, dispatch to ``E`` experts' capacity slots, the
    experts' gated MLPs, combine (and shared experts), as ``moe.moe_block`` has them."""
    from .moe import capacity, moe_mlp  # noqa: PLC0415 (moe imports model, which imports layers)

    if not config.is_moe:
        raise SpecError(f"model {config.name!r} has no experts")
    serving = serving.with_phase(ServePhase.DECODE)
    builder = _decode_builder(config, serving)
    x = builder.tensor("x", "bd", TensorKind.INPUT)
    n1 = _norm(builder, "norm1", x, scale="norm1_scale", out="xn1", stage="io")
    a = _decode_attention(builder, n1, serving)
    r1 = builder.pointwise("residual1", fn="add", inputs=(x, a), out="resid1", stage="io")
    n2 = _norm(builder, "norm2", r1, scale="norm2_scale", out="xn2", stage="io")
    mlp_out = moe_mlp(builder, config, n2, "b")
    y = builder.pointwise("residual2", fn="add", inputs=(r1, mlp_out), out="block_out", stage="io")
    dims = [
        *_attention_dims(config, serving),
        ("e", config.experts),
        ("c", capacity(config, serving.batch)),
        ("f", config.expert_f),
    ]
    if config.shared_experts:
        dims.append(("j", config.shared_experts * config.expert_f))
    roles = LetterRoles(
        batch="b", sequence="b", model="d", hidden=("f", "j", "k", "g"), experts="e"
    )
    stages = (*_DECODE_STAGES[:3], ("moe", "matmul"), ("experts", "matmul"))
    return _decode_program(
        "decode moe block", builder, dims=dims, out=y, stages=stages, roles=roles
    )


# -- prefill ---------------------------------------------------------------------------------


def _retype(program: Program, serving: Serving) -> Program:
    """A training-style forward program in the serving dtypes: weights at ``weights`` (norm
    scales, one number per channel, at ``compute``), the cache (``k``, ``v``) at ``kv``,
    every other activation at ``compute``; under flash attention the causal ``QK^T`` and
    ``AV`` count half their FLOPs (the kernel skips the masked blocks)."""
    tensors = []
    for t in program.tensors:
        dtype = t.dtype
        if t.kind is TensorKind.PARAM:
            dtype = serving.compute if len(t.letters) == 1 else serving.weights
        elif t.name in ("k", "v"):
            dtype = serving.kv
        elif t.dtype not in ("int32", "float32"):
            dtype = serving.compute
        tensors.append(dataclasses.replace(t, dtype=dtype))
    outputs = tuple(dict.fromkeys((*program.outputs, "k", "v")))
    ops = program.ops
    if serving.attention == "flash":  # a flash kernel skips the causal mask's upper half
        ops = tuple(
            dataclasses.replace(op, flops_scale=0.5) if op.name in ("scores", "context") else op
            for op in ops
        )
    return dataclasses.replace(program, tensors=tuple(tensors), ops=ops, outputs=outputs)


def prefill_block(config: ModelConfig, serving: Serving) -> Program:
    """One dense block's prefill of ``batch`` prompts of ``context`` tokens: the training
    block's forward pass, whose key and value projections are written as the cache."""
    serving = serving.with_phase(ServePhase.PREFILL)
    spec = _spec(config, serving, serving.batch * serving.context, serving.context)
    program = build_layer(spec)
    return _retype(dataclasses.replace(program, name="prefill block"), serving)


def prefill_moe_block(config: ModelConfig, serving: Serving) -> Program:
    from .moe import moe_block  # noqa: PLC0415

    serving = serving.with_phase(ServePhase.PREFILL)
    program = moe_block(config, serving.batch * serving.context, serving.context)
    return _retype(dataclasses.replace(program, name="prefill moe block"), serving)


# -- the ends ----------------------------------------------------------------------------------


def serve_ends(config: ModelConfig, serving: Serving) -> Program:
    """The embedding lookup of the step's tokens and the head of each sequence's last
    position: final norm and unembedding to the logits (sampling is not costed)."""
    decode = serving.is_decode
    token_letters = "b" if decode else "bt"
    dims: list[tuple[str, int]] = [("b", serving.batch)]
    if not decode:
        dims.append(("t", serving.context))
    dims += [("d", config.d), ("v", config.vocab)]
    spec = _spec(config, serving, serving.batch, 1)
    builder = _Builder(spec)
    table = "w_embed"
    head = table if config.tie_embeddings else "w_unembed"
    builder.tensor("ids", token_letters, TensorKind.INPUT, dtype="int32")
    builder.tensor("x_last", "bd", TensorKind.INPUT)
    builder.param(table, "vd")
    if not config.tie_embeddings:
        builder.param(head, "vd")
    builder.tensor("x0", token_letters + "d", TensorKind.ACTIVATION)
    builder.ops.append(
        Op(
            name="embed",
            kind=OpKind.GATHER,
            inputs=(
                OpInput(tensor="ids", letters=token_letters),
                OpInput(tensor=table, letters="vd"),
            ),
            output="x0",
            out_letters=token_letters + "d",
            fn="gather",
            stage="embed",
        )
    )
    xn = _norm(
        builder, "final_norm", "x_last", scale="final_norm_scale", out="xn_final", stage="io"
    )
    builder.einsum("unembed", (xn, "bd"), (head, "vd"), "logits", "bv", "head")
    return Program(
        name="embedding and head",
        dims=tuple(dims),
        tensors=tuple(builder.tensors.values()),
        ops=tuple(builder.ops),
        roles=LetterRoles(batch="b", sequence="b" if decode else "t", model="d", hidden=("v",)),
        outputs=("x0", "logits"),
        stages=(("embed", "matmul"), ("io", "boundary"), ("head", "matmul")),
        tokens=serving.tokens,
    )


def _part(
    name: str,
    program: Program,
    count: int,
    cache: tuple[str, ...] = (),
    writes: tuple[str, ...] = (),
) -> ServePart:
    return ServePart(name=name, program=program, count=count, cache=cache, cache_writes=writes)


def serving_parts(config: ModelConfig, serving: Serving) -> tuple[ServePart, ...]:
    """The programs of one serving step of ``config``: blocks (dense and/or MoE, each with
    its layer count) and the ends."""
    parts: list[ServePart] = []
    dense = config.layers - config.moe_layers
    if serving.is_decode:
        cache, writes = ("k_cache", "v_cache"), ("k_new", "v_new")
        if dense:
            block = decode_block(config, serving)
            parts.append(_part("block", block, dense, cache, writes))
        if config.moe_layers:
            moe = decode_moe_block(config, serving)
            parts.append(_part("moe block", moe, config.moe_layers, cache, writes))
    else:
        cache = ("k", "v")
        if dense:
            parts.append(_part("block", prefill_block(config, serving), dense, cache))
        if config.moe_layers:
            moe = prefill_moe_block(config, serving)
            parts.append(_part("moe block", moe, config.moe_layers, cache))
    parts.append(_part("ends", serve_ends(config, serving), 1))
    return tuple(parts)


def kv_bytes_per_token(parts: tuple[ServePart, ...], serving: Serving) -> float:
    """Bytes of KV cache per token, every layer: ``2·L·K·H·bytes`` read off the cache
    tensors of the step's programs (``serving_parts``; LLaMA-3-70B in int8: 2·80·8·128 =
    163,840)."""
    total = 0.0
    for part in parts:
        if not part.cache:
            continue
        program = part.program
        positions = program.size("b") * program.size("s" if serving.is_decode else "t")
        for name in part.cache:
            total += part.count * program.tensor_bytes(name) / positions
    return total
