"""``ingest --distributor ray`` on a local Ray cluster of 2 CPUs (``ray.init(num_cpus=2)``): the output is
byte-identical to the multiprocessing run, and a task whose worker process is killed mid-task is re-run.

Ray is an optional extra (``pip install 'dataengine[ray]'``): without it these tests skip, and CI, which
installs ``.[dev]``, does not run them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from dataengine.ingest import IngestConfig, run_ingest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

NUM_ROWS = 24


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _files(out) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file()}


def _url_list(tmp_path, server, slow: int | None = None) -> str:
    server.handler.images = {f"{i}.jpg": server.jpeg(i % 20, (40 + i, 30)) for i in range(NUM_ROWS)}
    urls = [f"{server}/ok/{i}.jpg" for i in range(NUM_ROWS)]
    urls[5] = f"{server}/status/404"
    if slow is not None:
        urls[slow] = f"{server}/trickle/{slow}.jpg"  # 10 s of body, cut off at the 2 s deadline
    path = tmp_path / "urls.jsonl"
    path.write_text("".join(json.dumps({"url": url, "text": f"photo {i}"}) + "\n" for i, url in enumerate(urls)))
    return str(path)


def _config(url_list: str, out, distributor: str) -> IngestConfig:
    return IngestConfig(url_list=url_list, out=str(out), distributor=distributor, caption_col="text", workers=2,
                        shard_size=5, block_rows=3, image_size=32, download_timeout=2.0, download_retries=0)


@pytest.mark.timeout(300)
def test_ray_output_is_byte_identical_to_multiprocessing(tmp_path, server, ray_cluster):
    url_list = _url_list(tmp_path, server)
    plain = run_ingest(_config(url_list, tmp_path / "plain", "multiprocessing"))
    on_ray = run_ingest(_config(url_list, tmp_path / "ray", "ray"))
    assert plain.counts == on_ray.counts and on_ray.counts["ok"] == NUM_ROWS - 1
    assert _files(tmp_path / "ray") == _files(tmp_path / "plain")
    assert len([name for name in _files(tmp_path / "ray") if name.startswith("shards/")]) == 5


def _ray_task_pids() -> list[int]:
    """Ray worker processes running an ingest block (Ray titles them ``ray::<function>``)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::_remote_block"):
            found.append(process.info["pid"])
    return found


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_task_is_retried(tmp_path, server, ray_cluster):
    """The worker fetching the slow URL is SIGKILLed while in the task; Ray re-runs the block elsewhere and the
    output is still byte-identical to the multiprocessing run."""
    url_list = _url_list(tmp_path, server, slow=13)
    run_ingest(_config(url_list, tmp_path / "plain", "multiprocessing"))
    server.handler.attempts.clear()
    killed: list[int] = []

    def kill_the_slow_task() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if server.handler.attempts.get("/trickle/13.jpg"):  # the block with row 13 is being fetched
                for pid in _ray_task_pids():
                    os.kill(pid, signal.SIGKILL)  # every running task: the slow one among them
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_slow_task, daemon=True)
    killer.start()
    result = run_ingest(_config(url_list, tmp_path / "ray", "ray"))
    killer.join()
    assert killed, "no Ray task was seen running"
    assert server.handler.attempts["/trickle/13.jpg"] == 2  # the killed block was fetched again
    assert result.counts["download_failed"] == 2 and result.counts["ok"] == NUM_ROWS - 2
    assert _files(tmp_path / "ray") == _files(tmp_path / "plain")
