"""Time the three sub-class strategies of :class:`trainer.losses.HierarchicalHead` (forward + backward).

Usage::

    python tools/bench_heads.py [--batch 128] [--dim 256] [--repeats 5] [--threads 1] [--supers 16 32 64]
                                [--ks 256 1024 4096]

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
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--supers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
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
