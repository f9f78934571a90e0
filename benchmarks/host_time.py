"""Host time of one jagged ``mha.attention`` call, the kernel replaced by a stub.

On a GPU a jagged call at L = 1k is bound by host time (the kernel takes about
0.2 ms on an H100), so what matters is the Python and nested-tensor work around
the kernel. This script measures exactly that on the CPU: the triton backend is
forced (``TRITON_INTERPRET=1`` lets it accept CPU tensors) and its variable-length
kernel, ``mha._backends.triton.varlen_fwd``, is replaced by a function that
returns preallocated tensors, so no kernel runs and every microsecond counted is
host work: checks, unpacking the nested tensors, dispatch, packing the output.

Usage::

    python benchmarks/host_time.py [--repeats 2000] [--rounds 7] [--clock thread|wall]

Prints the median over rounds of the mean time per call, in microseconds, and the
same for an anchor measured in interleaved rounds of the same process (one
``torch.nested.nested_tensor_from_jagged`` call, the step every jagged output takes
in torch's own API), so that runs on a busy machine compare by their ratio. The
clock is this thread's CPU time by default (everything here runs on it), so that
time the machine gives to other processes is not counted; ``--clock wall`` for
elapsed time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch

import mha
from mha._backends import triton as triton_backend
from mha.masks import Causal

LENGTHS = (1024, 700, 1024, 300, 1024, 1000, 512, 1024)
HEADS, HEAD_DIM = 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    seqs = [torch.randn(n, HEADS, HEAD_DIM) for n in LENGTHS]
    x = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)  # (N, H, j, D)
    total = sum(LENGTHS)
    out = torch.empty(total, HEADS, HEAD_DIM)
    lse = torch.empty(HEADS, total)
    stats = torch.empty(2, HEADS, total)
    triton_backend.varlen_fwd = lambda q, *rest: (out, lse, stats)  # the stub: no kernel runs
    values, offsets = out, x.offsets()
    calls = {
        "mha": lambda: mha.attention(x, x, x, Causal(), backend="triton"),
        "anchor": lambda: torch.nested.nested_tensor_from_jagged(values, offsets),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            for _ in range(50):
                call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = clock()
                for _ in range(args.repeats):
                    call()
                times[name].append((clock() - start) / args.repeats * 1e6)
    mha_us, anchor_us = statistics.median(times["mha"]), statistics.median(times["anchor"])
    ratio = statistics.median(m / a for m, a in zip(times["mha"], times["anchor"], strict=True))
    print(f"jagged mha.attention, kernel stubbed ({args.clock} clock): median {mha_us:.1f} us per call; "
          f"anchor nested_tensor_from_jagged {anchor_us:.1f} us; ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
