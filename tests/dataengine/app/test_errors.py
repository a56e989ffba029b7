"""Anticipated failures print one line saying what and where, exit 2 (usage) or 1 (runtime), and create
nothing; ``-v`` adds the traceback."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest



def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``dataengine --quiet ARGS`` in this process (a fresh interpreter costs seconds of torch imports)."""
    from typer.testing import CliRunner

    from dataengine.app import app

    result = CliRunner().invoke(app, ["--quiet", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def cli_process(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """Run ``dataengine --quiet ARGS`` in a fresh interpreter (after ``code``, run first in it, when given)."""
    prelude = [] if code is None else ["-c", textwrap.dedent(code) + "\nfrom dataengine.app import main\n"
                                       "sys.argv = ['dataengine', *sys.argv[1:]]\nmain()\n"]
    command = [sys.executable, *(prelude or ["-m", "dataengine"]), "--quiet", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def one_line(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The single ``error:`` line of a failed command, checked for its exit status and fragments."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (done.returncode, done.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _writing(p: dict, out: str) -> dict[str, list[str]]:
    """Every command that writes a folder, writing ``out``."""
    return {
        "ingest": ["ingest", "--yfcc", p["yfcc"], "--images", p["images"], "--out", out, "--workers", "0"],
        "embed": ["embed", p["ingest"], "--out", out, "--model", "small", "--image-size", "32", "--workers", "0"],
        "report": ["report", p["store"], "--clustering", "c", "--out", out, "--no-thumbnails"],
        "train": ["train", p["ingest"], "--out", out, "--arch", "small", "--image-size", "32", "--epochs", "1",
                  "--levels", "2,3", "--pca", "8", "--workers", "0"],
        "synth": ["synth", out, "--num-images", "50"],
        "cluster": ["cluster", out, "--clustering", "x"],
    }


# ------------------------------------------------------------------------------------------ output paths

COMMANDS = ["ingest", "embed", "report", "train", "synth", "cluster"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_is_a_file(pipeline, tmp_path, command):
    target = tmp_path / "file"
    target.write_text("keep me")
    one_line(cli(*_writing(pipeline, str(target))[command]), 2, str(target.name), "is a file")
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_lies_under_a_file(pipeline, tmp_path, command):
    (tmp_path / "file").write_text("keep me")
    one_line(cli(*_writing(pipeline, str(tmp_path / "file" / "sub"))[command]), 2, f"{tmp_path / 'file'}",
             "which is a file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder nobody may create entries in: chmod for a user, the immutable attribute for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["ingest", "report", "train"])
def test_out_is_not_writable(pipeline, read_only_folder, command):
    one_line(cli(*_writing(pipeline, str(read_only_folder / "out"))[command]), 2, f"{read_only_folder}",
             "is not writable")
    assert os.listdir(read_only_folder) == []


# ------------------------------------------------------------------------------------------ inputs


def test_yfcc_is_a_folder(pipeline, tmp_path):
    out = tmp_path / "out"
    one_line(cli("ingest", "--yfcc", pipeline["images"], "--images", pipeline["images"], "--out", str(out)), 2,
             pipeline["images"], "is a folder")
    assert not out.exists()


def test_truncated_gz_metadata(pipeline, tmp_path):
    data = gzip.compress(open(pipeline["yfcc"], "rb").read())
    cut = tmp_path / "metadata.tsv.gz"
    cut.write_bytes(data[: len(data) // 2])
    done = cli("ingest", "--yfcc", str(cut), "--images", pipeline["images"], "--out", str(tmp_path / "out"),
               "--workers", "0")
    assert "Aborted" not in done.stderr
    one_line(done, 2, str(cut), "truncated or corrupt")


@pytest.mark.parametrize("command", ["embed", "train"])
def test_a_missing_ingest_output_creates_nothing(pipeline, tmp_path, command):
    args = _writing(pipeline, str(tmp_path / "out"))[command]
    args[args.index(pipeline["ingest"])] = str(tmp_path / "nope")
    one_line(cli(*args), 2, "nope")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ object storage


def test_unknown_storage_option(pipeline, tmp_path):
    options = json.dumps({"endpoint_url": "http://127.0.0.1:9", "bogus": 1})
    one_line(cli("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out", "s3://b/x",
                 "--storage-options", options), 2, "'bogus'", "s3://b/x")
    one_line(cli("embed", pipeline["ingest"], "--out", "s3://b/store", "--model", "small", "--storage-options",
                 options), 2, "'bogus'", "s3://b/store")


def test_unreachable_endpoint(pipeline):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the command runs: nothing listens there
    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
                          "config_kwargs": {"retries": {"max_attempts": 2}}})
    one_line(cli("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out", "s3://b/x",
                 "--storage-options", options), 1, "cannot reach the storage endpoint", f"127.0.0.1:{port}")


def test_missing_credentials(pipeline, s3_server, s3_bucket):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    options = json.dumps({"endpoint_url": s3_server["endpoint_url"]})
    one_line(cli_process("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out",
                         f"{s3_bucket}/x", "--storage-options", options, env=env),
             2, "credentials", "AWS_ACCESS_KEY_ID")


# ------------------------------------------------------------------------------------------ runtime failures


def test_disk_full(pipeline, tmp_path):
    out = tmp_path / "out"
    full = """
        import errno, sys
        from dataengine.fs import Location
        def publish(self, local_file, rel):
            raise OSError(errno.ENOSPC, "No space left on device", local_file)
        Location.publish = publish
    """
    done = cli_process("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out", str(out),
                       "--workers", "0", code=full)
    one_line(done, 1, "no space left on the device writing", "shard-000000.tar.partial")
    assert not os.path.exists(f"{out}.lock")  # the lock is given back on the way out
    rerun = cli("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out", str(out),
                "--workers", "0")
    assert rerun.returncode == 0, rerun.stderr  # and the output is not poisoned


def test_verbose_shows_the_traceback_above_the_line(pipeline, tmp_path):
    done = cli_process("-v", "ingest", "--yfcc", pipeline["images"], "--images", pipeline["images"], "--out",
               str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr and "InputUnusableError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_an_unexpected_exception_is_one_line_too(pipeline, tmp_path):
    broken = """
        import sys
        import dataengine.ingest.run as run
        def boom(*args, **kwargs):
            raise RuntimeError("something nobody anticipated")
        run.check_inputs = boom
    """
    done = cli_process("ingest", "--yfcc", pipeline["yfcc"], "--images", pipeline["images"], "--out",
                       str(tmp_path / "o"), code=broken)
    one_line(done, 1, "unexpected RuntimeError: something nobody anticipated", "-v")


def test_usage_errors_keep_status_2(pipeline):
    done = cli_process("ingest", "--no-such-option")
    assert done.returncode == 2 and "No such option" in done.stderr
