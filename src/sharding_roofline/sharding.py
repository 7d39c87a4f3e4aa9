"""Shardings of arrays: which mesh axes split which dimension, in two spellings.

* PartitionSpec style, as JAX writes it and the CLI takes it: ``x,None`` (``None`` for a
  replicated dimension), ``x+y`` or ``(x,y)`` for one dimension split over two axes
  (major first). A ``jax.sharding.PartitionSpec`` object works too (duck-typed; no import).
* The scaling book's notation, for people: ``A[B_x, D_y]``; several axes on one dimension
  are concatenated when every name is one character (``D_xy``) and braced otherwise
  (``D_{data,model}``); ``{U_y}`` marks a result still unreduced over ``y``.
  ``parse_operation(str(op)) == op``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .limits import MAX_ARRAY_ELEMENTS, MAX_DIM_SIZE, MAX_RANK, parse_count, shown
from .mesh import REPLICATED_NAMES

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class ShardingSpec:
    """Per array dimension, the mesh axes that split it (major first); ``()`` = replicated."""

    dims: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        ok = isinstance(self.dims, tuple) and all(
            isinstance(dim, tuple) and all(isinstance(a, str) and _NAME.match(a) for a in dim)
            for dim in self.dims
        )
        if not ok:
            raise SpecError(
                f"ShardingSpec dims must be a tuple of tuples of axis names, got "
                f"{shown(self.dims)}; use ShardingSpec.parse('x,None')"
            )

    @classmethod
    def replicated(cls, rank: int) -> ShardingSpec:
        return cls(((),) * rank)

    @classmethod
    def parse(cls, spec: Any, rank: int | None = None) -> ShardingSpec:
        """From ``"x,None"``, ``"x+y,None"``, ``"(x,y),None"``, ``None`` (replicated; needs
        ``rank``), a sequence of entries, or a ``jax.sharding.PartitionSpec``. A spec shorter
        than ``rank`` is padded with replicated dimensions, as JAX does."""
        if isinstance(spec, ShardingSpec):
            dims = spec.dims
        elif spec is None:
            dims = ()
        elif isinstance(spec, str):
            dims = _parse_text(spec)
        elif isinstance(spec, Iterable):
            dims = tuple(_entry(item, spec) for item in spec)
        else:
            raise SpecError(f"cannot read a sharding from {spec!r}; write it like 'x,None'")
        if rank is not None:
            if len(dims) > rank:
                raise SpecError(
                    f"sharding {_spec_text(dims)!r} has {len(dims)} entries but the array has "
                    f"{rank} dimensions; give one entry per dimension (None for replicated)"
                )
            dims = dims + ((),) * (rank - len(dims))
        return cls(dims)

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def axes(self) -> tuple[str, ...]:
        """Every mesh axis used, in dimension order."""
        return tuple(axis for dim in self.dims for axis in dim)

    def shards(self, axis_size: dict[str, int]) -> tuple[int, ...]:
        """How many pieces each dimension is cut into."""
        return tuple(math.prod(axis_size[a] for a in dim) for dim in self.dims)

    def local_shape(self, shape: Sequence[int], axis_size: dict[str, int]) -> tuple[int, ...]:
        return tuple(size // n for size, n in zip(shape, self.shards(axis_size), strict=True))

    def text(self) -> str:
        """PartitionSpec style: ``x,None``, ``x+y,None``."""
        return _spec_text(self.dims)

    def __str__(self) -> str:
        return self.text()

    def notation(self, name: str, letters: str) -> str:
        """The book's notation: ``A[B_x, D_y]``."""
        parts = [
            letter.upper() + (("_" + subscript(dim)) if dim else "")
            for letter, dim in zip(letters, self.dims, strict=True)
        ]
        return f"{name}[{', '.join(parts)}]"

    def without(self, axes: Iterable[str]) -> ShardingSpec:
        drop = set(axes)
        return ShardingSpec(tuple(tuple(a for a in dim if a not in drop) for dim in self.dims))

    def with_axes(self, dim: int, axes: tuple[str, ...]) -> ShardingSpec:
        """``axes`` appended (as the minor-most) to dimension ``dim``."""
        return ShardingSpec(tuple(d + axes if i == dim else d for i, d in enumerate(self.dims)))

    def check(
        self,
        *,
        shape: Sequence[int],
        axis_size: dict[str, int],
        what: str,
        letters: str | None = None,
    ) -> None:
        """Raise ``SpecError`` unless this sharding fits an array of ``shape`` on the mesh:
        one entry per dimension, known axes, no axis twice, every dimension divisible."""
        label = self.notation(what, letters) if letters and len(letters) == self.rank else what
        mesh_text = ", ".join(f"{a}={n}" for a, n in axis_size.items())
        if self.rank != len(shape):
            raise SpecError(
                f"sharding {self.text()!r} of {what} has {self.rank} entries but {what} has "
                f"{len(shape)} dimensions {tuple(shape)}; give one entry per dimension "
                "(None for a replicated one)"
            )
        seen: set[str] = set()
        for axis in self.axes:
            if axis not in axis_size:
                raise SpecError(
                    f"sharding {label} uses mesh axis {axis!r}, but the mesh ({mesh_text}) has "
                    f"axes {', '.join(axis_size)}"
                )
            if axis in seen:
                raise SpecError(
                    f"sharding {label} uses mesh axis {axis!r} twice; a mesh axis may split at "
                    "most one dimension of an array"
                )
            seen.add(axis)
        for index, (size, dim) in enumerate(zip(shape, self.dims, strict=True)):
            pieces = math.prod(axis_size[a] for a in dim)
            if size % pieces:
                name = letters[index].upper() if letters else f"dimension {index}"
                over = "+".join(dim)
                raise SpecError(
                    f"sharding {label} cannot be applied on mesh ({mesh_text}): {name} (size "
                    f"{size}) is sharded over {over} ({pieces} pieces), and {pieces} does not "
                    f"divide {size}. Pad {name} to a multiple of {pieces}, shard it over fewer "
                    "axes, or leave it replicated"
                )


