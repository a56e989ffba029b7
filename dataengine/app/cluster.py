"""``dataengine cluster``, ``assign`` and ``neighbors``: clusterings stored with the features."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from dataengine.app.cli import app, console, emit_summary, fail, parse_ints, print_table, progress_bar
from dataengine.app.options import Json, Overwrite, StorageOptions, Threads
from dataengine.app.plan import DRY_RUN_HELP, show_dry_run

SAMPLE_HELP = ("Training rows of each level's k-means: k x P rows of its group, 0 = every row (up to "
               "--max-sample-rows); one value per level, the last for deeper levels.")
MAX_SAMPLE_HELP = "Rows at most of a k-means told to train on every row (0: no limit)."
OLD_NAME = "--name is its deprecated spelling."


@app.command()
def cluster(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store written by `dataengine embed`."),
    name: str = typer.Option(..., "--clustering", help="Name of the clustering (stored in the feature store). "
                             + OLD_NAME),
    levels: str = typer.Option("4,256", "--levels", help="Clusters per level: m,k = m super-clusters x k."),
    pca: Optional[int] = typer.Option(256, "--pca", help="Whitened dimension (0: keep the feature dimension)."),
    whiten: bool = typer.Option(True, "--whiten/--no-whiten", help="PCA-whiten and l2-normalise the features "
                                "(DeepCluster); --no-whiten: k-means on the features as they are (ClusterFit)."),
    niter: int = typer.Option(10, "--niter", help="Lloyd iterations per k-means."),
    seed: int = typer.Option(0, "--seed", help="Seed of samples, initialisation and splits."),
    sample_per_centroid: str = typer.Option("0,256", "--sample-per-centroid", help=SAMPLE_HELP),
    max_sample_rows: int = typer.Option(1 << 20, "--max-sample-rows", help=MAX_SAMPLE_HELP),
    balanced: bool = typer.Option(False, "--balanced", help="Children per parent proportional to its size."),
    neighbor_index: bool = typer.Option(True, "--neighbor-index/--no-neighbor-index",
                                        help="Also index all rows for `dataengine neighbors`."),
    index_memory_gb: float = typer.Option(2.0, "--index-memory-gb", help="Memory budget of the neighbour index."),
    threads: Threads = None,
    overwrite: Overwrite = False,
    storage_options: StorageOptions = None,
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: Json = False,
) -> None:
    """PCA-whiten the features and run hierarchical k-means; store ids, centroids and indices."""
    from dataengine.cluster import ClusterConfig, metadata_nmi, progress_total, run_cluster
    from dataengine.store import open_store
    from dataengine.fs import parse_storage_options
    from indexes import distributed

    config = ClusterConfig(
        store=store, name=name, levels=parse_ints(levels, "--levels"), pca_dim=pca or None, whiten=whiten,
        num_iterations=niter,
        seed=seed, sample_per_centroid=parse_ints(sample_per_centroid, "--sample-per-centroid"),
        max_sample_rows=max_sample_rows or None, balanced=balanced, neighbor_index=neighbor_index,
        index_memory_bytes=int(index_memory_gb * (1 << 30)), num_threads=threads, overwrite=overwrite,
        storage_options=parse_storage_options(storage_options),
    )
    if dry_run:
        from dataengine.dryrun import cluster_dry_run

        show_dry_run(cluster_dry_run(config), as_json)
        return
    # The reductions are of numpy arrays: gloo, whatever devices the machine has.
    with distributed.process_group("cpu") as placement:
        total = (progress_total(config, open_store(store, config.storage_options).num_rows, placement.rank,
                                placement.world_size) if console.is_terminal else None)
        with progress_bar(f"cluster {name}", total=total) as update:
            result = run_cluster(config, progress=update, reducer=distributed.reducer())
    if result.already_complete:
        console.print(f"{store}: clustering {name} is already complete with these options; nothing to do "
                      "(--overwrite recomputes it)")
    rows = [[level, k, f"{obj:.4g}", splits]
            for level, (k, obj, splits) in enumerate(zip(result.num_clusters, result.objective, result.empty_splits))]
    print_table(f"clustering {name}: {result.num_rows} rows in {result.seconds:.1f} s",
                ["level", "clusters", "objective", "empty splits"], rows)
    console.print(f"{result.num_leaf_clusters:,} leaf clusters (--levels {','.join(map(str, result.levels))}), "
                  f"{result.num_rows / max(result.num_leaf_clusters, 1):.1f} rows per leaf cluster on average; "
                  f"neighbour index: {result.neighbor_index or 'none'}")
    for line in result.warnings if result.already_complete else ():  # a fresh run logged them as it started
        console.print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
    if placement.rank != 0:
        return
    nmi = metadata_nmi(store, name, config.storage_options, seed=seed)
    if nmi:
        print_table(f"leaf clusters vs metadata (NMI {nmi[next(iter(nmi))]['average_method']})",
                    ["metadata", "NMI", "chance NMI", "vs chance", "coverage"],
                    [[kind, _figure(r["nmi"]), _figure(r["chance_nmi"]),
                      "within noise" if r["near_chance"] else "above", _figure(r["coverage"])]
                     for kind, r in nmi.items()])
    emit_summary(dict(result.to_dict(), nmi=nmi), as_json)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
def assign(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store holding the clustering."),
    name: str = typer.Option(..., "--clustering", help="Clustering to assign with. " + OLD_NAME),
    features: str = typer.Option(..., "--features", help="Another feature store whose rows get cluster ids."),
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Assign the rows of another feature store to a saved clustering (written into that store)."""
    import numpy as np

    from dataengine.cluster import assign_store
    from dataengine.fs import parse_storage_options

    sizes = assign_store(store, name, features, parse_storage_options(storage_options))
    console.print(f"{features}: clustering {name} written; clusters used per level: "
                  + ", ".join(str(int(np.count_nonzero(s))) for s in sizes))
    emit_summary({"store": store, "name": name, "features": features,
                  "num_rows": int(sizes[0].sum()), "num_clusters": [int(len(s)) for s in sizes]}, as_json)


