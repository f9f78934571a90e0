"""Per-call cost of mha.MultiheadAttention against torch.nn.MultiheadAttention, where
Python overhead dominates: small single calls and a small nn.Transformer after mha.swap.

Both sides run in one process, interleaved (torch, mha, then mha, torch, ...), each
timing the mean of ``--inner`` calls; the ratio torch time / mha time is taken per
repeat and the median reported (above 1.0: mha faster).

    PYTHONPATH=src python benchmarks/overhead.py [--repeats 15] [--inner 50] [--threads 1] [--clock thread|wall]

Cases:
  cross L=...   N=8, E=256, 8 heads, S=30 keys, right-padded boolean key_padding_mask,
                need_weights=False (as the decoder layers call it)
  causal L=...  causal self-attention, float causal attn_mask and is_causal=True,
                need_weights=False (as nn.TransformerDecoderLayer calls it)
  route ...     a right-padded call at larger sizes, the key-lengths route against the
                dense one inside mha (the rule of mha._frontend.key_lengths_may_pay / key_lengths_pay)
  reads ...     the time to read the masks' values, done on every call, against the call
  transformer   nn.Transformer(d_model=256, nhead=8, 3+3 layers, batch 8, batch_first),
                after mha.swap: a train step (forward, backward, SGD step) with a
                right-padded source, and greedy decoding of 24 tokens without a cache.
  encoder ...   nn.TransformerEncoder(d_model=256, nhead=8, 3 layers, batch_first,
                enable_nested_tensor=False) in eval under no_grad, with a causal mask
                or a right-padded key_padding_mask: torch's fused layer kernel against
                mha.TransformerEncoderLayer after mha.swap (masked calls through mha).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import mha
from mha import _frontend

N, E, H, S = 8, 256, 8, 30


# The clock: this thread's CPU time by default (with --threads 1 every op runs on it), so
# that time the shared machine spends on other processes is not counted; --clock wall
# for elapsed time.
_CLOCK = {"thread": time.thread_time, "wall": time.perf_counter}
_clock = time.thread_time


def _timed(fn: Callable[[], object], inner: int) -> float:
    start = _clock()
    for _ in range(inner):
        fn()
    return (_clock() - start) / inner


def compare(
    name: str,
    theirs: Callable[[], object],
    ours: Callable[[], object],
    repeats: int,
    inner: int,
    labels: tuple[str, str] = ("torch", "mha"),
) -> None:
    """Print the median of time ratios (first / second) over interleaved repeats, and both medians."""
    for fn in (theirs, ours):
        fn()  # warm-up
    ratios, t_theirs, t_ours = [], [], []
    for r in range(repeats):
        order = ((theirs, t_theirs), (ours, t_ours))
        for fn, times in order if r % 2 == 0 else order[::-1]:
            times.append(_timed(fn, inner))
        ratios.append(t_theirs[-1] / t_ours[-1])
    a, b = labels
    print(
        f"{name:<34} {a} {statistics.median(t_theirs) * 1e6:9.1f} us   {b} {statistics.median(t_ours) * 1e6:9.1f} us"
        f"   {a}/{b} {statistics.median(ratios):5.2f}x  (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


def _pair(**kwargs: object) -> tuple[nn.MultiheadAttention, mha.MultiheadAttention]:
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    ours = mha.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _right_padding(n: int, s: int) -> torch.Tensor:
    lengths = torch.linspace(s // 3, s, n).round().long()
    return torch.arange(s)[None, :] >= lengths[:, None]


def single_calls(repeats: int, inner: int) -> None:
    theirs, ours = _pair()
    theirs.eval(), ours.eval()
    memory = torch.randn(S, N, E)
    padding = _right_padding(N, S)
    with torch.no_grad():
        for L in (1, 16, 32):
            q = torch.randn(L, N, E)

            def cross(m: nn.Module, q: torch.Tensor = q) -> object:
                return m(q, memory, memory, key_padding_mask=padding, need_weights=False)

            compare(f"cross L={L} (right-padded S=30)", lambda: cross(theirs), lambda: cross(ours), repeats, inner)
        for L in (1, 16, 32):
            x = torch.randn(L, N, E)
            causal = nn.Transformer.generate_square_subsequent_mask(L)

            def self_causal(m: nn.Module, x: torch.Tensor = x, causal: torch.Tensor = causal) -> object:
                return m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)

            compare(f"causal L={L}", lambda: self_causal(theirs), lambda: self_causal(ours), repeats, inner)


def route_rule(repeats: int, inner: int) -> None:
    """mha's key-lengths route against its dense route on the same right-padded call."""
    _, ours = _pair()
    ours.eval()
    forced = {"key_lengths": (0, 0.0), "dense": (1 << 62, 1.0)}
    with torch.no_grad():
        for n, L, s in ((8, 1, 30), (8, 32, 30), (8, 32, 128), (8, 128, 128), (8, 256, 256), (8, 512, 512)):
            q, kv, padding = torch.randn(L, n, E), torch.randn(s, n, E), _right_padding(n, s)

            def run(route: str, q: torch.Tensor = q, kv: torch.Tensor = kv, padding: torch.Tensor = padding) -> object:
                _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED = forced[route]
                return ours(q, kv, kv, key_padding_mask=padding, need_weights=False)

            saved = _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED
            try:
                compare(
                    f"route N={n} L={L} S={s}",
                    lambda: run("dense"),
                    lambda: run("key_lengths"),
                    repeats,
                    max(1, inner // (1 + L * s // 4096)),
                    ("dense", "lengths"),
                )
            finally:
                _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED = saved


def _reads_case(ours: mha.MultiheadAttention, n: int, L: int, s: int, repeats: int, inner: int) -> None:
    q, kv = torch.randn(n, L, E), torch.randn(n, s, E)
    padding = _right_padding(n, s)
    float_padding = torch.zeros(n, s).masked_fill(padding, float("-inf"))
    causal = nn.Transformer.generate_square_subsequent_mask(L) if s == L else None
    lengths_wanted = _frontend.key_lengths_may_pay(n, L, s)

    def call() -> object:
        return ours(q, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=False)

    def read() -> object:
        _frontend.summarize_key_padding_mask(padding, lengths_wanted)
        return None if causal is None else _frontend.summarize_attn_mask(causal)

    def read_float() -> object:
        return _frontend.summarize_key_padding_mask(float_padding, lengths_wanted)

    inner = max(1, inner // (1 + L * s // 4096))
    what = "bool padding" + (" + float causal" if causal is not None else "")
    compare(f"reads N={n} L={L} S={s} {what}", call, read, repeats, inner, ("call", "reads"))
    compare(f"reads N={n} L={L} S={s} float padding", call, read_float, repeats, inner, ("call", "reads"))


def mask_reads(repeats: int, inner: int) -> None:
    """What reading the masks costs per call (every call reads them: nothing is kept across
    calls), against a module call with those masks."""
    _, ours = _pair(batch_first=True)
    ours.eval()
    with torch.no_grad():
        for n, L, s in ((8, 1, 30), (8, 32, 32), (8, 512, 512)):
            _reads_case(ours, n, L, s, repeats, inner)


def transformer(repeats: int, inner: int) -> None:
    torch.manual_seed(0)
    theirs = nn.Transformer(d_model=E, nhead=H, num_encoder_layers=3, num_decoder_layers=3, batch_first=True)
    ours = mha.swap(copy.deepcopy(theirs))
    src, tgt = torch.randn(N, S, E), torch.randn(N, 24, E)
    src_padding = _right_padding(N, S)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4) for m in (theirs, ours)}

    def train_step(model: nn.Transformer) -> None:
        model.train()
        out = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True,
                    src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding)
        out.square().mean().backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad()

    def greedy(model: nn.Transformer) -> None:
        model.eval()
        with torch.no_grad():
            memory = model.encoder(src, src_key_padding_mask=src_padding)
            ys = tgt[:, :1]
            for _ in range(tgt.shape[1] - 1):
                mask = nn.Transformer.generate_square_subsequent_mask(ys.shape[1])
                out = model.decoder(ys, memory, tgt_mask=mask, tgt_is_causal=True,
                                    memory_key_padding_mask=src_padding)
                ys = torch.cat([ys, out[:, -1:]], dim=1)

    compare("transformer train step", lambda: train_step(theirs), lambda: train_step(ours), repeats, max(1, inner // 25))
    compare("transformer greedy decode (24)", lambda: greedy(theirs), lambda: greedy(ours), repeats, max(1, inner // 25))


def encoder(repeats: int, inner: int) -> None:
    """Masked calls of a swapped encoder in eval, where torch's layers run their fused kernel."""
    torch.manual_seed(0)
    for n, s in ((8, 30), (8, 128), (1, 512)):
        layer = nn.TransformerEncoderLayer(E, H, batch_first=True)
        theirs = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
        ours = mha.swap(copy.deepcopy(theirs))
        x, padding = torch.randn(n, s, E), _right_padding(n, s)
        causal = nn.Transformer.generate_square_subsequent_mask(s)
        with torch.no_grad():
            for what, kwargs in (("causal", {"mask": causal, "is_causal": True}), ("padding", {"src_key_padding_mask": padding})):
                compare(
                    f"encoder N={n} S={s} {what}", functools.partial(theirs, x, **kwargs),
                    functools.partial(ours, x, **kwargs), repeats, max(1, inner // (1 + s // 16)),
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sections", default="single,route,reads,transformer")
    parser.add_argument("--clock", choices=sorted(_CLOCK), default="thread")
    args = parser.parse_args()
    global _clock
    _clock = _CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"medians of {args.repeats} interleaved repeats"
    )
    sections = {
        "single": single_calls, "route": route_rule, "reads": mask_reads, "transformer": transformer, "encoder": encoder,
    }
    for name in args.sections.split(","):
        sections[name](args.repeats, args.inner)


if __name__ == "__main__":
    main()
