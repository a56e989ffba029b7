"""Every stage that needs no pixels at a given row count: time and peak memory per stage (BENCHMARKS "Scale").

    python tools/bench_scale.py --rows 1000000 [--work DIR] [--results FILE] [--keep] [--json]

Parts, each run in its own child process (its peak RSS is that process's, its workers included):

1. ``metadata``: synthetic YFCC lines (the synth corpus's distributions, no images) to a gzip file, then
   ``ingest --metadata-only`` (parse, validate, ledger + metadata.parquet); the merge's share of the time.
2. ``store``: a feature store of N x 64 float16 written block by block through the store API as embed writes
   it (a planted mixture: a row's component follows its user), with the metadata arrays streamed in from
   metadata.parquet.
3. ``cluster``: hierarchical k-means 4 x 1,000 out of core (``dataengine cluster``'s library call, no PCA
   reduction, whitened); every valid row assigned (no -1); its objective against a flat k-means of 4,000 on a
   sample (``--flat-sample`` rows), both measured on that sample.
4. ``report``: NMI of the leaf clustering vs every metadata kind in one streaming pass; the number of
   non-empty (cluster, label) pairs per kind.
5. ``index``: the neighbour index under ``--index-memory-gb`` (IVF-PQ when the flat one does not fit), and
   recall@10 of 10,000 queries against exact search, both on a subsample of at most 1M rows.
6. ``trainer``: the trainer's bookkeeping driven by row ids only: labels joined from the clustering,
   the cluster-balanced stream of one epoch through a DataLoader with 2 workers, the stream positions
   checkpointed; the memory each worker holds of its own (USS) against the per-row arrays' size.
   ``--trainer-rows`` cuts the epoch short and scales its time to the whole epoch.

``--metadata tiled`` makes part 1 write the same metadata.parquet without ingesting every line (a 10,000-line
template ingested, its rows repeated with new photo ids and users): minutes instead of hours at 96M rows, for
the later parts; part 1's own figures need the default ``--metadata ingest``.

Resumable: a finished part leaves ``WORK/part-NAME.json`` and is skipped on re-run. Once every part is done
the results go to ``--results`` and ``WORK`` is removed (unless ``--keep``). Runs under ``nice -n 19`` with
2 threads at most (BLAS, torch, faiss; ingest parses in 2 worker processes beside its writer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

THREADS = 2
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = str(THREADS)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a shared machine, spinning OpenMP threads stall faiss

PARTS = ("metadata", "store", "cluster", "cluster2", "report", "index", "trainer")
DIM = 64
LEVELS = (4, 1000)
CLUSTERING = "scale"


def _usage() -> dict:
    """CPU seconds and peak RSS of this process and of its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            "peak_rss_mb": own.ru_maxrss / 1024, "children_peak_rss_mb": children.ru_maxrss / 1024}


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as handle:
        return json.load(handle)


def _write_json(path: str, value) -> None:
    with open(path + ".partial", "w") as handle:
        json.dump(value, handle)
    os.replace(path + ".partial", path)


def _bytes_under(*paths: str) -> int:
    total = 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
        for folder, _, names in os.walk(path):
            total += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return total


# ----------------------------------------------------------------------------------------------- the parts


def _write_metadata_lines(path: str, rows: int, seed: int, video_rate: float = 0.0) -> None:
    """``rows`` synthetic YFCC lines, gzip: one synth corpus plan of up to 10,000 photos (its distributions of
    users, tags, GPS and devices), repeated with new photo ids and line numbers, and users renamed per copy so
    that the user vocabulary grows with the rows as in the synth corpus (a user per 20 photos)."""
    import gzip

    import numpy as np

    from dataengine.synth.config import SynthConfig
    from dataengine.synth.metadata import metadata_line
    from dataengine.synth.plan import build_plan

    piece = min(rows, TEMPLATE_LINES)
    plan = build_plan(SynthConfig(num_images=piece, seed=seed, video_rate=video_rate))
    rng = np.random.default_rng(seed)
    template = [metadata_line(rng, plan, row).split("\t") for row in range(piece)]
    with gzip.open(path + ".partial", "wt", compresslevel=1, encoding="utf-8") as out:
        for row in range(rows):
            fields = list(template[row % piece])
            copy = row // piece
            fields[0], fields[1] = str(row), str(FIRST_PHOTO_ID + 3 * row)
            if copy:
                fields[3] = f"{fields[3]}-{copy}"
            out.write("\t".join(fields) + "\n")
    os.replace(path + ".partial", path)


