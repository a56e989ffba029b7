"""Worker processes that run one function over a stream of tasks, with results in submission order.

Ingest uses this instead of :class:`multiprocessing.pool.Pool`, for two reasons measured or seen here:

* ``Pool`` runs three helper threads in the calling process, and its worker-maintenance thread wakes up
  every time a result is waiting in the result pipe until the result thread has read it: on 4,000 photos with
  two workers that thread alone burned 0.05-0.07 CPU-s and the task and result threads 0.02-0.03 (thread CPU
  clocks), taken from the two workers on a two-core machine; the feeder thread here uses 0.015-0.02.
* ``Pool`` waits forever for the result of a worker that died (SIGKILL by the out-of-memory killer, a crash
  in a native decoder): here the caller gets a :class:`WorkerDiedError` naming the exit status.

Design: each worker reads ``(sequence, task)`` items from one shared task queue (whoever is free takes the
next task) and sends ``(sequence, ok, value)`` back through its own pipe. The calling thread reads results
itself (no result thread), keeping at most ``ahead`` tasks submitted and not yet consumed. Tasks are written
by one small feeder thread, so that the caller never blocks on a full task pipe while workers block on full
result pipes (the deadlock a single thread writing both ways would risk with large tasks and results).
Workers ignore SIGINT: Ctrl-C interrupts the caller, which then terminates them.
"""

from __future__ import annotations

import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from dataengine.errors import DataEngineError


class WorkerDiedError(DataEngineError):
    """A worker process ended while tasks were still assigned (killed, or crashed in native code)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker (attached as the ``__cause__``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _worker_main(tasks: Connection, tasks_lock: Any, results: Connection, function: Callable[[Any], Any],
                 initializer: Callable[..., None] | None, initargs: tuple, inherited: list[Connection]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker holds copies of the parent's ends (the task pipe's write end above all): closed, so that
    # the parent's death ends the task stream (EOF) instead of leaving the worker waiting forever.
    for connection in inherited:
        connection.close()
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            with tasks_lock:  # one reader at a time on the shared task pipe
                item = tasks.recv()
        except EOFError:  # the parent is gone
            return
        if item is None:
            break
        sequence, task = item
        try:
            message = (sequence, True, function(task))
        except Exception as exc:
            message = (sequence, False, (exc, traceback.format_exc()))
        try:
            try:
                results.send(message)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # the value does not pickle
                results.send((sequence, False, (RuntimeError(f"cannot send the result back: {exc!r}"),
                                                traceback.format_exc())))
        except OSError:  # the parent is gone
            return
    results.close()


class OrderedWorkers:
    """``processes`` worker processes running ``function``; use :meth:`imap`, then close (or ``with``).

    Args:
        context: a :mod:`multiprocessing` context (fork or spawn).
        processes: number of worker processes (>= 1).
        function: called in a worker with one task; must be importable by name under spawn.
        initializer: called once in each worker with ``initargs`` before its first task.
    """

    def __init__(self, context: Any, processes: int, function: Callable[[Any], Any],
                 initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, not {processes}")
        # The shared task pipe: written by the feeder thread only, read by the workers under a lock.
        self._tasks, self._tasks_writer = context.Pipe(duplex=False)
        self._tasks_lock = context.Lock()
        self._readers: dict[Connection, Any] = {}
        fork = context.get_start_method() == "fork"
        for _ in range(processes):
            reader, writer = context.Pipe(duplex=False)
            inherited = [self._tasks_writer, reader, *self._readers] if fork else []
            process = context.Process(target=_worker_main, daemon=True,
                                      args=(self._tasks, self._tasks_lock, writer, function, initializer, initargs,
                                            inherited))
            process.start()
            writer.close()  # the worker holds the only write end: its exit makes the reader see EOF
            self._readers[reader] = process
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        # Started after the workers: forking a process that runs other threads is unsafe.
        self._feeder = threading.Thread(target=self._feed, name="workers-feeder", daemon=True)
        self._feeder.start()
        self._closed = False
        self._outstanding = 0  # tasks submitted whose results were not consumed

    def _feed(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _STOP:
                return
            try:
                self._tasks_writer.send(item)
            except (OSError, ValueError):  # the task pipe is gone (terminated)
                return

    def imap(self, tasks: Iterable[Any], ahead: int) -> Iterator[Any]:
        """Results of ``function(task)`` in the order of ``tasks``.

        Task ``i + ahead`` is submitted only once result ``i`` has been consumed (the generator resumed
        after yielding it): callers may reuse per-task resources in a ring of ``ahead`` slots.

        Raises:
            the exception a task raised in its worker (with the worker's traceback as ``__cause__``);
            WorkerDiedError: a worker ended while results were awaited.
        """
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, not {ahead}")
        source = iter(tasks)
        done: dict[int, tuple[bool, Any]] = {}
        submitted = consumed = 0
        exhausted = False
        while True:
            while not exhausted and submitted - consumed < ahead:
                try:
                    task = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self._outbox.put((submitted, task))
                submitted += 1
                self._outstanding += 1
            if consumed == submitted:
                return
            while consumed not in done:
                self._receive(done)
            ok, value = done.pop(consumed)
            consumed += 1
            self._outstanding -= 1
            if not ok:
                exc, remote = value
                raise exc from RemoteTraceback(remote)
            yield value

    def _receive(self, done: dict[int, tuple[bool, Any]]) -> None:
        """Wait for at least one result and file what arrived; end of file on a result pipe means its worker
        exited (only a worker holds the write end), which it does early only when killed or crashed."""
        for connection in wait(list(self._readers)):
            try:
                sequence, ok, value = connection.recv()
            except (EOFError, OSError):
                process = self._readers[connection]
                process.join()
                raise WorkerDiedError(f"worker process {process.pid} ended with {_describe_exit(process.exitcode)} "
                                      "while tasks were pending") from None
            done[sequence] = (ok, value)

    def close(self) -> None:
        """Stop the workers once idle; terminate them if results are still pending (the caller stopped early)."""
        if self._outstanding:
            self.terminate()
        if self._closed:
            return
        self._closed = True
        self._outbox.put(_STOP)
        self._feeder.join()
        processes = list(self._readers.values())
        try:
            for _ in processes:
                self._tasks_writer.send(None)
        except OSError:
            pass
        for process in processes:
            process.join(timeout=5)
            if process.exitcode is None:
                process.terminate()
                process.join()
        self._release()

    def terminate(self) -> None:
        """Kill the workers now (after an error, or when the caller stops early)."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(_STOP)
        for process in self._readers.values():
            process.terminate()
        for process in self._readers.values():
            process.join()
        self._tasks.close()  # a feeder blocked on the full task pipe now fails (EPIPE) and returns
        self._feeder.join()
        self._release()

    def _release(self) -> None:
        for reader, process in self._readers.items():
            reader.close()
            process.close()
        self._tasks_writer.close()
        if not self._tasks.closed:
            self._tasks.close()

    def __enter__(self) -> "OrderedWorkers":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()


_STOP = object()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


__all__ = ["OrderedWorkers", "RemoteTraceback", "WorkerDiedError"]
