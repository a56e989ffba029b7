"""Output locks (local flock + record, s3 conditional PUT), stale-lock takeover, private scratch folders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dataengine import fs
from dataengine.errors import OutputLockedError, OutputUnusableError
from dataengine.fs import Location, create_private
from dataengine.locks import Owner, OutputLock, check_output_path, lock_url, locked_output


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _record(path: str, **fields) -> None:
    owner = dict(pid=_dead_pid(), host=socket.gethostname(), process_start=1.0, taken=time.time(), command="x")
    owner.update(fields)
    with open(path, "w") as handle:
        json.dump(owner, handle)


# ------------------------------------------------------------------------------------------ local


def test_a_second_writer_fails_at_once_and_release_leaves_nothing(tmp_path):
    out = str(tmp_path / "a" / "b" / "out")
    with OutputLock(out) as lock:
        assert lock.path == out + ".lock" and os.path.exists(lock.path)
        recorded = Owner.from_bytes(open(lock.path, "rb").read())
        assert (recorded.pid, recorded.host) == (os.getpid(), socket.gethostname())
        start = time.monotonic()
        with pytest.raises(OutputLockedError, match=f"is being written by pid {os.getpid()} on "):
            OutputLock(out).acquire()
        assert time.monotonic() - start < 5
        assert not os.path.exists(out)  # the lock lives beside the output, never inside
    assert os.listdir(tmp_path) == []  # the lock and the folders made for it are gone


def test_a_lock_held_by_another_process_until_it_is_killed(tmp_path):
    out = str(tmp_path / "out")
    script = textwrap.dedent(f"""
        import sys, time
        from dataengine.locks import OutputLock
        OutputLock({out!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} "):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(out + ".lock")  # a SIGKILLed owner leaves its record: stale now
    with OutputLock(out) as lock:  # taken over: the kernel dropped the dead owner's flock
        assert Owner.from_bytes(open(lock.path, "rb").read()).pid == os.getpid()


def test_a_forked_worker_that_outlives_its_killed_owner_does_not_keep_the_lock(tmp_path):
    """flock belongs to the open file, which a fork shares: a worker process must not hold the output locked
    after its parent was killed."""
    out = str(tmp_path / "out")
    script = textwrap.dedent(f"""
        import os, time
        from dataengine.locks import OutputLock
        OutputLock({out!r}).acquire()
        started, ready = os.pipe()
        if os.fork() == 0:  # a worker, still running when its parent is killed
            os.write(ready, b"1")  # past fork(): its at-fork handlers have run
            time.sleep(60)
            os._exit(0)
        os.read(started, 1)  # on a loaded machine the child may not have run yet when the parent is killed
        print("locked", flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with OutputLock(out) as lock:  # the worker lives on, yet the lock is free
            assert Owner.from_bytes(open(lock.path, "rb").read()).pid == os.getpid()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)


def test_a_stale_record_is_taken_over_and_another_hosts_is_not(tmp_path):
    out = str(tmp_path / "out")
    _record(out + ".lock")  # same host, dead pid
    with OutputLock(out):
        pass
    _record(out + ".lock", pid=os.getpid(), process_start=0.5)  # our pid, but another process (start time)
    with OutputLock(out):
        pass
    _record(out + ".lock", host="elsewhere.example")
    with pytest.raises(OutputLockedError, match=f"on elsewhere.example .*if that run is gone, delete {out}.lock"):
        OutputLock(out).acquire()


def test_a_symlink_planted_at_the_lock_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "out.lock")
    with pytest.raises(OutputUnusableError, match="cannot create its lock"):
        OutputLock(str(tmp_path / "out")).acquire()
    assert victim.read_text() == "precious"


def test_output_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputUnusableError, match="is a file, not a folder"):
        check_output_path(str(tmp_path / "file"))
    with pytest.raises(OutputUnusableError, match=f"lies under {tmp_path / 'file'}, which is a file"):
        check_output_path(str(tmp_path / "file" / "a" / "b"))
    check_output_path(str(tmp_path / "new" / "deeper"))
    check_output_path("s3://bucket/prefix")


def test_a_file_output_is_locked_beside_the_file(tmp_path):
    """An output that is one file (an export) may exist as a file; a folder at its path, or a file in its
    way, is refused; a second writer of the file fails at once."""
    out = tmp_path / "x.parquet"
    out.write_bytes(b"old export")
    with OutputLock(str(out), file=True):
        assert os.path.exists(str(out) + ".lock")
        with pytest.raises(OutputLockedError):
            OutputLock(str(out), file=True).acquire()
    assert not os.path.exists(str(out) + ".lock")
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(OutputUnusableError, match="is a folder, not a file"):
        OutputLock(str(tmp_path / "folder.parquet"), file=True).acquire()
    with pytest.raises(OutputUnusableError, match="which is a file"):
        OutputLock(str(out / "y.parquet"), file=True).acquire()


def test_lock_names():
    assert lock_url("s3://bucket/a/out/") == "s3://bucket/a/out.lock"
    assert lock_url("s3://bucket") == "s3://bucket/lock"
    assert lock_url("/data/out", "node-003") == "/data/out.node-003.lock"


def test_ranks_agree_on_whether_rank_zero_got_the_lock(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out):
        told = []
        with pytest.raises(OutputLockedError, match="rank 0 could not take"):
            with locked_output(out, rank=1, all_true=lambda ok: told.append(ok) or False):
                pass
        assert told == [True]  # rank 1 had nothing to report; rank 0 said it failed
        with pytest.raises(OutputLockedError, match="being written by"):
            with locked_output(out, rank=0, all_true=lambda ok: ok):
                pass


# ------------------------------------------------------------------------------------------ s3


def test_s3_lock_is_a_conditional_put(s3_server, s3_bucket):
    import s3fs

    s3 = s3fs.S3FileSystem(**s3_server)
    out = f"{s3_bucket}/runs/out"
    with OutputLock(out, s3_server) as lock:
        assert lock.path == f"{out}.lock"
        assert Owner.from_bytes(s3.cat_file(f"{out}.lock")).pid == os.getpid()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} "):
            OutputLock(out, s3_server).acquire()
    assert not s3.exists(f"{out}.lock")
    stale = Owner(pid=_dead_pid(), host=socket.gethostname(), process_start=1.0, taken=0.0, command="x")
    s3.pipe_file(f"{out}.lock", stale.to_bytes())
    with OutputLock(out, s3_server):
        assert Owner.from_bytes(s3.cat_file(f"{out}.lock")).pid == os.getpid()
    far = Owner(pid=1, host="elsewhere.example", process_start=1.0, taken=0.0, command="x")
    s3.pipe_file(f"{out}.lock", far.to_bytes())
    with pytest.raises(OutputLockedError, match="elsewhere.example.*delete"):
        OutputLock(out, s3_server).acquire()


def test_s3_lock_left_by_an_earlier_failed_run_of_this_process_is_taken_over(s3_server, s3_bucket):
    """A run that failed while the store was unreachable could not delete its lock object; a re-run in the
    same process (a notebook, a test, a library caller) takes it over, while a lock this process still holds
    stays held."""
    import s3fs

    s3 = s3fs.S3FileSystem(**s3_server)
    out = f"{s3_bucket}/left"
    left = Owner.of_this_process()  # what an earlier run of this process wrote and could not delete
    s3.pipe_file(f"{out}.lock", left.to_bytes())
    with OutputLock(out, s3_server) as lock:
        assert Owner.from_bytes(s3.cat_file(f"{out}.lock")).token == lock.owner.token != left.token
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} "):
            OutputLock(out, s3_server).acquire()
    assert not s3.exists(f"{out}.lock")


def test_s3_takeover_of_a_stale_lock_is_won_by_one(s3_server, s3_bucket, monkeypatch):
    """The stale record is replaced only if it is still the one read (If-Match): a run that read it but
    was overtaken fails."""
    import s3fs

    s3 = s3fs.S3FileSystem(**s3_server)
    out = f"{s3_bucket}/out"
    stale = Owner(pid=_dead_pid(), host=socket.gethostname(), process_start=1.0, taken=0.0, command="x")
    s3.pipe_file(f"{out}.lock", stale.to_bytes())
    real_from_bytes = Owner.from_bytes

    def read_then_overtaken(data):
        # Another run takes the stale lock over right after we read it (and before we replace it).
        s3.pipe_file(f"{out}.lock", Owner.of_this_process().to_bytes())
        return real_from_bytes(data)

    monkeypatch.setattr(Owner, "from_bytes", staticmethod(read_then_overtaken))
    with pytest.raises(OutputLockedError):
        OutputLock(out, s3_server).acquire()


# ------------------------------------------------------------------------------------------ scratch


def test_scratch_is_private_unique_and_removed_with_the_lock(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out):
        scratch = Location(out).scratch_dir()
        assert Location(out + "/").scratch_dir() == scratch  # one per output and process
        assert os.path.dirname(scratch) == os.path.join(out, ".tmp")
        assert os.stat(scratch).st_mode & 0o777 == 0o700
        assert os.path.basename(scratch).startswith(f"dataengine-{socket.gethostname()}-{os.getpid()}-")
    assert not os.path.exists(scratch) and not os.path.exists(os.path.join(out, ".tmp"))


def test_scratch_of_dead_runs_is_removed_when_the_lock_is_taken(tmp_path):
    out = tmp_path / "out"
    dead = out / ".tmp" / f"dataengine-{socket.gethostname()}-{_dead_pid()}-abc"
    alive = out / ".tmp" / f"dataengine-{socket.gethostname()}-{os.getppid()}-abc"
    other_host = out / ".tmp" / f"dataengine-elsewhere-{_dead_pid()}-abc"
    for folder in (dead, alive, other_host):
        folder.mkdir(parents=True)
        (folder / "shard-000000.tar.partial").write_bytes(b"x")
    with OutputLock(str(out)):
        assert not dead.exists() and alive.exists() and other_host.exists()


def test_create_private_refuses_existing_names_and_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("link", "dangling", "victim"):
        with pytest.raises(FileExistsError):
            create_private(str(tmp_path / name))
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()
    with create_private(str(tmp_path / "new")) as handle:
        handle.write(b"ok")
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o600


def test_remote_scratch_is_a_private_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    scratch = fs.scratch_for("s3://bucket/out")
    try:
        assert os.path.dirname(scratch) == str(tmp_path)
        assert os.stat(scratch).st_mode & 0o777 == 0o700
        assert scratch != fs.scratch_for("s3://bucket/other")
    finally:
        fs.remove_scratch("s3://bucket/out")
        fs.remove_scratch("s3://bucket/other")
    assert os.listdir(tmp_path) == []