TEMPLATE_LINES = 10_000
FIRST_PHOTO_ID = 1_000_000_007  # a line's photo id: FIRST_PHOTO_ID + 3 * line


def part_metadata(args: argparse.Namespace, work: str) -> dict:
    if args.metadata == "tiled":
        return _tiled_metadata(args, work)
    from dataengine.ingest import IngestConfig, merging, run, run_ingest

    lines = os.path.join(work, "yfcc.tsv.gz")
    started = time.perf_counter()
    if not os.path.exists(lines):
        _write_metadata_lines(lines, args.rows, args.seed, args.video_rate)
    generated = time.perf_counter() - started
    merge_seconds = []
    merge = merging.merge

    def timed_merge(*a, **k):
        begin = time.perf_counter()
        try:
            return merge(*a, **k)
        finally:
            merge_seconds.append(time.perf_counter() - begin)

    run.merge = timed_merge
    # At 99M lines the ingest outlasts a working session: a killed run is resumed by the next one (ingest resumes
    # after its last done part). Each attempt records its time as it goes, so the result adds them all up (an
    # attempt's last ~30 s, and the part it was writing when killed, are counted twice: < 0.1% at 99M lines).
    attempts_path = os.path.join(work, "metadata-attempts.json")
    attempts = _read_json(attempts_path, [])
    start = time.perf_counter()
    last_write = [start]

    def record(rows: int = 0) -> None:
        now = time.perf_counter()
        if rows and now - last_write[0] < 30:
            return
        last_write[0] = now
        _write_json(attempts_path, [*attempts, {"seconds": now - start, **_usage()}])

    record()
    result = run_ingest(IngestConfig(yfcc=lines, metadata_only=True, out=os.path.join(work, "ingest"),
                                     shard_size=args.part_rows, workers=THREADS), progress=record)
    seconds = time.perf_counter() - start + sum(a["seconds"] for a in attempts)
    rows = sum(result.counts.values())
    return {"seconds": seconds, "generate_seconds": generated, "rows": rows, "counts": result.counts,
            "rows_per_s": rows / seconds, "merge_seconds": sum(merge_seconds),
            "merge_share": sum(merge_seconds) / seconds, "gzip_bytes": os.path.getsize(lines),
            "output_bytes": _bytes_under(os.path.join(work, "ingest")), "earlier_attempts": attempts}


