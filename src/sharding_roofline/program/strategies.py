"""The scaling book's named strategies, placeable on any mesh axes: ``fsdp=x,tp=y``.

A strategy is written as comma-separated ``key=axes`` items (axes joined by ``+``, major
first):

* ``dp=x``: data parallelism: the batch is split over ``x``; parameters are replicated and
  their gradients all-reduced (``zero=1`` also shards the optimizer state over the dp
  axes, ``zero=2`` the gradients too: reduce-scatter, then all-gather the updated weights);
* ``fsdp=x``: fully sharded data parallelism (ZeRO-3): the batch and the parameters (along
  the model dimension ``d``) are split over ``x``; each weight is all-gathered where it is
  used, forward and backward, and its gradient reduce-scattered;
* ``tp=y``: Megatron tensor parallelism: the MLP width ``f`` and the attention heads (KV
  heads ``k``, then query groups ``g``) are split over ``y``; activations between blocks are
  replicated over ``y`` (an all-reduce after each block's second matmul);
* ``sp=y``: tensor parallelism with sequence parallelism: as ``tp=y``, and the activations
  between blocks are split along the sequence over ``y`` (all-gather before, reduce-scatter
  after, instead of the all-reduce);
* ``regather=1``: saved activations are kept as their producer laid them out, and a
  backward op that needs one gathered gathers it again (Megatron's sequence parallelism,
  nanotron's ``tp_recompute_allgather``): the saved copy of an activation that the forward
  op all-gathered (SP's normed inputs, CP's keys and values) costs its shard, not the
  whole, for one more all-gather in the backward pass;
* ``<stage>.<letter>=axes``: pins a letter of one stage (``mlp.f=y+z``, ``io.t=y``),
  overriding what the named parts say; the layout search names its placements this way.

The strategy's ``name`` is canonical and parses back to the same strategy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SpecError
from ..mesh import DeviceMesh
from ..reshard import Dims
from .evaluate import Placement, letter_map
from .graph import Phase, Program, TensorKind

_KEYS = ("dp", "fsdp", "tp", "sp", "pp", "ep", "cp")
_PIN = re.compile(r"^([a-z_][a-z0-9_]*)\.([a-z])$")
_SCHEDULES = ("gpipe", "1f1b", "interleaved")
_REMATS = ("none", "full", "dots")


def _axes(text: str, item: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split("+") if a.strip())
    if not names or any(not a.isidentifier() for a in names):
        raise SpecError(
            f"strategy item {item!r}: {text!r} is not mesh axes; write them joined by '+', "
            "e.g. fsdp=x+y"
        )
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    """A placement by role. ``dp``/``fsdp``/``tp``/``pp`` take disjoint axes; ``ep``
    (experts) and ``cp`` (context: the sequence) reuse data axes, as expert and context
    parallelism split what data parallelism splits. ``mb`` (microbatches), ``schedule``
    (pipeline: gpipe, 1f1b, interleaved, with ``vs`` chunks) and ``remat`` describe the
    training step, so that a model plan's name passes back with ``--strategy``."""

    dp: tuple[str, ...] = ()
    fsdp: tuple[str, ...] = ()
    tp: tuple[str, ...] = ()
    sp: bool = False
    pp: tuple[str, ...] = ()
    ep: tuple[str, ...] = ()
    cp: tuple[str, ...] = ()
    zero: int = 0
    mb: int = 0  # 0: the command's default
    schedule: str = ""
    vs: int = 0  # virtual stages per device (interleaved)
    remat: str = ""
    regather: bool = False
    pins: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for key in ("dp", "fsdp", "tp", "pp"):
            for axis in getattr(self, key):
                if axis in seen:
                    raise SpecError(
                        f"strategy {self.name!r}: mesh axis {axis!r} is given to both "
                        f"{seen[axis]} and {key}; each axis does one job"
                    )
                seen[axis] = key
        data = {*self.dp, *self.fsdp}
        for key in ("ep", "cp"):
            outside = [a for a in getattr(self, key) if a not in data]
            if outside:
                raise SpecError(
                    f"strategy {self.name!r}: {key} axis {outside[0]!r} is not a data axis; "
                    f"{'expert' if key == 'ep' else 'context'} parallelism splits what data "
                    f"parallelism splits: give it dp or fsdp too (e.g. fsdp=x,{key}=x)"
                )
        if set(self.ep) & set(self.cp):
            raise SpecError(f"strategy {self.name!r}: an axis cannot do both ep and cp")
        if self.zero not in (0, 1, 2, 3):
            raise SpecError(f"strategy {self.name!r}: zero={self.zero}; expected 0, 1, 2 or 3")
        if self.sp and not self.tp:
            raise SpecError(f"strategy {self.name!r}: sequence parallelism needs tp axes")
        if self.mb < 0 or self.vs < 0:
            raise SpecError(f"strategy {self.name!r}: mb and vs must be positive")
        if self.schedule and self.schedule not in _SCHEDULES:
            raise SpecError(
                f"strategy {self.name!r}: schedule={self.schedule!r}; expected one of "
                f"{', '.join(_SCHEDULES)}"
            )
        if self.remat and self.remat not in _REMATS:
            raise SpecError(
                f"strategy {self.name!r}: remat={self.remat!r}; expected none, full or dots"
            )

    @classmethod
    def parse(cls, text: str | Strategy) -> Strategy:
        """``"fsdp=x,tp=y"``, ``"dp=x+y,zero=1"``, ``"fsdp=x,sp=y"``, ``"mlp.f=y"``,
        ``"dp=slice,fsdp=x,tp=z,pp=y,mb=16,schedule=1f1b"``."""
        if isinstance(text, Strategy):
            return text
        parts: dict[str, tuple[str, ...]] = {}
        numbers: dict[str, int] = {}
        words: dict[str, str] = {}
        sp = False
        pins: list[tuple[str, str, tuple[str, ...]]] = []
        body = text.strip()
        if not body:
            raise SpecError("empty strategy; write e.g. fsdp=x,tp=y (see layer --help)")
        for item in body.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or not value:
                raise SpecError(
                    f"strategy {text!r}: {item.strip()!r} is not KEY=AXES; write e.g. "
                    "fsdp=x,tp=y (keys: dp, fsdp, tp, sp, pp, ep, cp, zero, mb, schedule, "
                    "vs, remat, regather, or stage.letter pins)"
                )
            if key in ("zero", "mb", "vs"):
                if not (value.isascii() and value.isdigit()):
                    raise SpecError(f"strategy {text!r}: {key}={value!r} must be a whole number")
                numbers[key] = int(value)
                continue
            if key == "regather":
                if value not in ("0", "1"):
                    raise SpecError(
                        f"strategy {text!r}: regather={value!r}; expected 1 (gather saved "
                        "activations again in the backward pass) or 0"
                    )
                numbers[key] = int(value)
                continue
            if key in ("schedule", "remat"):
                words[key] = value.lower()
                continue
            if key in _KEYS:
                axes = _axes(value, item)
                if key == "sp":
                    sp = True
                    key = "tp"
                if key in parts and parts[key] != axes:
                    raise SpecError(
                        f"strategy {text!r}: {key} is given twice ({'+'.join(parts[key])} and "
                        f"{'+'.join(axes)})"
                    )
                parts[key] = axes
                continue
            pin = _PIN.match(key)
            if pin:
                pins.append(
                    (pin.group(1), pin.group(2), () if value == "-" else _axes(value, item))
                )
                continue
            raise SpecError(
                f"strategy {text!r}: unknown key {key!r}; expected dp, fsdp, tp, sp, pp, ep, "
                "cp, zero, mb, schedule, vs, remat, regather, or a pin like mlp.f=y"
            )
        return cls(
            dp=parts.get("dp", ()),
            fsdp=parts.get("fsdp", ()),
            tp=parts.get("tp", ()),
            sp=sp,
            pp=parts.get("pp", ()),
            ep=parts.get("ep", ()),
            cp=parts.get("cp", ()),
            zero=numbers.get("zero", 0),
            mb=numbers.get("mb", 0),
            vs=numbers.get("vs", 0),
            schedule=words.get("schedule", ""),
            remat=words.get("remat", ""),
            regather=bool(numbers.get("regather", 0)),
            pins=tuple(pins),
        )

    @property
    def name(self) -> str:
        parts = []
        for key in ("dp", "fsdp"):
            axes = getattr(self, key)
            if axes:
                parts.append(f"{key}=" + "+".join(axes))
        if self.tp:
            parts.append(("sp=" if self.sp else "tp=") + "+".join(self.tp))
        for key in ("pp", "ep", "cp"):
            axes = getattr(self, key)
            if axes:
                parts.append(f"{key}=" + "+".join(axes))
        if self.zero:
            parts.append(f"zero={self.zero}")
        if self.mb:
            parts.append(f"mb={self.mb}")
        if self.schedule:
            parts.append(f"schedule={self.schedule}")
        if self.vs:
            parts.append(f"vs={self.vs}")
        if self.remat:
            parts.append(f"remat={self.remat}")
        if self.regather:
            parts.append("regather=1")
        parts += [f"{s}.{c}={'+'.join(a) or '-'}" for s, c, a in self.pins]
        return ",".join(parts) or "replicated"

    def __str__(self) -> str:
        return self.name

    def replace(self, **changes: object) -> Strategy:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def axes(self) -> tuple[str, ...]:
        return (*self.dp, *self.fsdp, *self.tp, *self.pp)

    def check(self, mesh: DeviceMesh) -> None:
        for axis in (
            *self.axes,
            *self.ep,
            *self.cp,
            *(a for _, _, axes in self.pins for a in axes),
        ):
            if axis not in mesh.axis_names:
                raise SpecError(
                    f"strategy {self.name!r} uses mesh axis {axis!r}, but the mesh "
                    f"({mesh.spec_text}) has axes {', '.join(mesh.axis_names)}"
                )


