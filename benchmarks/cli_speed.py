"""How long the command line takes: start-up, and planning beyond start-up.

Each command runs as its own process, several times; the figure is its CPU time (user +
sys, from ``resource.getrusage(RUSAGE_CHILDREN)``), which the machine's load stretches far
less than wall time; the median is quoted. Baselines in the same run: a bare ``python -c
pass`` and ``hardware show`` (start-up: import, parse arguments, load one preset).

Targets (the new-user issue): start-up under 150 ms; ``plan --json`` for the 209 strategies
of ``bd,df->bf`` on a v5p 16x16x16 under 50 ms beyond start-up.

    python benchmarks/cli_speed.py      # prints the table, writes results/cli_speed.json
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cli_speed.json"
CLI = [sys.executable, "-m", "sharding_roofline"]
V5P = ["--hardware", "tpu-v5p", "--topology", "16x16x16", "--mesh", "x=16,y=16,z=16"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "hardware show (start-up)": [*CLI, "hardware", "show", "tpu-v5p", "--json"],
    "plan --json (209 strategies)": [
        *CLI, "plan", *V5P, "--einsum", "bd,df->bf", "--dims", "b=8192,d=8192,f=32768",
        "--json", "--top", "1000",
    ],
    "plan (text, top 10)": [
        *CLI, "plan", *V5P, "--einsum", "bd,df->bf", "--dims", "b=8192,d=8192,f=32768",
    ],
    "layer --compare (block, backward)": [
        *CLI, "layer", "--layer", "block", "--dims", "d=8192,f=28672,n=64,k=8,h=128,t=8192",
        "--batch-tokens", "4194304", *V5P, "--backward", "--json",
    ],
}  # fmt: skip
RUNS = 7


def cpu_s(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    medians: dict[str, float] = {}
    for name, argv in COMMANDS.items():
        cpu_s(argv)  # warm the file cache and the .pyc files
        medians[name] = statistics.median(cpu_s(argv) for _ in range(RUNS))
    startup = medians["hardware show (start-up)"]
    plan_beyond = medians["plan --json (209 strategies)"] - startup
    print(f"CPU seconds per process, median of {RUNS}")
    for name, seconds in medians.items():
        beyond = (
            ""
            if "start-up" in name or "pass" in name
            else f"  ({(seconds - startup) * 1e3:+.0f} ms beyond start-up)"
        )
        print(f"  {name:<36} {seconds * 1e3:7.1f} ms{beyond}")
    ok = startup < 0.150 and plan_beyond < 0.050
    print(
        f"start-up {startup * 1e3:.0f} ms (target < 150), plan --json {plan_beyond * 1e3:.0f} ms "
        f"beyond it (target < 50): {'ok' if ok else 'MISSED'}; start-up is "
        f"{startup / medians['python -c pass']:.1f}x a bare interpreter"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "about": "CPU seconds per process, median of 7 (benchmarks/cli_speed.py)",
                "median_cpu_s": medians,
                "startup_s": startup,
                "plan_json_beyond_startup_s": plan_beyond,
                "targets_met": ok,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
