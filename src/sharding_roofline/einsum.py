"""Two-operand einsums: their letters, roles, sizes, FLOPs and bytes (roofline.md).

``EinsumSpec.parse("bd,df->bf")`` is the equation; ``Einsum`` adds the global size of every
letter and the dtypes. FLOPs follow the book: ``2 × product of every distinct letter's
size`` (a multiply and an add per term of every output element); bytes are both inputs in
the operand dtype plus the output in the accumulation dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .dtypes import canonical_dtype, dtype_bytes
from .errors import SpecError
from .limits import MAX_ARRAY_ELEMENTS, MAX_DIM_SIZE, check_count, parse_count, shown

_OPERAND = re.compile(r"^[a-z]*$")
_SIZE = re.compile(r"^[0-9][0-9_]*$")
#: What an equation may contain: letters, the comma, the arrow, spaces (and '.', which gets
#: its own message: no ellipsis).
_EQUATION_CHARS = re.compile(r"^[A-Za-z,\-> .]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class EinsumSpec:
    """The equation of a two-operand einsum, e.g. ``bd,df->bf``."""

    lhs: str
    rhs: str
    out: str
    #: the equation as the user typed it, echoed in errors (not part of the value)
    typed: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        for role, letters in (("lhs", self.lhs), ("rhs", self.rhs), ("output", self.out)):
            if not isinstance(letters, str):
                raise SpecError(f"einsum {role} must be a string of letters, got {letters!r}")
        for role, letters in (("lhs", self.lhs), ("rhs", self.rhs), ("output", self.out)):
            if not _OPERAND.match(letters):
                raise SpecError(
                    f"einsum {self.shown!r}: the {role} {letters!r} must be letters a-z only "
                    "(no ellipsis, digits or spaces)"
                )
            if role != "output" and not letters:
                raise SpecError(
                    f"einsum {self.shown!r}: the {role} operand is empty (a scalar); each "
                    "operand needs at least one dimension, e.g. 'bd,df->bf'"
                )
            repeated = sorted({c for c in letters if letters.count(c) > 1})
            if repeated:
                what = "output" if role == "output" else f"{role} operand"
                raise SpecError(
                    f"einsum {self.shown!r}: letter {repeated[0]!r} repeats in the {what} "
                    f"{letters!r}; traces and diagonals are not matmuls. Give each dimension "
                    "its own letter"
                )
        missing = [c for c in self.out if c not in self.lhs and c not in self.rhs]
        if missing:
            raise SpecError(
                f"einsum {self.shown!r}: output letter {missing[0]!r} appears in neither "
                "operand; every output letter must come from an input"
            )

    @classmethod
    def parse(cls, equation: str) -> EinsumSpec:
        """``"bd,df->bf"``; without ``->`` the output is numpy's implicit one (the letters that
        appear once, sorted). Errors quote the equation as typed."""
        if not isinstance(equation, str):
            raise SpecError(f"an einsum is a string like 'bd,df->bf', got {shown(equation)}")
        typed = equation
        text = equation.replace(" ", "")
        if text.endswith("-"):
            raise SpecError(
                f"einsum {typed!r} ends in '-': the shell read '>' as a redirect (and wrote a "
                "file named after the output letters); quote the equation, e.g. "
                "--einsum 'bd,df->bf'"
            )
        if not _EQUATION_CHARS.match(text):
            odd = next(c for c in text if not _EQUATION_CHARS.match(c))
            hint = " (write the arrow as ASCII '->')" if odd in "→⟶⇒➔" else ""
            raise SpecError(
                f"einsum {typed!r} contains {odd!r}{hint}; an equation is letters, one comma "
                "and '->', e.g. 'bd,df->bf'"
            )
        if text.count("->") > 1:
            raise SpecError(f"einsum {typed!r} has more than one '->'; write e.g. 'bd,df->bf'")
        if text.lower() != text and text.upper() == text:
            text = text.lower()  # "BD,DF->BF" reads as the book writes it
        inputs, arrow, out = text.partition("->")
        if "-" in inputs or ">" in inputs or "-" in out or ">" in out:
            raise SpecError(
                f"einsum {typed!r}: '-' and '>' only appear together as the arrow '->'; "
                "write e.g. 'bd,df->bf'"
            )
        operands = inputs.split(",")
        if len(operands) != 2:
            raise SpecError(
                f"einsum {typed!r} has {len(operands)} operand(s); sharding_roofline plans "
                "two-operand einsums. Split a longer chain into pairwise steps (e.g. "
                "'bd,df->bf' then 'bf,fe->be')"
            )
        if "." in text:
            raise SpecError(f"einsum {typed!r}: ellipsis '...' is not supported; name each dim")
        if not arrow:
            seen = operands[0] + operands[1]
            out = "".join(sorted(c for c in set(seen) if seen.count(c) == 1))
        return cls(lhs=operands[0], rhs=operands[1], out=out, typed=typed)

    @property
    def shown(self) -> str:
        """The equation as typed, if it was parsed from text; else the canonical one."""
        return self.typed or self.equation

    @property
    def equation(self) -> str:
        return f"{self.lhs},{self.rhs}->{self.out}"

    def __str__(self) -> str:
        return self.equation

    @property
    def letters(self) -> tuple[str, ...]:
        """Every distinct letter, in order of first appearance (lhs, rhs, out)."""
        seen: dict[str, None] = {}
        for c in self.lhs + self.rhs + self.out:
            seen.setdefault(c)
        return tuple(seen)

    @property
    def summed(self) -> tuple[str, ...]:
        """Letters summed over (in an input, not in the output): contracting letters, plus
        letters of one operand only that the output drops."""
        return tuple(c for c in self.letters if c not in self.out)

    @property
    def reduced_first(self) -> tuple[str, ...]:
        """Summed letters in one operand only (``b`` in ``bd,df->f``): XLA reduces them out of
        that operand (a cheap reduce) before the dot, which never sees them."""
        return tuple(
            c for c in self.letters if c not in self.out and (c in self.lhs) != (c in self.rhs)
        )

    @property
    def dot_letters(self) -> tuple[str, ...]:
        """The letters of the dot XLA runs: every letter but those reduced first."""
        first = set(self.reduced_first)
        return tuple(c for c in self.letters if c not in first)

    def dot_flops(self, sizes: Mapping[str, int]) -> int:
        """``2 × product of the dot's letters`` at ``sizes`` (whole or per-chip)."""
        return 2 * math.prod(sizes[c] for c in self.dot_letters)

    def reduce_flops(self, sizes: Mapping[str, int]) -> int:
        """The adds of reducing ``reduced_first`` out of its operand at ``sizes``: elements
        in minus elements out, per operand that holds such a letter."""
        first = set(self.reduced_first)
        total = 0
        for letters in (self.lhs, self.rhs):
            if first & set(letters):
                every = math.prod(sizes[c] for c in letters)
                total += every - math.prod(sizes[c] for c in letters if c not in first)
        return total

    def flops(self, sizes: Mapping[str, int]) -> int:
        """``dot_flops + reduce_flops`` at ``sizes``: what one chip computes with its shards'
        sizes, what the whole einsum computes with the full ones."""
        return self.dot_flops(sizes) + self.reduce_flops(sizes)

    @property
    def contracting(self) -> tuple[str, ...]:
        return tuple(c for c in self.lhs if c in self.rhs and c not in self.out)

    @property
    def batch(self) -> tuple[str, ...]:
        return tuple(c for c in self.lhs if c in self.rhs and c in self.out)

    def operand(self, role: str) -> str:
        return {"lhs": self.lhs, "rhs": self.rhs, "out": self.out}[role]