def named_strategies(mesh: DeviceMesh) -> list[Strategy]:
    """The book's strategies over the mesh's axes, for ``--compare``: data parallelism
    (DP, FSDP) on the major axes and model parallelism (TP, TP+SP) on the minor ones (inner
    axes are the fast links: a torus's neighbours, an NVLink node), at every split; and
    FSDP with TP+SP on each single other axis (whose size may suit the heads better)."""
    axes = tuple(a.name for a in mesh.axes if a.size > 1)
    out: list[Strategy] = []
    for axis in axes[:-1]:  # TP on one axis that is not the minor one (an 8-wide axis)
        others = tuple(a for a in axes if a != axis)
        out.append(Strategy(fsdp=others, tp=(axis,), sp=True))
    for split in range(len(axes), -1, -1):
        data, model = axes[:split], axes[split:]
        if not model:
            out += [Strategy(dp=data), Strategy(fsdp=data)]
        elif not data:
            out += [Strategy(tp=model), Strategy(tp=model, sp=True)]
        else:
            out += [
                Strategy(dp=data, tp=model),
                Strategy(fsdp=data, tp=model),
                Strategy(fsdp=data, tp=model, sp=True),
            ]
    return out


# -- placing a strategy on a program -----------------------------------------------------


def _in_mesh_order(mesh: DeviceMesh, axes: Iterable[str]) -> tuple[str, ...]:
    wanted = set(axes)
    return tuple(a for a in mesh.axis_names if a in wanted)


