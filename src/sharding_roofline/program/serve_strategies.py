"""Serving strategies: where weights, the KV cache and activations live for prefill and
decode, written ``tp=x+y,kvb=y`` (inference.md, "Distributing inference").

Items, comma-separated, axes joined by ``+`` (major first):

* ``tp=y``: model (tensor) parallelism, Megatron's 1D weight-stationary layout: the MLP
  width ``f`` and the heads (KV heads ``k``, then query groups ``g``) split over ``y``;
  activations between blocks replicated over it (an all-reduce after each block's second
  matmul). Over several axes (``tp=x+y``) it spans them all;
* ``sp=y``: as ``tp=y`` with the activations between blocks split over ``y`` (gather before
  each block, reduce-scatter after: the same bytes as the all-reduce, in two halves);
* ``kvb=y``: the KV cache split over the batch along ``y``, a model axis (``tp`` or ``d``)
  the KV heads do not use (they split at most ``K`` ways): attention runs batch-split, with
  two all-to-alls that move the queries onto the cache's layout and the result back (the
  book's
  ``KV[2, B_Z, S, K_Y, H]``). Without it, those axes split the query groups and every chip
  of a group holds (and reads) the same cache;
* ``d=x``: 2D weight-stationary (ESTI; inference.md Q7): every weight's model dimension ``d``
  is also split over ``x``, activations between blocks are split along ``d`` over ``x`` and
  the ``tp`` axes (gathered over the ``tp`` axes before a block's first matmul, reduced over
  ``x`` between its matmuls, reduce-scattered over the ``tp`` axes after);
* ``ep=x``: expert parallelism: the experts split over ``x`` (a model axis: each chip runs
  its experts on every token; or a replica axis: tokens go to their experts' chips by
  all-to-all), the ``tp`` axes left splitting each expert's width;
* ``dp=x``: replicas: the batch split over ``x`` with the weights copied, no communication
  (the book's "spin up multiple copies of the model");
* ``fsdp=x``: weights stored split over ``x`` and gathered at every use (the training
  layout; the book's rule is never to do this for decode, and the costs show why);
* ``cp=x``: prefill only: the prompt's positions split over ``x``, a ``dp`` or ``fsdp`` axis
  (sequence parallelism; the keys and values are gathered before attention).

The canonical ``name`` parses back to the same strategy (``--strategy`` takes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SpecError
from ..mesh import DeviceMesh
from ..reshard import Dims
from .evaluate import Placement
from .graph import Program
from .serving import ServePart, Serving
from .strategies import Strategy, _in_mesh_order, boundary_map, build_placement, place

_KEYS = ("dp", "fsdp", "tp", "sp", "d", "kvb", "ep", "cp")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeStrategy:
    """A serving layout by role (see the module docstring); axes are mesh axis names."""

    dp: tuple[str, ...] = ()
    fsdp: tuple[str, ...] = ()
    tp: tuple[str, ...] = ()
    sp: bool = False
    d: tuple[str, ...] = ()
    kvb: tuple[str, ...] = ()
    ep: tuple[str, ...] = ()
    cp: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for key in ("dp", "fsdp", "tp", "d"):
            for axis in getattr(self, key):
                if axis in seen:
                    raise SpecError(
                        f"serving strategy {self.name!r}: mesh axis {axis!r} is given to both "
                        f"{seen[axis]} and {key}; give each axis one job"
                    )
                seen[axis] = key
        outside = [a for a in self.kvb if a not in (*self.tp, *self.d)]
        if outside:
            raise SpecError(
                f"serving strategy {self.name!r}: kvb axis {outside[0]!r} is not a model axis "
                "(tp or d); the KV cache is split over the batch along model-parallel axes "
                f"the KV heads do not use: give it to tp too (e.g. tp=...+{outside[0]},"
                f"kvb={outside[0]})"
            )
        outside = [a for a in self.ep if a not in (*self.tp, *self.dp, *self.fsdp)]
        if outside:
            raise SpecError(
                f"serving strategy {self.name!r}: ep axis {outside[0]!r} is neither a tp nor a "
                f"dp axis; give it one of those jobs too (e.g. tp={outside[0]},ep={outside[0]})"
            )
        outside = [a for a in self.cp if a not in (*self.dp, *self.fsdp)]
        if outside:
            raise SpecError(
                f"serving strategy {self.name!r}: cp axis {outside[0]!r} is not a dp axis; "
                f"sequence parallelism splits what replicas split: write dp={outside[0]},"
                f"cp={outside[0]}"
            )
        if self.sp and not self.tp:
            raise SpecError(f"serving strategy {self.name!r}: sp needs tp axes")
        if self.sp and self.d:
            raise SpecError(
                f"serving strategy {self.name!r}: sp and d both split the activations between "
                "blocks; use one of them"
            )
        if self.d and not self.tp:
            raise SpecError(
                f"serving strategy {self.name!r}: 2D weight-stationary (d=...) needs tp axes "
                "for the MLP width; write e.g. tp=y+z,d=x"
            )

    @classmethod
    def parse(cls, text: str | ServeStrategy) -> ServeStrategy:
        """``"tp=x+y"``, ``"tp=x+y,kvb=y"``, ``"tp=y+z,d=x"``, ``"dp=x,tp=y"``."""
        if isinstance(text, ServeStrategy):
            return text
        if not isinstance(text, str) or not text.strip():
            raise SpecError(
                "empty serving strategy; write e.g. tp=x+y (model parallelism over x and y)"
            )
        parts: dict[str, tuple[str, ...]] = {}
        sp = False
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or not value:
                raise SpecError(
                    f"serving strategy {text!r}: {item.strip()!r} is not KEY=AXES; write e.g. "
                    f"tp=x+y,kvb=y (keys: {', '.join(_KEYS)})"
                )
            if key not in _KEYS:
                raise SpecError(
                    f"serving strategy {text!r}: unknown key {key!r}; use one of "
                    f"{', '.join(_KEYS)} (e.g. tp=x+y,kvb=y)"
                )
            axes = tuple(a.strip() for a in value.split("+") if a.strip())
            if not axes or any(not a.isidentifier() for a in axes):
                raise SpecError(
                    f"serving strategy {text!r}: {value!r} is not mesh axes; write them joined "
                    "by '+', e.g. tp=x+y"
                )
            if key == "sp":
                sp, key = True, "tp"
            if key in parts and parts[key] != axes:
                raise SpecError(f"serving strategy {text!r}: {key} is given twice; write it once")
            parts[key] = axes
        return cls(sp=sp, **parts)

    @property
    def name(self) -> str:
        out = []
        for key in ("dp", "fsdp"):
            if getattr(self, key):
                out.append(f"{key}=" + "+".join(getattr(self, key)))
        if self.tp:
            out.append(("sp=" if self.sp else "tp=") + "+".join(self.tp))
        for key in ("d", "kvb", "ep", "cp"):
            if getattr(self, key):
                out.append(f"{key}=" + "+".join(getattr(self, key)))
        return ",".join(out) or "replicated"

    def __str__(self) -> str:
        return self.name

    @property
    def axes(self) -> tuple[str, ...]:
        return (*self.dp, *self.fsdp, *self.tp, *self.d)

    def check(self, mesh: DeviceMesh) -> None:
        for axis in (*self.axes, *self.kvb, *self.ep, *self.cp):
            if axis not in mesh.axis_names:
                raise SpecError(
                    f"serving strategy {self.name!r} uses mesh axis {axis!r}, but the mesh "
                    f"({mesh.spec_text}) has axes {', '.join(mesh.axis_names)}; use those"
                )

    def replicas(self, mesh: DeviceMesh) -> int:
        """Model copies: the product of the dp axes."""
        n = 1
        for axis in self.dp:
            n *= mesh.axis_size(axis)
        return n


def _stage_letters(program: Program, stage: str) -> set[str]:
    return {c for op in program.ops if op.stage == stage for c in op.letters}


def _strip(mapping: dict[str, list[str]], axes: Iterable[str]) -> None:
    drop = set(axes)
    for letter in list(mapping):
        mapping[letter] = [a for a in mapping[letter] if a not in drop]
        if not mapping[letter]:
            del mapping[letter]


def place_serving(
    part: ServePart, mesh: DeviceMesh, strategy: ServeStrategy | str, serving: Serving
) -> Placement:
    """The placement of ``strategy`` on one serving program: the named training layout
    (``strategies.place``) for dp, fsdp, tp, sp, cp and data-axis ep, then the serving
    layouts: the attention core batch-split over ``kvb``, the model dimension over ``d``
    (2D weight-stationary), experts over model-axis ``ep``; the KV cache stored where
    attention reads it (decode) or where its projection writes it (prefill)."""
    strategy = ServeStrategy.parse(strategy)
    strategy.check(mesh)
    if serving.is_decode and strategy.cp:
        raise SpecError(
            f"serving strategy {strategy.name!r}: cp splits the prompt's positions, and a decode "
            "step has one new token per sequence; use tp (or kvb) for decode, cp for --prefill"
        )
    if not serving.is_decode and strategy.kvb:
        raise SpecError(
            f"serving strategy {strategy.name!r}: kvb splits the decode cache over the batch; "
            "prefill attends within each prompt: drop kvb for --prefill (or use cp)"
        )
    program = part.program
    roles = program.roles
    data = (*strategy.dp, *strategy.fsdp)
    base = Strategy(
        dp=strategy.dp,
        fsdp=strategy.fsdp,
        tp=strategy.tp,
        sp=strategy.sp,
        cp=strategy.cp,
        ep=tuple(a for a in strategy.ep if a in data),
    )
    placed = place(program, mesh, base)
    maps = {stage: {c: list(a) for c, a in mapping} for stage, mapping in placed.stages}
    boundary = boundary_map(program, mesh, base)
    stages = dict(program.stages)
    if strategy.d:
        d_axes = list(_in_mesh_order(mesh, strategy.d))
        for stage, kind in stages.items():
            if kind == "matmul" and roles.model in _stage_letters(program, stage):
                maps[stage][roles.model] = d_axes + maps[stage].get(roles.model, [])
            elif kind == "boundary":
                maps[stage][roles.model] = d_axes + list(_in_mesh_order(mesh, strategy.tp))
        boundary[roles.model] = d_axes + list(_in_mesh_order(mesh, strategy.tp))
    if strategy.kvb and "kv" in stages:
        kvb = list(_in_mesh_order(mesh, strategy.kvb))
        _strip(maps["kv"], kvb)
        maps["kv"][roles.batch] = maps["kv"].get(roles.batch, []) + kvb
    model_ep = [a for a in _in_mesh_order(mesh, strategy.ep) if a not in data]
    if model_ep and roles.experts and "experts" in stages:
        _strip(maps["experts"], model_ep)
        maps["experts"][roles.experts] = maps["experts"].get(roles.experts, []) + model_ep
    placement = build_placement(
        program,
        mesh,
        name=strategy.name,
        stages=maps,
        boundary=boundary,
        fsdp=strategy.fsdp,
        dp=strategy.dp,
        idle_axes=placed.idle_axes,
        notes=placed.notes,
    )
    homes = dict(placement.homes)
    for tensor, layout in _cache_homes(part, maps).items():
        homes[tensor] = layout
    return dataclasses.replace(placement, homes=tuple(homes.items()))


def _cache_homes(part: ServePart, maps: dict[str, dict[str, list[str]]]) -> dict[str, Dims]:
    """Where the cache lives: at its reader's layout (decode: the attention core, so it
    never moves) or at its producer's (prefill: written once, where it is computed); the
    new token's entries at the cache's layout of their letters."""
    program = part.program
    homes: dict[str, Dims] = {}
    for name in part.cache:
        producer = program.producer(name)
        if producer is not None:
            sigma = maps.get(producer.stage, {})
            letters = producer.out_letters
        else:
            reader, item = next(iter(program.consumers(name)))
            sigma = maps.get(reader.stage, {})
            letters = item.letters
        homes[name] = tuple(tuple(sigma.get(c, ())) for c in letters)
    if part.cache:
        reader, item = next(iter(program.consumers(part.cache[0])))
        sigma = maps.get(reader.stage, {})
        for name in part.cache_writes:
            letters = program.tensor(name).letters
            homes[name] = tuple(tuple(sigma.get(c, ())) for c in letters)
    return homes


# -- candidates for the search ---------------------------------------------------------------


def kv_batch_axes(mesh: DeviceMesh, tp: Iterable[str], kv_heads: int) -> tuple[str, ...]:
    """The ``tp`` axes the KV heads cannot take: the heads take axes in mesh order while
    they divide (as ``strategies.place`` assigns them); the rest would split query groups
    over a replicated cache, or split the cache's batch (``kvb``)."""
    heads = kv_heads
    rest: list[str] = []
    for axis in _in_mesh_order(mesh, tp):
        size = mesh.axis_size(axis)
        if heads % size == 0:
            heads //= size
        else:
            rest.append(axis)
    return tuple(rest)


