"""Transformer layers as forward programs, built from a few hyperparameters.

Letters (the scaling book's, transformers.md): ``b`` sequences in the batch, ``t`` query
positions, ``s`` key/value positions (the same tokens, read again), ``d`` model width,
``f`` MLP width, ``k`` KV heads, ``g`` query heads per KV head (``N = K·G``), ``h`` head
dimension. A layer without attention and without a given sequence length has one token
letter, ``b`` (the book's ``B`` tokens).

* ``mlp``: ``h = x·W_in``, ``a = gelu(h)``, ``y = a·W_out``;
* ``gated-mlp`` (SwiGLU): ``silu(x·W_gate) * (x·W_up)``, then ``·W_down``;
* ``attention`` (GQA): Q/K/V projections, ``QK^T`` per KV head and query group, a causal
  softmax over ``s``, ``AV``, the O projection. Under ``causal_flops="half"`` the two
  attention einsums count half their FLOPs (a kernel that skips the masked half, as the
  book allows); the default counts them whole, as the book's ``12BT²NH`` and XLA do.
  Under ``attention="flash"`` the scores and probabilities stay on chip (a fused kernel):
  they move no HBM bytes, are not saved, and the backward pass recomputes the scores;
* ``block``: RMSNorm, attention, residual add, RMSNorm, MLP (gated by default), residual
  add (the pre-norm decoder block).

Parameters take ``param_dtype`` and activations ``dtype`` (bf16 both by default); each
einsum's result is written in the activation dtype.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from ..dtypes import canonical_dtype
from ..einsum import Einsum
from ..errors import SpecError
from .graph import LetterRoles, Op, OpInput, OpKind, Program, Tensor, TensorKind


class LayerKind(enum.Enum):
    MLP = "mlp"
    GATED_MLP = "gated-mlp"
    ATTENTION = "attention"
    BLOCK = "block"


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSpec:
    """A layer's hyperparameters (sizes are global, the batch in tokens)."""

    kind: LayerKind
    d: int
    f: int = 0
    n: int = 0  # query heads
    k: int = 0  # KV heads (GQA); defaults to n
    h: int = 0  # head dim; defaults to d // n
    t: int = 0  # sequence length; 0 = a token-only MLP (no sequence letter)
    batch_tokens: int
    dtype: str = "bfloat16"
    param_dtype: str = ""
    mlp: str = "gated"  # the block's MLP: "gated" (SwiGLU) or "plain"
    activation: str = ""  # gelu for the plain MLP, silu for the gated one
    causal_flops: str = "full"  # "full" (as XLA and the book's 12BT²NH) or "half"
    #: "materialized": scores and probabilities go through HBM and are saved (what plain JAX
    #: compiles, and what the validator checks); "flash": a fused kernel keeps them on chip
    #: and recomputes the scores in the backward pass (2.5x the forward attention FLOPs)
    attention: str = "materialized"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype or self.dtype))
        where = f"layer {self.kind.value}"
        attention = self.kind in (LayerKind.ATTENTION, LayerKind.BLOCK)
        mlp = self.kind is not LayerKind.ATTENTION
        for name, value, needed in (
            ("d", self.d, True),
            ("f", self.f, mlp),
            ("n", self.n, attention),
            ("t", self.t, attention),
            ("batch_tokens", self.batch_tokens, True),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"{where}: {name}={value!r} must be a non-negative integer")
            if needed and value == 0:
                raise SpecError(
                    f"{where} needs {name}; pass it in --dims (e.g. "
                    f"{_example(self.kind)}) or --batch-tokens"
                )
        if attention:
            k = self.k or self.n
            if self.n % k:
                raise SpecError(
                    f"{where}: {self.n} query heads do not split into groups over {k} KV "
                    "heads; n must be a multiple of k"
                )
            h = self.h or self.d // self.n
            if h < 1:
                raise SpecError(f"{where}: head dim h={h} (d // n); pass h explicitly")
            object.__setattr__(self, "k", k)
            object.__setattr__(self, "h", h)
        if self.t and self.batch_tokens % self.t:
            raise SpecError(
                f"{where}: --batch-tokens {self.batch_tokens} is not a whole number of "
                f"sequences of t={self.t}; use a multiple of {self.t}"
            )
        if self.mlp not in ("gated", "plain"):
            raise SpecError(f"{where}: mlp={self.mlp!r}; expected 'gated' or 'plain'")
        if self.attention not in ("materialized", "flash"):
            raise SpecError(
                f"{where}: attention={self.attention!r}; expected materialized or flash"
            )
        if self.causal_flops not in ("full", "half"):
            raise SpecError(f"{where}: causal_flops={self.causal_flops!r}; expected full or half")
        gated = self.kind is LayerKind.GATED_MLP or (
            self.kind is LayerKind.BLOCK and self.mlp == "gated"
        )
        act = self.activation or ("silu" if gated else "gelu")
        if act not in ("silu", "gelu"):
            raise SpecError(f"{where}: activation {act!r}; expected silu or gelu")
        object.__setattr__(self, "activation", act)

    @property
    def sequences(self) -> int:
        return self.batch_tokens // self.t if self.t else self.batch_tokens

    @classmethod
    def from_dims(
        cls,
        kind: str | LayerKind,
        dims: Mapping[str, int],
        *,
        batch_tokens: int,
        dtype: str = "bfloat16",
        **options: str,
    ) -> LayerSpec:
        """From ``--dims`` letters (``d=8192,f=28672,n=64,k=8,h=128,t=8192``)."""
        try:
            layer = LayerKind(kind) if isinstance(kind, str) else kind
        except ValueError:
            raise SpecError(
                f"unknown layer {kind!r}; expected one of {', '.join(k.value for k in LayerKind)}"
            ) from None
        allowed = {"d", "f", "n", "k", "h", "t"}
        unknown = sorted(set(dims) - allowed)
        if unknown:
            raise SpecError(
                f"--dims: unknown letter {unknown[0]!r} for a layer; expected d, f, n, k, h, t "
                "(model width, MLP width, query heads, KV heads, head dim, sequence length)"
            )
        return cls(
            kind=layer,
            d=dims.get("d", 0),
            f=dims.get("f", 0),
            n=dims.get("n", 0),
            k=dims.get("k", 0),
            h=dims.get("h", 0),
            t=dims.get("t", 0),
            batch_tokens=batch_tokens,
            dtype=dtype,
            **options,
        )