@app.command()
def neighbors(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store holding the clustering."),
    query: Optional[str] = typer.Argument(None, metavar="QUERY", help="A key of the store, a source path of an "
                                          "ingested image (or a path ending with it), or an image file (embedded "
                                          "with the store's model)."),
    key: Optional[str] = typer.Option(None, "--key", help="A key of the store (the QUERY argument takes keys too)."),
    k: int = typer.Option(9, "--num-neighbors", "-k", help="Number of neighbours (the image itself included)."),
    name: Optional[str] = typer.Option(None, "--clustering", help="Clustering whose index to use (default: the "
                                       "latest). " + OLD_NAME),
    shards: Optional[str] = typer.Option(None, "--shards", help="Ingest output with the paths and labels (default: "
                                         "the store's source)."),
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """The nearest images of a key, a source path or an image file, with their clusters, labels and paths
    (a table on stdout; on stderr with --json)."""
    from dataengine.fs import parse_storage_options
    from dataengine.neighbors import find_neighbors

    if (query is None) == (key is None):
        fail("give one QUERY (a key, a source path or an image file), or --key KEY")
    found = find_neighbors(store, query or key, k, name, parse_storage_options(storage_options), shards)
    lines = neighbor_lines(found)
    if as_json:
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    emit_summary(found, as_json)


def neighbor_lines(found: dict) -> list[str]:
    """A plain table of the neighbours: a title, a header, one aligned line each (paths last, never cut)."""
    header = ["rank", "distance", "cluster", "label", "key", "path"]
    rows = [[str(i), f"{n['distance']:.4f}", str(n["cluster"]), n["label"] or "-", n["key"], n["path"] or "-"]
            for i, n in enumerate(found["neighbors"])]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    title = (f"# {len(rows)} nearest images of {found['query_kind']} {found['query']} "
             f"(clustering {found['name']})")
    return [title] + ["  ".join([*(v.ljust(w) for v, w in zip(r, widths)), r[-1]]).rstrip() for r in [header, *rows]]