def _tiled_metadata(args: argparse.Namespace, work: str) -> dict:
    """``metadata.parquet`` of the lines ``_write_metadata_lines`` makes, without ingesting them: the template's
    lines are ingested, then their rows repeated with each copy's photo ids (the key too) and users, exactly
    as ingesting every line would write them (tests check it). For the later parts at a row count whose
    ingest would not fit the time at hand; the ingest's own figures need ``--metadata ingest``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dataengine.ingest import IngestConfig, run_ingest

    start = time.perf_counter()
    piece = min(args.rows, TEMPLATE_LINES)
    lines = os.path.join(work, "template.tsv.gz")
    if not os.path.exists(lines):
        _write_metadata_lines(lines, piece, args.seed, args.video_rate)
    template_out = os.path.join(work, "template-ingest")
    run_ingest(IngestConfig(yfcc=lines, metadata_only=True, out=template_out, shard_size=args.part_rows,
                            workers=0))
    template = pq.read_table(os.path.join(template_out, "metadata.parquet"))
    line = (template["photo_id"].to_numpy() - FIRST_PHOTO_ID) // 3
    columns = template.column_names
    target = os.path.join(work, "ingest", "metadata.parquet")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    copies_per_group = max(1, 1_000_000 // piece)
    rows = 0
    with pq.ParquetWriter(target + ".partial", template.schema, compression="zstd") as writer:  # as ingest
        pending = []
        for copy in range(-(-args.rows // piece)):
            keep = line < args.rows - copy * piece
            part = template if keep.all() else template.filter(pa.array(keep))
            photo_id = pa.array(FIRST_PHOTO_ID + 3 * (copy * piece + line[keep]))
            user = part["user"] if not copy else pc.binary_join_element_wise(part["user"], f"-{copy}", "")
            replaced = {"key": pc.cast(photo_id, pa.string()), "photo_id": photo_id, "user": user}
            pending.append(pa.table([replaced.get(name, part[name]) for name in columns], schema=template.schema))
            rows += len(part)
            if len(pending) == copies_per_group:
                writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
    os.replace(target + ".partial", target)
    return {"mode": "tiled", "seconds": time.perf_counter() - start, "rows": rows, "lines": args.rows,
            "template_rows": template.num_rows, "output_bytes": os.path.getsize(target)}


def part_store(args: argparse.Namespace, work: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from dataengine.store import METADATA_COLUMNS, StoreLayout, create_store, metadata_batches, open_store
    from dataengine.store import write_metadata_batches

    source = os.path.join(work, "ingest", "metadata.parquet")
    url = os.path.join(work, "store.zarr")
    num_rows = pq.ParquetFile(source).metadata.num_rows
    start = time.perf_counter()
    layout = StoreLayout(num_rows=num_rows, dim=DIM, dtype="float16", chunk_rows=args.chunk_rows)
    store = create_store(url, None, layout, {"num_rows": num_rows, "dim": DIM, "dtype": "float16",
                                             "chunk_rows": layout.chunk_rows, "num_blocks": layout.num_blocks,
                                             "rows_per_block": layout.rows_per_block})

    def batches():
        parquet = pq.ParquetFile(source)
        names = [n for n in ("key", *METADATA_COLUMNS) if n in parquet.schema_arrow.names]
        return metadata_batches(parquet, names)

    columns = write_metadata_batches(store, batches, num_rows)
    metadata_seconds = time.perf_counter() - start
    users = store.group["metadata/user/codes"]
    centers = np.random.default_rng(args.seed).normal(size=(4 * LEVELS[0] * LEVELS[1], DIM)).astype(np.float32)
    for block in range(layout.num_blocks):
        lo, hi = layout.block_rows(block)
        component = np.asarray(users[lo:hi]).astype(np.int64) % len(centers)
        rng = np.random.default_rng([args.seed, block])
        features = centers[component] + 0.5 * rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        store.write_block(block, lo, features.astype(np.float16), np.ones(hi - lo, bool),
                          {"rows": hi - lo, "invalid": []})
    store.write_attrs("", {"metadata_columns": columns, "num_invalid": 0, "failures": [], "state": "complete",
                           "complete": True})
    seconds = time.perf_counter() - start
    assert open_store(url).num_rows == num_rows
    return {"seconds": seconds, "metadata_seconds": metadata_seconds, "rows": num_rows, "columns": columns,
            "output_bytes": _bytes_under(url)}


def part_cluster(args: argparse.Namespace, work: str) -> dict:
    import numpy as np

    from dataengine.cluster import ClusterConfig, run_cluster
    from dataengine.clustering import open_clustering
    from dataengine.store import open_store
    from indexes.data import ArrayDataset
    from indexes.kmeans import KMeansConfig, fit_kmeans

    url = os.path.join(work, "store.zarr")
    before = _bytes_under(url)
    start = time.perf_counter()
    result = run_cluster(ClusterConfig(store=url, name=CLUSTERING, levels=LEVELS, pca_dim=None, seed=args.seed,
                                       neighbor_index=False, num_threads=THREADS, overwrite=True))
    seconds = time.perf_counter() - start
    store = open_store(url)
    clustering = open_clustering(store, CLUSTERING)
    leaf = clustering.assignments(len(LEVELS) - 1)
    unassigned = int(np.count_nonzero(leaf[store.valid] < 0))
    clustered = _usage()  # the hierarchical k-means alone, before the flat one below
    # Flat k-means of as many clusters on a seeded sample, both objectives per row on that sample.
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(store.num_rows, min(args.flat_sample, store.num_rows), replace=False))
    rows = clustering.pca().apply(np.asarray(store.features.get_orthogonal_selection((sample, slice(None))),
                                             dtype=np.float32))
    flat_start = time.perf_counter()
    flat = fit_kmeans(ArrayDataset(rows), KMeansConfig(num_clusters=int(np.prod(LEVELS)), seed=args.seed,
                                                    num_threads=THREADS))
    flat_seconds = time.perf_counter() - flat_start
    centroids = clustering.centroids(len(LEVELS) - 1)
    hierarchical = float(np.mean(np.sum((rows - centroids[leaf[sample]]) ** 2, axis=1)))
    return {"seconds": seconds, "rows": store.num_rows, "num_clusters": result.num_clusters,
            "objective_per_row": result.objective[-1] / store.num_rows, "unassigned_rows": unassigned,
            "flat_sample_rows": len(sample), "flat_seconds": flat_seconds,
            "sample_objective_hierarchical": hierarchical, "sample_objective_flat": flat.objective / len(sample),
            "objective_ratio": hierarchical / (flat.objective / len(sample)),
            "hierarchical_cpu_s": clustered["cpu_s"], "hierarchical_peak_rss_mb": clustered["peak_rss_mb"],
            "output_bytes": _bytes_under(url) - before}


def part_cluster2(args: argparse.Namespace, work: str) -> dict:
    """The same clustering by `dataengine cluster` under torchrun, 2 gloo ranks of one thread each: every row
    assigned, and its objective beside the single process's (correctness at scale; 2 cores make it no faster)."""
    import numpy as np

    from dataengine.clustering import open_clustering
    from dataengine.store import open_store

    url = os.path.join(work, "store.zarr")
    name = f"{CLUSTERING}-2ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "dataengine", "--quiet", "cluster", url, "--clustering", name, "--levels", ",".join(map(str, LEVELS)),
               "--pca", "0", "--seed", str(args.seed), "--no-neighbor-index", "--threads", "1", "--overwrite",
               "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - start
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    store = open_store(url)
    leaf = open_clustering(store, name).assignments(len(LEVELS) - 1)
    with open(os.path.join(work, "part-cluster.json")) as handle:
        single = json.load(handle)
    objective = summaries[0]["objective"][-1] / store.num_rows
    return {"seconds": seconds, "rows": store.num_rows, "world_size": summaries[0].get("world_size", 2),
            "summaries": len(summaries), "unassigned_rows": int(np.count_nonzero(leaf[store.valid] < 0)),
            "objective_per_row": objective, "single_process_objective_per_row": single["objective_per_row"],
            "objective_vs_single_process": objective / single["objective_per_row"]}


