"""Time of the averaged-weights path: mha.MultiheadAttention against torch.nn.MultiheadAttention.

Self-attention in inference mode with the module's default ``need_weights=True``
(weights averaged over heads), E = 512, H = 8, fp32, ``batch_first=True``, both
modules with the same weights, timed in interleaved rounds in one process (so a
busy machine slows both alike). Prints, per shape, the median time of each and
the median over rounds of torch's time divided by mha's (above 1: mha is faster).

At N=1, L=256 (one block of scores in mha's tiled backend) torch runs its fused
``_native_multi_head_attention`` (batch_first, inference). Without autograd the tiled
backend now puts each block's scores in one buffer allocated per call (``baddbmm_``,
the scale as its alpha), the softmax overwrites them, P @ V goes straight into the
output and the head mean is a sum with one division at the end: the same ops as
torch's path (one projection GEMM, two attention products, one softmax, one head
sum, two copies to contiguous heads). Replaying mha's ops without its Python layers
ran at 0.96-1.05x torch at L=128 and 256; with the layers (front end, dispatch, the
backend's loop) mha runs at 0.87-0.97x there: a few hundred microseconds of Python a
call, dearer after the projections have evicted the caches than when timed alone.

Measured with ``OMP_NUM_THREADS=1`` (2026-11-29, a 2-core machine shared with other
jobs, 9 rounds, six runs alternating the commit before this work, 5bc8861, and
after it; 1x128 in three), torch/mha before -> after:

* 1x128: 0.85-0.86 -> 0.80-0.88; 1x256: 0.90-1.09 -> 0.87-1.11 (the spread is the
  page faults below; timed in one process with both versions interleaved, thread
  CPU time, 15 rounds, three runs: 1x128 0.86-0.89 -> 0.89-0.92, 1x256 0.87-0.90
  (1.13 in the run where torch faulted) -> 0.93-0.96);
* 1x1024: 1.06-1.16 -> 1.26-1.41;
* 1x4096: 0.82-0.98 -> 1.25-1.53;
* 8x512: 1.17-1.33 -> 1.28-1.41.

Two effects to know when reading a run. glibc sometimes gives the heap back between
calls, and a call then faults its pages in again (about 1,000 faults, 2.5 ms for
torch at 1x256): whichever side it hits in a given process loses 20-35%. And with
two threads on a machine whose other core is busy, every parallel op waits for the
descheduled thread: mha's block loop (up to a few hundred ops a call at L=4096)
then ran 5-9x slower than with one thread while torch's few large ops did not
(2 threads under load average 4-6: 0.2-0.9x for both commits). Compare runs at
``OMP_NUM_THREADS=1`` or on an idle machine.

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
