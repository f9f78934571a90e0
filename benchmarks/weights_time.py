"""Time of the averaged-weights path: mha.MultiheadAttention against torch.nn.MultiheadAttention.

Self-attention in inference mode with the module's default ``need_weights=True``
(weights averaged over heads), E = 512, H = 8, fp32, ``batch_first=True``, both
modules with the same weights, timed in interleaved rounds in one process (so a
busy machine slows both alike). Prints, per shape, the median time of each and
the median over rounds of torch's time divided by mha's (above 1: mha is faster).

At N=1, L=256 (one block of scores in mha's tiled backend, so neither tile size nor
the tile loop is the cause) torch runs its fused ``_native_multi_head_attention``
(batch_first, inference). In torch's op profile (1 thread) mha's softmax took 0.98 ms
a call against torch's 0.33 ms, and the mean over heads 0.95 ms against torch's
sum-and-divide 0.12 ms, while the same ops on a warm tensor take 0.34 and 0.15 ms:
the time went to a fresh 2 MiB buffer per block, not to arithmetic. Without autograd
the tiled backend now writes the probabilities over the scores: at 1x256 torch/mha
went from 0.67x to 0.87x (9 interleaved rounds each, 2 threads, a shared machine);
1x128 stayed at 0.82x. The rest (the head mean, the copy of each block's output into
the result) is not yet closed.

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