def part_report(args: argparse.Namespace, work: str) -> dict:
    from dataengine.clustering import open_clustering
    from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks
    from dataengine.store import open_store

    store = open_store(os.path.join(work, "store.zarr"))
    start = time.perf_counter()
    clustering = open_clustering(store, CLUSTERING)
    labels = StoreLabels(store)
    blocks = row_blocks(store.num_rows, args.chunk_rows * 8)
    evaluator = evaluate_store(labels, {"leaf": clustering.assignment_array(len(LEVELS) - 1)}, blocks)
    nmi = evaluator.nmi()["leaf"]
    seconds = time.perf_counter() - start
    pairs = {kind: int(len(evaluator._tables[("leaf", kind)].table()[0])) for kind in labels.kinds}
    return {"seconds": seconds, "rows": store.num_rows, "kinds": labels.kinds,
            "nmi": {kind: round(result.nmi, 4) for kind, result in nmi.items()}, "nonempty_pairs": pairs,
            "nonempty_pairs_total": sum(pairs.values())}


def part_index(args: argparse.Namespace, work: str) -> dict:
    import faiss
    import numpy as np

    from dataengine.clustering import open_clustering
    from dataengine.store import open_store
    from indexes.data import ArrayDataset
    from indexes.faiss_index import NeighborIndexConfig, build_neighbor_index, serialized_size

    faiss.omp_set_num_threads(THREADS)
    store = open_store(os.path.join(work, "store.zarr"))
    pca = open_clustering(store, CLUSTERING).pca()
    config = NeighborIndexConfig(memory_budget_bytes=int(args.index_memory_gb * (1 << 30)), kind=args.index_kind,
                                 pq_bytes=args.pq_bytes if args.index_kind == "ivf_pq" else None, seed=args.seed)
    start = time.perf_counter()
    whitened = ArrayDataset(store.features, block_rows=store.features.chunks[0], transform=pca.apply,
                            transform_dim=pca.output_dim)
    # WORK/index-progress.json: how far the build got, should the part not finish (96M rows: about 2 hours).
    progress_path = os.path.join(work, "index-progress.json")
    added = [0, 0.0]  # rows added to the lists, and when the adding began (the training and assignment done)

    def heartbeat(rows: int = 0, stage: str = "adding") -> None:
        now = time.perf_counter()
        if not added[1]:
            added[1] = now
        added[0] += rows
        if stage != "adding" or added[0] % (1 << 22) < rows:
            _write_json(progress_path, {"stage": stage, "seconds": now - start, "rows_added": added[0],
                                        "trained_and_assigned_seconds": added[1] - start, **_usage()})

    index, plan = build_neighbor_index(whitened, config, progress=heartbeat)
    seconds = time.perf_counter() - start
    heartbeat(stage="built")
    index_bytes = serialized_size(index)  # faiss.serialize_index would hold a copy of it
    # Recall of the index built: --full-recall-queries of its rows as queries, exact search over every row
    # (block by block).
    rng = np.random.default_rng(args.seed)
    begin = time.perf_counter()
    wanted = min(args.full_recall_queries, store.num_rows)
    queries = whitened.take(np.sort(rng.choice(store.num_rows, wanted, replace=False)))
    full_recall = _recall_at_10(index.search(queries, 10)[1], _exact_top10(whitened, queries))
    full_recall_seconds = time.perf_counter() - begin
    # Recall on a subsample: the same kind of index over it (the index itself when it is every row), 10,000 of
    # its rows as queries, exact search over it.
    subsample = np.sort(rng.choice(store.num_rows, min(1_000_000, store.num_rows), replace=False))
    rows = pca.apply(np.asarray(store.features.get_orthogonal_selection((subsample, slice(None))), np.float32))
    small, small_plan = index, plan
    if len(subsample) < store.num_rows:
        del index
        small, small_plan = build_neighbor_index(ArrayDataset(rows), dataclasses.replace(config, kind=plan.kind))
    queries = rows[rng.choice(len(rows), min(10_000, len(rows)), replace=False)]
    found = small.search(queries, 10)[1]
    recall = _recall_at_10(found, _exact_top10(ArrayDataset(rows), queries))
    return {"seconds": seconds, "rows": store.num_rows, "plan": plan.to_dict(), "index_bytes": index_bytes,
            "trained_and_assigned_seconds": added[1] - start,
            "recall_at_10_full": full_recall, "recall_full_seconds": full_recall_seconds,
            "recall_full_queries": wanted,
            "recall_subsample_rows": len(rows), "recall_plan": small_plan.to_dict(), "recall_at_10": recall,
            "num_probes": config.num_probes}


