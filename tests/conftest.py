"""Shared fixtures: a real S3 HTTP endpoint (moto server on 127.0.0.1) and small helpers."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import uuid

import pytest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; yields fsspec storage options for s3fs (no region, on purpose)."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    yield options
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; returns its ``s3://`` URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(name)
    return f"s3://{name}"


def _load_faultproxy():
    """tests/faultproxy.py, importable as ``faultproxy`` by every test module (tests are not a package)."""
    spec = importlib.util.spec_from_file_location("faultproxy", os.path.join(os.path.dirname(__file__),
                                                                             "faultproxy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["faultproxy"] = module
    spec.loader.exec_module(module)
    return module


faultproxy = sys.modules.get("faultproxy") or _load_faultproxy()


@pytest.fixture()
def fault_proxy(request):
    """``fault_proxy(upstream=None, seed=0, **plan)``: a started :class:`faultproxy.FaultProxy` (stopped after the
    test) in front of ``upstream`` (host, port), by default the moto S3 server; ``plan`` holds the fields of
    :class:`faultproxy.FaultPlan`. Its ``storage_options`` attribute holds the moto options pointed at it."""
    proxies = []

    def make(upstream=None, seed: int = 0, **plan):
        options = None
        if upstream is None:
            options = request.getfixturevalue("s3_server")
            host, port = options["endpoint_url"].removeprefix("http://").rsplit(":", 1)
            upstream = (host, int(port))
        proxy = faultproxy.FaultProxy(upstream, faultproxy.FaultPlan(**plan), seed=seed).start()
        proxies.append(proxy)
        if options is not None:
            proxy.storage_options = {**options, "endpoint_url": proxy.endpoint_url}
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture()
def shared_data():
    """``shared_data(name)``: path of a file in ../shared/data; skips the test when it is absent."""

    def get(name: str) -> str:
        path = os.path.abspath(os.path.join(SHARED_DATA, name))
        if not os.path.exists(path):
            pytest.skip(f"{name} not found in ../shared/data (real-data test; fresh machines lack it)")
        return path

    return get


@pytest.fixture()
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torch.distributed rendezvous (gloo, 2 local processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def one_torch_thread():
    """torch on one intra-op thread for the test (parallelism is not what it checks), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def metadata_store():
    """``metadata_store(path, table, clusterings={})``: a complete feature store of a metadata table (the columns
    of ``metadata.parquet``; features unused) holding the given clusterings (name -> one id array per level)."""
    import numpy as np

    from dataengine.clustering import ClusteringWriter
    from dataengine.store import StoreLayout, create_store, write_keys_and_metadata

    def make(path: str, table, clusterings: dict | None = None):
        layout = StoreLayout(num_rows=table.num_rows, dim=2, dtype="float16", chunk_rows=table.num_rows)
        store = create_store(path, None, layout, {})
        store.write_attrs("", {"metadata_columns": write_keys_and_metadata(store, table), "state": "complete",
                               "complete": True, "num_invalid": 0})
        for name, levels in (clusterings or {}).items():
            writer = ClusteringWriter(store, name)
            for level, ids in enumerate(levels):
                writer.create_assignments(level, max(1, table.num_rows))
                writer.write_assignments(level, 0, np.asarray(ids))
            writer.finish({"config": {"levels": [int(np.max(ids, initial=0)) + 1 for ids in levels]}})
        return store

    return make