def parse_array_shape(text: str, *, what: str = "--shape") -> tuple[int, ...]:
    """An array's global shape as typed: ``"2048,8192"`` or ``"2048x8192"`` -> ``(2048, 8192)``.
    Sizes are ASCII whole numbers >= 1 (each at most ``MAX_DIM_SIZE``), at most ``MAX_RANK``
    of them, at most ``MAX_ARRAY_ELEMENTS`` elements in all."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"{what} {shown(text)} is not a shape; write sizes like 2048,8192")
    parts = [part.strip() for part in re.split(r"[,xX]", text.strip())]
    if len(parts) > MAX_RANK:
        raise SpecError(
            f"{what} {text!r} has {len(parts)} dimensions; give at most {MAX_RANK} sizes"
        )
    shape = tuple(
        parse_count(part, what=f"{what} {text!r}: size", most=MAX_DIM_SIZE, error=SpecError)
        for part in parts
    )
    if math.prod(shape) > MAX_ARRAY_ELEMENTS:
        raise SpecError(f"{what} {text!r} has more than 2**62 elements; use a smaller array")
    return shape


def _entry(item: Any, whole: Any) -> tuple[str, ...]:
    if item is None:
        return ()
    if isinstance(item, str):
        return _entry_text(item, str(whole))
    if isinstance(item, (tuple, list)):
        names = tuple(item)
        if all(isinstance(n, str) and _NAME.match(n) for n in names):
            return names
    raise SpecError(f"sharding {whole!r}: entry {item!r} is not None, an axis name or a tuple")


def _entry_text(item: str, whole: str) -> tuple[str, ...]:
    item = item.strip().strip("'\"")
    if item.lower() in REPLICATED_NAMES:
        return ()
    inner = item[1:-1] if item.startswith("(") and item.endswith(")") else item
    names = tuple(n.strip().strip("'\"") for n in re.split(r"[+,]", inner) if n.strip())
    for name in names:
        if not _NAME.match(name) or name.lower() in REPLICATED_NAMES:
            raise SpecError(
                f"sharding {whole!r}: {name!r} is not a mesh axis name; write entries like "
                "x, x+y or None"
            )
    return names


def _parse_text(text: str) -> tuple[tuple[str, ...], ...]:
    body = text.strip()
    if body.startswith(("P(", "PartitionSpec(")) and body.endswith(")"):
        body = body[body.index("(") + 1 : -1]
    if body in ("", "replicated"):
        return ()
    # split on commas that are not inside parentheses
    entries: list[str] = []
    depth, current = 0, ""
    for char in body:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    if depth != 0:
        raise SpecError(f"sharding {text!r} has unbalanced parentheses")
    return tuple(_entry_text(entry, text) for entry in entries)


def _spec_text(dims: tuple[tuple[str, ...], ...]) -> str:
    return ",".join("+".join(dim) if dim else "None" for dim in dims)


def subscript(axes: Sequence[str]) -> str:
    """``("x", "y") -> "xy"``; ``("data", "model") -> "{data,model}"`` (the book's ``D_XY``)."""
    if all(len(a) == 1 for a in axes):
        return "".join(axes)
    return "{" + ",".join(axes) + "}"


def unreduced_suffix(axes: Sequence[str]) -> str:
    """`` {U_y}`` for a result unreduced over ``y``; empty when fully reduced."""
    return " {U_" + subscript(axes) + "}" if axes else ""


def _parse_subscript(text: str) -> tuple[str, ...]:
    if text.startswith("{") and text.endswith("}"):
        return tuple(a.strip() for a in text[1:-1].split(",") if a.strip())
    return tuple(text)


# -- the book's notation for whole operations --------------------------------------------------

_ARRAY = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\[(?P<body>[^\]]*)\]\s*$")


