"""Element types by their numpy/JAX names, with the aliases people type."""

from __future__ import annotations

from .errors import UnknownNameError

#: Bytes per element, by canonical (numpy/JAX) name. Sub-byte types are fractional: fp4 packs
#: two elements per byte (NVIDIA's NVFP4 tensor cores read it packed), so 0.5. Multiply by an
#: integer element count and the product is exact (a float with a .0 or .5 fraction).
DTYPE_BYTES: dict[str, float] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float4_e2m1fn": 0.5,  # two per byte, packed (JAX stores one per byte on CPU)
    "int32": 4,
    "int8": 1,
}

_ALIASES: dict[str, str] = {
    "f64": "float64",
    "fp64": "float64",
    "f32": "float32",
    "fp32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "f8": "float8_e4m3fn",
    "f8e4m3fn": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "f8e5m2": "float8_e5m2",
    "e5m2": "float8_e5m2",
    "fp4": "float4_e2m1fn",
    "s32": "int32",
    "i32": "int32",
    "s8": "int8",
    "i8": "int8",
}


def canonical_dtype(name: str) -> str:
    """``canonical_dtype("bf16") == "bfloat16"``; raises with the valid names otherwise."""
    if not isinstance(name, str):
        raise UnknownNameError(
            f"a dtype is a name like 'bfloat16', got {name!r}; expected one of "
            f"{', '.join(DTYPE_BYTES)}"
        )
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise UnknownNameError(
            f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        )
    return key


def dtype_bytes(name: str) -> float:
    """Bytes per element of a dtype given by name or alias (0.5 for fp4: fractional-safe)."""
    return DTYPE_BYTES[canonical_dtype(name)]


def array_bytes(num_elements: int, name: str) -> float:
    """Bytes of ``num_elements`` elements of ``name``: ``array_bytes(3, "fp4") == 1.5``."""
    return num_elements * dtype_bytes(name)
