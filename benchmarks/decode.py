"""Decoding with a KV cache on CPU: the two targets of the decoding work.

    python benchmarks/decode.py [--threads 2] [--tokens 128] [--repeats 3] [--sections greedy,step,formulations]

greedy: greedy decoding of ``--tokens`` tokens with ``nn.Transformer(d_model=512,
    nhead=8, 6 + 6 layers)``, batch 8, source length 128, fp32: torch recomputing the
    whole prefix every step (the only way with torch's modules) against the same
    model after ``mha.swap`` decoding with a cache. The two run in lockstep (each
    step of one, then the same step of the other, each timed), so that a change in
    the machine's load hits both alike. Reports both times (encoder included), the
    speed-up, whether the tokens are the same, and the cached time per step near
    step 16 and near the last step; medians over ``--repeats``.

step: one decode step of ``mha.attention`` (N=8, Hq=32, Hkv=8, D=128, cache of
    4096 tokens, fp32) against the memory bandwidth measured in the same run
    (reading the same bytes with ``sum`` and copying them, the faster of the two),
    and against SDPA on the same tensors. Bandwidth of a step = bytes of K and V
    (read once) / time. Runs interleaved, medians over ``--repeats * 5``.

formulations: the same step (no mask) computed in several ways with torch ops
    (which matmul carries the G query heads of a key/value head, the keys' layout,
    blocks of keys merged by an online softmax, with fresh tensors or one buffer
    updated in place, einsum) and by torch's fused CPU flash-attention kernel with
    the G heads as its query rows (what the decode backend runs), each against
    reading the same bytes with ``sum`` in the same run; not in the default
    sections.

Measured on the shared 2-core development machine, torch 2.13.0+cpu, with other
jobs running (load average 2.5-5, so each figure moves with the load; compare
only within a run):

    --threads 2 --sections step (3 runs)     58-60% of the bandwidth (6.7 GB/s); the
                                             simple path it replaced: 43% in a run alongside
    --threads 1 --sections step              64% (8.3 GB/s; the simple path: 50%)
    --threads 1 --sections formulations      of the sum read: fused kernel 74%, 1024-key
                                             blocks in place 70%, bmm (simple path) 66%
    --threads 1 --sections greedy --repeats 2    7.2x (7.1, 7.3), same tokens, step 128 /
                                             step 16 = 1.13 (before this round: 6.6x)
    --threads 2 (default sections, 3 repeats)    3.6x (3.6, 4.0, 3.5), same tokens; before
                                             this round 3.5x in the next run. At this load
                                             each op of an 8-row step waits for the second
                                             thread, and the per-step times (44 ms near
                                             step 16, 447 ms near 128) follow the load
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import mha


def _causal(L: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(L)


def _greedy_lockstep(theirs, ours, embed, head, src, steps, t_torch, t_mha):
    """Greedy decoding with both models in lockstep: at each step, torch recomputing the
    prefix, then mha on its cache, each timed, so both see the same machine load."""
    N = src.shape[1]
    start = time.perf_counter()
    memory_torch = theirs.encoder(src)
    t_torch.append(time.perf_counter() - start)
    start = time.perf_counter()
    memory_mha = ours.encoder(src)
    cache = ours.decoder.new_cache(N, steps, memory_length=len(src))
    t_mha.append(time.perf_counter() - start)
    expected = torch.zeros(1, N, dtype=torch.long)
    got = expected.clone()
    for _ in range(steps):
        start = time.perf_counter()
        out = theirs.decoder(embed(expected, 0), memory_torch, tgt_mask=_causal(len(expected)))
        expected = torch.cat([expected, head(out[-1]).argmax(-1)[None]])
        t_torch.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = ours.decoder(embed(got[-1:], len(got) - 1), memory_mha, cache=cache)
        got = torch.cat([got, head(out[-1]).argmax(-1)[None]])
        t_mha.append(time.perf_counter() - start)
    return torch.equal(got, expected)


def greedy(tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dropout=0.0).eval()
    ours = mha.swap(copy.deepcopy(theirs))
    table, positions = nn.Embedding(1000, 512), torch.randn(tokens + 1, 1, 512)
    head = nn.Linear(512, 1000)

    def embed(t: torch.Tensor, start: int) -> torch.Tensor:
        return table(t) + positions[start : start + len(t)]

    src = torch.randn(128, 8, 512)
    runs_torch, runs_mha, per_step = [], [], []
    same = True
    with torch.no_grad():
        for _ in range(repeats):
            t_torch: list[float] = []
            t_mha: list[float] = []
            same &= _greedy_lockstep(theirs, ours, embed, head, src, tokens, t_torch, t_mha)
            runs_torch.append(sum(t_torch))
            runs_mha.append(sum(t_mha))
            per_step.append(t_mha[1:])
    a, b = statistics.median(runs_torch), statistics.median(runs_mha)
    ratios = [x / y for x, y in zip(runs_torch, runs_mha, strict=True)]
    print(f"greedy decoding, {tokens} tokens, nn.Transformer(512, 8, 6+6), batch 8, source 128, fp32")
    print("  (both models step in lockstep, each step timed, encoder included)")
    print(f"  torch recomputing the prefix: {a:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in runs_torch)})")
    print(f"  mha with a cache:             {b:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in runs_mha)})")
    print(
        f"  speed-up {statistics.median(ratios):.1f}x (median of runs: {', '.join(f'{r:.1f}' for r in ratios)}), "
        f"same tokens: {same}"
    )
    early = statistics.median(s[i] for s in per_step for i in range(12, min(20, tokens)))
    late = statistics.median(s[i] for s in per_step for i in range(max(0, tokens - 8), tokens))
    print(
        f"  cached step time near step 16: {early * 1e3:.2f} ms, near step {tokens}: {late * 1e3:.2f} ms "
        f"(ratio {late / early:.2f})"
    )


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step(repeats: int) -> None:
    N, Hq, Hkv, D, S = 8, 32, 8, 128, 4096
    g = torch.Generator().manual_seed(0)
    cache = mha.KVCache(N, S, Hkv, D)
    cache.key.normal_(generator=g)
    cache.value.normal_(generator=g)
    q = torch.randn(N, Hq, 1, D, generator=g)
    k1, v1 = torch.randn(N, Hkv, 1, D, generator=g), torch.randn(N, Hkv, 1, D, generator=g)
    nbytes = cache.key.numel() * 4 * 2
    kv = torch.cat([cache.key.flatten(), cache.value.flatten()])
    out = torch.empty_like(kv)

    def one_step() -> None:
        cache.lengths.fill_(S - 1)
        mha.attention(q, k1, v1, cache=cache)

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, cache.key, cache.value, enable_gqa=True)

    results: dict[str, list[float]] = {"read": [], "copy": [], "step": [], "sdpa": []}
    for _ in range(repeats * 5):
        results["read"].append(_median_time(kv.sum, 3))
        results["copy"].append(_median_time(lambda: out.copy_(kv), 3))
        results["step"].append(_median_time(one_step, 3))
        results["sdpa"].append(_median_time(sdpa, 3))
    med = {k: statistics.median(v) for k, v in results.items()}
    read_bw = nbytes / med["read"] / 1e9
    copy_bw = 2 * nbytes / med["copy"] / 1e9
    bandwidth = max(read_bw, copy_bw)
    step_bw = nbytes / med["step"] / 1e9
    print(f"one decode step, N={N} Hq={Hq} Hkv={Hkv} D={D}, cache {S}, fp32 ({nbytes / 2**20:.0f} MiB of K and V)")
    print(f"  memory bandwidth: read (sum) {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s -> {bandwidth:.1f} GB/s")
    print(f"  mha.attention(cache=): {med['step'] * 1e3:.2f} ms, {step_bw:.1f} GB/s = {step_bw / bandwidth:.0%} of bandwidth")
    print(f"  SDPA (enable_gqa):     {med['sdpa'] * 1e3:.2f} ms, {nbytes / med['sdpa'] / 1e9:.1f} GB/s")


def _formulations(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """Ways to compute one decode step without masks, q ``(B, G, D)`` against k, v
    ``(B, S, D)`` (``B = N * Hkv``, the ``G`` query heads of a key/value head as rows)."""
    B, S, _ = k.shape
    k_by_columns = k.transpose(1, 2).contiguous().transpose(1, 2)  # the same keys stored (B, D, S)

    def rows(keys: torch.Tensor) -> torch.Tensor:  # q @ k^T: G rows per matmul (the decode backend)
        return torch.bmm(torch.bmm(q, keys.transpose(1, 2)).softmax(-1), v)

    def columns() -> torch.Tensor:  # k @ q^T: S rows, G columns
        p = torch.bmm(k, q.transpose(1, 2)).softmax(1)
        return torch.bmm(v.transpose(1, 2), p).transpose(1, 2)

    def chunked(size: int) -> torch.Tensor:  # S in cache-sized blocks, merged by an online softmax
        top = torch.full((B, q.shape[1], 1), float("-inf"))
        total, acc = torch.zeros_like(top), torch.zeros(B, q.shape[1], v.shape[-1])
        for c in range(0, S, size):
            s = torch.bmm(q, k[:, c : c + size].transpose(1, 2))
            new_top = torch.maximum(top, s.amax(-1, keepdim=True))
            p, rescale = (s - new_top).exp(), (top - new_top).exp()
            total = total * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(p, v[:, c : c + size])
            top = new_top
        return acc / total

    def chunked_in_place(size: int) -> torch.Tensor:  # the same, one score buffer, in-place updates
        s = torch.empty(B, q.shape[1], size)
        acc = torch.empty(B, q.shape[1], v.shape[-1])
        for c in range(0, S, size):
            torch.bmm(q, k[:, c : c + size].transpose(1, 2), out=s)
            if c == 0:
                top = s.amax(-1, keepdim=True)
                total = s.sub_(top).exp_().sum(-1, keepdim=True)
                torch.bmm(s, v[:, :size], out=acc)
            else:
                new_top = torch.maximum(top, s.amax(-1, keepdim=True))
                rescale = (top - new_top).exp_()
                total.mul_(rescale).add_(s.sub_(new_top).exp_().sum(-1, keepdim=True))
                acc.mul_(rescale).baddbmm_(s, v[:, c : c + size])
                top = new_top
        return acc.div_(total)

    def fused() -> torch.Tensor:  # torch's flash kernel (SDPA's on CPU), the G heads as its query rows
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q[:, None], k[:, None], v[:, None], scale=1.0)[0][:, 0]

    def einsum() -> torch.Tensor:
        return torch.einsum("bgs,bsd->bgd", torch.einsum("bgd,bsd->bgs", q, k).softmax(-1), v)

    return {
        "q @ k^T, bmm (simple path)": lambda: rows(k),
        "q @ k^T, k stored (D, S)": lambda: rows(k_by_columns),
        "k @ q^T, bmm": columns,
        "chunks of 512 + online softmax": lambda: chunked(512),
        "chunks of 1024 + online softmax": lambda: chunked(1024),
        "chunks of 1024, in place": lambda: chunked_in_place(1024),
        "chunks of 2048, in place": lambda: chunked_in_place(2048),
        "fused kernel, G rows (used)": fused,
        "einsum": einsum,
    }


def formulations(repeats: int) -> None:
    N, Hq, Hkv, D, S = 8, 32, 8, 128, 4096
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(N * Hkv, S, D, generator=g), torch.randn(N * Hkv, S, D, generator=g)
    q = torch.randn(N * Hkv, Hq // Hkv, D, generator=g) / D**0.5
    nbytes = 2 * k.numel() * 4
    kv = torch.cat([k.flatten(), v.flatten()])
    calls = {"read (sum)": kv.sum, **_formulations(q, k, v)}
    expected = calls["q @ k^T, bmm (simple path)"]()
    for name, call in calls.items():
        if name != "read (sum)":
            torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-5)
    results: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats * 5):
        for name, call in calls.items():
            results[name].append(_median_time(call, 3))
    read = statistics.median(results["read (sum)"])
    print(f"decode step formulations, N={N} Hq={Hq} Hkv={Hkv} D={D}, cache {S}, fp32, no mask")
    for name, times in results.items():
        t = statistics.median(times)
        print(f"  {name:34s} {t * 1e3:8.2f} ms  {nbytes / t / 1e9:6.1f} GB/s  {read / t:5.0%} of read")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="greedy,step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    sections = args.sections.split(",")
    if "step" in sections:
        step(args.repeats)
    if "formulations" in sections:
        formulations(args.repeats)
    if "greedy" in sections:
        greedy(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