def _example(kind: LayerKind) -> str:
    if kind in (LayerKind.MLP, LayerKind.GATED_MLP):
        return "d=8192,f=28672"
    if kind is LayerKind.ATTENTION:
        return "d=8192,n=64,k=8,h=128,t=8192"
    return "d=8192,f=28672,n=64,k=8,h=128,t=8192"


class _Builder:
    """Accumulates tensors and ops; ``program()`` validates the result."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.tensors: dict[str, Tensor] = {}
        self.ops: list[Op] = []
        self.tok = "bt" if spec.t else "b"

    def tensor(
        self, name: str, letters: str, kind: TensorKind, dtype: str = "", *, on_chip: bool = False
    ) -> str:
        dt = dtype or (self.spec.param_dtype if kind is TensorKind.PARAM else self.spec.dtype)
        self.tensors[name] = Tensor(
            name=name, letters=letters, dtype=dt, kind=kind, on_chip=on_chip
        )
        return name

    def param(self, name: str, letters: str) -> str:
        return self.tensor(name, letters, TensorKind.PARAM)

    def einsum(  # noqa: PLR0917 (the op's parts in equation order)
        self,
        name: str,
        a: tuple[str, str],
        b: tuple[str, str],
        out: str,
        letters: str,
        stage: str,
        flops_scale: float = 1.0,
    ) -> str:
        self.tensor(out, letters, TensorKind.ACTIVATION)
        self.ops.append(
            Op(
                name=name,
                kind=OpKind.EINSUM,
                inputs=(OpInput(tensor=a[0], letters=a[1]), OpInput(tensor=b[0], letters=b[1])),
                output=out,
                out_letters=letters,
                stage=stage,
                flops_scale=flops_scale,
            )
        )
        return out

    def pointwise(
        self,
        name: str,
        *,
        fn: str,
        inputs: tuple[str, ...],
        out: str,
        stage: str,
        kind: OpKind = OpKind.POINTWISE,
        reduce: str = "",
    ) -> str:
        letters = self.tensors[inputs[0]].letters
        self.tensor(out, letters, TensorKind.ACTIVATION)
        self.ops.append(
            Op(
                name=name,
                kind=kind,
                inputs=tuple(OpInput(tensor=i, letters=self.tensors[i].letters) for i in inputs),
                output=out,
                out_letters=letters,
                fn=fn,
                reduce_letters=reduce,
                stage=stage,
            )
        )
        return out

    def norm(self, name: str, x: str, scale: str, out: str, stage: str) -> str:
        letters = self.tensors[x].letters
        self.tensor(out, letters, TensorKind.ACTIVATION)
        self.ops.append(
            Op(
                name=name,
                kind=OpKind.NORM,
                inputs=(OpInput(tensor=x, letters=letters), OpInput(tensor=scale, letters="d")),
                output=out,
                out_letters=letters,
                fn="rmsnorm",
                reduce_letters="d",
                stage=stage,
            )
        )
        return out

    def mlp(self, x: str, prefix: str = "") -> str:
        """A plain or gated MLP reading ``x[tok, d]``; returns its output's name."""
        spec = self.spec
        tok = self.tok
        gated = spec.kind is LayerKind.GATED_MLP or (
            spec.kind is LayerKind.BLOCK and spec.mlp == "gated"
        )
        st = "mlp"
        if gated:
            self.param(prefix + "w_gate", "df")
            self.param(prefix + "w_up", "df")
            self.param(prefix + "w_down", "fd")
            gate = self.einsum(
                prefix + "gate", (x, tok + "d"), (prefix + "w_gate", "df"), prefix + "gate_out",
                tok + "f", st,
            )  # fmt: skip
            up = self.einsum(
                prefix + "up", (x, tok + "d"), (prefix + "w_up", "df"), prefix + "up_out",
                tok + "f", st,
            )  # fmt: skip
            act = self.pointwise(
                prefix + "act", fn=spec.activation, inputs=(gate,), out=prefix + "act_out", stage=st
            )
            hidden = self.pointwise(
                prefix + "gating", fn="mul", inputs=(act, up), out=prefix + "hidden", stage=st
            )
            return self.einsum(
                prefix + "down", (hidden, tok + "f"), (prefix + "w_down", "fd"),
                prefix + "mlp_out", tok + "d", st,
            )  # fmt: skip
        self.param(prefix + "w_in", "df")
        self.param(prefix + "w_out", "fd")
        h = self.einsum(
            prefix + "in", (x, tok + "d"), (prefix + "w_in", "df"), prefix + "h", tok + "f", st
        )
        act = self.pointwise(
            prefix + "act", fn=spec.activation, inputs=(h,), out=prefix + "act_out", stage=st
        )
        return self.einsum(
            prefix + "out", (act, tok + "f"), (prefix + "w_out", "fd"), prefix + "mlp_out",
            tok + "d", st,
        )  # fmt: skip

    def attention(self, x: str) -> str:
        """GQA self-attention reading ``x[b, t, d]``; returns its output's name."""
        half = 0.5 if self.spec.causal_flops == "half" else 1.0
        st = "attn"
        self.param("w_q", "dkgh")
        self.param("w_k", "dkh")
        self.param("w_v", "dkh")
        self.param("w_o", "kghd")
        q = self.einsum("q_proj", (x, "btd"), ("w_q", "dkgh"), "q", "btkgh", st)
        # keys and values are written per position t and read as positions s: a layout
        # that splits t (context parallelism) then gathers them before the scores
        k = self.einsum("k_proj", (x, "btd"), ("w_k", "dkh"), "k", "btkh", st)
        v = self.einsum("v_proj", (x, "btd"), ("w_v", "dkh"), "v", "btkh", st)
        scores = self.einsum(
            "scores", (q, "btkgh"), (k, "bskh"), "scores", "bkgts", st, flops_scale=half
        )
        flash = self.spec.attention == "flash"
        if flash:  # the fused kernel keeps the scores and probabilities on chip
            self.tensors[scores] = dataclasses.replace(self.tensors[scores], on_chip=True)
        probs = self.pointwise(
            "softmax",
            fn="causal_softmax",
            inputs=(scores,),
            out="probs",
            stage=st,
            kind=OpKind.SOFTMAX,
            reduce="s",
        )
        if flash:
            self.tensors[probs] = dataclasses.replace(self.tensors[probs], on_chip=True)
        o = self.einsum(
            "context", (probs, "bkgts"), (v, "bskh"), "context", "btkgh", st, flops_scale=half
        )
        return self.einsum("o_proj", (o, "btkgh"), ("w_o", "kghd"), "attn_out", "btd", st)

    def program(self, name: str, outputs: tuple[str, ...], stages: tuple[str, ...]) -> Program:
        spec = self.spec
        dims: list[tuple[str, int]] = [("b", spec.sequences)]
        if spec.t:
            dims.append(("t", spec.t))
        dims.append(("d", spec.d))
        if spec.kind is not LayerKind.ATTENTION:
            dims.append(("f", spec.f))
        if spec.kind in (LayerKind.ATTENTION, LayerKind.BLOCK):
            dims += [("s", spec.t), ("k", spec.k), ("g", spec.n // spec.k), ("h", spec.h)]
        hidden: tuple[str, ...] = {
            LayerKind.MLP: ("f",),
            LayerKind.GATED_MLP: ("f",),
            LayerKind.ATTENTION: ("k", "g"),
            LayerKind.BLOCK: ("f", "k", "g"),
        }[spec.kind]
        roles = LetterRoles(
            batch="b",
            sequence="t" if spec.t else "b",
            model="d",
            hidden=hidden,
            kv_sequence="s" if "s" in dict(dims) else "",
        )
        kinds = {"mlp": "matmul", "attn": "matmul", "io": "boundary"}
        return Program(
            name=name,
            dims=tuple(dims),
            tensors=tuple(self.tensors.values()),
            ops=tuple(self.ops),
            roles=roles,
            outputs=outputs,
            stages=tuple((s, kinds[s]) for s in stages),
            tokens=spec.batch_tokens,
        )


def build_layer(spec: LayerSpec) -> Program:
    """The forward program of one layer (``autodiff.training`` adds the backward)."""
    builder = _Builder(spec)
    tok = builder.tok
    x = builder.tensor("x", tok + "d", TensorKind.INPUT)
    if spec.kind in (LayerKind.MLP, LayerKind.GATED_MLP):
        y = builder.mlp(x)
        return builder.program(spec.kind.value, (y,), ("mlp",))
    if spec.kind is LayerKind.ATTENTION:
        y = builder.attention(x)
        return builder.program(spec.kind.value, (y,), ("attn",))
    builder.param("norm1_scale", "d")
    builder.param("norm2_scale", "d")
    n1 = builder.norm("norm1", x, "norm1_scale", "xn1", "io")
    a = builder.attention(n1)
    r1 = builder.pointwise("residual1", fn="add", inputs=(x, a), out="resid1", stage="io")
    n2 = builder.norm("norm2", r1, "norm2_scale", "xn2", "io")
    m = builder.mlp(n2)
    y = builder.pointwise("residual2", fn="add", inputs=(r1, m), out="block_out", stage="io")
    return builder.program("block", (y,), ("io", "attn", "mlp"))


def einsum_program(einsum: Einsum, names: tuple[str, str, str] = ("lhs", "rhs", "out")) -> Program:
    """A single einsum as a one-op program: its operands are inputs named ``names`` (the
    roles by default, or the user's tensor names), its result the output."""
    spec = einsum.spec
    lhs, rhs, out = names
    if len({lhs, rhs, out}) != 3:
        raise SpecError(f"einsum operand names {names} must be three different names")
    tensors = (
        Tensor(name=lhs, letters=spec.lhs, dtype=einsum.dtype, kind=TensorKind.INPUT),
        Tensor(name=rhs, letters=spec.rhs, dtype=einsum.dtype, kind=TensorKind.INPUT),
        Tensor(name=out, letters=spec.out, dtype=einsum.accum_dtype, kind=TensorKind.ACTIVATION),
    )
    op = Op(
        name="einsum",
        kind=OpKind.EINSUM,
        inputs=(OpInput(tensor=lhs, letters=spec.lhs), OpInput(tensor=rhs, letters=spec.rhs)),
        output=out,
        out_letters=spec.out,
        stage="op",
    )
    batch = next((c for c in spec.lhs if c in spec.out and c not in spec.rhs), spec.lhs[0])
    model = next((c for c in spec.contracting), batch)
    hidden = tuple(c for c in spec.rhs if c in spec.out and c not in spec.lhs)
    return Program(
        name=spec.equation,
        dims=einsum.dims,
        tensors=tensors,
        ops=(op,),
        roles=LetterRoles(batch=batch, sequence=batch, model=model, hidden=hidden),
        outputs=(out,),
        stages=(("op", "matmul"),),
        tokens=einsum.size(batch),
    )