def _exact_top10(data, queries):
    """Ids of each query's 10 nearest rows of ``data`` by brute force, one block of rows at a time."""
    import faiss
    import numpy as np

    from indexes.threads import faiss_threads

    best_d = np.full((len(queries), 10), np.inf, np.float32)
    best_i = np.full((len(queries), 10), -1, np.int64)
    with faiss_threads(1):  # faiss's OpenMP around its threaded GEMM: 2.8-3.5x slower than one thread here
        for start, rows in data.iter_blocks():
            d, i = faiss.knn(queries, rows, min(10, len(rows)))
            d, i = np.hstack([best_d, d]), np.hstack([best_i, i + start])
            keep = np.argsort(d, axis=1, kind="stable")[:, :10]
            best_d, best_i = np.take_along_axis(d, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def _recall_at_10(found, truth) -> float:
    return float(sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())) / truth.size)


def part_trainer(args: argparse.Namespace, work: str) -> dict:
    import numpy as np
    import psutil
    import torch

    from dataengine.shards import ShardInfo
    from dataengine.store import open_store
    from trainer.labels import Labels
    from trainer.sampler import ClusterBalance

    torch.set_num_threads(1)
    store = open_store(os.path.join(work, "store.zarr"))
    start = time.perf_counter()
    labels = Labels.from_store(store, CLUSTERING, "deepercluster")
    balance = ClusterBalance(labels.balance)
    join_seconds = time.perf_counter() - start
    shard_rows = 1000
    shards = [ShardInfo(i, f"shards/shard-{i:06d}.tar", "", min(shard_rows, store.num_rows - first), first)
              for i, first in enumerate(range(0, store.num_rows, shard_rows))]
    dataset = _RowStream(shards, balance)
    workers = 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    per_row_bytes = sum(a.nbytes for a in (labels.balance, labels.parents, labels.local))
    worker_uss: list[float] = []
    positions: dict[int, tuple[int, int]] = {}
    emitted, batches, cut_short = 0, 0, False
    epoch_start = time.perf_counter()
    for rows, worker, block, offset in loader:
        parents, local = labels.parents[rows.numpy()], labels.local[rows.numpy()]  # the label join
        emitted += len(parents) + 0 * int(local[0])
        positions[int(worker[-1])] = (int(block[-1]), int(offset[-1]))
        batches += 1
        if batches % 200 == 1:
            for child in psutil.Process().children():
                try:
                    worker_uss.append(child.memory_full_info().uss / 2**20)
                except psutil.Error:
                    pass
        if args.trainer_rows and emitted >= args.trainer_rows:
            cut_short = True
            break
    measured_seconds = time.perf_counter() - epoch_start
    del loader  # its workers stop here when the epoch was cut short
    # An epoch emits about as many rows as the store has (cut short: its time scaled to them).
    epoch_seconds = measured_seconds * store.num_rows / emitted if cut_short else measured_seconds
    checkpoint = os.path.join(work, "sampler_state.pt")
    begin = time.perf_counter()
    torch.save({"positions": positions, "balance": balance.digest()}, checkpoint)
    checkpoint_seconds = time.perf_counter() - begin
    return {"seconds": time.perf_counter() - start, "rows": store.num_rows, "emitted": emitted,
            "epoch_seconds": epoch_seconds, "epoch_extrapolated": cut_short,
            "measured_seconds": measured_seconds, "label_join_seconds": join_seconds,
            "per_row_arrays_mb": per_row_bytes / 2**20, "worker_uss_mb_max": max(worker_uss, default=0.0),
            "workers": workers, "checkpoint_bytes": os.path.getsize(checkpoint),
            "checkpoint_seconds": checkpoint_seconds, "clusters": int(balance.num_nonempty)}


