"""Peak memory per device of a scheduled module: a liveness walk over its buffers.

Pure text. The compiled module is scheduled (``is_scheduled=true``): each computation's
instructions print in execution order. :func:`peak_memory` replays that order:

* **arguments** (entry parameters) are live for the whole step (nothing is donated);
* every other buffer is allocated when its instruction runs; a **temporary** is freed after
  its last use (through any alias), an **output** (a leaf of the entry root) stays to the
  end. ``peak = arguments + the peak of live temporaries and outputs`` (so temporaries may
  use the space of outputs not yet written, as XLA's buffer assignment does), and
  ``temp_peak = that peak - outputs``;
* no new buffer: ``parameter``, ``get-tuple-element``, ``tuple``, ``bitcast``, ``while``
  (its state aliases its operand), ``opt-barrier``, ``constant`` (read-only data, not
  counted), the ``-done`` halves of async pairs, and in-place updates
  (``dynamic-update-slice``, and fusions whose root updates a parameter in place) which
  alias the buffer they update;
* an elementwise loop fusion (``kind=kLoop``) or elementwise op writes over an operand of
  the same size whose last use it is (XLA's buffer sharing);
* a ``while`` adds the peak of its body's temporaries on top of what is live around it, a
  ``conditional`` the dearest branch's, a ``call`` its callee's.

Sizes use the logical element types when given a :class:`~.logical.LogicalTypes` (what a
chip would hold), else the printed ones (what the CPU compile holds, comparable with
``compiled.memory_analysis()``). Fragmentation and XLA's cleverer buffer reuse are not
modelled; docs/estimate_fn.md measures the gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._text import _Instr, _itemsize, _Module
from .logical import LogicalTypes

__all__ = ["MemoryEstimate", "peak_memory"]

_ALIASING = frozenset(
    {
        "parameter",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "while",
        "opt-barrier",
        "constant",
        "after-all",
        "add-dependency",
        "async-done",
        "all-gather-done",
        "all-reduce-done",
        "collective-permute-done",
        "copy-done",
    }
)
_ELEMENTWISE = frozenset(
    {
        "abs",
        "add",
        "convert",
        "cosine",
        "divide",
        "exponential",
        "log",
        "logistic",
        "maximum",
        "minimum",
        "multiply",
        "negate",
        "rsqrt",
        "select",
        "sine",
        "sqrt",
        "subtract",
        "tanh",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """Per-device memory of one step, in bytes (the components of ``memory_analysis()``)."""

    argument_bytes: int
    output_bytes: int
    temp_peak_bytes: int
    peak_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes,
            "temp_peak_bytes": self.temp_peak_bytes,
            "peak_bytes": self.peak_bytes,
        }


class _Sizes:
    def __init__(self, module: _Module, logical: LogicalTypes | None) -> None:
        self.module = module
        self.logical = logical

    def leaves(self, instr: _Instr) -> list[int]:
        if instr.type.dtype is not None and self.logical is None:
            return [math.prod(instr.type.dims) * _itemsize(instr.type.dtype)]
        leaves = list(instr.type.leaves())
        dtypes: tuple[str, ...] = tuple(leaf.dtype or "token" for leaf in leaves)
        if self.logical is not None:
            got = self.logical.leaf_dtypes(instr.computation, instr.name)
            if len(got) == len(leaves):
                dtypes = got
        return [math.prod(leaf.dims) * _itemsize(d) for leaf, d in zip(leaves, dtypes, strict=True)]


def _in_place_fusion(module: _Module, instr: _Instr) -> int | None:
    """The operand a fusion updates in place (its root is a dynamic-update-slice of it)."""
    bodies = [c for a, c in module.callees(instr) if a == "calls"]
    if not bodies:
        return None
    root = module.root(bodies[0])
    while root is not None and root.opcode in ("bitcast", "reshape") and root.operands:
        root = module.instr(bodies[0], root.operands[0])
    if root is None or root.opcode != "dynamic-update-slice" or not root.operands:
        return None
    buffer = module.instr(bodies[0], root.operands[0])
    while buffer is not None and buffer.opcode in ("bitcast", "reshape") and buffer.operands:
        buffer = module.instr(bodies[0], buffer.operands[0])
    if buffer is None or buffer.opcode != "parameter":
        return None
    return buffer.param_index


def _computation_peak(
    sizes: _Sizes, comp: str, *, entry: bool, depth: int = 0
) -> tuple[int, int, int]:
    """(peak bytes of live temporaries and outputs, argument bytes, output bytes) of one
    computation run by itself; a nested computation's parameters belong to its caller."""
    module = sizes.module
    instrs = module.computations.get(comp, [])
    last_reader: dict[str, int] = {}
    for k, instr in enumerate(instrs):
        for name in instr.operands:
            last_reader[name] = k
    root_instr = module.root(comp)
    if root_instr is not None:
        last_reader[root_instr.name] = len(instrs)  # outputs live to the end
    holders: dict[int, list[str]] = {}
    # Buffers: id -> bytes. Each value maps to the buffers it holds (aliases share ids).
    buffer_bytes: dict[int, int] = {}
    holds: dict[str, list[int]] = {}
    last_use: dict[int, int] = {}
    pinned: set[int] = set()
    next_id = 0
    arguments = 0

    def new(nbytes: int) -> int:
        nonlocal next_id
        next_id += 1
        buffer_bytes[next_id] = nbytes
        return next_id

    root = module.root(comp)
    for k, instr in enumerate(instrs):
        op = instr.opcode
        operand_buffers = [b for name in instr.operands for b in holds.get(name, [])]
        if op == "parameter":
            nbytes = sum(sizes.leaves(instr))
            ids = [new(nbytes if entry else 0)]
            if entry:
                arguments += nbytes
                pinned.update(ids)
            holds[instr.name] = ids
        elif op == "get-tuple-element":
            source = holds.get(instr.operands[0], [])
            tuple_instr = module.instr(comp, instr.operands[0])
            index = _tuple_index(instr)
            if tuple_instr is not None and tuple_instr.type.dtype is None and index is not None:
                parts = tuple_instr.type.parts
                start = sum(len(list(p.leaves())) for p in parts[:index])
                width = len(list(parts[index].leaves())) if index < len(parts) else 0
                # a parameter tuple is one buffer; a built tuple one per leaf
                holds[instr.name] = source[start : start + width] if len(source) > 1 else source
            else:
                holds[instr.name] = source
        elif op in _ALIASING or op.endswith("-done"):
            holds[instr.name] = operand_buffers if op != "constant" else []
        elif op == "dynamic-update-slice" and instr.operands:
            holds[instr.name] = holds.get(instr.operands[0], [])
        elif op == "fusion" and (index := _in_place_fusion(module, instr)) is not None:
            holds[instr.name] = (
                holds.get(instr.operands[index], []) if index < len(instr.operands) else []
            )
        else:
            leaves = sizes.leaves(instr)
            shared: int | None = None
            if len(leaves) == 1 and (
                op in _ELEMENTWISE or (op == "fusion" and "kind=kLoop" in instr.attrs)
            ):
                for name in instr.operands:
                    for b in holds.get(name, []):
                        if (
                            b not in pinned
                            and buffer_bytes.get(b) == leaves[0]
                            and all(last_reader.get(v, -1) <= k for v in holders.get(b, ()))
                        ):
                            shared = b
                            break
                    if shared is not None:
                        break
            holds[instr.name] = [shared] if shared is not None else [new(n) for n in leaves]
        for b in operand_buffers:
            last_use[b] = k
        for b in holds[instr.name]:
            last_use.setdefault(b, k)
            holders.setdefault(b, []).append(instr.name)
    outputs: set[int] = set(holds.get(root.name, [])) if root is not None else set()
    output_bytes = sum(buffer_bytes[b] for b in outputs)

    # Replay: every buffer but the arguments is allocated when defined; temporaries are
    # freed after their last use, outputs stay; nested computations add their own peak.
    defined: dict[int, int] = {}
    for k, instr in enumerate(instrs):
        for b in holds.get(instr.name, []):
            defined.setdefault(b, k)
    frees: dict[int, list[int]] = {}
    allocs: dict[int, list[int]] = {}
    for b in buffer_bytes:
        if b in pinned:
            continue
        allocs.setdefault(defined.get(b, 0), []).append(b)
        if b not in outputs:
            frees.setdefault(last_use.get(b, defined.get(b, 0)), []).append(b)
    live = 0
    peak = 0
    for k, instr in enumerate(instrs):
        for b in allocs.get(k, []):
            live += buffer_bytes[b]
        nested = 0
        if depth < 8:
            attrs = _NESTED.get(instr.opcode)
            if attrs:
                nested = max(
                    (
                        _computation_peak(sizes, c, entry=False, depth=depth + 1)[0]
                        for a, c in module.callees(instr)
                        if a in attrs
                    ),
                    default=0,
                )
        peak = max(peak, live + nested)
        for b in frees.get(k, []):
            live -= buffer_bytes[b]
    return peak, arguments, output_bytes


_NESTED = {
    "while": ("body", "condition"),
    "conditional": ("branch_computations", "true_computation", "false_computation"),
    "call": ("to_apply", "calls"),
    "async-start": ("calls",),
}


def _tuple_index(instr: _Instr) -> int | None:
    import re  # noqa: PLC0415 (only here)

    match = re.search(r"\bindex=(\d+)", instr.attrs)
    return int(match.group(1)) if match else None


def peak_memory(module: _Module, logical: LogicalTypes | None = None) -> MemoryEstimate:
    """Peak bytes live on one device during one step (see the module docstring)."""
    entry = module.entry or next(iter(module.computations), None)
    if entry is None:
        return MemoryEstimate(argument_bytes=0, output_bytes=0, temp_peak_bytes=0, peak_bytes=0)
    sizes = _Sizes(module, logical)
    heap, arguments, outputs = _computation_peak(sizes, entry, entry=True)
    return MemoryEstimate(
        argument_bytes=arguments,
        output_bytes=outputs,
        temp_peak_bytes=max(0, heap - outputs),
        peak_bytes=arguments + max(heap, outputs),
    )
