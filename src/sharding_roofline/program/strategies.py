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
* ``<stage>.<letter>=axes``: pins a letter of one stage (``mlp.f=y+z``, ``io.t=y``),
  overriding what the named parts say; the layout search names its placements this way.

The strategy's ``name`` is canonical and parses back to the same strategy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SpecError
from ..mesh import DeviceMesh
from ..reshard import Dims
from .evaluate import Placement, letter_map
from .graph import Phase, Program, TensorKind

_KEYS = ("dp", "fsdp", "tp", "sp")
_PIN = re.compile(r"^([a-z_][a-z0-9_]*)\.([a-z])$")


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
    dp: tuple[str, ...] = ()
    fsdp: tuple[str, ...] = ()
    tp: tuple[str, ...] = ()
    sp: bool = False
    zero: int = 0
    pins: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for key in ("dp", "fsdp", "tp"):
            for axis in getattr(self, key):
                if axis in seen:
                    raise SpecError(
                        f"strategy {self.name!r}: mesh axis {axis!r} is given to both "
                        f"{seen[axis]} and {key}; each axis does one job"
                    )
                seen[axis] = key
        if self.zero not in (0, 1, 2, 3):
            raise SpecError(f"strategy {self.name!r}: zero={self.zero}; expected 0, 1, 2 or 3")
        if self.sp and not self.tp:
            raise SpecError(f"strategy {self.name!r}: sequence parallelism needs tp axes")

    @classmethod
    def parse(cls, text: str | Strategy) -> Strategy:
        """``"fsdp=x,tp=y"``, ``"dp=x+y,zero=1"``, ``"fsdp=x,sp=y"``, ``"mlp.f=y"``."""
        if isinstance(text, Strategy):
            return text
        parts: dict[str, tuple[str, ...]] = {}
        zero = 0
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
                    "fsdp=x,tp=y (keys: dp, fsdp, tp, sp, zero, or stage.letter pins)"
                )
            if key == "zero":
                if value not in ("0", "1", "2", "3"):
                    raise SpecError(f"strategy {text!r}: zero={value!r}; expected 0, 1, 2 or 3")
                zero = int(value)
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
                f"strategy {text!r}: unknown key {key!r}; expected dp, fsdp, tp, sp, zero, or a "
                "pin like mlp.f=y"
            )
        return cls(
            dp=parts.get("dp", ()),
            fsdp=parts.get("fsdp", ()),
            tp=parts.get("tp", ()),
            sp=sp,
            zero=zero,
            pins=tuple(pins),
        )

    @property
    def name(self) -> str:
        parts = []
        if self.dp:
            parts.append("dp=" + "+".join(self.dp))
        if self.fsdp:
            parts.append("fsdp=" + "+".join(self.fsdp))
        if self.tp:
            parts.append(("sp=" if self.sp else "tp=") + "+".join(self.tp))
        if self.zero:
            parts.append(f"zero={self.zero}")
        parts += [f"{s}.{c}={'+'.join(a) or '-'}" for s, c, a in self.pins]
        return ",".join(parts) or "replicated"

    def __str__(self) -> str:
        return self.name

    @property
    def axes(self) -> tuple[str, ...]:
        return (*self.dp, *self.fsdp, *self.tp)

    def check(self, mesh: DeviceMesh) -> None:
        for axis in (*self.axes, *(a for _, _, axes in self.pins for a in axes)):
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
    """The layout of activations between blocks: the batch over the data axes, and with
    sequence parallelism the sequence over the tp axes."""
    roles = program.roles
    data = list(_in_mesh_order(mesh, (*strategy.dp, *strategy.fsdp)))
    mapping: dict[str, list[str]] = {roles.batch: data}
    if strategy.sp:
        tp = list(_in_mesh_order(mesh, strategy.tp))
        if roles.sequence == roles.batch:
            mapping[roles.batch] = data + tp
        else:
            mapping[roles.sequence] = tp
    return mapping


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
    data = _in_mesh_order(mesh, (*strategy.dp, *strategy.fsdp))
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
            if roles.batch in letters:
                sigma[roles.batch] = list(data)
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
                            f"tp axis {axis} splits no letter of stage {stage} (sizes "
                            f"{', '.join(f'{c}={sizes[c]}' for c in hidden)}): replicated there"
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
        if fsdp and stored == at:
            remarks.append(f"{param.name} is too small to shard over {'+'.join(fsdp)}")
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
        idle_axes=idle_axes,
        notes=tuple(dict.fromkeys(remarks)),
    )


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
    """``layout`` with ``axes`` added on the model letter (or else the largest letter they
    divide), as FSDP and ZeRO shard a parameter; unchanged when nothing divides."""
    if not axes:
        return layout
    used = {a for d in layout for a in d}
    extra = [a for a in _in_mesh_order(mesh, axes) if a not in used]
    if not extra:
        return layout
    order = sorted(range(len(letters)), key=lambda i: (letters[i] != model, -sizes[letters[i]]))
    for i in order:
        pieces = _pieces(layout[i], axis_size) * _pieces(extra, axis_size)
        if sizes[letters[i]] % pieces == 0:
            out = [list(d) for d in layout]
            out[i] = out[i] + extra
            return out
    return layout
