"""Hardware presets: strict TOML -> ``HardwareSpec``.

One generic loader, driven by ``dataclasses.fields()``, builds every spec: an unknown key, a
missing key or a value of the wrong type is an error that names the file, the table, the
key and the valid keys. Shipped presets live in ``presets/*.toml`` (package data); a user's
own hardware is any TOML file of the same shape, passed by path.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, ShardingRooflineError, UnknownNameError
from .files import read_config_text
from .hardware import FrozenMap, HardwareSpec
from .limits import shown

T = TypeVar("T")


def _preset_folder() -> Any:
    """The shipped presets: a data folder inside the package (so a wheel carries it)."""
    return resources.files("sharding_roofline") / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted (``tpu-v5e``, ``h100``, ...)."""
    folder = _preset_folder()
    return sorted(
        entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml")
    )


def load_preset(name_or_path: str | Path) -> HardwareSpec:
    """A shipped preset by name (``"tpu-v5e"``), or a user's TOML file by path."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        return _load_file(str(Path(text).resolve()))
    return _load_shipped(text)


@functools.cache
def _load_shipped(name: str) -> HardwareSpec:
    names = list_presets()
    if name not in names:
        raise UnknownNameError(
            f"unknown hardware preset {name!r}; shipped presets are {', '.join(names)}. "
            "Pass a path to your own .toml file for other hardware."
        )
    resource = _preset_folder() / f"{name}.toml"
    return _parse(resource.read_text(encoding="utf-8"), f"{name}.toml")


def _load_file(path: str) -> HardwareSpec:
    """A user's file is read afresh each time (it may have been edited since); only a
    regular file of at most 1 MiB (``files.read_config_text``)."""
    file = Path(path)
    try:
        text = read_config_text(file, what="hardware file", missing=UnknownNameError)
    except UnknownNameError:
        raise UnknownNameError(
            f"hardware file {path!r} does not exist; pass a shipped preset name "
            f"({', '.join(list_presets())}) or the path of a .toml file"
        ) from None
    return _parse(text, file.name, path=path)


def _parse(text: str, filename: str, path: str = "") -> HardwareSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{filename}: not valid TOML: {exc}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{filename}: not valid TOML: {exc}") from None
    spec = build_dataclass(HardwareSpec, data, filename=filename, table="")
    return dataclasses.replace(spec, path=path or filename)


def build_dataclass(cls: type[T], data: dict[str, Any], *, filename: str, table: str) -> T:
    """Build the frozen dataclass ``cls`` from a TOML table, strictly.

    Every init field without a default is required; keys that are not fields are errors.
    Nested dataclasses, arrays of tables, enums (by value), tuples and ``FrozenMap`` tables
    are converted by the field's type annotation.
    """
    where = f"{filename}: [{table}]" if table else filename
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.compare}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"{where}: missing key {name!r} (required keys: "
                    f"{', '.join(sorted(n for n, f in fields.items() if _required(f)))})"
                )
            continue
        sub = f"{table}.{name}" if table else name
        kwargs[name] = _convert(hints[name], data[name], filename=filename, table=sub)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{filename}: {exc}") from None
    except ShardingRooflineError as exc:
        raise ConfigError(f"{filename}: {exc}") from None


def _required(fld: dataclasses.Field[Any]) -> bool:
    return fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, *, filename: str, table: str) -> Any:
    where = f"{filename}: {table}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        return _convert(options[0], value, filename=filename, table=table)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, filename=filename, table=table)  # type: ignore[arg-type]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        valid = [member.value for member in hint]
        if value not in valid:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, valid))}")
        return hint(value)
    if hint is FrozenMap:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of dtype = number, got {value!r}")
        for key, item in value.items():
            _check_number(item, f"{where}.{key}")
        return FrozenMap({key: float(item) for key, item in value.items()})
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        item_hint = args[0]
        if dataclasses.is_dataclass(item_hint):
            return tuple(
                build_dataclass(item_hint, item, filename=filename, table=f"{table}[{i}]")  # type: ignore[arg-type]
                for i, item in enumerate(value)
            )
        return tuple(
            _convert(item_hint, item, filename=filename, table=f"{table}[{i}]")
            for i, item in enumerate(value)
        )
    if hint is float:
        _check_number(value, where)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shown(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    raise TypeError(f"build_dataclass cannot convert to {hint!r}")  # a bug in our own types


def _check_number(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (write numbers without quotes, e.g. 8.2e11)" if isinstance(value, str) else ""
        raise ConfigError(f"{where}: expected a number, got {shown(value)}{hint}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):  # inf, nan, or an integer too large for a float
        raise ConfigError(
            f"{where}: {shown(value)} is not a finite number; write a plain number such as 8.2e11"
        )
