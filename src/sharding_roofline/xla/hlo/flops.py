"""Per-device matmul FLOPs of a compiled module, counted from its ``dot`` instructions."""

from __future__ import annotations

import math
import re

from sharding_roofline.errors import ValidationError

from ._text import _ints, _module

__all__ = ["dot_flops"]


def dot_flops(text: str) -> int:
    """Exact per-device matmul FLOPs: ``2 * prod(result) * prod(contracting dims)``.

    Summed over every ``dot`` in every computation (fused ones included, e.g. the CPU's
    ``ynn_fusion`` bodies), each weighted by how many times its computation runs (while-loop
    trip counts). Operand shapes come from inline operand types or the operand's definition.
    Convolutions and library custom-calls (cuBLAS) are not counted.
    """
    module = _module(text)
    counts = module.execution_counts()
    total = 0
    for comp, instrs in module.computations.items():
        for instr in instrs:
            if instr.opcode != "dot":
                continue
            lhs = module.operand_type(instr, 0)
            contracting = re.search(r"\blhs_contracting_dims=\{([\d,\s]*)\}", instr.attrs)
            dims = _ints(contracting.group(1)) if contracting else ()
            if lhs.dtype is None or any(d >= len(lhs.dims) for d in dims):
                raise ValidationError(
                    f"dot {instr.name!r} in computation {comp!r}: lhs_contracting_dims {dims} "
                    f"do not fit its lhs type {lhs}."
                )
            k = math.prod(lhs.dims[d] for d in dims)
            total += 2 * instr.type.elements * k * counts.get(comp, 1)
    return total