def _row_stream_class():
    import torch

    from trainer.data import EpochPlan, epoch_shards, interleave
    from trainer.sampler import BalancedStream, StreamConfig

    class RowStream(torch.utils.data.IterableDataset):
        """One epoch of the trainer's balanced stream, rows only: ``(row, worker, block, emitted)``."""

        def __init__(self, shards, balance) -> None:
            super().__init__()
            self.shards, self.balance = shards, balance
            self.stream = StreamConfig(seed=0)

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, num = (0, 1) if info is None else (info.id, info.num_workers)
            mine = epoch_shards(self.shards, self.stream.seed, EpochPlan(0, 0, 1))[worker::num]
            stream = BalancedStream(self.balance, self.stream, epoch=0, rank=0, worker=worker)
            rows = (((r, None) for r in range(s.first_row, s.end_row)) for s in mine)
            for row, _ in stream(interleave(rows, 32)):
                state = stream.state_dict()
                yield row, worker, state["block"], state["emitted"]

    return RowStream


def _RowStream(shards, balance):  # noqa: N802 - a class built lazily (torch imported in the child only)
    return _row_stream_class()(shards, balance)


# --------------------------------------------------------------------------------------------- the driver


def run_part(args: argparse.Namespace, work: str, name: str) -> dict:
    """Run one part in this process; record its result, CPU time and peak RSS."""
    result = globals()[f"part_{name}"](args, work)
    result.update(_usage())
    for earlier in result.get("earlier_attempts", ()):  # a part resumed after being killed: all its attempts
        result["cpu_s"] += earlier["cpu_s"]
        result["peak_rss_mb"] = max(result["peak_rss_mb"], earlier["peak_rss_mb"])
        result["children_peak_rss_mb"] = max(result["children_peak_rss_mb"], earlier["children_peak_rss_mb"])
    _write_json(os.path.join(work, f"part-{name}.json"), result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True, help="metadata lines (their valid photo lines are the rows of every later stage)")
    parser.add_argument("--work", help="work folder (default: bench-scale-ROWS)")
    parser.add_argument("--results", help="results JSON (default: bench-scale-ROWS.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part-rows", type=int, default=50_000, help="metadata rows per ingest part")
    parser.add_argument("--chunk-rows", type=int, default=32768, help="rows per feature chunk of the store")
    parser.add_argument("--flat-sample", type=int, default=2_000_000, help="rows of the flat k-means sample")
    parser.add_argument("--index-memory-gb", type=float, default=4.0)
    parser.add_argument("--index-kind", default="ivf_pq", help="neighbour index kind (auto, flat, ivf_flat, ivf_pq)")
    parser.add_argument("--full-recall-queries", type=int, default=10_000,
                        help="queries of the recall of the index built, each searched exactly over every row "
                             "(10,000 cost ~25 min at 96M rows)")
    parser.add_argument("--pq-bytes", type=int, default=32,
                        help="IVF-PQ code bytes (32: what 4 GB allows at 96M rows of 64 dimensions)")
    parser.add_argument("--video-rate", type=float, default=0.0,
                        help="videos per photo among the lines (0.03125: 99M lines give 96M photos, as YFCC100M's)")
    parser.add_argument("--metadata", choices=("ingest", "tiled"), default="ingest",
                        help="ingest: every line through `ingest --metadata-only` (the metadata part's figures); "
                             "tiled: ingest a 10,000-line template and repeat its rows with new photo ids and "
                             "users, the same metadata.parquet in minutes (for the later parts only)")
    parser.add_argument("--trainer-rows", type=int, default=0,
                        help="stop the trainer part's epoch after this many rows and extrapolate the epoch's time "
                             "(0: the whole epoch)")
    parser.add_argument("--prune", action="store_true",
                        help="once the metadata part is done, delete what no later part reads: the gzip lines and "
                             "the ingest's per-part files (25 GB at 99M lines)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this child process
    args = parser.parse_args()
    work = os.path.abspath(args.work or f"bench-scale-{args.rows}")
    if args.part:
        run_part(args, work, args.part)
        return
    os.nice(max(0, 19 - os.nice(0)))
    os.makedirs(work, exist_ok=True)
    results = {"rows": args.rows, "cpu": _cpu_model(), "parts": {}}
    for name in [p for p in args.parts.split(",") if p]:
        if name not in PARTS:
            parser.error(f"unknown part {name!r}; choose from {', '.join(PARTS)}")
        done = os.path.join(work, f"part-{name}.json")
        if not os.path.exists(done):
            started = time.perf_counter()
            command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--work", work, "--part", name]
            subprocess.run(command, check=True)
            print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if name == "metadata" and args.prune:
            _prune_metadata_inputs(work)
        with open(done) as handle:
            results["parts"][name] = json.load(handle)
        part = results["parts"][name]
        print(f"{name:9s} wall {part['seconds']:8.1f} s  cpu {part['cpu_s']:8.1f} s  peak RSS "
              f"{max(part['peak_rss_mb'], part['children_peak_rss_mb']):7.0f} MB", file=sys.stderr)
    results_path = args.results or f"bench-scale-{args.rows}.json"
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)
    if not args.keep and all(os.path.exists(os.path.join(work, f"part-{p}.json")) for p in PARTS):
        shutil.rmtree(work)
    if args.json:
        print(json.dumps(results))


def _prune_metadata_inputs(work: str) -> None:
    for path in (os.path.join(work, "yfcc.tsv.gz"), os.path.join(work, "ingest", "meta"),
                 os.path.join(work, "ingest", "ledger")):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
