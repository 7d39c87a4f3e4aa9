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
from dataclasses import dataclass

from .dtypes import canonical_dtype, dtype_bytes
from .errors import SpecError

_OPERAND = re.compile(r"^[a-z]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class EinsumSpec:
    """The equation of a two-operand einsum, e.g. ``bd,df->bf``."""

    lhs: str
    rhs: str
    out: str

    def __post_init__(self) -> None:
        for role, letters in (("lhs", self.lhs), ("rhs", self.rhs), ("output", self.out)):
            if not _OPERAND.match(letters):
                raise SpecError(
                    f"einsum {self.equation!r}: the {role} {letters!r} must be letters a-z only "
                    "(no ellipsis, digits or spaces)"
                )
            repeated = sorted({c for c in letters if letters.count(c) > 1})
            if repeated:
                what = "output" if role == "output" else f"{role} operand"
                raise SpecError(
                    f"einsum {self.equation!r}: letter {repeated[0]!r} repeats in the {what} "
                    f"{letters!r}; traces and diagonals are not matmuls. Give each dimension "
                    "its own letter"
                )
        missing = [c for c in self.out if c not in self.lhs and c not in self.rhs]
        if missing:
            raise SpecError(
                f"einsum {self.equation!r}: output letter {missing[0]!r} appears in neither "
                "operand; every output letter must come from an input"
            )

    @classmethod
    def parse(cls, equation: str) -> EinsumSpec:
        """``"bd,df->bf"``; without ``->`` the output is numpy's implicit one (the letters that
        appear once, sorted)."""
        text = equation.replace(" ", "")
        if text.lower() != text and text.upper() == text:
            text = text.lower()  # "BD,DF->BF" reads as the book writes it
        inputs, arrow, out = text.partition("->")
        operands = inputs.split(",")
        if len(operands) != 2:
            raise SpecError(
                f"einsum {equation!r} has {len(operands)} operand(s); sharding_roofline plans "
                "two-operand einsums. Split a longer chain into pairwise steps (e.g. "
                "'bd,df->bf' then 'bf,fe->be')"
            )
        if "." in text:
            raise SpecError(f"einsum {equation!r}: ellipsis '...' is not supported; name each dim")
        if not arrow:
            seen = operands[0] + operands[1]
            out = "".join(sorted(c for c in set(seen) if seen.count(c) == 1))
        return cls(lhs=operands[0], rhs=operands[1], out=out)

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

    def __post_init__(self) -> None:
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
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise SpecError(f"einsum dimension {name}={size!r} must be a positive integer")
        ordered = tuple((c, dict(self.dims)[c]) for c in needed)
        object.__setattr__(self, "dims", ordered)

    @classmethod
    def create(
        cls,
        equation: str | EinsumSpec,
        dims: Mapping[str, int] | str,
        dtype: str = "bfloat16",
        accum_dtype: str | None = None,
    ) -> Einsum:
        spec = equation if isinstance(equation, EinsumSpec) else EinsumSpec.parse(equation)
        sizes = parse_dims(dims) if isinstance(dims, str) else dict(dims)
        return cls(spec=spec, dims=tuple(sizes.items()), dtype=dtype, accum_dtype=accum_dtype or "")

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
        )

    @property
    def flops(self) -> int:
        """``2 × product of every distinct letter's size`` (the book's 2BDF for a matmul)."""
        return 2 * math.prod(size for _, size in self.dims)

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
    """``"b=8192,d=8192" -> {"b": 8192, "d": 8192}``."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip().replace("_", "")
        if not eq or len(name) != 1 or not name.isalpha() or not value.isdigit():
            raise SpecError(
                f"dims {text!r}: {part.strip()!r} is not LETTER=SIZE; write e.g. "
                "b=8192,d=8192,f=32768"
            )
        if name in sizes:
            raise SpecError(f"dims {text!r}: letter {name!r} is given twice")
        sizes[name] = int(value)
    return sizes