def _stage_letters(program: Program, stage: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for op in program.ops:
        if op.stage == stage and op.phase is Phase.FORWARD:
            for c in op.letters:
                seen.setdefault(c)
    return tuple(seen)


def boundary_map(program: Program, mesh: DeviceMesh, strategy: Strategy) -> dict[str, list[str]]:
    """The layout of activations between blocks: the batch over the data axes (but the
    context-parallel ones, which split the sequence), and with sequence parallelism the
    sequence over the tp axes too."""
    roles = program.roles
    batch, sequence = _token_axes(program, mesh, strategy)
    mapping: dict[str, list[str]] = {roles.batch: batch}
    if roles.sequence != roles.batch and sequence:
        mapping[roles.sequence] = list(sequence)
    if strategy.sp:
        tp = list(_in_mesh_order(mesh, strategy.tp))
        if roles.sequence == roles.batch:
            mapping[roles.batch] = mapping[roles.batch] + tp
        else:
            mapping[roles.sequence] = mapping.get(roles.sequence, []) + tp
    return mapping


def _token_axes(
    program: Program, mesh: DeviceMesh, strategy: Strategy
) -> tuple[list[str], list[str]]:
    """(axes on the batch letter, axes on the sequence letter) at every stage: the data
    axes split whole sequences, the context-parallel ones positions within them. Without
    a sequence letter, every data axis splits the tokens."""
    data = list(_in_mesh_order(mesh, (*strategy.dp, *strategy.fsdp)))
    if program.roles.sequence == program.roles.batch:
        return data, []
    cp = set(strategy.cp)
    return [a for a in data if a not in cp], [a for a in data if a in cp]


def place(
    program: Program, mesh: DeviceMesh, strategy: Strategy | str, *, idle_axes: bool = True
) -> Placement:
    """The placement of ``strategy`` on ``program``: each stage's layout at the op, each
    parameter's storage, gradient and optimizer layouts, and the activations' homes."""
    strategy = Strategy.parse(strategy)
    strategy.check(mesh)
    roles = program.roles
    sizes = program.sizes
    axis_size = {a.name: a.size for a in mesh.axes}
    tp = _in_mesh_order(mesh, strategy.tp)
    notes: list[str] = []
    boundary = boundary_map(program, mesh, strategy)
    maps: dict[str, dict[str, list[str]]] = {}
    for stage, kind in program.stages:
        letters = _stage_letters(program, stage)
        sigma: dict[str, list[str]] = {}
        if kind == "boundary":
            sigma = {c: list(a) for c, a in boundary.items() if c in letters}
        elif kind == "matmul":
            batch_axes, sequence_axes = _token_axes(program, mesh, strategy)
            if roles.batch in letters and batch_axes:
                sigma[roles.batch] = list(batch_axes)
            if roles.sequence in letters and sequence_axes:
                sigma[roles.sequence] = list(sequence_axes)
            if roles.experts and roles.experts in letters and roles.batch not in letters:
                # the experts' view: experts over the ep axes, each expert's slots over the
                # other token axes (the dispatch all-to-all moves the ep axes from c to e)
                ep = list(_in_mesh_order(mesh, strategy.ep))
                tokens = [*batch_axes, *sequence_axes]
                if ep:
                    sigma[roles.experts] = ep
                slots = [a for a in tokens if a not in ep]
                if slots:
                    sigma[roles.slots] = slots
            hidden = [c for c in roles.hidden if c in letters]
            for axis in tp:
                for c in hidden:
                    pieces = _pieces(sigma.get(c, []), axis_size) * axis_size[axis]
                    if sizes[c] % pieces == 0:
                        sigma.setdefault(c, []).append(axis)
                        break
                else:
                    if hidden:
                        notes.append(
                            f"tp axis {axis} ({axis_size[axis]}) splits no letter of stage "
                            f"{stage} (sizes {', '.join(f'{c}={sizes[c]}' for c in hidden)}): "
                            f"replicated there{_factor_hint(axis, axis_size[axis], hidden, sizes)}"
                        )
        maps[stage] = sigma
    known = {s for s, _ in program.stages}
    for pin_stage, letter, axes in strategy.pins:
        if pin_stage not in known:
            raise SpecError(
                f"strategy {strategy.name!r} pins stage {pin_stage!r}, but {program.name} has "
                f"stages {', '.join(sorted(known))}"
            )
        sigma = maps[pin_stage]
        for c in sigma:
            sigma[c] = [a for a in sigma[c] if a not in axes]
        sigma[letter] = list(axes)
        if program.stage_kind(pin_stage) == "boundary":
            boundary = {c: list(a) for c, a in sigma.items()}
    return build_placement(
        program,
        mesh,
        name=strategy.name,
        stages=maps,
        boundary=boundary,
        fsdp=strategy.fsdp,
        dp=strategy.dp,
        zero=strategy.zero,
        regather=strategy.regather,
        idle_axes=idle_axes,
        notes=notes,
    )


def build_placement(
    program: Program,
    mesh: DeviceMesh,
    *,
    name: str,
    stages: dict[str, dict[str, list[str]]],
    boundary: dict[str, list[str]],
    fsdp: tuple[str, ...] = (),
    dp: tuple[str, ...] = (),
    zero: int = 0,
    regather: bool = False,
    idle_axes: bool = True,
    notes: Iterable[str] = (),
) -> Placement:
    """A placement from each stage's letter map and the boundary layout: parameters stored
    as their first forward consumer splits them, plus ``fsdp`` axes along the model letter
    (ZeRO-3); ``zero >= 1`` also shards the optimizer state over ``dp`` (and its gradient
    reduction becomes a reduce-scatter)."""
    roles = program.roles
    sizes = program.sizes
    axis_size = {a.name: a.size for a in mesh.axes}
    remarks = list(notes)
    storage: list[tuple[str, Dims]] = []
    grads: list[tuple[str, Dims]] = []
    optimizer: list[tuple[str, Dims]] = []
    for param in program.params:
        consumer = next(
            (op for op, _ in program.consumers(param.name) if op.phase is Phase.FORWARD), None
        )
        sigma = stages.get(consumer.stage, {}) if consumer is not None else {}
        at = [
            [] if consumer is not None and c in consumer.reduce_letters else list(sigma.get(c, ()))
            for c in param.letters
        ]
        stored = _shard_over(param.letters, at, fsdp, roles.model, sizes, axis_size, mesh)
        whole = [a for a in fsdp if a not in {x for d in stored for x in d}]
        if whole:
            remarks.append(
                f"{param.name} {list(param.letters)} does not divide over "
                f"{'+'.join(whole)}: whole over {'it' if len(whole) == 1 else 'them'}"
            )
        opt = stored
        if dp and zero >= 1:
            opt = _shard_over(param.letters, stored, dp, roles.model, sizes, axis_size, mesh)
        storage.append((param.name, _dims(stored)))
        optimizer.append((param.name, _dims(opt)))
        grads.append((param.name, _dims(opt if zero >= 1 else stored)))
    seeds = {g for _, g in program.gradients if program.tensor(g).kind is TensorKind.INPUT}
    forward_outputs = (
        {f for f, g in program.gradients if g in seeds}
        if program.has_backward
        else set(program.outputs)
    )
    homes: list[tuple[str, Dims]] = [
        (t.name, tuple(tuple(boundary.get(c, ())) for c in t.letters))
        for t in program.tensors
        if (t.kind is TensorKind.INPUT and t.name not in seeds) or t.name in forward_outputs
    ]
    return Placement(
        name=name,
        stages=tuple((stage, letter_map(stages.get(stage, {}))) for stage, _ in program.stages),
        homes=tuple(homes),
        storage=tuple(storage),
        grads=tuple(grads),
        optimizer=tuple(optimizer),
        zero=3 if fsdp and not dp else zero,
        regather=regather,
        idle_axes=idle_axes,
        notes=tuple(dict.fromkeys(remarks)),
    )


def _factor_hint(axis: str, size: int, letters: list[str], sizes: dict[str, int]) -> str:
    """How to split ``letters`` ``size`` ways anyway: one mesh axis shards one letter, so
    factor the axis into one factor per letter (``z=16`` over ``k=8, g=8``: ``z1=8,z2=2``)."""
    remaining, factors = size, []
    for c in letters:
        factor = math.gcd(remaining, sizes[c])
        if factor > 1:
            factors.append(factor)
            remaining //= factor
    if remaining != 1 or len(factors) < 2:
        return ""
    names = [f"{axis}{i + 1}" for i in range(len(factors))]
    mesh = ",".join(f"{n}={f}" for n, f in zip(names, factors, strict=True))
    return f"; to split it {size} ways, factor the axis: --mesh ...,{mesh} and tp={'+'.join(names)}"


def _pieces(axes: Iterable[str], axis_size: dict[str, int]) -> int:
    n = 1
    for a in axes:
        n *= axis_size[a]
    return n


def _dims(layout: list[list[str]]) -> Dims:
    return tuple(tuple(d) for d in layout)


def _shard_over(  # noqa: PLR0917 (the layout, then what to add and the sizes)
    letters: str,
    layout: list[list[str]],
    axes: tuple[str, ...],
    model: str,
    sizes: dict[str, int],
    axis_size: dict[str, int],
    mesh: DeviceMesh,
) -> list[list[str]]:
    """``layout`` with ``axes`` added as FSDP and ZeRO shard a parameter: all of them on the
    model letter when they divide it, else axis by axis (major first) on the model letter
    or the largest letter each still divides (``d = 5120`` over 4096 chips: ``x+y`` on
    ``d``, ``z`` on ``f``); an axis that divides no letter leaves the parameter whole over
    it."""
    if not axes:
        return layout
    used = {a for d in layout for a in d}
    extra = [a for a in _in_mesh_order(mesh, axes) if a not in used]
    if not extra:
        return layout
    order = sorted(range(len(letters)), key=lambda i: (letters[i] != model, -sizes[letters[i]]))
    out = [list(d) for d in layout]
    for i in order:  # every axis on one letter, the model letter first
        if sizes[letters[i]] % (_pieces(out[i], axis_size) * _pieces(extra, axis_size)) == 0:
            out[i] += extra
            return out
    for axis in extra:
        for i in order:
            if sizes[letters[i]] % (_pieces(out[i], axis_size) * axis_size[axis]) == 0:
                out[i].append(axis)
                break
    return out
