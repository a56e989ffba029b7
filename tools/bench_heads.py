"""Time the three sub-class strategies of :class:`trainer.losses.HierarchicalHead` (forward + backward); with
``--sharding``, measure the sub-class heads sharded over gloo ranks against a replicated, all-reduced head.

Usage::

    python tools/bench_heads.py [--batch 128] [--dim 256] [--repeats 5] [--threads 1] [--supers 16 32 64]
                                [--ks 256 1024 4096]
    python tools/bench_heads.py --sharding [--ranks 4] [--batch 48] [--repeats 5] [--supers 320] [--ks 10 100]
                                [--dims 32 64 128]

``--sharding`` starts ``--ranks`` gloo processes (1 thread each) and, for every (S, k, d), takes steps of the
sub-class term of Eq. 5 (forward, backward) both ways, each rank with its own batch of ``--batch`` rows:

- ``sharded``: the trainer's scheme (:func:`trainer.parallel.sub_class_loss`): each rank holds the ``W_s`` of
  its super-classes; rows go to the owner of their head and their gradients come back (all-to-all);
- ``dense``: every rank holds every ``W_s`` and all-reduces their gradients (what a replicated head under
  DDP, or the earlier hand-written all-reduce, communicates).

It counts, per rank and step, the bytes each collective call sends off the rank (all-to-all: the rows for other
ranks; all-gather and all-reduce: ring algorithms, ``(W - 1)`` inputs and ``2 (W - 1) / W`` of the buffer),
and the bytes of head parameters the rank holds, then checks them against the formulas (fp32, ``K = S k``
sub-classes, ``W`` ranks, ``B`` rows per rank, targets int64)::

    head bytes per rank    dense 4 K (d + 1)                 sharded about 4 K (d + 1) / W
    sent per rank, step    dense 2 (W - 1) / W x 4 K (d + 1) sharded (W - 1) / W x B (8 d + 24) + 8 W (W - 1)

(sharded: features 4 d and targets 16 bytes out, feature gradients 4 d and the per-row loss and hit 8 bytes
back, for the ``(W - 1) / W`` of the rows another rank owns; the row counts' all-gather), and extrapolates them
to the paper's 320,000 sub-classes of d = 4,096 on 64 ranks of 48 rows (its 3,072-image batch). The
super-class head ``V`` (``4 m x (d + 1)``, replicated and all-reduced by DDP either way) and the backbone are
the same in both and left out.

For every (S super-classes, k sub-classes per super-class) it runs each strategy ``repeats`` times on the
same random batch (rows spread uniformly over the super-classes) and prints the median wall time of one
forward + backward pass, and its ratio to the ``grouped`` strategy measured in the same run.

Figures from the shared, noisy 2-core CPU box this was written on (torch 2.14.1, ``--threads 1``, batch
128, D = 256, medians of 5; command: ``python tools/bench_heads.py``), time of one
forward + backward pass of the head and ratio to ``grouped`` in the same run::

    S   k      grouped   gather           dense
    16  256    5.7 ms    0.13 s (22x)     15 ms (2.7x)
    16  1024   15 ms     0.53 s (35x)     63 ms (4.1x)
    16  4096   0.12 s    3.1 s  (25x)     0.35 s (2.8x)
    32  256    14 ms     0.19 s (14x)     27 ms (2.0x)
    32  1024   0.12 s    0.69 s (5.6x)    0.20 s (1.6x)
    32  4096   0.45 s    3.4 s  (7.4x)    0.52 s (1.15x)
    64  256    15 ms     0.14 s (9.4x)    43 ms (2.9x)
    64  1024   0.16 s    0.86 s (5.5x)    0.40 s (2.6x)
    64  4096   0.46 s    3.1 s  (6.8x)    1.06 s (2.3x)

An earlier run under heavier load gave the same ordering (gather 5.9-53x, dense 1.3-4.0x slower). For
large heads ``grouped`` is memory-bound: its time goes to reading the ``sum k_s x D`` weight (forward and
``grad_x``), writing its gradient, and one more copy of that gradient by the backward of ``split`` (about a
third of the time at S = 32, k = 4096, from ``torch.profiler``); the optimizer step then makes several more
passes over the same weight.

``grouped`` is the default: it does exactly the arithmetic of the batch's own classifiers, as a few GEMMs,
while ``gather`` copies ``B * k * D`` weights forward and scatters as many gradients back, and ``dense``
computes ``S`` times too many logits.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch

from trainer.losses import SUB_STRATEGIES, HierarchicalHead


def time_strategy(head: HierarchicalHead, features: torch.Tensor, supers: torch.Tensor, subs: torch.Tensor,
                  repeats: int) -> float:
    """Median seconds of one forward + backward pass (after one warm-up pass)."""
    times = []
    for index in range(repeats + 1):
        head.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = head(features, supers, subs)
        loss.backward()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(num_super: int, k: int, batch: int, dim: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    head = HierarchicalHead(dim, [k] * num_super, generator=generator)
    features = torch.randn(batch, dim, generator=generator)
    supers = torch.randint(0, num_super, (batch,), generator=generator)
    subs = torch.randint(0, k, (batch,), generator=generator)
    results = {}
    for strategy in SUB_STRATEGIES:
        head.strategy = strategy
        results[strategy] = time_strategy(head, features, supers, subs, repeats)
    return results


PAPER = {"K": 320_000, "d": 4096, "W": 64, "B": 48}
"""DeeperCluster's largest run: 320,000 leaf clusters of fc7 features on 64 GPUs, 3,072 images per step."""


