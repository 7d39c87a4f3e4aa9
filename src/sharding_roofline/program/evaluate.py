"""The one evaluator: a program placed on a mesh -> a ``ProgramPlan`` with every number.

A ``Placement`` says, per stage, which mesh axes split which letter at the op (``σ``,
e.g. ``mlp: b=x, f=y``), where each parameter, its gradient and its optimizer state are
stored, and where the program's inputs and outputs live. From it, op by op:

* each input goes from where it lives (its *home*) to its layout at the op, by the exact
  resharding engine (``paths.py``); a saved activation is read as it was laid out at the
  forward op that saved it, a parameter from its storage (FSDP gathers it again);
* the local op: matmul FLOPs ``2 × Π local sizes`` (einsums; × the op's ``flops_scale``),
  vector FLOPs of memory-bound ops, and HBM bytes (local inputs + local result);
* its result, local and unreduced over the axes that split a summed letter, goes to its own
  home: where its consumers read it when they agree, else its reduced local layout; a
  parameter's gradient to the gradient's layout (all-reduce under DP, reduce-scatter under
  FSDP/ZeRO); a tensor written by a boundary stage stays in that stage's layout.

Each number is computed once, here, and the plan keeps them: ranking and reports read the
same ``Cost`` (the sum of the ops' costs; ``Cost`` keeps the transient memory peak by max).
Memory per chip: parameters, gradients and optimizer state as stored, activations saved for
the backward pass, and the largest transient of any op (resharded inputs, the result and its
moved copy, plus what a remat policy recomputes). Invalid placements are ``Rejected`` with
the reason, never raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import PlanError
from ..estimate import Bottleneck, CommTerm, Cost, Overlap
from ..mesh import DeviceMesh
from ..plans import Rejected, Step
from ..reshard import Dims
from ..sharding import ShardingSpec
from ..units import format_bytes
from .autodiff import OptimizerSpec
from .graph import FLOPS_PER_ELEMENT, Op, OpInput, OpKind, Phase, Program, TensorKind
from .paths import EMPTY, Path, TensorPaths

#: ``letter -> mesh axes`` (major first); letters not listed are whole at the op.
LetterMap = tuple[tuple[str, tuple[str, ...]], ...]


#: The all-reduces a vocabulary-split loss op issues before its result's own reduction
#: (the largest logit, the sum of exponentials): the first steps of its ``steps_out``.
LOSS_STATISTICS = 2


def letter_map(mapping: Mapping[str, Iterable[str]]) -> LetterMap:
    return tuple((c, tuple(axes)) for c, axes in mapping.items() if tuple(axes))


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where everything of a program is laid out, and how each stage's ops are split."""

    name: str
    stages: tuple[tuple[str, LetterMap], ...]
    homes: tuple[tuple[str, Dims], ...] = ()  # explicit layouts (inputs, outputs)
    storage: tuple[tuple[str, Dims], ...] = ()  # parameters
    grads: tuple[tuple[str, Dims], ...] = ()  # parameter gradients' layout (communication)
    optimizer: tuple[tuple[str, Dims], ...] = ()  # optimizer state (and its update)
    #: ZeRO stage, for memory: gradients are held sharded (as ``grads``) from stage 2 on;
    #: below, each chip holds a full gradient buffer (as ``storage``)
    zero: int = 0
    #: a saved activation the forward op gathered is kept as its producer left it, and the
    #: backward op gathers it again (``Strategy.regather``)
    regather: bool = False
    idle_axes: bool = True
    notes: tuple[str, ...] = ()

    def sigma(self, stage: str) -> dict[str, tuple[str, ...]]:
        for name, mapping in self.stages:
            if name == stage:
                return dict(mapping)
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBreakdown:
    """Bytes per chip, by component (the ``layer`` JSON's ``memory_per_chip_bytes``)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    #: ``(component, tensor, bytes)``, largest first: what to shard further
    items: tuple[tuple[str, str, float], ...] = ()
    transient_op: str = ""

    @property
    def persistent(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def peak(self) -> float:
        return self.persistent + self.transient

    def scaled(self, layers: int) -> MemoryBreakdown:
        """``layers`` copies of the persistent parts; one transient peak."""
        return self.scaled_by(layers)

    def scaled_by(self, factor: float) -> MemoryBreakdown:
        """The persistent parts times ``factor``; the transient peak as it is."""
        return MemoryBreakdown(
            params=self.params * factor,
            grads=self.grads * factor,
            optimizer=self.optimizer * factor,
            activations=self.activations * factor,
            transient=self.transient,
            items=tuple((c, t, b * factor) for c, t, b in self.items),
            transient_op=self.transient_op,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "peak": self.peak,
        }

    def overflow(self, capacity: float) -> str:
        """Why this does not fit in ``capacity`` bytes: by how much, and the largest parts."""
        over = self.peak - capacity
        parts = ", ".join(f"{comp} {t} {format_bytes(b)}" for comp, t, b in self.items[:3])
        return (
            f"needs {format_bytes(self.peak)} per chip, {format_bytes(over)} more than the "
            f"{format_bytes(capacity)} of HBM (params {format_bytes(self.params)}, grads "
            f"{format_bytes(self.grads)}, optimizer {format_bytes(self.optimizer)}, "
            f"activations {format_bytes(self.activations)}, transient "
            f"{format_bytes(self.transient)}); largest: {parts}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OpPlan:
    """One op at its layout: the moves of its inputs and result, and its cost."""

    op: Op
    sigma: LetterMap  # at the op
    at_op: tuple[tuple[str, Dims], ...]  # per input: (tensor, layout at the op)
    out_local: Dims
    unreduced: tuple[str, ...]
    out_home: Dims
    steps_in: tuple[Step, ...]
    steps_out: tuple[Step, ...]
    cost: Cost
    #: per input: where it is read from (its home, or the layout it was saved in)
    sources: tuple[Dims, ...] = ()

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.steps_in + self.steps_out

    @property
    def collectives(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.kind is not None and s.cost is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramPlan:
    """A program placed on a mesh: its ops in order, its cost and its memory per chip."""

    program: Program
    mesh: DeviceMesh
    placement: Placement
    ops: tuple[OpPlan, ...]
    cost: Cost  # the passes one after another (each overlaps only within itself)
    passes: tuple[tuple[str, Cost], ...]  # "forward", "backward" (with remat), "optimizer"
    memory: MemoryBreakdown
    overlap: Overlap = Overlap.FULL
    #: how many times the program runs per step (``repeat``): ``cost``, ``passes`` and
    #: ``memory`` are for all of them; each op's own cost stays one repetition's
    layers: int = 1

    @property
    def name(self) -> str:
        return self.placement.name

    def repeat(self, layers: int) -> ProgramPlan:
        """``layers`` copies of this program per step (a stack of identical blocks): every
        time and byte scales, the persistent memory too, the transient peak does not."""
        if not isinstance(layers, int) or layers < 1:
            raise PlanError(f"layers={layers!r} must be a positive integer")
        factor = layers / self.layers
        return dataclasses.replace(
            self,
            cost=self.cost * factor,
            passes=tuple((name, cost * factor) for name, cost in self.passes),
            memory=self.memory.scaled_by(factor),
            layers=layers,
        )

    @property
    def collectives(self) -> tuple[Step, ...]:
        return tuple(s for op in self.ops for s in op.collectives)

    @property
    def bottleneck(self) -> Bottleneck:
        """What bounds the step: per pass, the larger of the chip's own time and its
        communication; the kind that bounds the most seconds over the passes."""
        seconds = {Bottleneck.COMPUTE: 0.0, Bottleneck.HBM: 0.0, Bottleneck.COMM: 0.0}
        for _, cost in self.passes:
            seconds[cost.bottleneck] += cost.lower_bound_s
        return max(seconds, key=lambda kind: seconds[kind])

    @property
    def bottleneck_link(self) -> tuple[tuple[str, ...], str] | None:
        """When communication bounds the step: the axes and link that take longest in the
        communication-bound passes."""
        if self.bottleneck is not Bottleneck.COMM:
            return None
        totals: dict[tuple[tuple[str, ...], str], float] = {}
        for _, cost in self.passes:
            if cost.bottleneck is Bottleneck.COMM:
                for term in cost.comm:
                    key = (term.axes, term.link)
                    totals[key] = totals.get(key, 0.0) + term.time_s
        return max(totals, key=lambda key: totals[key]) if totals else None

    def describe_bottleneck(self) -> str:
        kind = self.bottleneck
        if kind is Bottleneck.COMPUTE:
            return "compute"
        if kind is Bottleneck.HBM:
            return "HBM bandwidth"
        link = self.bottleneck_link
        return (
            "communication"
            if link is None
            else f"communication over {'+'.join(link[0])} ({link[1]})"
        )

    def pass_cost(self, name: str) -> Cost:
        return dict(self.passes).get(name, Cost.zero())

    def pass_of(self, op: str) -> str:
        return _PASS[self.op(op).op.phase]

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.mesh.hardware.chip.hbm_capacity_bytes

    @property
    def time_s(self) -> float:
        return self.cost.time_s(self.overlap)

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.program.tokens / self.time_s / self.mesh.num_devices if self.time_s else 0.0

    def op(self, name: str) -> OpPlan:
        for item in self.ops:
            if item.op.name == name:
                return item
        raise PlanError(f"plan {self.name!r} has no op {name!r}")

    def home(self, tensor: str) -> Dims:
        """Where ``tensor`` lives in this plan (its stored or produced layout)."""
        for item in self.ops:
            if item.op.output == tensor:
                return item.out_home
        return _Evaluator(self.program, self.mesh, self.placement).home(tensor)

    def __repr__(self) -> str:
        return (
            f"ProgramPlan({self.name!r}, {self.program.name!r} on {self.mesh}, "
            f"time {self.cost.lower_bound_s:.4g}..{self.cost.upper_bound_s:.4g} s, "
            f"peak {format_bytes(self.memory.peak)})"
        )


# -- the evaluator -----------------------------------------------------------------------------


def _sums_gradients(op: Op) -> bool:
    """An add of the backward pass that sums a tensor's gradient contributions."""
    return op.phase is Phase.BACKWARD and op.kind is OpKind.POINTWISE and op.fn == "add"


