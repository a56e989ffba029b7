"""Benchmark: start-up of the command line (``python -m dataengine --help``, ``... ingest --help``).

Each command runs in a fresh interpreter; this tree and, with ``--against TREE``, another checkout (e.g. a
``git worktree`` of an earlier commit) take turns for ``--repeats`` rounds, so that load from other processes
hits them alike. Reported per tree and command: median wall time and median CPU time (user + system of the
child). On a busy machine the wall time mostly measures the wait for a core; the CPU time and the ratio of the
two trees, measured in the same run, are the figures to compare.

    python tools/bench_cli.py                                  # this tree, 5 rounds
    python tools/bench_cli.py --against ../main --repeats 5    # before (../main) vs after (this tree)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = (("--help",), ("ingest", "--help"))


def run_once(tree: str, args: tuple[str, ...]) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -m dataengine ARGS`` importing the package from ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dataengine", *args], env=env, capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="Another checkout to compare with (run first in every round).")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds (each tree runs each command once).")
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON on the last line.")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"before": os.path.abspath(args.against), "after": here} if args.against else {"this": here}
    for tree in trees.values():  # compile the bytecode caches once, outside the measurement
        for command in COMMANDS:
            run_once(tree, command)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            for command in COMMANDS:
                times.setdefault((name, " ".join(command)), []).append(run_once(tree, command))
    results = []
    for (name, command), runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        results.append({"tree": name, "command": f"dataengine {command}", "wall_ms": round(wall * 1000),
                        "cpu_ms": round(cpu * 1000), "runs": len(runs)})
        print(f"{name:>6}  dataengine {command:<14} wall {wall * 1000:6.0f} ms  CPU {cpu * 1000:5.0f} ms "
              f"(median of {len(runs)})", file=sys.stderr)
    if args.against:
        for command in COMMANDS:
            text = "dataengine " + " ".join(command)
            before, after = (next(r for r in results if r["tree"] == t and r["command"] == text)
                             for t in ("before", "after"))
            print(f"after / before, {text}: wall {after['wall_ms'] / before['wall_ms']:.2f}, "
                  f"CPU {after['cpu_ms'] / before['cpu_ms']:.2f}", file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
