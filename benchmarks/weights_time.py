"""Time of the averaged-weights path: mha.MultiheadAttention against torch.nn.MultiheadAttention.

Self-attention in inference mode with the module's default ``need_weights=True``
(weights averaged over heads), E = 512, H = 8, fp32, ``batch_first=True``, both
modules with the same weights, timed in interleaved rounds in one process (so a
busy machine slows both alike). Prints, per shape, the median time of each and
the median over rounds of torch's time divided by mha's (above 1: mha is faster).

At N=1, L=256 torch runs its fused ``_native_multi_head_attention`` (batch_first,
inference): one projection GEMM, a copy of q, k, v into heads, two attention
products, a softmax, a head sum, a copy back. mha at N=1 writes the projection
transposed, ``(3E, L)``, so that each head's q, k and v are dense ``(D, L)``
matrices that the tiled backend reads without copies; with every row in one block
it writes the output transposed too, which ``out_proj`` reads as it is. Larger
calls run in blocks of up to 16 MiB of scores of one sequence's rows (2^22 in fp32;
whole sequences grouped up to 8 MiB), a block of a taller output going through ``bmm`` and a copy
rather than a strided ``out=`` (a slow path in torch).

Two effects decide a run, more than the code does:

* Page faults. glibc serves 32 MiB and more (torch's full score matrix from
  L = 1024) with a fresh ``mmap`` on every call, and sometimes gives the heap back
  between smaller calls: the call then faults its pages in again (about 1,000
  faults, 1.5-2 ms, for torch at 1x256). Torch's larger allocations make it the
  usual loser, but the smaller shapes flip from process to process. To compare the
  arithmetic alone, run with ``MALLOC_MMAP_THRESHOLD_=1073741824
  MALLOC_TRIM_THRESHOLD_=1073741824`` (malloc then never maps or trims: no faults).
* Threads under load. With two threads while the machine's other core is busy,
  every parallel op waits for the descheduled thread, and mha's block loop (more,
  smaller ops than torch's) slowed 5-9x in such runs. Compare on an idle machine
  or at ``OMP_NUM_THREADS=1``.

Measured 2026-11-29 on the development machine (2 cores, idle, torch 2.13.0+cpu,
15 rounds), torch/mha:

=================================  =========  =========  =========  =========
run                                1 x 256    1 x 1024   1 x 4096   8 x 512
=================================  =========  =========  =========  =========
2 threads, default malloc (5 runs)  0.98-1.53  1.40-1.51  1.55-1.67  1.35-1.43
2 threads, no faults (4 runs)       0.96-1.00  0.98-1.02  1.32-1.38  1.17-1.19
1 thread, default malloc            0.95       1.29       1.65       1.40
1 thread, no faults                 0.95       1.10       1.33       1.19
=================================  =========  =========  =========  =========

Before this round (same machine, no faults, 2 threads, 9 rounds, seven runs):
0.90-0.93, 0.88-0.93, 1.06-1.15, 1.11-1.18. At 1 x 256 without faults the ops alone (mha's
sequence replayed without its Python layers) run 1.04x torch at 2 threads and
1.00x at one; the rest is Python between kernels, which costs several times its
tight-loop time once the products have evicted the caches.

Usage::

    python benchmarks/weights_time.py [--rounds 15] [--shapes 1x256,1x1024,1x4096,8x512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mha

EMBED, HEADS = 512, 8


def _time(f, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", default="1x256,1x1024,1x4096,8x512", help="NxL, comma-separated")
    args = parser.parse_args()
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    ours = mha.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    print(f"need_weights=True (averaged), E={EMBED}, H={HEADS}, fp32, inference_mode, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'N':>3} {'L':>5} {'torch ms':>9} {'mha ms':>8} {'torch/mha':>10}")
    for shape in args.shapes.split(","):
        N, L = (int(x) for x in shape.split("x"))
        x = torch.randn(N, L, EMBED)
        calls = {"torch": lambda m=theirs, x=x: m(x, x, x), "mha": lambda m=ours, x=x: m(x, x, x)}
        with torch.inference_mode():
            for f in calls.values():
                f()
            once = _time(calls["torch"], 1)
            repeats = max(1, int(0.2 / max(once, 1e-6)))
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, f in calls.items():
                    times[name].append(_time(f, repeats))
        ratio = statistics.median(t / m for t, m in zip(times["torch"], times["mha"], strict=True))
        print(f"{N:>3} {L:>5} {statistics.median(times['torch']) * 1e3:>9.2f} "
              f"{statistics.median(times['mha']) * 1e3:>8.2f} {ratio:>9.2f}x")


if __name__ == "__main__":
    main()