def serving_candidates(
    mesh: DeviceMesh, *, decode: bool, moe: bool, kv_heads: int
) -> list[ServeStrategy]:
    """The layouts the serving search compares on ``mesh`` (axes of size 1 left out).

    Every split of the axes into replicas (``dp``, the major ones) and model parallelism
    (``tp``, the minor ones, where the fast links are); for each, decode with and without
    the KV cache split over the batch along the model axes the KV heads cannot use
    (``kvb``), ``sp`` between blocks, 2D weight-stationary with each model axis as ``d``
    (two or more model axes), and for a mixture of experts ``ep`` over each axis; prefill
    with ``sp`` and with the replica axes splitting the prompt (``cp``). And FSDP, over
    every axis and with tp on the minor one: the training layout, which serving should not
    use (the costs show why: every step gathers the weights)."""
    axes = tuple(a.name for a in mesh.axes if a.size > 1)
    out: list[ServeStrategy] = []

    def add(**kwargs: object) -> None:
        try:
            candidate = ServeStrategy(**kwargs)  # type: ignore[arg-type]
        except SpecError:  # pragma: no cover - the combinations below are valid
            return
        if candidate not in out:
            out.append(candidate)

    for split in range(len(axes) + 1):
        dp, tp = axes[:split], axes[split:]
        if not tp:
            add(dp=dp)
            if not decode and dp:
                add(dp=dp, cp=dp)
            continue
        rest = kv_batch_axes(mesh, tp, kv_heads)
        add(dp=dp, tp=tp)
        add(dp=dp, tp=tp, sp=True)
        if decode:
            if rest:
                add(dp=dp, tp=tp, kvb=rest)
                add(dp=dp, tp=tp, sp=True, kvb=rest)
            if len(tp) >= 2:
                for d_axis in tp:
                    others = tuple(a for a in tp if a != d_axis)
                    add(dp=dp, tp=others, d=(d_axis,))
                    # the d axis is idle at the attention core: it can split the cache too
                    kvb = (*kv_batch_axes(mesh, others, kv_heads), d_axis)
                    add(dp=dp, tp=others, d=(d_axis,), kvb=kvb)
        elif dp:
            add(dp=dp, tp=tp, cp=dp)
        if moe:
            for axis in (*tp, *dp):
                add(dp=dp, tp=tp, ep=(axis,))
                if decode and rest:
                    add(dp=dp, tp=tp, ep=(axis,), kvb=rest)
    if axes:
        add(fsdp=axes)
        if len(axes) > 1:
            add(fsdp=axes[:-1], tp=axes[-1:])
    return out
