"""Calibration files: strict JSON <-> ``Calibration``.

Shipped calibrations are package data, one file per hardware preset
(``calibration/<preset>.json``), written by ``benchmarks/calibration.py`` and holding fitted
parameters only. They are read with the presets' loader (``presets.build_dataclass``), so an
unknown, missing or mistyped key is an error naming the file, the table and the valid keys.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownNameError
from ..presets import build_dataclass
from .model import Calibration

SIGNIFICANT_DIGITS = 6


def _folder() -> Any:
    return resources.files("sharding_roofline") / "calibration"


def list_calibrations() -> list[str]:
    """Presets that ship a calibration file, sorted (``b200``, ``gb200-nvl72``, ``h100``)."""
    return sorted(
        entry.name[: -len(".json")] for entry in _folder().iterdir() if entry.name.endswith(".json")
    )


def load_calibration(name_or_path: str | Path) -> Calibration | None:
    """The shipped calibration of preset ``name`` (None when it has none: roofline only),
    or a calibration file given by path (an error when it does not exist)."""
    text = str(name_or_path)
    if text.endswith(".json") or "/" in text or "\\" in text:
        path = Path(text)
        try:
            content = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UnknownNameError(
                f"calibration file {text!r} does not exist; pass the path of a calibration "
                f"JSON file, or a preset name ({', '.join(list_calibrations())} ship one)"
            ) from None
        return parse_calibration(content, path.name, path=str(path.resolve()))
    return _load_shipped(text)


@functools.cache
def _load_shipped(name: str) -> Calibration | None:
    if name not in list_calibrations():
        return None
    resource = _folder() / f"{name}.json"
    return parse_calibration(resource.read_text(encoding="utf-8"), f"{name}.json")


def parse_calibration(text: str, filename: str, *, path: str = "") -> Calibration:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{filename}: not valid JSON: {exc}") from None
    calibration = build_dataclass(Calibration, data, filename=filename, table="")
    return dataclasses.replace(calibration, path=path or filename)


def calibration_to_dict(calibration: Calibration) -> dict[str, Any]:
    """The JSON form: field names as keys, enums by value, tuples as lists, ``None`` fields
    and the ``path`` left out, floats to 6 significant digits."""
    out = _to_json(calibration)
    if not isinstance(out, dict):  # pragma: no cover - a dataclass always becomes a dict
        raise TypeError("a Calibration did not serialise to a JSON object")
    return out


def write_calibration(calibration: Calibration, path: Path | str) -> None:
    """Write ``calibration`` to ``path`` as stable, readable JSON (sorted as declared)."""
    text = json.dumps(calibration_to_dict(calibration), indent=1, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for fld in dataclasses.fields(value):
            if not fld.compare:
                continue
            item = getattr(value, fld.name)
            if item is None:
                continue
            out[fld.name] = _to_json(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"cannot write the non-finite number {value!r} to a calibration")
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    raise TypeError(f"calibration_to_dict cannot write {type(value).__name__}")  # a bug
