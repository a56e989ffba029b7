"""OrderedWorkers: results in submission order, errors and dead workers reported, no deadlock, clean exit."""

from __future__ import annotations

import multiprocessing
import operator
import os
import signal
import threading
import time

import pytest

from dataengine.workers import OrderedWorkers, RemoteTraceback, WorkerDiedError

FORK = multiprocessing.get_context("fork")


def _slow_square(task: tuple[int, float]) -> int:
    value, delay = task
    time.sleep(delay)
    return value * value


def _fail_on_seven(value: int) -> int:
    if value == 7:
        raise KeyError(f"no {value}")
    return value


def _die_on_five(value: int) -> int:
    if value == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def _echo_big(blob: bytes) -> bytes:
    return blob * 3


def _unpicklable(value: int):
    return lambda: value


def _no_children_left() -> bool:
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_results_come_back_in_submission_order_whatever_finishes_first():
    # Early tasks sleep longest, so later ones finish first on the other workers.
    tasks = [(i, 0.02 * ((10 - i) % 4)) for i in range(30)]
    with OrderedWorkers(FORK, 3, _slow_square) as workers:
        assert list(workers.imap(tasks, ahead=6)) == [i * i for i in range(30)]
    assert _no_children_left()


def test_lookahead_is_bounded_by_consumption():
    submitted = []

    def tasks():
        for i in range(20):
            submitted.append(i)
            yield (i, 0.0)

    with OrderedWorkers(FORK, 2, _slow_square) as workers:
        results = workers.imap(tasks(), ahead=4)
        for consumed, value in enumerate(results):
            assert value == consumed * consumed
            # Task i + ahead is only submitted after result i has been consumed.
            assert len(submitted) <= consumed + 4
            time.sleep(0.005)
    assert submitted == list(range(20))


def test_a_task_error_is_raised_with_its_type_and_the_worker_traceback():
    with pytest.raises(KeyError, match="no 7") as info:
        with OrderedWorkers(FORK, 2, _fail_on_seven) as workers:
            list(workers.imap(range(20), ahead=4))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_fail_on_seven" in str(info.value.__cause__)
    assert _no_children_left()


def test_a_result_that_does_not_pickle_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="cannot send the result back"):
        with OrderedWorkers(FORK, 2, _unpicklable) as workers:
            list(workers.imap(range(3), ahead=2))


def test_a_killed_worker_is_reported_instead_of_waiting_forever():
    with pytest.raises(WorkerDiedError, match="SIGKILL"):
        with OrderedWorkers(FORK, 2, _die_on_five) as workers:
            list(workers.imap(range(50), ahead=4))
    assert _no_children_left()


def test_large_tasks_and_results_do_not_deadlock():
    # 8 tasks of 1 MiB in flight and results of 3 MiB: far beyond the 64 KiB pipe buffers both ways.
    blobs = [bytes([i]) * (1 << 20) for i in range(12)]
    with OrderedWorkers(FORK, 2, _echo_big) as workers:
        for blob, result in zip(blobs, workers.imap(blobs, ahead=8), strict=True):
            assert result == blob * 3


def _touch_after(task: tuple[str, float]) -> str:
    path, delay = task
    time.sleep(delay)
    open(path, "w").close()
    return path


def test_stopping_early_terminates_the_workers_and_leaves_no_thread(tmp_path):
    threads = threading.active_count()
    tasks = ((str(tmp_path / f"{i}.done"), 0.3) for i in range(100))
    with OrderedWorkers(FORK, 2, _touch_after) as workers:
        for _ in workers.imap(tasks, ahead=8):
            break
    assert _no_children_left()
    assert threading.active_count() == threads
    # Eight tasks were submitted; the workers were killed rather than left to finish them all.
    assert len(list(tmp_path.iterdir())) < 8


def test_spawned_workers_work_too():
    with OrderedWorkers(multiprocessing.get_context("spawn"), 2, operator.neg) as workers:
        assert list(workers.imap(range(40), ahead=3)) == [-i for i in range(40)]
    assert _no_children_left()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="processes"):
        OrderedWorkers(FORK, 0, abs)
    with OrderedWorkers(FORK, 1, abs) as workers:
        with pytest.raises(ValueError, match="ahead"):
            list(workers.imap([1], ahead=0))


_ORPHAN_CHECK = """
import multiprocessing, os, sys, time
from dataengine.workers import OrderedWorkers

def slow(value):
    time.sleep(0.2)
    return value

workers = OrderedWorkers(multiprocessing.get_context("fork"), 2, slow)
print(" ".join(str(p.pid) for p in workers._readers.values()), flush=True)
for value in workers.imap(range(1000), ahead=8):
    pass
"""


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_CHECK)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    time.sleep(0.5)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"workers {alive} outlived their killed parent"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"  # a zombie has exited (and awaits its reaper)
    except FileNotFoundError:
        return False