def formula(num_sub: int, dim: int, world: int, batch: int) -> dict[str, float]:
    """Head bytes per rank and bytes sent per rank and step, dense and sharded (see the module docstring)."""
    head = 4.0 * num_sub * (dim + 1)
    return {"dense_head": head, "dense_sent": 2.0 * (world - 1) / world * head, "sharded_head": head / world,
            "sharded_sent": (world - 1) / world * batch * (8 * dim + 24) + 8.0 * world * (world - 1)}


class SentBytes:
    """Counts the bytes this rank sends through ``torch.distributed``'s all-to-all, all-gather and all-reduce
    (ring algorithms for the last two) while installed."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.total, self.originals = dist, 0, {}

    def __enter__(self) -> "SentBytes":
        dist = self.dist
        for name, count in (("all_to_all_single", self._to_all), ("all_gather_single", self._gather),
                            ("all_reduce", self._reduce)):
            original = getattr(dist, name)
            self.originals[name] = original

            def counted(*args: Any, _original=original, _count=count, **kwargs: Any) -> Any:
                self.total += _count(*args, **kwargs)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(self.dist, name, original)

    def _to_all(self, output: torch.Tensor, tensor: torch.Tensor, output_split_sizes=None, input_split_sizes=None,
                group=None, **_: Any) -> int:
        row = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
        return (sum(input_split_sizes) - input_split_sizes[self.dist.get_rank(group)]) * row

    def _gather(self, output: torch.Tensor, tensor: torch.Tensor, group=None, **_: Any) -> int:
        return (self.dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()

    def _reduce(self, tensor: torch.Tensor, *_: Any, group=None, **__: Any) -> int:
        world = self.dist.get_world_size(group)
        return int(2 * (world - 1) / world * tensor.numel() * tensor.element_size())


def _sharding_steps(num_super: int, k: int, dim: int, batch: int, repeats: int, group: Any) -> dict[str, float]:
    """Median seconds and bytes sent per step, and head bytes held, for the sharded and the dense head."""
    import torch.distributed as dist

    from indexes import distributed
    from trainer.losses import SubClassHeads
    from trainer.parallel import HeadShards, sub_class_loss

    counts, rank, world = [k] * num_super, dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(rank)
    features = torch.randn(batch, dim, generator=generator).requires_grad_(True)
    supers = torch.randint(0, num_super, (batch,), generator=generator)
    subs = torch.randint(0, k, (batch,), generator=generator)
    shards = HeadShards.plan(counts, world)
    sharded = SubClassHeads(dim, counts, first=shards.owned(rank)[0], stop=shards.owned(rank)[1], seed=0)
    dense = SubClassHeads(dim, counts, seed=0)

    def sharded_step() -> None:
        loss, _ = sub_class_loss(sharded, shards, features, supers, subs, "batch", group)
        loss.backward()

    def dense_step() -> None:
        dense(features, supers, subs, divisor=float(batch)).loss.backward()
        for parameter in dense.parameters():
            dist.all_reduce(parameter.grad, group=group)

    results = {}
    for name, step, heads in (("sharded", sharded_step, sharded), ("dense", dense_step, dense)):
        times, sent = [], []
        for index in range(repeats + 1):
            for tensor in (features, *heads.parameters()):
                tensor.grad = None
            distributed.barrier()
            with SentBytes() as counter:
                start = time.perf_counter()
                step()
                seconds = time.perf_counter() - start
            if index:
                times.append(seconds)
                sent.append(counter.total)
        results |= {f"{name}_seconds": statistics.median(times), f"{name}_sent": statistics.median(sent),
                    f"{name}_head": float(sum(p.numel() * p.element_size() for p in heads.parameters()))}
    return results


def _sharding_rank(rank: int, world: int, port: int, cases: list[tuple[int, int, int]], batch: int, repeats: int,
                   out: str) -> None:
    import json

    import torch.distributed as dist

    from indexes import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = distributed.new_group()
        rows = [{"S": s, "k": k, "d": d, **_sharding_steps(s, k, d, batch, repeats, group)} for s, k, d in cases]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(rows, handle)
    finally:
        dist.destroy_process_group()


def _megabytes(value: float) -> str:
    if value < 1e6:
        return f"{value / 1e3:,.1f} kB"
    return f"{value / 1e6:,.2f} MB" if value < 1e9 else f"{value / 1e9:,.2f} GB"


def run_sharding(world: int, batch: int, repeats: int, cases: list[tuple[int, int, int]]) -> None:
    """Run the ``--sharding`` measurement on ``world`` gloo ranks and print its table and the extrapolation."""
    import json

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_sharding_rank, args=(world, port, cases, batch, repeats, out), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    print(f"W={world} gloo ranks, B={batch} rows per rank, medians of {repeats} steps; per rank: max over ranks "
          "(formula)")
    print("| S | k | K = S k | d | head bytes dense | head bytes sharded | sent per step dense | sent per step "
          "sharded | step dense | step sharded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, (s, k, d) in enumerate(cases):
        got = {key: max(r[index][key] for r in ranks) for key in ranks[0][index] if key not in ("S", "k", "d")}
        want = formula(s * k, d, world, batch)
        cells = [f"{_megabytes(got[key])} ({_megabytes(want[key])})" for key in
                 ("dense_head", "sharded_head", "dense_sent", "sharded_sent")]
        print(f"| {s} | {k} | {s * k:,} | {d} | " + " | ".join(cells)
              + f" | {got['dense_seconds'] * 1e3:.1f} ms | {got['sharded_seconds'] * 1e3:.1f} ms |", flush=True)
    paper = formula(PAPER["K"], PAPER["d"], PAPER["W"], PAPER["B"])
    print(f"formula at K={PAPER['K']:,}, d={PAPER['d']}, W={PAPER['W']}, B={PAPER['B']}: head bytes per rank "
          f"dense {_megabytes(paper['dense_head'])}, sharded {_megabytes(paper['sharded_head'])}; sent per rank "
          f"and step dense {_megabytes(paper['dense_sent'])}, sharded {_megabytes(paper['sharded_sent'])} "
          f"({paper['dense_sent'] / paper['sharded_sent']:,.0f}x less)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharding", action="store_true", help="sharded vs dense sub-class heads over gloo ranks")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--supers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    if args.sharding:
        supers = args.supers if args.supers != parser.get_default("supers") else [320]
        ks = args.ks if args.ks != parser.get_default("ks") else [10, 100]
        batch = args.batch if args.batch != parser.get_default("batch") else 48
        run_sharding(args.ranks, batch, args.repeats, [(s, k, d) for s in supers for k in ks for d in args.dims])
        return
    torch.set_num_threads(args.threads)
    print(f"batch={args.batch} dim={args.dim} threads={args.threads} repeats={args.repeats} (median s, ratio "
          "to grouped)")
    for num_super in args.supers:
        for k in args.ks:
            results = run_case(num_super, k, args.batch, args.dim, args.repeats)
            reference = results["grouped"]
            cells = "  ".join(f"{name}={seconds:.4f} ({seconds / reference:.2f}x)" for name, seconds in results.items())
            print(f"S={num_super:3d} k={k:5d}  {cells}", flush=True)


if __name__ == "__main__":
    main()