def parse_array(text: str) -> tuple[str, str, ShardingSpec]:
    """``"A[B_x, D_{x,y}]" -> ("A", "bd", ShardingSpec((("x",), ("x", "y"))))``."""
    match = _ARRAY.match(text)
    if not match:
        raise SpecError(f"{text!r} is not an array in the book's notation, e.g. A[B_x, D]")
    letters, dims = "", []
    body = match["body"].strip()
    for part in [p.strip() for p in re.split(r",(?![^{]*\})", body)] if body else []:
        letter, _, sub = part.partition("_")
        if len(letter) != 1 or not letter.isalpha():
            raise SpecError(f"{text!r}: dimension {part!r} must be one letter, e.g. B or B_x")
        letters += letter.lower()
        dims.append(_parse_subscript(sub) if sub else ())
    return match["name"], letters, ShardingSpec(tuple(dims))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardedOperation:
    """``A[B_x, D_y] · B[D_y, F] -> C[B_x, F] {U_y}``: a local einsum on sharded operands,
    with the axes its result is still unreduced over."""

    lhs: ShardingSpec
    rhs: ShardingSpec
    out: ShardingSpec
    lhs_letters: str
    rhs_letters: str
    out_letters: str
    unreduced: tuple[str, ...] = ()
    names: tuple[str, str, str] = ("lhs", "rhs", "out")

    def __str__(self) -> str:
        text = (
            f"{self.lhs.notation(self.names[0], self.lhs_letters)} · "
            f"{self.rhs.notation(self.names[1], self.rhs_letters)} -> "
            f"{self.out.notation(self.names[2], self.out_letters)}"
        )
        if self.unreduced:
            text += unreduced_suffix(self.unreduced)
        return text

    @classmethod
    def parse(cls, text: str) -> ShardedOperation:
        """Inverse of ``str``: ``parse(str(op)) == op``."""
        body, _, unreduced_text = text.partition("{U_")
        inputs, arrow, output = body.partition("->")
        if not arrow:
            raise SpecError(f"{text!r}: expected 'A[...] · B[...] -> C[...]'")
        parts = re.split(r"\s*[·*@]\s*", inputs.strip())
        if len(parts) != 2:
            raise SpecError(f"{text!r}: expected two operands joined by '·'")
        lhs_name, lhs_letters, lhs = parse_array(parts[0])
        rhs_name, rhs_letters, rhs = parse_array(parts[1])
        out_name, out_letters, out = parse_array(output)
        unreduced: tuple[str, ...] = ()
        if unreduced_text:
            unreduced = _parse_subscript(unreduced_text.strip().removesuffix("}"))
        return cls(
            lhs=lhs,
            rhs=rhs,
            out=out,
            lhs_letters=lhs_letters,
            rhs_letters=rhs_letters,
            out_letters=out_letters,
            unreduced=unreduced,
            names=(lhs_name, rhs_name, out_name),
        )
