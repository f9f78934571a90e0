"""Time of scripted and traced mha.MultiheadAttention against torch.nn.MultiheadAttention.

A scripted or traced mha module runs its dense TorchScript forward: SDPA when there is
no mask and no weights, else materialised ``(N, H, L, S)`` scores with a softmax that
gives fully masked rows zeros. This measures what that costs against torch's module
(eager and scripted, the anchor being eager torch) and against mha in eager mode.

Every variant runs on the same weights and inputs, interleaved in one process, after a
warm-up; the figure per variant is the median of ``--repeats`` times, and the ratio is
torch eager's median over the variant's (above 1 = faster than torch).

Usage::

    python benchmarks/script.py                    # N=8, L=S=256, E=256, H=8, fp32, CPU
    python benchmarks/script.py --length 512 --repeats 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import mha

CASES = {
    # name: (key_padding_mask, need_weights)
    "dense, need_weights=False": (False, False),
    "right-padded key_padding_mask, need_weights=False": (True, False),
    "dense, need_weights=True (averaged)": (False, True),
}


class _Call(nn.Module):
    """A call with its flags fixed, so that it can be traced."""

    def __init__(self, attention: nn.Module, need_weights: bool) -> None:
        super().__init__()
        self.attention = attention
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)[0]


class _CallNoMask(_Call):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=self.need_weights)[0]


def _time(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    N, L, E = args.batch, args.length, args.embed_dim

    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, args.heads, batch_first=True).eval()
    ours = mha.MultiheadAttention(E, args.heads, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(N, L, E)
    lengths = torch.linspace(L // 4, L, N).long()
    padding = torch.arange(L)[None, :] >= lengths[:, None]

    print(f"N={N}, L=S={L}, E={E}, H={args.heads}, fp32, {args.threads} threads, torch {torch.__version__}")
    print("median ms (ratio: torch eager / variant)")
    with torch.no_grad():
        for case, (masked, need_weights) in CASES.items():
            cls = _Call if masked else _CallNoMask
            inputs = (x, padding) if masked else (x,)
            variants = {
                "torch eager": cls(theirs, need_weights),
                "torch scripted": torch.jit.script(cls(theirs, need_weights)),
                "mha eager": cls(ours, need_weights),
                "mha scripted": torch.jit.script(cls(ours, need_weights)),
                "mha traced": torch.jit.trace(cls(ours, need_weights), inputs),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for fn in variants.values():
                for _ in range(3):
                    fn(*inputs)
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(_time(fn, *inputs))
            anchor = statistics.median(times["torch eager"])
            print(f"\n{case}")
            for name, ts in times.items():
                median = statistics.median(ts)
                print(f"  {name:15s} {median * 1e3:8.2f} ms   {anchor / median:5.2f}x")


if __name__ == "__main__":
    main()
