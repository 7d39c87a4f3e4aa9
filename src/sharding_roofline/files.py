"""The rules for the files we read and write, in one place.

Reading (hardware presets, experiment configs): only regular files, at most
``limits.MAX_CONFIG_BYTES``, in UTF-8, so ``--hardware /dev/zero`` or a FIFO is refused at
once instead of reading until memory runs out or hanging.

Writing (``--plot``, ``run --out-dir``): every path is checked *before* anything is computed
(``check_output_path``): its format must be one we write (``.png``, ``.pdf``, ``.svg`` for
figures), its directory must exist and be writable, and an existing file is replaced only
with ``--force``. Files are written atomically (``write_atomic``: a temporary file in the
same directory, then ``os.replace``), so an interrupted run never leaves half a figure.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConfigError, OutputError
from .limits import MAX_CONFIG_BYTES

#: What matplotlib writes that we accept for a figure.
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg")


def slug(text: str) -> str:
    """A file-name stem from a name: ``"TPU v5e 4x4, free" -> "tpu-v5e-4x4-free"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "plan"


def read_config_text(path: str | Path, *, what: str, missing: type[Exception] = ConfigError) -> str:
    """The text of a user's config file, read safely: a regular file of at most
    ``MAX_CONFIG_BYTES``, UTF-8. ``what`` names it in errors (``"hardware file"``);
    ``missing`` is the error class for a path that does not exist."""
    file = Path(path)
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise missing(f"{what} {str(file)!r} does not exist; check the path") from None
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(file)!r} cannot be read: {exc.strerror or exc}; pass a readable file"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {str(file)!r} is a directory; pass the path of a .toml file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"{what} {str(file)!r} is not a regular file (a device, FIFO or socket); pass the "
            "path of a .toml file"
        )
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} {str(file)!r} is {info.st_size} bytes, more than the {MAX_CONFIG_BYTES} "
            "a config may have; pass the .toml file itself"
        )
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(file)!r} cannot be read: {exc.strerror or exc}; pass a readable file"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:  # it grew while we looked
        raise ConfigError(f"{what} {str(file)!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file.name}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def check_output_path(
    path: str | Path, *, force: bool, formats: Iterable[str] | None = None
) -> Path:
    """``path`` if it can be written as asked, checked before any work is done.

    ``formats`` (lower-case suffixes without the dot) limits the file type: a path without
    a suffix or with another one is refused, never silently given ``.png``. The directory
    must already exist (we do not create directories silently) and be writable. An
    existing file is refused unless ``force``; a directory is always refused."""
    out = Path(path)
    allowed = tuple(formats) if formats is not None else None
    if out.is_dir():
        raise OutputError(f"cannot write {str(out)!r}: it is a directory; give a file name")
    if allowed is not None:
        suffix = out.suffix.lower().lstrip(".")
        if suffix not in allowed:
            got = f"'.{suffix}' is not a format we write" if suffix else "it has no suffix"
            names = ", ".join(f".{s}" for s in allowed)
            raise OutputError(
                f"cannot write {str(out)!r}: {got}; name the file with one of {names} "
                f"(e.g. {out.with_suffix('.' + allowed[0]).name}); nothing is appended for you"
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise OutputError(
            f"cannot write {str(out)!r}: the directory {str(parent)!r} {what}; create it "
            "first or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {str(out)!r}: the directory {str(parent)!r} is not writable; choose "
            "another path"
        )
    if out.exists() and not force:
        raise OutputError(
            f"{str(out)!r} already exists; pass --force to replace it, or choose another path"
        )
    return out


def check_output_dir(path: str | Path, *, force: bool, create: bool = True) -> Path:
    """A directory to write several files into (``run --out-dir``), checked before work.

    It may exist (its files are then checked one by one with ``check_output_path``) or not
    (then its parent must exist and it is created only when ``create``, which the caller
    does after every check passed); a file in its place is refused."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"--out-dir {str(out)!r} is a file, not a directory; choose a directory (it is "
            "created if missing)"
        )
    if not out.exists():
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(
                f"--out-dir {str(out)!r}: its parent {str(parent)!r} does not exist; create it "
                "first or choose another directory"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--out-dir {str(out)!r}: {str(parent)!r} is not writable")
    elif not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out-dir {str(out)!r} is not writable; choose another directory")
    del force  # existing files inside are checked per file
    return out


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``writer`` writes a temporary file in the same directory
    (same suffix, so format detection works), which then replaces ``path`` in one
    ``os.replace``. On any error the temporary file is removed and ``path`` is untouched."""
    out = Path(path)
    directory = out.parent if str(out.parent) else Path(".")
    handle, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=directory)
    os.close(handle)
    temporary = Path(name)
    try:
        writer(temporary)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)  # mkstemp makes it 0600; give the usual mode
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_atomic(path, write)
