"""The time budget of a run: wall or CPU seconds, counted across resumes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def process_tree_cpu_seconds() -> float:
    """CPU seconds used by this process (all threads) and its children, live or finished (Linux ``/proc``;
    elsewhere this process and its finished children only).

    Not monotonic on its own: a child reaped between the two reads is briefly counted twice (use
    :class:`CpuClock` for budgets).
    """
    total = time.process_time()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    ticks = os.sysconf("SC_CLK_TCK")
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as handle:
                children = handle.read().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited in between: counted in children_* once reaped
            # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] is field 3 (state).
            total += sum(int(value) for value in fields[11:15]) / ticks
    # Read after the live children: a child reaped in between is counted twice for a moment, never missed.
    times = os.times()
    return total + times.children_user + times.children_system


class CpuClock:
    """:func:`process_tree_cpu_seconds` made monotonic (a reading never goes below an earlier one)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self) -> float:
        self.last = max(self.last, process_tree_cpu_seconds())
        return self.last


class Budget:
    """Seconds a run has taken over all its sessions, on the clock ``config.budget_clock`` names, and whether
    its ``time_budget`` allows more."""

    def __init__(self, time_budget: float | None, clock: str) -> None:
        self.time_budget = time_budget
        self.clock: Callable[[], float] = CpuClock() if clock == "cpu" else time.perf_counter
        self.session_start = self.clock()
        self.elapsed_before = 0.0  # seconds spent by earlier sessions of this run (resume)
        self.recluster_seconds = 0.0  # duration of the last re-clustering

    @property
    def elapsed(self) -> float:
        """Seconds (of the budget's clock) this run has taken so far, over all its sessions."""
        return self.elapsed_before + self.clock() - self.session_start

    def out_of_time(self) -> bool:
        return self.time_budget is not None and self.elapsed >= self.time_budget

    def time_to_recluster(self, have_labels: bool) -> bool:
        """False when the budget would run out during a re-clustering: train on with the labels in hand
        rather than spend the rest of the budget on a clustering no step would use."""
        if not have_labels or self.time_budget is None:
            return True
        return self.elapsed + self.recluster_seconds < self.time_budget
