"""The backward pass, derived mechanically from the forward program.

Reverse-mode, op by op, last op first (transformers.md; no per-layer hand-written rules):

* an einsum ``z = einsum(a[la], b[lb]) -> z[lz]`` gives the two gradient einsums
  ``da = einsum(dz[lz], b[lb]) -> [la]`` and ``db = einsum(a[la], dz[lz]) -> [lb]``; a weight
  gradient whose batch letters are sharded leaves partial sums, which the layout engine
  reduces into the gradient's layout (all-reduce for DP, reduce-scatter for FSDP/ZeRO);
* ``add`` passes its gradient to both inputs; ``mul`` multiplies it by the other input;
  ``silu``/``gelu`` by the derivative (reading the saved input); a softmax's gradient reads
  its saved output; an RMSNorm's reads its input and scale, and its scale's gradient is a
  vector contraction over the tokens (``REDUCE``) of the incoming gradient with the
  normalised input (``x / rms(x)``: the norm's letter stays whole there, as at the norm);
* a tensor read by several ops gets one gradient contribution from each, summed by ``add``
  ops; gradients of renamed reads (``xn`` read as ``[b, s, d]``) are summed by position.

What the backward reads from the forward pass depends on the remat policy (``Remat``):
``NONE`` saves every activation the backward needs, as laid out at the op that read it
(gathered activations stay gathered: no second gather); ``FULL`` saves only the layer's
input and recomputes the forward pass before the backward (the book's "block remat", about
``8 × params × tokens`` FLOPs: every op but those whose results the backward does not read,
such as the last matmul, which ``jax.checkpoint`` does not recompute either); ``DOTS`` saves
the einsums' outputs and recomputes the memory-bound ops (an einsum's backward reads a
recomputed input from where it is recomputed, moving it again if the einsum needs it
elsewhere). Parameters are never saved: the backward reads them from where they are
stored (FSDP gathers them again, as ZeRO-3 does).

``training(program)`` returns the forward+backward program (and, with ``optimizer=True``,
one AdamW update per parameter at the end, in the optimizer state's layout).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ..errors import SpecError
from .graph import Op, OpInput, OpKind, Phase, Program, Tensor, TensorKind


class Remat(enum.Enum):
    NONE = "none"
    FULL = "full"
    DOTS = "dots"

    @classmethod
    def parse(cls, text: str | Remat) -> Remat:
        if isinstance(text, Remat):
            return text
        key = text.strip().lower().replace("_", "-")
        aliases = {"block": "full", "matmuls": "dots", "save-dots": "dots", "off": "none"}
        key = aliases.get(key, key)
        for item in cls:
            if item.value == key:
                return item
        raise SpecError(
            f"unknown remat policy {text!r}; expected none (save every activation), full "
            "(recompute the layer) or dots (save only matmul outputs)"
        )


#: The optimizer's persistent state, per parameter element (AdamW, mixed precision).
@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerSpec:
    """AdamW: two moments (``moment_dtype``) and, optionally, a master copy of the weights
    (``master_dtype``; empty for none, the scaling book's 10-bytes-per-parameter setting:
    bf16 weights plus two fp32 moments)."""

    moment_dtype: str = "float32"
    num_moments: int = 2
    master_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_moments < 0:
            raise SpecError(f"optimizer: num_moments={self.num_moments} must be >= 0")

    @property
    def state_bytes_per_param(self) -> float:
        from ..dtypes import dtype_bytes  # noqa: PLC0415 (tiny; avoids an import cycle)

        master = dtype_bytes(self.master_dtype) if self.master_dtype else 0
        return self.num_moments * dtype_bytes(self.moment_dtype) + master


def grad_name(tensor: str) -> str:
    return "d_" + tensor


class _Backward:
    def __init__(self, forward: Program, remat: Remat) -> None:
        self.fwd = forward
        self.remat = remat
        self.tensors: dict[str, Tensor] = {t.name: t for t in forward.tensors}
        self.ops: list[Op] = list(forward.ops)
        self.contributions: dict[str, list[str]] = {}
        self.grads: dict[str, str] = {}
        self.saved_name: dict[str, str] = {}  # forward tensor -> the one the backward reads
        self.saved_at: dict[str, str] = {}  # forward tensor -> op whose layout it is read in
        self.stage_of: dict[str, str] = {}  # tensor -> the stage of the op that wrote it

    # -- helpers ---------------------------------------------------------------------------

    def new_tensor(self, name: str, letters: str, like: str, kind: TensorKind) -> str:
        base = name
        n = 1
        while name in self.tensors:
            n += 1
            name = f"{base}_{n}"
        source = self.tensors[like]
        self.tensors[name] = Tensor(
            name=name, letters=letters, dtype=source.dtype, kind=kind, on_chip=source.on_chip
        )
        return name

    def emit(self, op: Op) -> None:
        self.ops.append(op)
        self.stage_of[op.output] = op.stage

    def read_saved(self, tensor: str, at: Op, letters: str) -> OpInput:
        """A forward tensor as the backward of ``at`` reads it (saved, or recomputed)."""
        source = self.tensors[tensor]
        if source.kind is TensorKind.PARAM:
            return OpInput(tensor=tensor, letters=letters)  # read from where it is stored
        name = self.saved_name.get(tensor, tensor)
        producer = self.recomputed_at.get(at.name, at.name)
        if name != tensor and producer == at.name:
            # recomputed, but ``at`` is not (an einsum under DOTS): nothing moved the fresh
            # copy to ``at``'s layout, so it is read from its home (and moved there)
            return OpInput(tensor=name, letters=letters)
        return OpInput(tensor=name, letters=letters, saved_at=producer)

    def grad_input(self, tensor: str) -> OpInput:
        """The gradient of a forward tensor, read under that tensor's own letters."""
        return OpInput(tensor=self.grads[tensor], letters=self.tensors[tensor].letters)

    def contribute(self, tensor: str, grad: str) -> None:
        if self.tensors[tensor].no_grad:
            return
        self.contributions.setdefault(tensor, []).append(grad)

    def finish(self, tensor: str, stage: str, of: str) -> bool:
        """Sum the contributions to ``tensor``'s gradient; False if it has none. The sum
        runs in the stage that produced the contributions when they share one (where they
        are, unreduced, so they add before one reduction), else in ``stage``."""
        parts = self.contributions.pop(tensor, [])
        if not parts:
            return False
        stages = {self.stage_of.get(part, stage) for part in parts}
        if len(stages) == 1:
            stage = stages.pop()
        letters = self.tensors[tensor].letters
        total = parts[0]
        for i, part in enumerate(parts[1:], start=2):
            out = self.new_tensor(
                grad_name(tensor) + (f"_sum{i}" if i < len(parts) else ""),
                letters,
                tensor,
                TensorKind.GRADIENT,
            )
            self.emit(
                Op(
                    name=f"sum_{grad_name(tensor)}_{i}",
                    kind=OpKind.POINTWISE,
                    inputs=(
                        OpInput(tensor=total, letters=letters),
                        OpInput(tensor=part, letters=letters),
                    ),
                    output=out,
                    out_letters=letters,
                    fn="add",
                    stage=stage,
                    phase=Phase.BACKWARD,
                    of=of,
                )
            )
            total = out
        self.grads[tensor] = total
        return True

    # -- recompute (remat) -------------------------------------------------------------------

    recomputed_at: dict[str, str]

    def recompute(self) -> None:
        """Emit the forward ops again (FULL), the memory-bound ones (DOTS), and always those
        that write on-chip tensors (a fused attention kernel recomputes its scores in the
        backward pass instead of saving them)."""
        self.recomputed_at = {}
        on_chip = {op.name for op in self.fwd.ops if self.tensors[op.output].on_chip}
        if self.remat is Remat.NONE and not on_chip:
            return
        renamed: dict[str, str] = {}
        for op in self.fwd.ops:
            wanted = (
                self.remat is Remat.FULL
                or (self.remat is Remat.DOTS and op.kind is not OpKind.EINSUM)
                or op.name in on_chip
            )
            if not wanted:
                continue
            inputs = tuple(
                OpInput(tensor=renamed.get(i.tensor, i.tensor), letters=i.letters)
                for i in op.inputs
            )
            out = self.new_tensor(
                "re_" + op.output, op.out_letters, op.output, TensorKind.ACTIVATION
            )
            renamed[op.output] = out
            name = "re_" + op.name
            # the forward op itself, renamed (every other field, e.g. a dispatch's relabel
            # of slots as tokens, carries over: the recomputed op runs at the same layout)
            self.emit(
                replace(op, name=name, inputs=inputs, output=out, phase=Phase.RECOMPUTE, of=op.name)
            )
            self.recomputed_at[op.name] = name
        self.saved_name = renamed
        # the backward of a forward op reads what the recomputed op read, at its layout
        for op in self.fwd.ops:
            if op.name not in self.recomputed_at:
                self.recomputed_at[op.name] = op.name

    # -- the pass --------------------------------------------------------------------------

    def run(self, seeds: tuple[str, ...]) -> None:
        self.seeds: dict[str, str] = {}
        for y in seeds:
            dy = self.new_tensor(grad_name(y), self.tensors[y].letters, y, TensorKind.INPUT)
            self.contribute(y, dy)
            self.seeds[y] = dy
        self.recompute()
        for op in reversed(self.fwd.ops):
            if not self.finish(op.output, op.stage, op.name):
                continue
            self.backward_of(op)
        for tensor in list(self.contributions):
            self.finish(tensor, self._stage_of(tensor), "")
        self.prune_recompute()

    def prune_recompute(self) -> None:
        """Drop recomputed ops whose results nothing reads (under FULL, the last op of the
        layer: its output is not needed by the backward pass, and ``jax.checkpoint`` never
        recomputes it); a backward op that read its input as laid out at a dropped op reads
        it from its home instead (and moves it there itself)."""
        dropped: set[str] = set()
        while True:
            read = {item.tensor for op in self.ops for item in op.inputs}
            dead = {
                op.name for op in self.ops if op.phase is Phase.RECOMPUTE and op.output not in read
            }
            if not dead:
                break
            for op in self.ops:
                if op.name in dead:
                    del self.tensors[op.output]
            self.ops = [op for op in self.ops if op.name not in dead]
            dropped |= dead
        if not dropped:
            return
        self.ops = [
            replace(
                op,
                inputs=tuple(
                    replace(item, saved_at="") if item.saved_at in dropped else item
                    for item in op.inputs
                ),
            )
            if any(item.saved_at in dropped for item in op.inputs)
            else op
            for op in self.ops
        ]

    def _stage_of(self, tensor: str) -> str:
        for op, _ in self.fwd.consumers(tensor):
            return op.stage
        return ""

    def backward_of(self, op: Op) -> None:
        dz = self.grad_input(op.output)
        dz = OpInput(tensor=dz.tensor, letters=op.out_letters)
        common = {"stage": op.stage, "phase": Phase.BACKWARD, "of": op.name}
        if op.kind is OpKind.EINSUM:
            a, b = op.inputs
            for target, other, first in ((a, b, True), (b, a, False)):
                missing = [c for c in target.letters if c not in op.out_letters + other.letters]
                if missing:
                    raise SpecError(
                        f"op {op.name!r} ({op.equation}): the gradient of {target.tensor!r} "
                        f"needs letter {missing[0]!r}, which only {target.tensor!r} has (a "
                        "summed free letter); reduce it in its own op first"
                    )
                out = self.new_tensor(
                    f"{grad_name(target.tensor)}_{op.name}",
                    target.letters,
                    target.tensor,
                    TensorKind.GRADIENT,
                )
                saved = self.read_saved(other.tensor, op, other.letters)
                inputs = (dz, saved) if first else (saved, dz)
                self.emit(
                    Op(
                        name=f"{op.name}_grad_{target.tensor}",
                        kind=OpKind.EINSUM,
                        inputs=inputs,
                        output=out,
                        out_letters=target.letters,
                        flops_scale=op.flops_scale,
                        **common,  # type: ignore[arg-type]
                    )
                )
                self.contribute(target.tensor, out)
            return
        if op.kind is OpKind.POINTWISE and op.fn == "add":
            for item in op.inputs:
                self.contribute(item.tensor, self.grads[op.output])
            return
        if op.kind is OpKind.POINTWISE and op.fn == "mul":
            a, b = op.inputs
            for target, other in ((a, b), (b, a)):
                out = self.new_tensor(
                    f"{grad_name(target.tensor)}_{op.name}",
                    op.out_letters,
                    target.tensor,
                    TensorKind.GRADIENT,
                )
                self.emit(
                    Op(
                        name=f"{op.name}_grad_{target.tensor}",
                        kind=OpKind.POINTWISE,
                        inputs=(dz, self.read_saved(other.tensor, op, other.letters)),
                        output=out,
                        out_letters=op.out_letters,
                        fn="mul",
                        **common,  # type: ignore[arg-type]
                    )
                )
                self.contribute(target.tensor, out)
            return
        if op.kind is OpKind.POINTWISE:  # a unary activation: reads its saved input
            (x,) = op.inputs
            out = self.new_tensor(
                f"{grad_name(x.tensor)}_{op.name}", op.out_letters, x.tensor, TensorKind.GRADIENT
            )
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.POINTWISE,
                    inputs=(self.read_saved(x.tensor, op, x.letters), dz),
                    output=out,
                    out_letters=op.out_letters,
                    fn=op.fn + "_grad",
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(x.tensor, out)
            return
        if op.kind is OpKind.SOFTMAX:
            (x,) = op.inputs
            out = self.new_tensor(
                f"{grad_name(x.tensor)}_{op.name}", op.out_letters, x.tensor, TensorKind.GRADIENT
            )
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.SOFTMAX,
                    inputs=(self.read_saved(op.output, op, op.out_letters), dz),
                    output=out,
                    out_letters=op.out_letters,
                    fn=op.fn + "_grad",
                    reduce_letters=op.reduce_letters,
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(x.tensor, out)
            return
        if op.kind is OpKind.NORM:
            x, scale = op.inputs
            out = self.new_tensor(
                f"{grad_name(x.tensor)}_{op.name}", op.out_letters, x.tensor, TensorKind.GRADIENT
            )
            saved_x = self.read_saved(x.tensor, op, x.letters)
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.NORM,
                    inputs=(saved_x, OpInput(tensor=scale.tensor, letters=scale.letters), dz),
                    output=out,
                    out_letters=op.out_letters,
                    fn=op.fn + "_grad",
                    reduce_letters=op.reduce_letters,
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(x.tensor, out)
            dscale = self.new_tensor(
                f"{grad_name(scale.tensor)}_{op.name}",
                scale.letters,
                scale.tensor,
                TensorKind.GRADIENT,
            )
            self.emit(
                Op(
                    name=f"{op.name}_grad_scale",
                    kind=OpKind.REDUCE,
                    inputs=(dz, saved_x),
                    output=dscale,
                    out_letters=scale.letters,
                    fn="reduce",
                    # sum(dz * x / rms(x)) over the tokens: rms(x) reduces over the norm's
                    # letter, which must therefore be whole at this op too
                    reduce_letters=op.reduce_letters,
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(scale.tensor, dscale)
            return
        if op.kind is OpKind.RELABEL:  # the view's gradient is the opposite view
            data = op.inputs[0]
            extra = op.inputs[1:]  # the combine's gates: read again, not differentiated
            out = self.new_tensor(
                f"{grad_name(data.tensor)}_{op.name}",
                data.letters,
                data.tensor,
                TensorKind.GRADIENT,
            )
            reads = (dz, *(self.read_saved(i.tensor, op, i.letters) for i in extra))
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.RELABEL,
                    inputs=reads,
                    output=out,
                    out_letters=data.letters,
                    fn="combine" if op.fn == "dispatch" else "dispatch",
                    relabel=op.relabel,
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(data.tensor, out)
            return
        if op.kind is OpKind.GATHER:  # the table's gradient: scatter-add the rows back
            ids, table = op.inputs
            out = self.new_tensor(
                f"{grad_name(table.tensor)}_{op.name}",
                table.letters,
                table.tensor,
                TensorKind.GRADIENT,
            )
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.SCATTER,
                    inputs=(dz, self.read_saved(ids.tensor, op, ids.letters)),
                    output=out,
                    out_letters=table.letters,
                    fn="scatter",
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(table.tensor, out)
            return  # integer ids have no gradient
        if op.kind is OpKind.LOSS:  # d logits = (softmax(logits) - onehot) · d loss
            (logits,) = op.inputs
            out = self.new_tensor(
                f"{grad_name(logits.tensor)}_{op.name}",
                logits.letters,
                logits.tensor,
                TensorKind.GRADIENT,
            )
            self.emit(
                Op(
                    name=f"{op.name}_grad",
                    kind=OpKind.POINTWISE,
                    inputs=(
                        self.read_saved(logits.tensor, op, logits.letters),
                        self.read_saved(op.output, op, op.out_letters),
                        dz,
                    ),
                    output=out,
                    out_letters=logits.letters,
                    fn="xent_grad",
                    **common,  # type: ignore[arg-type]
                )
            )
            self.contribute(logits.tensor, out)
            return
        raise SpecError(  # pragma: no cover - every forward kind is handled above
            f"op {op.name!r}: no gradient rule for a {op.kind.value} op"
        )


def training(
    forward: Program,
    *,
    remat: Remat | str = Remat.NONE,
    optimizer: bool = False,
) -> Program:
    """The forward program followed by its backward pass (and the optimizer update).

    The program's outputs become the gradients of every parameter and of its inputs; the
    incoming gradient of each forward output is an input named ``d_<output>``."""
    if forward.has_backward:
        raise SpecError(f"program {forward.name!r} already has a backward pass")
    policy = Remat.parse(remat)
    back = _Backward(forward, policy)
    back.run(forward.outputs)
    outputs = [back.grads[t.name] for t in forward.params if t.name in back.grads]
    outputs += [back.grads[t.name] for t in forward.inputs if t.name in back.grads]
    if optimizer:
        for param in forward.params:
            if param.name not in back.grads:
                continue
            new = back.new_tensor(
                "new_" + param.name, param.letters, param.name, TensorKind.ACTIVATION
            )
            back.emit(
                Op(
                    name="adamw_" + param.name,
                    kind=OpKind.POINTWISE,
                    inputs=(
                        OpInput(tensor=param.name, letters=param.letters),
                        OpInput(tensor=back.grads[param.name], letters=param.letters),
                    ),
                    output=new,
                    out_letters=param.letters,
                    fn="adamw",
                    stage="optimizer",
                    phase=Phase.OPTIMIZER,
                    of=param.name,
                )
            )
            outputs.append(new)
    gradients = [(y, dy) for y, dy in back.seeds.items()]
    gradients += [
        (t.name, back.grads[t.name])
        for t in (*forward.params, *forward.inputs)
        if t.name in back.grads
    ]
    stages = forward.stages
    if optimizer:
        stages = (*stages, ("optimizer", "optimizer"))
    suffix = {Remat.NONE: "", Remat.FULL: ", remat full", Remat.DOTS: ", remat dots"}[policy]
    return Program(
        name=f"{forward.name} (forward+backward{suffix})",
        dims=forward.dims,
        tensors=tuple(back.tensors.values()),
        ops=tuple(back.ops),
        roles=forward.roles,
        outputs=tuple(outputs),
        stages=stages,
        tokens=forward.tokens,
        gradients=tuple(gradients),
    )
