"""Programs: small graphs of named tensors and the ops that read and write them.

A ``Program`` is what the planner plans when it plans more than one einsum: a transformer
layer forward (inference) or forward and backward (training). Every tensor has a name, its
letters (one per dimension, from the program's dimension table), a dtype and a kind
(parameter, input, activation, gradient). Every op reads tensors and writes one:

* ``EINSUM``: a two-operand contraction on the matrix units (``btd,df->btf``);
* ``REDUCE``: a contraction done on the vector units (a norm scale's gradient,
  ``btd,btd->d``): costed like an einsum's layout, its FLOPs counted as vector FLOPs;
* ``POINTWISE``: an elementwise function of inputs with the output's letters (SiLU, GELU,
  the gate product, a residual add, a gradient of those);
* ``SOFTMAX`` and ``NORM``: elementwise ops that also reduce over one letter
  (``reduce_letters``), which must be whole on every chip (the layout at the op leaves it
  unsharded), and their gradients.

An op may read a tensor under other letters (``OpInput.letters``): attention reads the
normalised activations ``xn[b, t, d]`` as ``[b, s, d]`` for its keys and values. The layout
travels by position, so ``t`` sharded over ``y`` is read as ``s`` sharded over ``y``.

Letter roles (``LetterRoles``) say which letter is the batch, the sequence, the model
dimension and the tensor-parallel ones, so that named strategies (``fsdp=x,tp=y``) can be
placed on any program (``strategies.py``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ..dtypes import canonical_dtype, dtype_bytes
from ..errors import SpecError


class TensorKind(enum.Enum):
    PARAM = "param"  # a weight: stored sharded as the strategy says, gathered where needed
    INPUT = "input"  # the program's input activations
    ACTIVATION = "activation"  # written by a forward op
    GRADIENT = "gradient"  # written by a backward op


class OpKind(enum.Enum):
    EINSUM = "einsum"
    REDUCE = "reduce"
    POINTWISE = "pointwise"
    SOFTMAX = "softmax"
    NORM = "norm"
    #: an embedding lookup ``ids[b, t], table[v, d] -> x[b, t, d]``: a contraction over the
    #: vocabulary (split over v, each chip looks up its rows and the result is a partial
    #: sum, as Megatron's vocabulary-parallel embedding all-reduces it) reading only the
    #: rows it gathers
    GATHER = "gather"
    #: the lookup's gradient: ``d_x[b, t, d], ids[b, t] -> d_table[v, d]``, summed over the
    #: tokens (a weight gradient: partial over the data axes)
    SCATTER = "scatter"
    #: softmax cross-entropy ``logits[b, t, v] -> loss[b, t]``, reduced over the vocabulary
    #: (split over v it is a partial sum: an all-reduce of the per-token statistics)
    LOSS = "loss"
    #: a token <-> expert-slot view (mixture-of-experts dispatch and combine): tokens
    #: ``[b, t, d]`` copied to (or summed back from) capacity slots ``[e, c, d]``. The slot
    #: letter ``c`` is laid out as the token letters it stands for (``relabel``: c <- b, t),
    #: so a chip's own tokens fill its own slots; moving them to their experts' chips is the
    #: resharding that follows (an all-to-all over the expert-parallel axes)
    RELABEL = "relabel"


_CONTRACTIONS = frozenset(
    {OpKind.EINSUM, OpKind.REDUCE, OpKind.GATHER, OpKind.SCATTER, OpKind.LOSS}
)


class Phase(enum.Enum):
    FORWARD = "forward"
    RECOMPUTE = "recompute"  # forward ops run again in the backward pass (remat)
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


#: Vector FLOPs per output element of the memory-bound functions (our counting convention:
#: one per add, multiply, exp, divide or rsqrt; a softmax is max, subtract, exp, sum and
#: divide). They are reported, not timed: at about one FLOP per byte these ops are bound by
#: HBM bandwidth on every preset (the book's vector critical intensities are about 3-10).
FLOPS_PER_ELEMENT: dict[str, float] = {
    "add": 1.0,
    "mul": 1.0,
    "silu": 4.0,  # x / (1 + exp(-x))
    "silu_grad": 6.0,
    "gelu": 8.0,  # tanh approximation
    "gelu_grad": 12.0,
    "softmax": 5.0,
    "softmax_grad": 4.0,  # y * (dy - sum(dy * y))
    "causal_softmax": 6.0,  # the mask's select, then a softmax
    "causal_softmax_grad": 5.0,
    "rmsnorm": 5.0,  # square, mean, rsqrt, two multiplies
    "rmsnorm_grad": 9.0,
    "layernorm": 8.0,
    "layernorm_grad": 14.0,
    "adamw": 18.0,  # two moment updates, bias correction, sqrt, divide, weight decay
    "reduce": 2.0,  # a multiply and an add per input element of a vector contraction
    "gather": 0.0,  # a copy of the rows looked up
    "scatter": 1.0,  # an add per gradient element into its row
    "xent": 5.0,  # per logit: max, subtract, exp, sum, and the label's pick
    "xent_grad": 3.0,  # softmax(logits) - onehot: exp, divide, subtract
    "router": 6.0,  # softmax over the experts and the top-k selection
    "dispatch": 0.0,  # a copy of each token to its experts' slots
    "combine": 2.0,  # per slot element: scale by the gate, add into the token
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Tensor:
    name: str
    letters: str
    dtype: str
    kind: TensorKind
    #: carries no gradient (the router's gates are a stop-gradient in our costing: the
    #: router's own d·E parameters get no update)
    no_grad: bool = False
    #: lives only in on-chip memory (VMEM, shared memory) inside a fused kernel: moves no
    #: HBM bytes, takes no HBM, is never saved (a backward that needs it recomputes it)
    on_chip: bool = False
    itemsize: int = field(init=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise SpecError(f"tensor name {self.name!r} must be an identifier, e.g. w_in or xn")
        if self.letters and not (
            self.letters.isascii() and self.letters.isalpha() and self.letters.islower()
        ):  # a scalar has no letters
            raise SpecError(f"tensor {self.name!r}: letters {self.letters!r} must be lowercase a-z")
        if len(set(self.letters)) != len(self.letters):
            raise SpecError(f"tensor {self.name!r}: a letter repeats in {self.letters!r}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "itemsize", dtype_bytes(self.dtype))


@dataclass(frozen=True, slots=True, kw_only=True)
class OpInput:
    """A tensor as an op reads it: under ``letters`` (the tensor's own letters by default,
    or a positional renaming of them)."""

    tensor: str
    letters: str
    #: a forward op's name: in the backward pass, the tensor is read as it was saved at that
    #: op (its layout there), not from where it is stored
    saved_at: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    name: str
    kind: OpKind
    inputs: tuple[OpInput, ...]
    output: str
    out_letters: str
    fn: str = ""  # the memory-bound function (``silu``, ``add``, ...); empty for an einsum
    reduce_letters: str = ""  # letters a softmax or norm reduces over (whole on each chip)
    stage: str = ""  # ops of one stage share one layout at the op under a strategy
    phase: Phase = Phase.FORWARD
    #: the forward op this one differentiates or recomputes (reports and validation group by it)
    of: str = ""
    #: multiplies this op's matmul FLOPs (0.5: a causal kernel that skips the masked half)
    flops_scale: float = 1.0
    #: RELABEL ops: ``(slot letter, the token letters it is laid out as)``, e.g. ("c", "bt")
    relabel: tuple[tuple[str, str], ...] = ()
    _letters: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _summed: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        seen: dict[str, None] = {}
        for item in self.inputs:
            for c in item.letters:
                seen.setdefault(c)
        for c in self.out_letters:
            seen.setdefault(c)
        object.__setattr__(self, "_letters", tuple(seen))
        if self.kind in _CONTRACTIONS:
            summed = tuple(c for c in seen if c not in self.out_letters)
            object.__setattr__(self, "_summed", summed)

    @property
    def letters(self) -> tuple[str, ...]:
        """Every letter the op touches, in order of first appearance (inputs, then output)."""
        return self._letters

    @property
    def summed(self) -> tuple[str, ...]:
        """Letters summed over: read by a contraction but not written (einsum, reduce)."""
        return self._summed

    @property
    def equation(self) -> str:
        return ",".join(item.letters for item in self.inputs) + "->" + self.out_letters

    @property
    def is_contraction(self) -> bool:
        """Reads letters it does not write (summed): its local result is a partial sum
        over the axes that split them."""
        return self.kind in _CONTRACTIONS


@dataclass(frozen=True, slots=True, kw_only=True)
class LetterRoles:
    """What each letter means to a strategy (``strategies.py``).

    ``batch`` is split by data parallelism (dp, fsdp); ``sequence`` by sequence parallelism
    between blocks (the batch letter itself in a layer without one); ``model`` is the
    dimension FSDP shards parameters over; ``hidden`` are the letters tensor parallelism
    splits, in order of preference (``f``; query-head groups ``k`` then ``g``)."""

    batch: str
    sequence: str
    model: str
    hidden: tuple[str, ...]
    #: the key/value sequence letter of attention (context parallelism splits it)
    kv_sequence: str = ""
    #: mixture of experts: the expert letter (expert parallelism splits it) and the
    #: capacity-slot letter (laid out as the tokens it holds)
    experts: str = ""
    slots: str = "c"


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    """A validated graph of tensors and ops, in an order where every op's inputs exist."""

    name: str
    dims: tuple[tuple[str, int], ...]
    tensors: tuple[Tensor, ...]
    ops: tuple[Op, ...]
    roles: LetterRoles
    #: the program's result tensors (a training program's are the parameter gradients)
    outputs: tuple[str, ...] = ()
    #: ``stage -> kind``: "matmul" stages (einsums and what sits between them) or
    #: "boundary" stages (norms and residual adds, in the activations' stored layout)
    stages: tuple[tuple[str, str], ...] = ()
    #: tokens per step (the batch letter times the sequence letter, or the batch letter)
    tokens: int = 0
    #: ``(forward tensor, its gradient)`` for the parameters, the inputs and the outputs
    #: (an output's gradient is the backward pass's incoming seed)
    gradients: tuple[tuple[str, str], ...] = ()
    _by_name: dict[str, Tensor] = field(init=False, repr=False, compare=False, default_factory=dict)
    _ops_by_name: dict[str, Op] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        sizes = dict(self.dims)
        for letter, size in self.dims:
            if len(letter) != 1 or not letter.islower():
                raise SpecError(f"program {self.name!r}: dimension {letter!r} is not a letter")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise SpecError(
                    f"program {self.name!r}: dimension {letter}={size!r} must be a positive integer"
                )
        for tensor in self.tensors:
            if tensor.name in self._by_name:
                raise SpecError(f"program {self.name!r}: tensor {tensor.name!r} is defined twice")
            missing = [c for c in tensor.letters if c not in sizes]
            if missing:
                raise SpecError(
                    f"program {self.name!r}: tensor {tensor.name!r} uses letter {missing[0]!r}, "
                    f"which has no size (dims: {', '.join(sizes)})"
                )
            self._by_name[tensor.name] = tensor
        written: set[str] = {
            t.name for t in self.tensors if t.kind in (TensorKind.PARAM, TensorKind.INPUT)
        }
        for op in self.ops:
            self._check_op(op, written, sizes)
            written.add(op.output)
            self._ops_by_name[op.name] = op
        for name in self.outputs:
            if name not in written:
                raise SpecError(f"program {self.name!r}: output {name!r} is never written")

    def _check_op(self, op: Op, written: set[str], sizes: Mapping[str, int]) -> None:
        where = f"program {self.name!r}, op {op.name!r} ({op.equation})"
        if op.name in self._ops_by_name:
            raise SpecError(f"{where}: the op name is used twice")
        for item in op.inputs:
            tensor = self._by_name.get(item.tensor)
            if tensor is None or item.tensor not in written:
                raise SpecError(f"{where}: reads {item.tensor!r} before anything writes it")
            if len(item.letters) != len(tensor.letters):
                raise SpecError(
                    f"{where}: reads {item.tensor}[{tensor.letters}] as {item.letters!r}, "
                    "which has another rank"
                )
            for own, read in zip(tensor.letters, item.letters, strict=True):
                if sizes[own] != sizes.get(read, -1):
                    raise SpecError(
                        f"{where}: reads {item.tensor}'s {own!r} (size {sizes[own]}) as "
                        f"{read!r} (size {sizes.get(read)})"
                    )
        out = self._by_name.get(op.output)
        if out is None:
            raise SpecError(f"{where}: writes {op.output!r}, which is not a tensor")
        if out.letters != op.out_letters:
            raise SpecError(f"{where}: writes {op.output}[{out.letters}] as {op.out_letters!r}")
        if op.output in written:
            raise SpecError(f"{where}: writes {op.output!r}, which is already written")
        letters_read = {c for item in op.inputs for c in item.letters}
        extra = [c for c in op.out_letters if c not in letters_read]
        if extra and op.kind not in (OpKind.RELABEL, OpKind.SCATTER):
            raise SpecError(f"{where}: output letter {extra[0]!r} is read from no input")
        if op.kind is OpKind.EINSUM and len(op.inputs) != 2:
            raise SpecError(
                f"{where}: an einsum op takes two operands; split a longer chain into pairwise ops"
            )
        if not op.is_contraction and op.kind is not OpKind.RELABEL:
            for item in op.inputs:
                if any(
                    c not in op.out_letters and c not in op.reduce_letters for c in item.letters
                ):
                    raise SpecError(f"{where}: a {op.kind.value} op cannot drop letters")
        if op.fn and op.fn not in FLOPS_PER_ELEMENT:
            raise SpecError(
                f"{where}: unknown function {op.fn!r}; expected one of "
                f"{', '.join(sorted(FLOPS_PER_ELEMENT))}"
            )

    # -- lookups ---------------------------------------------------------------------------

    def tensor(self, name: str) -> Tensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecError(
                f"program {self.name!r} has no tensor {name!r}; it has "
                f"{', '.join(t.name for t in self.tensors)}"
            ) from None

    def op(self, name: str) -> Op:
        try:
            return self._ops_by_name[name]
        except KeyError:
            raise SpecError(
                f"program {self.name!r} has no op {name!r}; it has "
                f"{', '.join(o.name for o in self.ops)}"
            ) from None

    def size(self, letter: str) -> int:
        for name, size in self.dims:
            if name == letter:
                return size
        raise SpecError(f"program {self.name!r} has no letter {letter!r}")

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.dims)

    def shape(self, tensor: str) -> tuple[int, ...]:
        sizes = self.sizes
        return tuple(sizes[c] for c in self.tensor(tensor).letters)

    def elements(self, tensor: str) -> int:
        return math.prod(self.shape(tensor))

    def tensor_bytes(self, tensor: str) -> int:
        return self.elements(tensor) * self.tensor(tensor).itemsize

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self.tensors if t.kind is TensorKind.PARAM)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self.tensors if t.kind is TensorKind.INPUT)

    @property
    def num_params(self) -> int:
        return sum(self.elements(t.name) for t in self.params)

    def consumers(self, tensor: str) -> Iterator[tuple[Op, OpInput]]:
        for op in self.ops:
            for item in op.inputs:
                if item.tensor == tensor:
                    yield op, item

    def producer(self, tensor: str) -> Op | None:
        for op in self.ops:
            if op.output == tensor:
                return op
        return None

    def stage_kind(self, stage: str) -> str:
        for name, kind in self.stages:
            if name == stage:
                return kind
        raise SpecError(f"program {self.name!r} has no stage {stage!r}")

    @property
    def has_backward(self) -> bool:
        return any(op.phase is Phase.BACKWARD for op in self.ops)

    def with_dims(self, **sizes: int) -> Program:
        """The same program with some letters resized (for sweeps)."""
        unknown = [c for c in sizes if c not in self.sizes]
        if unknown:
            raise SpecError(f"program {self.name!r} has no letter {unknown[0]!r}")
        dims = tuple((c, sizes.get(c, s)) for c, s in self.dims)
        scale = math.prod(sizes.get(c, s) / s for c, s in self.dims if c in self._token_letters())
        return Program(
            name=self.name,
            dims=dims,
            tensors=self.tensors,
            ops=self.ops,
            roles=self.roles,
            outputs=self.outputs,
            stages=self.stages,
            tokens=round(self.tokens * scale),
            gradients=self.gradients,
        )

    def _token_letters(self) -> tuple[str, ...]:
        roles = self.roles
        return (roles.batch,) if roles.sequence == roles.batch else (roles.batch, roles.sequence)
