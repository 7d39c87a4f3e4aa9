"""Execute notebooks and save them with their outputs (``make notebooks``; the test suite).

    python -m sharding_roofline._notebooks notebooks/*.ipynb

Each notebook runs top to bottom in a fresh kernel started from *this* interpreter
(``sys.executable -m ipykernel_launcher``), never from whatever ``python3`` kernelspec the
machine has installed, whose ``python`` may be another environment. The kernel imports the
same ``sharding_roofline`` as this process (its directory goes first on ``PYTHONPATH``) and
runs in the notebook's own directory. Outputs are kept deterministic: no execution
timestamps are recorded, so re-running an unchanged notebook rewrites the same file.

Not imported by the package (it needs the ``test`` extras: nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# jupyter_core warns (DeprecationWarning) on import unless told which data paths to use;
# the platform-standard ones are the future default.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

KERNEL_NAME = "sharding-roofline-python"
CELL_TIMEOUT_S = 300
AS_VERSION = 4


@contextmanager
def kernel_manager_class() -> Iterator[type[AsyncKernelManager]]:
    """A kernel manager class whose kernel is ``sys.executable -m ipykernel_launcher``: its
    only kernelspec is written to a temporary directory (removed afterwards). nbclient
    creates, owns and shuts down the manager."""
    with tempfile.TemporaryDirectory(prefix="sr-kernel-") as tmp:
        spec_dir = Path(tmp) / KERNEL_NAME
        spec_dir.mkdir()
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")

        class ThisInterpreter(AsyncKernelManager):
            @default("kernel_spec_manager")
            def _only_our_kernelspec(self) -> KernelSpecManager:
                return KernelSpecManager(kernel_dirs=[tmp], ensure_native_kernel=False)

        yield ThisInterpreter


def kernel_env() -> dict[str, str]:
    """This process's environment, with this ``sharding_roofline`` first on the path."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules notice
    env.setdefault("MPLBACKEND", "Agg")
    return env


def execute(path: str | Path, *, timeout_s: int = CELL_TIMEOUT_S) -> Any:
    """Run the notebook at ``path`` in its own directory and return it with its outputs
    (``nbformat.NotebookNode``). Raises ``nbclient.exceptions.CellExecutionError`` (with
    the failing cell and traceback) if a cell raises."""
    notebook = Path(path)
    nb = nbformat.read(notebook, as_version=AS_VERSION)  # type: ignore[no-untyped-call]
    with kernel_manager_class() as manager:
        client = NotebookClient(
            nb,
            kernel_name=KERNEL_NAME,
            kernel_manager_class=manager,
            timeout=timeout_s,
            record_timing=False,  # no timestamps in the saved file
            resources={"metadata": {"path": str(notebook.resolve().parent)}},
        )
        client.execute(env=kernel_env())
    # The kernelspec saved is the standard one, not our temporary name.
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    return nb


def problems(nb: Any) -> list[str]:
    """Error outputs and stderr text of an executed notebook (warnings end up there)."""
    found: list[str] = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {index} wrote to stderr: {output.get('text', '')[:500]}")
    return found


def run_in_place(paths: Sequence[str | Path], *, timeout_s: int = CELL_TIMEOUT_S) -> int:
    """Execute each notebook and overwrite it with its outputs; 1 if any failed."""
    status = 0
    for path in paths:
        start = time.perf_counter()
        try:
            nb = execute(path, timeout_s=timeout_s)
        except CellExecutionError as error:
            print(f"{path}: FAILED, not saved\n{error}", file=sys.stderr)
            status = 1
            continue
        trouble = problems(nb)
        nbformat.write(nb, str(path))  # type: ignore[no-untyped-call]
        took = time.perf_counter() - start
        print(f"{path}: executed in {took:.1f} s")
        for line in trouble:
            print(f"  {line}", file=sys.stderr)
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sharding_roofline._notebooks",
        description="Execute notebooks in place and save them with their outputs.",
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="the .ipynb files to run")
    parser.add_argument(
        "--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds allowed per cell"
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    return run_in_place(args.notebooks, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
