"""A mixture-of-experts decoder block: attention, then a routed MLP over ``E`` experts.

``norm -> attention -> residual -> norm -> router -> dispatch -> experts -> combine
(+ shared experts) -> residual``, with letters ``e`` (experts), ``c`` (capacity slots per
expert: ``tokens · top_k · capacity_factor / E``), ``f`` (an expert's hidden width) and
``j`` (the shared experts' hidden width, ``n_shared · f``):

* router: ``xn[b,t,d] · w_router[d,e] -> logits[b,t,e]``, a softmax and top-k (the gates:
  a stop-gradient here, so the router's own ``d·E`` parameters get no update);
* dispatch (``RELABEL``): each chip copies its tokens into their experts' slots
  ``x_e[e,c,d]``, the slots laid out as its tokens are; an expert-parallel layout at the
  experts (``e`` over the ep axes) makes the move an all-to-all (the book's "each MoE layer
  adds 2 AllToAlls");
* experts: a gated MLP per expert, ``[e,c,d] · [e,d,f]``, FLOPs ``6·tokens·k·cf·D·F``;
* combine (``RELABEL``): the slots summed back into their tokens, weighted by the gates
  (the second all-to-all moves them home first);
* shared experts: a dense gated MLP every token takes (DeepSeek's ``n_shared_experts``).

Stages: ``attn`` and ``io`` as in a dense block, ``moe`` (router, dispatch, combine,
shared experts: the tokens' view) and ``experts`` (the expert MLPs: the experts' view).
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import SpecError
from .config import ModelConfig
from .graph import LetterRoles, Op, OpInput, OpKind, Program, TensorKind
from .layers import _Builder
from .model import block_spec


def capacity(config: ModelConfig, tokens: int) -> int:
    """Slots per expert: ``tokens · top_k · capacity_factor / E``, rounded up."""
    return math.ceil(tokens * config.top_k * config.capacity_factor / config.experts)


def moe_block(config: ModelConfig, tokens: int, seq_len: int) -> Program:
    """One mixture-of-experts block's forward program for ``tokens`` tokens."""
    if not config.is_moe:
        raise SpecError(f"model {config.name!r} has no experts")
    builder = _Builder(block_spec(config, tokens, seq_len))
    slots = capacity(config, tokens)
    builder.tensor("x", "btd", TensorKind.INPUT)
    builder.param("norm1_scale", "d")
    builder.param("norm2_scale", "d")
    n1 = builder.norm("norm1", "x", "norm1_scale", "xn1", "io")
    a = builder.attention(n1)
    r1 = builder.pointwise("residual1", fn="add", inputs=("x", a), out="resid1", stage="io")
    n2 = builder.norm("norm2", r1, "norm2_scale", "xn2", "io")
    mlp_out = moe_mlp(builder, config, n2, "bt")
    y = builder.pointwise("residual2", fn="add", inputs=(r1, mlp_out), out="block_out", stage="io")
    dims = [
        ("b", tokens // seq_len),
        ("t", seq_len),
        ("d", config.d),
        ("s", seq_len),
        ("k", config.k),
        ("g", config.n // config.k),
        ("h", config.h),
        ("e", config.experts),
        ("c", slots),
        ("f", config.expert_f),
    ]
    if config.shared_experts:
        dims.append(("j", config.shared_experts * config.expert_f))
    return Program(
        name="moe block",
        dims=tuple(dims),
        tensors=tuple(builder.tensors.values()),
        ops=tuple(builder.ops),
        roles=LetterRoles(
            batch="b",
            sequence="t",
            model="d",
            hidden=("f", "j", "k", "g"),
            kv_sequence="s",
            experts="e",
        ),
        outputs=(y,),
        stages=(("io", "boundary"), ("attn", "matmul"), ("moe", "matmul"), ("experts", "matmul")),
        tokens=tokens,
    )


def moe_mlp(builder: _Builder, config: ModelConfig, x: str, tokens: str) -> str:
    """The mixture of experts after the second norm, into ``builder``: the router's logits
    and gates (softmax and top-k, a stop-gradient), dispatch of ``x[tokens, d]`` to the
    experts' capacity slots, each expert's gated MLP, combine, and the shared experts if
    any. ``tokens`` are the token letters (``bt`` in training and prefill, ``b`` in a decode
    step); returns the MLP's output tensor."""
    xd, te = f"{tokens}d", f"{tokens}e"
    builder.param("w_router", "de")
    logits = builder.einsum("router", (x, xd), ("w_router", "de"), "router_logits", te, "moe")
    builder.tensor("gates", te, TensorKind.ACTIVATION)
    builder.tensors["gates"] = dataclasses.replace(builder.tensors["gates"], no_grad=True)
    builder.ops.append(
        Op(
            name="route",
            kind=OpKind.SOFTMAX,
            inputs=(OpInput(tensor=logits, letters=te),),
            output="gates",
            out_letters=te,
            fn="router",
            reduce_letters="e",
            stage="moe",
        )
    )
    relabel = (("c", tokens),)
    builder.tensor("x_e", "ecd", TensorKind.ACTIVATION)
    builder.ops.append(
        Op(
            name="dispatch",
            kind=OpKind.RELABEL,
            inputs=(OpInput(tensor=x, letters=xd),),
            output="x_e",
            out_letters="ecd",
            fn="dispatch",
            relabel=relabel,
            stage="moe",
        )
    )
    for name in ("w_gate_e", "w_up_e"):
        builder.param(name, "edf")
    builder.param("w_down_e", "efd")
    st = "experts"
    gate = builder.einsum("expert_gate", ("x_e", "ecd"), ("w_gate_e", "edf"), "gate_e", "ecf", st)
    up = builder.einsum("expert_up", ("x_e", "ecd"), ("w_up_e", "edf"), "up_e", "ecf", st)
    act = builder.pointwise("expert_act", fn="silu", inputs=(gate,), out="act_e", stage=st)
    hidden = builder.pointwise(
        "expert_gating", fn="mul", inputs=(act, up), out="hidden_e", stage=st
    )
    y_e = builder.einsum("expert_down", (hidden, "ecf"), ("w_down_e", "efd"), "y_e", "ecd", st)
    builder.tensor("moe_out", xd, TensorKind.ACTIVATION)
    builder.ops.append(
        Op(
            name="combine",
            kind=OpKind.RELABEL,
            inputs=(OpInput(tensor=y_e, letters="ecd"), OpInput(tensor="gates", letters=te)),
            output="moe_out",
            out_letters=xd,
            fn="combine",
            relabel=relabel,
            stage="moe",
        )
    )
    if not config.shared_experts:
        return "moe_out"
    tj = f"{tokens}j"
    builder.param("w_gate_s", "dj")
    builder.param("w_up_s", "dj")
    builder.param("w_down_s", "jd")
    sg = builder.einsum("shared_gate", (x, xd), ("w_gate_s", "dj"), "gate_s", tj, "moe")
    su = builder.einsum("shared_up", (x, xd), ("w_up_s", "dj"), "up_s", tj, "moe")
    sa = builder.pointwise("shared_act", fn="silu", inputs=(sg,), out="act_s", stage="moe")
    sh = builder.pointwise("shared_gating", fn="mul", inputs=(sa, su), out="hidden_s", stage="moe")
    sd = builder.einsum("shared_down", (sh, tj), ("w_down_s", "jd"), "shared_out", xd, "moe")
    return builder.pointwise(
        "moe_sum", fn="add", inputs=("moe_out", sd), out="mlp_out", stage="moe"
    )