_PASS = {
    Phase.FORWARD: "forward",
    Phase.RECOMPUTE: "backward",
    Phase.BACKWARD: "backward",
    Phase.OPTIMIZER: "optimizer",
}


class _Evaluator:
    def __init__(
        self,
        program: Program,
        mesh: DeviceMesh,
        placement: Placement,
        *,
        paths: TensorPaths | None = None,
        optimizer: OptimizerSpec | None = None,
        memo: dict[tuple[object, ...], OpPlan | Rejected] | None = None,
    ) -> None:
        self.program = program
        self.mesh = mesh
        self.placement = placement
        self.paths = paths or TensorPaths(mesh, idle_axes=placement.idle_axes)
        self.optimizer = optimizer or OptimizerSpec()
        self.memo: dict[tuple[object, ...], OpPlan | Rejected] = {} if memo is None else memo
        self.sizes = program.sizes
        self.chip = mesh.hardware.chip
        self.sigmas = {name: dict(m) for name, m in placement.stages}
        self.explicit = dict(placement.homes)
        self.storage = dict(placement.storage)
        self.grad_layout = dict(placement.grads)
        self.opt_layout = dict(placement.optimizer)
        self.gradient_of: dict[str, str] = {}  # gradient tensor -> forward tensor
        self.gradient: dict[str, str] = dict(program.gradients)
        for fwd, grad in program.gradients:
            self.gradient_of[grad] = fwd
        self.producers = {op.output: op for op in program.ops}
        self.readers: dict[str, list[tuple[Op, OpInput]]] = {}
        for op in program.ops:
            for item in op.inputs:
                self.readers.setdefault(item.tensor, []).append((op, item))
        self._homes: dict[str, Dims] = {}
        self._at_op: dict[tuple[str, str], Dims] = {}
        self._partials: dict[str, tuple[str, ...]] | None = None
        self._op_sigma: dict[str, dict[str, tuple[str, ...]]] = {}
        #: layouts a tensor has already been moved to in this pass (forward; backward with
        #: its recomputation; optimizer): later readers there reuse the copy, as XLA
        #: reuses one collective's result. A new pass moves it again (ZeRO-3 gathers the
        #: weights again in the backward pass).
        self._copies: set[tuple[str, Dims, str]] = set()

    # -- layouts ------------------------------------------------------------------------

    def op_sigma(self, op: Op) -> dict[str, tuple[str, ...]]:
        cached = self._op_sigma.get(op.name)
        if cached is None:
            base = self.sigmas.get(op.stage, {})
            cached = {
                c: base[c]
                for c in op.letters
                if c in base and base[c] and c not in op.reduce_letters
            }
            self._op_sigma[op.name] = cached
        return cached

    def at_op(self, op: Op, letters: str) -> Dims:
        key = (op.name, letters)
        cached = self._at_op.get(key)
        if cached is None:
            if op.phase is Phase.OPTIMIZER:
                cached = self.opt(op.of)
            else:
                sigma = self.op_sigma(op)
                if op.relabel:  # a slot letter is laid out as the token letters it stands for
                    # (the axes that split the experts minor-most, so that the all-to-all to
                    # the experts' layout moves just them)
                    sigma = dict(sigma)
                    expert = self.expert_axes()
                    for slot, tokens in op.relabel:
                        axes = [a for c in tokens for a in sigma.get(c, ())]
                        axes = [a for a in axes if a not in expert] + [
                            a for a in axes if a in expert
                        ]
                        sigma[slot] = tuple(axes)
                cached = tuple(sigma.get(c, ()) for c in letters)
            self._at_op[key] = cached
        return cached

    def expert_axes(self) -> tuple[str, ...]:
        """The axes any stage splits the expert letter over (expert parallelism)."""
        letter = self.program.roles.experts
        if not letter:
            return ()
        return tuple(a for sigma in self.sigmas.values() for a in sigma.get(letter, ()))

    def replicated(self, tensor: str) -> Dims:
        return ((),) * len(self.program.tensor(tensor).letters)

    def param_storage(self, name: str) -> Dims:
        return self.storage.get(name, self.replicated(name))

    def opt(self, param: str) -> Dims:
        return self.opt_layout.get(param, self.grad_layout.get(param, self.param_storage(param)))

    def home(self, tensor: str) -> Dims:
        cached = self._homes.get(tensor)
        if cached is None:
            cached = self._resolve_home(tensor)
            self._homes[tensor] = cached
        return cached

    def _resolve_home(self, tensor: str) -> Dims:
        if tensor in self.explicit:
            return self.explicit[tensor]
        info = self.program.tensor(tensor)
        if info.kind is TensorKind.PARAM:
            return self.param_storage(tensor)
        forward = self.gradient_of.get(tensor)
        if forward is not None:
            source = self.program.tensor(forward)
            if source.kind is TensorKind.PARAM:
                return self.grad_layout.get(forward, self.param_storage(forward))
            return self.home(forward)  # mirror: a gradient lives where its tensor lives
        producer = self.producers.get(tensor)
        if producer is None:
            return self.replicated(tensor)
        if producer.phase is Phase.OPTIMIZER:
            return self.param_storage(producer.of)
        local = self.at_op(producer, producer.out_letters)
        if self._is_boundary(producer):
            return local
        layouts = {
            self.at_op(op, item.letters)
            for op, item in self.readers.get(tensor, ())
            if not item.saved_at
        }
        if len(layouts) == 1:
            return layouts.pop()
        return local

    def op_unreduced(self, op: Op) -> tuple[str, ...]:
        """The axes an op's local result is a partial sum over: those splitting a summed
        letter of a contraction; for a gradient-summing add of partial sums, theirs."""
        if op.is_contraction:
            sigma = self.op_sigma(op)
            return tuple(
                axis for axis in self.mesh.axis_names for c in op.summed if axis in sigma.get(c, ())
            )
        if _sums_gradients(op):
            return self.partial(op.inputs[0].tensor)
        return ()

    def partial(self, tensor: str) -> tuple[str, ...]:
        """The axes ``tensor`` is kept unreduced over at its home: a gradient contribution
        whose only readers add it, in the same layout, to contributions as partial as it
        is. The partial sums are added first and reduced once, as frameworks accumulate
        gradients before reducing them (one all-reduce for ``dx`` of Q, K and V)."""
        if self._partials is None:
            self._partials = self._resolve_partials()
        return self._partials.get(tensor, ())

    def _resolve_partials(self) -> dict[str, tuple[str, ...]]:
        adds = [op for op in self.program.ops if _sums_gradients(op)]
        if not adds:
            return {}
        partial: dict[str, tuple[str, ...]] = {}
        for op in self.program.ops:  # in order: an add's inputs are settled before it
            for item in op.inputs if _sums_gradients(op) else ():
                tensor = item.tensor
                if tensor in partial:
                    continue
                partial[tensor] = self._candidate(tensor, partial)
        # an add of a partial and a reduced input reduces both first; a tensor reduced
        # stays reduced, so this ends (each pass demotes at least one tensor, or stops)
        demoted: set[str] = set()
        changed = True
        while changed:
            changed = False
            for op in adds:
                parts = {partial.get(item.tensor, ()) for item in op.inputs}
                if len(parts) > 1:
                    for item in op.inputs:
                        if partial.get(item.tensor, ()):
                            partial[item.tensor] = ()
                            demoted.add(item.tensor)
                            changed = True
                out = op.output
                if out in partial and out not in demoted:
                    want = self._candidate(out, partial)
                    if partial[out] != want:
                        partial[out] = want
                        if not want:
                            demoted.add(out)
                        changed = True
        return {t: u for t, u in partial.items() if u}

    def _candidate(self, tensor: str, partial: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        producer = self.producers.get(tensor)
        if producer is None or tensor in self.explicit or tensor in self.gradient_of:
            return ()
        readers = [(op, item) for op, item in self.readers.get(tensor, ()) if not item.saved_at]
        if not readers or not all(_sums_gradients(op) for op, _ in readers):
            return ()
        local = self.at_op(producer, producer.out_letters)
        if any(self.at_op(op, item.letters) != local for op, item in readers):
            return ()
        if producer.is_contraction:
            return self.op_unreduced(producer)
        if _sums_gradients(producer):
            parts = {partial.get(item.tensor, ()) for item in producer.inputs}
            return parts.pop() if len(parts) == 1 else ()
        return ()

    def _is_boundary(self, op: Op) -> bool:
        for name, kind in self.program.stages:
            if name == op.stage:
                return kind == "boundary"
        return False

    def source(self, op: Op, item: OpInput) -> Dims:
        """Where an op's input comes from: a saved layout, or the tensor's home. Under
        ``regather``, an activation its forward op read gathered is saved as its home (a
        shard) when that holds fewer bytes and is no partial sum."""
        if item.saved_at:
            saved_op = self.program.op(item.saved_at)
            saved = self.at_op(saved_op, item.letters)
            if self.placement.regather and not self.partial(item.tensor):
                home = self.home(item.tensor)
                if self._bytes(item.tensor, home) < self._bytes(item.tensor, saved):
                    return home
            return saved
        return self.home(item.tensor)

    # -- one op ---------------------------------------------------------------------------

    def evaluate_op(self, op: Op) -> OpPlan | Rejected:
        """The op at its layout, memoised (a search meets the same op in the same layouts
        under many placements): keyed by everything its numbers depend on."""
        sigma = self.op_sigma(op)
        pass_name = _PASS[op.phase]
        dsts = tuple(self.at_op(op, item.letters) for item in op.inputs)
        srcs = tuple(self.source(op, item) for item in op.inputs)
        reused = tuple(
            (item.tensor, dst, pass_name) in self._copies
            for item, dst in zip(op.inputs, dsts, strict=True)
        )
        home = self.home(op.output)
        keep = self.partial(op.output)
        unreduced = self.op_unreduced(op)
        key = (op.name, tuple(sigma.items()), srcs, dsts, reused, home, keep, unreduced)
        cached = self.memo.get(key)
        if cached is None:
            cached = self._evaluate_op(
                op, sigma=sigma, srcs=srcs, dsts=dsts, reused=reused, home=home, keep=keep
            )
            self.memo[key] = cached
        if isinstance(cached, Rejected):
            return Rejected(strategy=self.placement.name, reason=cached.reason)
        for item, dst, src, was in zip(op.inputs, dsts, srcs, reused, strict=True):
            if not was and src != dst:
                self._copies.add((item.tensor, dst, pass_name))
        return cached

    def _evaluate_op(
        self,
        op: Op,
        *,
        sigma: dict[str, tuple[str, ...]],
        srcs: tuple[Dims, ...],
        dsts: tuple[Dims, ...],
        reused: tuple[bool, ...],
        home: Dims,
        keep: tuple[str, ...],
    ) -> OpPlan | Rejected:
        for letter, axes in sigma.items():
            pieces = self.paths.pieces(axes)
            if self.sizes[letter] % pieces:
                return Rejected(
                    strategy=self.placement.name,
                    reason=(
                        f"op {op.name}: {letter.upper()} (size {self.sizes[letter]}) does not "
                        f"divide over {'+'.join(axes)} ({pieces} pieces)"
                    ),
                )
        steps_in: list[Step] = []
        at_op: list[tuple[str, Dims]] = []
        comm: list[CommTerm] = []
        hbm_bytes = 0.0
        transient = 0.0
        read: set[tuple[str, Dims]] = set()
        for item, src, dst, was in zip(op.inputs, srcs, dsts, reused, strict=True):
            tensor = self.program.tensor(item.tensor)
            shape = tuple(self.sizes[c] for c in item.letters)
            # an op reading one tensor twice in one layout (x·x) moves and reads it once
            again = (item.tensor, dst) in read
            read.add((item.tensor, dst))
            path = EMPTY if was or again else self.paths.path(shape, tensor.dtype, src, dst)
            if path is None:
                return self._indivisible(op, item.tensor, src, dst)
            at_op.append((item.tensor, dst))
            local_bytes = (
                0 if tensor.on_chip or again else self.paths.elements(shape, dst) * tensor.itemsize
            )
            if op.kind is OpKind.GATHER and tensor.kind is TensorKind.PARAM:
                # a lookup reads the rows it gathers, not the whole table
                out_shape_ = tuple(self.sizes[c] for c in op.out_letters)
                rows = self.paths.elements(out_shape_, self.at_op(op, op.out_letters))
                local_bytes = min(local_bytes, rows * tensor.itemsize)
            hbm_bytes += local_bytes
            if path.steps:
                transient += local_bytes
            steps_in += self._steps(item.tensor, path, op)
            comm += self._terms(path)
        out = self.program.tensor(op.output)
        out_shape = tuple(self.sizes[c] for c in op.out_letters)
        local = self.at_op(op, op.out_letters)
        unreduced = self.op_unreduced(op)
        stats = EMPTY
        if op.kind is OpKind.LOSS and unreduced:
            # a vocabulary-split cross-entropy needs two statistics of every token whole on
            # every chip of the split (its gradient's softmax reads them): the largest logit
            # and the sum of exponentials, each all-reduced over the axes splitting the
            # vocabulary (Megatron's vocabulary-parallel loss; XLA's partitioner issues the
            # same); the label's logit, and so the loss, is then a partial sum, reduced into
            # the loss's home like any other
            reduce = self.paths.path(out_shape, out.dtype, local, local, unreduced)
            if reduce is None:  # pragma: no cover - an all-reduce keeps the layout
                return self._indivisible(op, op.output, local, local)
            stats = Path(
                LOSS_STATISTICS * reduce.steps,
                LOSS_STATISTICS * reduce.time_s,
                LOSS_STATISTICS * reduce.bytes_sent_per_chip,
            )
        post = (
            EMPTY
            if home == local and unreduced == keep
            else self.paths.path(out_shape, out.dtype, local, home, unreduced)
        )
        if post is None:
            return self._indivisible(op, op.output, local, home)
        if stats.steps:
            post = Path(
                stats.steps + post.steps,
                stats.time_s + post.time_s,
                stats.bytes_sent_per_chip + post.bytes_sent_per_chip,
            )
        out_bytes = 0 if out.on_chip else self.paths.elements(out_shape, local) * out.itemsize
        hbm_bytes += out_bytes
        transient += out_bytes
        if post.steps and not out.on_chip:
            transient += self.paths.elements(out_shape, home) * out.itemsize
        comm += self._terms(post)
        elements = 1
        for c in op.letters:
            elements *= self.sizes[c] // self.paths.pieces(sigma.get(c, ()))
        flops = 0.0
        vector = 0.0
        if op.kind is OpKind.EINSUM:
            flops = 2.0 * elements * op.flops_scale
        elif op.kind is OpKind.REDUCE:
            vector = 2.0 * elements
        elif op.kind is OpKind.LOSS:
            vector = FLOPS_PER_ELEMENT["xent"] * elements
        elif op.kind is OpKind.RELABEL:
            vector = FLOPS_PER_ELEMENT[op.fn] * max(
                self.paths.elements(
                    tuple(self.sizes[c] for c in item.letters), self.at_op(op, item.letters)
                )
                for item in op.inputs
            )
        elif op.kind in (OpKind.GATHER, OpKind.SCATTER):
            vector = FLOPS_PER_ELEMENT[op.kind.value] * self.paths.elements(
                tuple(self.sizes[c] for c in op.inputs[0].letters),
                self.at_op(op, op.inputs[0].letters),
            )
        else:
            vector = FLOPS_PER_ELEMENT[op.fn] * self.paths.elements(out_shape, local)
        if op.phase is Phase.OPTIMIZER:
            # AdamW reads and writes its state (moments, master weights) besides the tensors
            hbm_bytes += (
                2 * self.optimizer.state_bytes_per_param * self.paths.elements(out_shape, local)
            )
        # matmuls run at the peak of their operands' dtype (the first operand's)
        dtype = self.program.tensor(op.inputs[0].tensor).dtype
        compute_s = flops / self.chip.peak_flops_per_s_for(dtype) if flops else 0.0
        cost = Cost(
            flops=flops,
            hbm_bytes=hbm_bytes,
            compute_s=compute_s,
            hbm_s=hbm_bytes / self.chip.hbm_bytes_per_s,
            comm=tuple(comm),
            vector_flops=vector,
            peak_memory_bytes=transient,
        )
        return OpPlan(
            op=op,
            sigma=letter_map(sigma),
            at_op=tuple(at_op),
            out_local=local,
            unreduced=unreduced,
            out_home=home,
            steps_in=tuple(steps_in),
            steps_out=tuple(self._steps(op.output, post, op)),
            cost=cost,
            sources=srcs,
        )

    def _indivisible(self, op: Op, tensor: str, src: Dims, dst: Dims) -> Rejected:
        return Rejected(
            strategy=self.placement.name,
            reason=(
                f"op {op.name}: moving {tensor} from {ShardingSpec(src).text()} to "
                f"{ShardingSpec(dst).text()} passes a layout that does not divide its sizes"
            ),
        )

    def _terms(self, path: Path) -> list[CommTerm]:
        return [
            CommTerm(
                s.cost.axes,
                s.cost.link,
                s.cost.time_s,
                s.cost.bytes_sent_per_chip,
                self.mesh.link_resources(s.cost.axes),
            )
            for s in path.steps
            if s.cost is not None
        ]

    @staticmethod
    def _steps(tensor: str, path: Path, op: Op) -> list[Step]:
        return [
            Step(
                operand=tensor,
                kind=s.kind,
                axes=s.axes,
                before=ShardingSpec(s.before),
                after=ShardingSpec(s.after),
                unreduced_before=s.unreduced_before,
                unreduced_after=s.unreduced_after,
                cost=s.cost,
            )
            for s in path.steps
        ]

    # -- the whole program ------------------------------------------------------------------

    def run(self, overlap: Overlap) -> ProgramPlan | Rejected:
        result = self.run_ops(self.program.ops)
        if isinstance(result, Rejected):
            return result
        ops, passes, total, memory = result
        return ProgramPlan(
            program=self.program,
            mesh=self.mesh,
            placement=self.placement,
            ops=tuple(ops),
            cost=total,
            passes=tuple(passes.items()),
            memory=memory,
            overlap=overlap,
        )

    def run_ops(
        self, selected: Iterable[Op]
    ) -> tuple[list[OpPlan], dict[str, Cost], Cost, MemoryBreakdown] | Rejected:
        """Evaluate ``selected`` ops (all of them for a plan; one stage's in a search):
        their plans, their cost per pass and in sequence, and their memory."""
        ops: list[OpPlan] = []
        passes: dict[str, Cost] = {}
        recompute_bytes = 0.0
        for op in selected:
            result = self.evaluate_op(op)
            if isinstance(result, Rejected):
                return result
            if op.phase is Phase.RECOMPUTE and not self.program.tensor(op.output).on_chip:
                recompute_bytes += self._bytes(op.output, result.out_home)
            cost = result.cost
            if op.phase is Phase.BACKWARD and recompute_bytes:
                cost = cost + Cost(peak_memory_bytes=cost.peak_memory_bytes + recompute_bytes)
            ops.append(result)
            key = _PASS[op.phase]
            passes[key] = passes.get(key, Cost.zero()) + cost
        total = Cost.zero()
        for name in ("forward", "backward", "optimizer"):
            if name in passes:
                total = total.then(passes[name])
        return ops, passes, total, self.memory(ops, total.peak_memory_bytes)

    def _bytes(self, tensor: str, dims: Dims) -> float:
        info = self.program.tensor(tensor)
        shape = tuple(self.sizes[c] for c in info.letters)
        return float(self.paths.elements(shape, dims) * info.itemsize)

    def memory(self, ops: list[OpPlan], transient: float) -> MemoryBreakdown:
        """Memory per chip of the parameters the ``ops`` read and the activations they save."""
        program = self.program
        training = program.has_backward
        items: list[tuple[str, str, float]] = []
        params = grads = optimizer = activations = 0.0
        read = {item.tensor for op_plan in ops for item in op_plan.op.inputs}
        for param in program.params:
            if param.name not in read:
                continue
            stored = self._bytes(param.name, self.param_storage(param.name))
            params += stored
            items.append(("params", param.name, stored))
            if not training:
                continue
            held = self.grad_layout.get(param.name, self.param_storage(param.name))
            if self.placement.zero < 2:
                held = self.param_storage(param.name)
            grad = self._bytes(param.name, held)
            grads += grad
            items.append(("grads", param.name, grad))
            shape = program.shape(param.name)
            state = self.paths.elements(shape, self.opt(param.name))
            opt = state * self.optimizer.state_bytes_per_param
            optimizer += opt
            items.append(("optimizer", param.name, opt))
        saved: set[tuple[str, Dims]] = set()
        for op in (op_plan.op for op_plan in ops):
            if op.phase is Phase.FORWARD:
                continue
            for item in op.inputs:
                info = program.tensor(item.tensor)
                if info.kind not in (TensorKind.ACTIVATION, TensorKind.INPUT) or info.on_chip:
                    continue
                producer = self.producers.get(item.tensor)
                if producer is not None and producer.phase is not Phase.FORWARD:
                    continue  # produced in the backward pass: transient
                if info.kind is TensorKind.INPUT and item.tensor in self.gradient_of:
                    continue  # the incoming gradient seed is not saved
                saved.add((item.tensor, self.source(op, item)))
        for tensor, dims in sorted(saved):
            size = self._bytes(tensor, dims)
            activations += size
            items.append(("activations", tensor, size))
        items.sort(key=lambda item: -item[2])
        peak_op = ""
        best = -1.0
        for op_plan in ops:
            if op_plan.cost.peak_memory_bytes > best:
                best = op_plan.cost.peak_memory_bytes
                peak_op = op_plan.op.name
        return MemoryBreakdown(
            params=params,
            grads=grads,
            optimizer=optimizer,
            activations=activations,
            transient=transient,
            items=tuple(items),
            transient_op=peak_op,
        )


@dataclass(slots=True)
class Evaluation:
    """Reusable state for evaluating many placements of one program on one mesh (a
    search): the path cache is shared."""

    program: Program
    mesh: DeviceMesh
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    overlap: Overlap = Overlap.FULL
    #: axes gathers may never widen over though they look idle (a pipeline's stage axis:
    #: its chips hold other layers)
    exclude_widen: tuple[str, ...] = ()
    _paths: dict[bool, TensorPaths] = field(default_factory=dict)
    _memo: dict[bool, dict[tuple[object, ...], OpPlan | Rejected]] = field(default_factory=dict)

    def evaluator(self, placement: Placement) -> _Evaluator:
        paths = self._paths.get(placement.idle_axes)
        if paths is None:
            paths = self._paths[placement.idle_axes] = TensorPaths(
                self.mesh, idle_axes=placement.idle_axes, exclude=self.exclude_widen
            )
        memo = self._memo.setdefault(placement.idle_axes, {})
        return _Evaluator(
            self.program, self.mesh, placement, paths=paths, optimizer=self.optimizer, memo=memo
        )

    def __call__(self, placement: Placement) -> ProgramPlan | Rejected:
        return self.evaluator(placement).run(self.overlap)


def evaluate(
    program: Program,
    mesh: DeviceMesh,
    placement: Placement,
    *,
    optimizer: OptimizerSpec | None = None,
    overlap: Overlap = Overlap.FULL,
) -> ProgramPlan:
    """Evaluate one placement; an invalid one raises ``PlanError`` with the reason."""
    result = Evaluation(program, mesh, optimizer or OptimizerSpec(), overlap)(placement)
    if isinstance(result, Rejected):
        raise PlanError(f"strategy {result.strategy} cannot run {program.name}: {result.reason}")
    return result