@dataclass(frozen=True, slots=True, kw_only=True)
class Einsum:
    """An einsum with global sizes and dtypes: the unsharded operation."""

    spec: EinsumSpec
    dims: tuple[tuple[str, int], ...]
    dtype: str = "bfloat16"
    accum_dtype: str = ""
    #: what the operands and the result are called in printed layouts (``lhs[B_x, D]``):
    #: their roles by default, or the user's tensor names (``x``, ``w``, ``y``)
    names: tuple[str, str, str] = ("lhs", "rhs", "out")

    def __post_init__(self) -> None:
        if not isinstance(self.spec, EinsumSpec):
            raise SpecError(f"Einsum needs an EinsumSpec, got {shown(self.spec)}")
        if not isinstance(self.dims, tuple) or not all(
            isinstance(item, tuple) and len(item) == 2 for item in self.dims
        ):
            raise SpecError(
                f"einsum dims must be (letter, size) pairs, got {shown(self.dims)}; use "
                "Einsum.create(equation, {'b': 8192, ...}) or 'b=8192,...'"
            )
        names = tuple(self.names)
        if (
            len(names) != 3
            or len(set(names)) != 3
            or not all(isinstance(n, str) and n.isidentifier() and n.isascii() for n in names)
        ):
            raise SpecError(
                f"einsum operand names {list(names)!r} must be three different identifiers, "
                "e.g. --names x,w,y (the left operand, the right operand, the result)"
            )
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "accum_dtype", canonical_dtype(self.accum_dtype or self.dtype))
        given = [name for name, _ in self.dims]
        needed = self.spec.letters
        missing = [c for c in needed if c not in given]
        extra = [c for c in given if c not in needed]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if extra:
                problems.append(f"{', '.join(extra)} not in the equation")
            raise SpecError(
                f"einsum {self.spec.equation!r} needs a size for each of its letters "
                f"{', '.join(needed)}; got {self.dims_text or 'none'} ({'; '.join(problems)}). "
                f"Pass --dims {','.join(f'{c}=...' for c in needed)}"
            )
        for name, size in self.dims:
            check_count(size, what=f"einsum dimension {name}", most=MAX_DIM_SIZE, error=SpecError)
        ordered = tuple((c, dict(self.dims)[c]) for c in needed)
        object.__setattr__(self, "dims", ordered)
        for role in ("lhs", "rhs"):
            elements = math.prod(self.shape(role))
            if elements > MAX_ARRAY_ELEMENTS:
                raise SpecError(
                    f"einsum {self.spec.shown!r}: the {role} has {elements:.3g} elements, more "
                    f"than the 2**62 a 64-bit index addresses; use smaller sizes"
                )

    @classmethod
    def create(
        cls,
        equation: str | EinsumSpec,
        dims: Mapping[str, int] | str,
        dtype: str = "bfloat16",
        accum_dtype: str | None = None,
        names: tuple[str, str, str] | str | None = None,
    ) -> Einsum:
        """``Einsum.create("bd,df->bf", "b=8192,d=8192,f=32768", names="x,w,y")``."""
        spec = equation if isinstance(equation, EinsumSpec) else EinsumSpec.parse(equation)
        if isinstance(dims, str):
            sizes: dict[Any, Any] = parse_dims(dims)
        elif isinstance(dims, Mapping):
            sizes = dict(dims)
        else:
            raise SpecError(
                f"einsum dims must be a mapping like {{'b': 8192}} or text like 'b=8192', "
                f"got {shown(dims)}"
            )
        if isinstance(names, str):
            parts = tuple(n.strip() for n in names.split(","))
            if len(parts) != 3:
                raise SpecError(
                    f"--names {names!r} must name the left operand, the right operand and the "
                    "result, e.g. x,w,y"
                )
            names = (parts[0], parts[1], parts[2])
        return cls(
            spec=spec,
            dims=tuple(sizes.items()),
            dtype=dtype,
            accum_dtype=accum_dtype or "",
            names=names or ("lhs", "rhs", "out"),
        )

    def name(self, role: str) -> str:
        """The printed name of ``"lhs"``, ``"rhs"`` or ``"out"``."""
        return self.names[("lhs", "rhs", "out").index(role)]

    @property
    def dims_text(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.dims)

    def size(self, letter: str) -> int:
        for name, size in self.dims:
            if name == letter:
                return size
        raise SpecError(f"einsum {self.spec.equation!r} has no letter {letter!r}")

    def shape(self, role: str) -> tuple[int, ...]:
        """Global shape of ``"lhs"``, ``"rhs"`` or ``"out"``."""
        return tuple(self.size(c) for c in self.spec.operand(role))

    def with_size(self, letter: str, size: int) -> Einsum:
        """The same einsum with one letter resized (for sweeps)."""
        return Einsum(
            spec=self.spec,
            dims=tuple((c, size if c == letter else s) for c, s in self.dims),
            dtype=self.dtype,
            accum_dtype=self.accum_dtype,
            names=self.names,
        )

    @property
    def dot_flops(self) -> int:
        """``2 × product of the dot's letters`` (the book's 2BDF for a matmul)."""
        return self.spec.dot_flops(dict(self.dims))

    @property
    def reduce_flops(self) -> int:
        """The vector FLOPs of reducing the letters of ``spec.reduced_first`` out of their
        operand before the dot: one add per input element that is not the first of its sum
        (``elements in - elements out``). 0 when no letter is reduced first."""
        return self.spec.reduce_flops(dict(self.dims))

    @property
    def flops(self) -> int:
        """FLOPs as XLA lowers the einsum: the dot's ``2 × product of its letters`` plus the
        pre-reduction of letters summed in one operand only (``bd,df->f`` is a reduce over
        ``b``, ``B·D`` adds, then ``d,df->f``, ``2DF``). For a plain matmul (every letter in
        two of the three arrays) that is the book's ``2 × product of every letter``."""
        return self.dot_flops + self.reduce_flops

    def operand_bytes(self, role: str) -> float:
        itemsize = dtype_bytes(self.accum_dtype if role == "out" else self.dtype)
        return itemsize * math.prod(self.shape(role))

    @property
    def hbm_bytes(self) -> float:
        """Bytes of both inputs and the output: what one chip reads and writes unsharded."""
        return sum(self.operand_bytes(role) for role in ("lhs", "rhs", "out"))

    @property
    def arithmetic_intensity_flops_per_byte(self) -> float:
        return self.flops / self.hbm_bytes

    def __str__(self) -> str:
        accum = f" -> {self.accum_dtype}" if self.accum_dtype != self.dtype else ""
        return f"{self.spec.equation} ({self.dims_text}) {self.dtype}{accum}"


def parse_dims(text: str) -> dict[str, int]:
    """``"b=8192,d=8192" -> {"b": 8192, "d": 8192}`` (sizes in ASCII digits, ``8_192`` ok,
    each at most ``limits.MAX_DIM_SIZE``)."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq or len(name) != 1 or not ("a" <= name <= "z") or not _SIZE.match(value):
            raise SpecError(
                f"dims {text!r}: {part.strip()!r} is not LETTER=SIZE (a letter a-z and a size "
                "in ASCII digits); write e.g. b=8192,d=8192,f=32768"
            )
        if name in sizes:
            raise SpecError(f"dims {text!r}: letter {name!r} is given twice")
        sizes[name] = parse_count(
            value, what=f"dims: size of {name!r}", most=MAX_DIM_SIZE, error=SpecError
        )
    return sizes
