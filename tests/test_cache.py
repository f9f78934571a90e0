"""Decoding with a KV cache: every step against the reference (fp64), and the module
against torch's full causal forward over the whole sequence so far."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from torch import nn

import mha
from conftest import TOL, build_pair
from mha.masks import Allowed, Blocked, Causal, KeyPadding, Window

F64 = torch.float64
# Distinct sizes so a swapped axis fails: N=3 sequences, Hq=6 query heads over Hkv=2.
N, HQ, HKV, DK, DV, M = 3, 6, 2, 40, 24, 29


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype)


class History:
    """Each sequence's real keys and values so far, for the reference."""

    def __init__(self, n: int) -> None:
        self.k: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def add(self, k: torch.Tensor, v: torch.Tensor, counts: list[int]) -> None:
        for n, count in enumerate(counts):
            self.k[n] += [k[n, :, t] for t in range(count)]
            self.v[n] += [v[n, :, t] for t in range(count)]

    def reference(self, q: torch.Tensor, n: int, count: int, window: int | Window | None = None):
        """The reference for the real queries of sequence ``n``: its ``count`` new queries
        are the last ``count`` positions; causal bottom-right over every real key."""
        K = torch.stack(self.k[n], 1)[None]
        V = torch.stack(self.v[n], 1)[None]
        if isinstance(window, Window):
            mask = Causal("bottom_right") & Window(window.before, window.after, "bottom_right", window.shift)
        else:
            mask = Causal("bottom_right") if window is None else Window(window, 0, "bottom_right")
        return mha.attention(
            q[n : n + 1, :, :count], K, V, mask, backend="reference", return_lse=True, weights="per_head"
        )

    def reorder(self, index: list[int]) -> None:
        self.k = [list(self.k[i]) for i in index]
        self.v = [list(self.v[i]) for i in index]


def _steps(cache, history, g, chunks, Hq=HQ, Hkv=HKV, Dk=DK, Dv=DV, window=None, backend=None, noncontig=False):
    for T, new_lengths in chunks:
        q = _randn(g, N, Hq, T, Dk)
        k = _randn(g, N, Hkv, T, Dk)
        v = _randn(g, N, Hkv, T, Dv)
        if noncontig:  # (N, T, H, D) in memory, as the module's head split gives
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        lengths = None if new_lengths is None else torch.tensor(new_lengths)
        mask = window if window is None or isinstance(window, Window) else Window(window, 0)
        out = mha.attention(
            q, k, v, mask, cache=cache, new_lengths=lengths,
            return_lse=True, weights="per_head", backend=backend,
        )
        counts = [T] * N if new_lengths is None else list(new_lengths)
        history.add(k, v, counts)
        assert torch.equal(cache.lengths, torch.tensor([len(h) for h in history.k]))
        assert not out.output.isnan().any()
        for n, count in enumerate(counts):
            if count == 0:
                continue
            ref = history.reference(q, n, count, window)
            S = ref.weights.shape[-1]
            torch.testing.assert_close(out.output[n : n + 1, :, :count], ref.output, **TOL[F64])
            torch.testing.assert_close(out.lse[n : n + 1, :, :count], ref.lse, **TOL[F64])
            torch.testing.assert_close(out.weights[n : n + 1, :, :count, :S], ref.weights, **TOL[F64])
            assert not out.weights[n, :, :count, S:].any()
        yield out


# Ragged prompts (right-padded chunk of 5 with 5, 2 and 0 real tokens), single steps,
# and a second ragged chunk.
CHUNKS = [(5, [5, 2, 0]), (1, None), (3, [1, 3, 2]), (1, None), (1, None)]


@pytest.mark.parametrize(("Hq", "Hkv", "Dk", "Dv"), [(6, 2, 40, 24), (3, 3, 80, 80), (7, 1, 5, 3)])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_steps_match_reference(Hq, Hkv, Dk, Dv, backend):
    g = torch.Generator().manual_seed(0)
    cache = mha.KVCache(N, M, Hkv, Dk, Dv, dtype=F64)
    for _ in _steps(cache, History(N), g, CHUNKS, Hq, Hkv, Dk, Dv, backend=backend):
        pass


def test_noncontiguous_inputs():
    g = torch.Generator().manual_seed(1)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    for _ in _steps(cache, History(N), g, CHUNKS, noncontig=True):
        pass


@pytest.mark.parametrize("window", [0, 1, 3])
def test_window_counts_from_each_query(window):
    g = torch.Generator().manual_seed(2)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    for _ in _steps(cache, History(N), g, CHUNKS, window=window):
        pass


@pytest.mark.parametrize("window", [Window(3, 0, shift=-2), Window(2, 1, "bottom_right", shift=-1), Window(1, 0, shift=1)])
def test_shifted_window_counts_from_each_query(window):
    """A Window's shift (and then its after) move the band from each query's position,
    as over the whole sequence, in ragged steps and in steps of equal lengths."""
    g = torch.Generator().manual_seed(2)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    for _ in _steps(cache, History(N), g, CHUNKS, window=window):
        pass


def test_fp32_step_within_rounding():
    """fp32 through the decode path: error against fp64 at most twice plain torch's."""
    g = torch.Generator().manual_seed(3)
    cache = mha.KVCache(2, 97, 2, 40, dtype=torch.float32)
    prompt = [_randn(g, 2, 2, 97, 40) for _ in range(2)]
    mha.attention(_randn(g, 2, 4, 96, 40).float(), prompt[0][:, :, :96].float(), prompt[1][:, :, :96].float(), cache=cache)
    q = _randn(g, 2, 4, 1, 40)
    out = mha.attention(q.float(), prompt[0][:, :, 96:].float(), prompt[1][:, :, 96:].float(), cache=cache).output
    exact = mha.attention(q, *prompt, Causal("bottom_right"), backend="reference").output
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.float(), *(p.float().repeat_interleave(2, 1) for p in prompt)
    )
    assert (out.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-7


def test_extra_masks_over_cache_positions():
    """KeyPadding, Blocked and Allowed over cache positions (N, Hq, T, max_length)."""
    g = torch.Generator().manual_seed(4)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    k, v = _randn(g, N, HKV, 6, DK), _randn(g, N, HKV, 6, DV)
    mha.attention(_randn(g, N, HQ, 6, DK), k, v, cache=cache)
    blocked = torch.zeros(N, 1, 1, M, dtype=torch.bool)
    blocked[0, ..., 2] = blocked[2, ..., 0] = True
    allowed = torch.ones(1, HQ, 1, M, dtype=torch.bool)
    allowed[:, 1, :, 4] = False
    q, k1, v1 = _randn(g, N, HQ, 1, DK), _randn(g, N, HKV, 1, DK), _randn(g, N, HKV, 1, DV)
    out = mha.attention(
        q, k1, v1, KeyPadding(torch.tensor([7, 5, 6])) & Blocked(blocked) & Allowed(allowed), cache=cache
    ).output
    K, V = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    ref_mask = (
        KeyPadding(torch.tensor([7, 5, 6])) & Blocked(blocked[..., :7]) & Allowed(allowed[..., :7])
    )
    ref = mha.attention(q, K, V, ref_mask, backend="reference").output
    torch.testing.assert_close(out, ref, **TOL[F64])


def test_reorder_for_beam_search():
    g = torch.Generator().manual_seed(5)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    history = History(N)
    for _ in _steps(cache, history, g, CHUNKS[:3]):
        pass
    index = [2, 2, 0]
    cache.reorder(torch.tensor(index))
    history.reorder(index)
    for _ in _steps(cache, history, g, [(1, None), (2, [1, 2, 0])]):
        pass


def test_reorder_to_another_batch_size_and_reset():
    cache = mha.KVCache(N, M, HKV, DK, dtype=F64)
    mha.attention(*(torch.ones(N, h, 2, DK, dtype=F64) for h in (HQ, HKV, HKV)), cache=cache)
    cache.reorder(torch.tensor([1, 0, 1, 2, 0], dtype=torch.uint8))  # any integer dtype
    assert cache.key.shape[0] == 5
    assert cache.lengths.tolist() == [2] * 5
    cache.reset()
    assert cache.lengths.tolist() == [0] * 5
    with pytest.raises(ValueError, match=r"index values must be batch rows in \[0, 5\), got values in \[0, 5\]"):
        cache.reorder(torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="index must be an integer Tensor"):
        cache.reorder([0, 1])  # type: ignore[arg-type]


@pytest.mark.parametrize("static", [False, True])
def test_reorder_to_no_rows_is_refused_before_changing_anything(static):
    """An empty index would leave a cache of batch size 0, which the constructor refuses
    and which no reorder can bring rows back to: refused, the cache as it was."""
    cache = mha.KVCache(N, M, HKV, DK, static=static, dtype=F64)
    mha.attention(*(torch.randn(N, h, 2, DK, dtype=F64) for h in (HQ, HKV, HKV)), cache=cache)
    if static:
        cache.key_padding_mask = torch.zeros(N, M, dtype=torch.bool)
    before = _cache_state(cache)
    with pytest.raises(ValueError, match=r"index is empty: it would leave no sequence \(batch_size=0\).*reset\(\)"):
        cache.reorder(torch.tensor([], dtype=torch.int64))
    after = _cache_state(cache)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3], strict=True))
    assert after[3] is before[3]
    assert cache.batch_size == N
    out = mha.attention(*(torch.randn(N, h, 1, DK, dtype=F64) for h in (HQ, HKV, HKV)), cache=cache).output
    assert out.shape == (N, HQ, 1, DK)


def test_overflow_names_max_length_lengths_and_fix():
    cache = mha.KVCache(2, 5, 1, 4, dtype=F64)
    x = torch.ones(2, 1, 4, 4, dtype=F64)
    mha.attention(x, x, x, cache=cache, new_lengths=torch.tensor([4, 1]))
    one = torch.ones(2, 1, 1, 4, dtype=F64)
    mha.attention(one, one, one, cache=cache)  # 5 and 2: fits exactly
    with pytest.raises(ValueError, match=r"after lengths \[5, 2\] goes past max_length=5; make the cache"):
        mha.attention(one, one, one, cache=cache)
    assert cache.lengths.tolist() == [5, 2]  # nothing written
    # A padded token past the end is not a real token: this fits.
    mha.attention(x[:, :, :2], x[:, :, :2], x[:, :, :2], cache=cache, new_lengths=torch.tensor([0, 2]))
    assert cache.lengths.tolist() == [5, 4]
    y = torch.ones(2, 1, 6, 4, dtype=F64)
    with pytest.raises(ValueError, match="do not fit a cache of max_length=5"):
        mha.attention(y, y, y, cache=cache, new_lengths=torch.tensor([0, 0]))


def test_padded_tokens_are_not_stored():
    """A padded token is not written over real cached ones (past the end, or later)."""
    g = torch.Generator().manual_seed(6)
    cache = mha.KVCache(1, 4, 1, 3, dtype=F64)
    k = _randn(g, 1, 1, 3, 3)
    mha.attention(k, k, k, cache=cache)
    before = cache.key[:, :, :3].clone()
    k2 = _randn(g, 1, 1, 3, 3)
    mha.attention(k2, k2, k2, cache=cache, new_lengths=torch.tensor([1]))
    assert torch.equal(cache.key[:, :, :3], before)
    assert torch.equal(cache.key[:, :, 3], k2[:, :, 0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"new_lengths": torch.tensor([1, 3, 0])}, ValueError, r"new_lengths must count real tokens among the T=2 new ones, in \[0, 2\], got values in \[0, 3\]"),
        ({"new_lengths": torch.tensor([1.0, 1.0, 1.0])}, TypeError, "new_lengths must be an integer tensor"),
        ({"new_lengths": torch.tensor([1, 1])}, ValueError, r"new_lengths must have shape \(N,\) = \(3,\), got \(2,\)"),
        ({"key": torch.ones(3, 2, 2, 7, dtype=F64)}, ValueError, r"key \(N, Hkv, T, Dk\) must be the new tokens with \(N, Hkv, Dk\) = \(3, 2, 40\)"),
        ({"key": torch.ones(3, 2, 2, 40)}, TypeError, "key has dtype torch.float32 .* the cache torch.float64"),
        ({"query": torch.ones(2, 6, 2, 40, dtype=F64)}, ValueError, "has N=2 but the cache holds batch_size=3"),
        ({"query": torch.ones(3, 5, 2, 40, dtype=F64)}, ValueError, "Hq=5 must be a multiple of the cache's key/value heads Hkv=2"),
        ({"key": None}, ValueError, "key and value may be None only together, on a static"),
        ({"mask": torch.ones(3, 1, 2, M, dtype=torch.bool)}, TypeError, "mask must be an mha.masks object"),
        ({"mask": Blocked(torch.ones(3, 1, 2, 7, dtype=torch.bool))}, ValueError, "does not broadcast to .* = \\(3, 6, 2, 29\\)"),
        # Rejected before the new tokens are written, not after.
        ({"query": torch.ones(3, 6, 2, 40)}, TypeError, "query has dtype torch.float32 .* the cache torch.float64"),
        ({"query": torch.ones(3, 6, 2, 7, dtype=F64)}, ValueError, r"query .* must have the cache's Dk = 40"),
        ({"dropout_p": 2.0}, ValueError, r"dropout_p must be in \[0, 1\]"),
        ({"weights": "all"}, ValueError, "weights must be None, 'mean' or 'per_head'"),
        ({"backend": "fast"}, ValueError, "unknown backend 'fast'"),
        ({"backend": "sdpa", "weights": "mean"}, NotImplementedError, "SDPA returns no attention weights"),
        ({"mask": Blocked(torch.ones(3, 1, 2, M, dtype=torch.bool, device="meta"))}, ValueError, r"mask Blocked\(shape=\(3, 1, 2, 29\), .* holds a tensor on meta but the query is on cpu"),
        ({"scale": "big"}, TypeError, "scale must be a number or None, got 'big'"),
    ],
)
def test_errors(kwargs, error, match):
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    call = {
        "query": torch.ones(N, HQ, 2, DK, dtype=F64),
        "key": torch.ones(N, HKV, 2, DK, dtype=F64),
        "value": torch.ones(N, HKV, 2, DV, dtype=F64),
    }
    call.update(kwargs)
    mask = call.pop("mask", None)
    with pytest.raises(error, match=match):
        mha.attention(call.pop("query"), call.pop("key"), call.pop("value"), mask, cache=cache, **call)
    assert cache.lengths.tolist() == [0] * N
    assert not cache.key.any()
    assert not cache.value.any()


def _cache_state(cache: mha.KVCache) -> tuple:
    return cache.lengths.clone(), cache.key.clone(), cache.value.clone(), cache.key_padding_mask


def _assert_unchanged(cache: mha.KVCache, state: tuple) -> None:
    lengths, key, value, padding = state
    assert torch.equal(cache.lengths, lengths)
    assert torch.equal(cache.key, key)
    assert torch.equal(cache.value, value)
    assert cache.key_padding_mask is padding


@pytest.mark.parametrize("forced", ["argument", "use_backend"])
@pytest.mark.parametrize(
    ("prompt", "step"),
    [(None, None), ([3, 1, 2], None), (None, [1, 2, 0])],
    ids=["equal-lengths", "ragged-cache", "ragged-step"],
)
def test_forced_backend_that_cannot_serve_leaves_the_cache_as_it_was(forced, prompt, step):
    """A forced backend that cannot serve a cached call raises before the new tokens are
    written: a caller that catches NotImplementedError and retries finds the cache as it
    was, and the retry stores the tokens once."""
    g = torch.Generator().manual_seed(15)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    history = History(N)
    for _ in _steps(cache, history, g, [(3, prompt)]):
        pass
    state, drawn = _cache_state(cache), g.get_state()
    q, k, v = _randn(g, N, HQ, 2, DK), _randn(g, N, HKV, 2, DK), _randn(g, N, HKV, 2, DV)
    lengths = None if step is None else torch.tensor(step)
    backend = "sdpa" if forced == "argument" else None
    with (
        mha.use_backend("sdpa") if forced == "use_backend" else contextlib.nullcontext(),
        pytest.raises(NotImplementedError, match="SDPA returns no attention weights"),
    ):
        mha.attention(q, k, v, cache=cache, new_lengths=lengths, weights="mean", backend=backend)
    _assert_unchanged(cache, state)
    g.set_state(drawn)  # the same tokens again, on the default backend
    for _ in _steps(cache, history, g, [(2, step)]):
        pass


def test_backend_is_checked_against_the_cache_as_the_write_leaves_it(monkeypatch):
    """Before the write the cache's views require no grad; after it they do when the new
    tokens do. A backend whose weights are not differentiable is refused for that call,
    before the write, as it is for the same call without a cache."""
    import dataclasses

    from mha._backends import tiled

    monkeypatch.setattr(tiled.BACKEND, "caps", dataclasses.replace(tiled.BACKEND.caps, weights_grad=False))
    g = torch.Generator().manual_seed(17)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    q, k, v = _randn(g, N, HQ, 2, DK), _randn(g, N, HKV, 2, DK).requires_grad_(), _randn(g, N, HKV, 2, DV)
    match = "weights='mean' are not differentiable and the inputs require grad"
    with pytest.raises(NotImplementedError, match=match):
        mha.attention(q, k, v, Causal(), weights="mean", backend="tiled")
    state = _cache_state(cache)
    with pytest.raises(NotImplementedError, match=match):
        mha.attention(q, k, v, cache=cache, weights="mean", backend="tiled")
    _assert_unchanged(cache, state)
    with torch.no_grad():
        mha.attention(q, k, v, cache=cache, weights="mean", backend="tiled")
    assert cache.lengths.tolist() == [2] * N


def test_forced_backend_that_cannot_serve_leaves_a_static_cache_as_it_was():
    """The same for a static cache: neither the stored memory nor, through the module,
    its padding mask is replaced by a fill that then fails."""
    g = torch.Generator().manual_seed(16)
    cache = mha.KVCache(N, 11, HKV, DK, DV, static=True, dtype=F64)
    q = _randn(g, N, HQ, 1, DK)
    mha.attention(q, _randn(g, N, HKV, 9, DK), _randn(g, N, HKV, 9, DV), cache=cache, new_lengths=torch.tensor([9, 4, 1]))
    state = _cache_state(cache)
    with pytest.raises(NotImplementedError, match="SDPA returns no attention weights"):
        mha.attention(q, _randn(g, N, HKV, 5, DK), _randn(g, N, HKV, 5, DV), cache=cache, weights="mean", backend="sdpa")
    _assert_unchanged(cache, state)

    theirs, ours = build_pair(30, 5, dtype=F64)
    memory, x = _randn(g, 9, N, 30), _randn(g, 1, N, 30)
    padding = torch.rand(N, 9, generator=g) < 0.4  # not right padding: stored as a mask
    static = ours.new_cache(N, 12, static=True)
    ours(x, memory, memory, key_padding_mask=padding, cache=static)
    state = _cache_state(static)
    with mha.use_backend("sdpa"), pytest.raises(NotImplementedError, match="SDPA returns no attention weights"):
        ours(x, memory[:4], memory[:4], key_padding_mask=~padding[:, :4], cache=static)
    _assert_unchanged(static, state)
    out, _ = ours(x, None, None, cache=static)
    torch.testing.assert_close(out, theirs(x, memory, memory, key_padding_mask=padding)[0], **TOL[F64])


def _shape_run(device: str) -> list:
    """The shapes of ragged steps, a reorder, a static cache and the module's padded
    prompt and memory, on ``device``."""
    shapes = []

    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    cache = mha.KVCache(N, M, HKV, DK, DV, device=device)
    for T, new_lengths in [*CHUNKS, (2, [0, 2, 1])]:
        lengths = None if new_lengths is None else torch.tensor(new_lengths, device=device)
        out = mha.attention(
            zeros(N, HQ, T, DK), zeros(N, HKV, T, DK), zeros(N, HKV, T, DV), cache=cache, new_lengths=lengths,
            weights="mean", return_lse=True,
        )
        shapes.append([tuple(t.shape) for t in out])
        if T == 3:
            cache.reorder(torch.tensor([2, 0, 0], device=device))
    static = mha.KVCache(N, 11, HKV, DK, DV, static=True, device=device)
    for memory in (9, None):
        kv = (None, None) if memory is None else (zeros(N, HKV, memory, DK), zeros(N, HKV, memory, DV))
        lengths = None if memory is None else torch.tensor([9, 4, 1], device=device)
        out = mha.attention(zeros(N, HQ, 2, DK), *kv, cache=static, new_lengths=lengths, weights="mean")
        shapes.append([tuple(out.output.shape), tuple(out.weights.shape)])
    module = mha.MultiheadAttention(30, 5, device=device)
    self_cache, memory_cache = module.new_cache(N, 13), module.new_cache(N, 12, static=True)
    prompt_padding = torch.arange(4, device=device)[None, :] >= torch.tensor([4, 1, 3], device=device)[:, None]
    memory_padding = torch.eye(N, 9, dtype=torch.bool, device=device)
    for x, padding in ((zeros(4, N, 30), prompt_padding), (zeros(1, N, 30), None)):
        out, weights = module(x, x, x, key_padding_mask=padding, cache=self_cache)
        shapes.append([tuple(out.shape), tuple(weights.shape)])
        out, weights = module(x, zeros(9, N, 30), zeros(9, N, 30), key_padding_mask=memory_padding, cache=memory_cache)
        shapes.append([tuple(out.shape), tuple(weights.shape)])
    return shapes


def test_ragged_steps_on_the_meta_device():
    """Shape inference with meta tensors: ragged new_lengths and padding masks, reorder and
    static caches read no values there and give the shapes a real cache gives."""
    assert _shape_run("meta") == _shape_run("cpu")
    cache = mha.KVCache(N, M, HKV, DK, device="meta")
    x = torch.zeros(N, HKV, 2, DK, device="meta")
    mha.attention(x, x, x, cache=cache, new_lengths=torch.tensor([1, 2, 0], device="meta"))
    cache.lengths[0] = 2  # by hand: the lengths are unknown, every position may be read
    assert mha.attention(x, x, x, cache=cache, weights="mean").weights.shape == (N, 2, M)


@pytest.mark.parametrize(("embed_dim", "num_heads"), [(12, 3), (8, 4), (16, 2)])
@pytest.mark.parametrize("static", [False, True])
def test_cache_of_another_module_names_the_module_and_new_cache(embed_dim, num_heads, static):
    """A cache made for other heads failed in the terms of the heads (Dk, Hkv) with no fix:
    now it says what the module needs, what the cache holds, and to use new_cache."""
    module = mha.MultiheadAttention(8, 2)
    cache = mha.MultiheadAttention(embed_dim, num_heads).new_cache(2, 5, static=static)
    x = torch.randn(1, 2, 8)
    match = (
        rf"KVCache\(batch_size=2, max_length=5, num_heads={num_heads}, head_dim={embed_dim // num_heads}, .* was not "
        r"made for this module \(embed_dim=8, num_heads=2\).* needs num_heads=2, head_dim=4, value_head_dim=4; "
        r"make it with this module's new_cache\(batch_size, max_length\)"
    )
    with pytest.raises(ValueError, match=match):
        module(x, x, x, cache=cache)
    assert cache.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("integer", [np.int64, torch.tensor])
def test_sizes_of_any_integral_type(integer):
    """Sizes read from numpy arrays or tensors (what operator.index takes) are ints; a bool,
    a float or a str is a TypeError naming the argument."""
    cache = mha.KVCache(integer(2), integer(5), integer(1), integer(4), integer(3))
    assert repr(cache) == repr(mha.KVCache(2, 5, 1, 4, 3))
    assert mha.MultiheadAttention(8, 2).new_cache(integer(2), integer(5)).key.shape == (2, 2, 5, 4)
    for bad, got in ((True, "bool True"), (2.0, "float 2.0"), ("2", "str '2'")):
        with pytest.raises(TypeError, match=f"KVCache: batch_size must be an int, got {got}; pass a Python int"):
            mha.KVCache(bad, 5, 1, 4)  # type: ignore[arg-type]


def test_constructor_errors_and_no_cache_arguments():
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        mha.KVCache(1, 0, 1, 8)
    with pytest.raises(TypeError, match="num_heads must be an int, got float"):
        mha.KVCache(1, 4, 2.0, 8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a floating-point dtype"):
        mha.KVCache(1, 4, 1, 8, dtype=torch.int64)
    x = torch.ones(1, 1, 2, 4)
    with pytest.raises(ValueError, match="new_lengths=, key=None and value=None need cache="):
        mha.attention(x, x, x, new_lengths=torch.tensor([1]))


def test_static_cache_functional():
    g = torch.Generator().manual_seed(7)
    cache = mha.KVCache(N, 11, HKV, DK, DV, static=True, dtype=F64)
    k, v = _randn(g, N, HKV, 9, DK), _randn(g, N, HKV, 9, DV)
    lengths = torch.tensor([9, 4, 1])
    q1, q2 = _randn(g, N, HQ, 2, DK), _randn(g, N, HQ, 3, DK)
    out1 = mha.attention(q1, k, v, cache=cache, new_lengths=lengths, weights="mean").output
    out2 = mha.attention(q2, None, None, cache=cache, weights="mean")
    for q, out in ((q1, out1), (q2, out2.output)):
        ref = mha.attention(q, k, v, KeyPadding(lengths), backend="reference")
        torch.testing.assert_close(out, ref.output, **TOL[F64])
    assert out2.weights.shape == (N, 3, 9)
    # A new fill replaces the memory.
    mha.attention(q1, k[:, :, :2], v[:, :, :2], cache=cache)
    assert cache.lengths.tolist() == [2] * N
    with pytest.raises(NotImplementedError, match=r"a static .* cache has no query positions"):
        mha.attention(q1, None, None, Causal(), cache=cache)


def test_empty_static_cache_is_not_read():
    """key=None, value=None on a static cache never filled (or reset) raises, naming the
    cache and the fix, instead of attending nothing (zeros)."""
    cache = mha.KVCache(N, 11, HKV, DK, DV, static=True, dtype=F64)
    q = torch.ones(N, HQ, 1, DK, dtype=F64)
    match = r"KVCache\(batch_size=3, max_length=11, .*static=True.*\) is empty: .*pass key and value, the encoder memory"
    with pytest.raises(ValueError, match=match):
        mha.attention(q, None, None, cache=cache)
    mha.attention(q, torch.ones(N, HKV, 4, DK, dtype=F64), torch.ones(N, HKV, 4, DV, dtype=F64), cache=cache)
    mha.attention(q, None, None, cache=cache)
    cache.reset()
    with pytest.raises(ValueError, match=match):
        mha.attention(q, None, None, cache=cache)
    _, ours = build_pair(30, 5, dtype=F64)
    static = ours.new_cache(N, 8, static=True)
    x = torch.ones(1, N, 30, dtype=F64)
    with pytest.raises(ValueError, match=r"static=True.* is empty: .*pass key and value, the encoder memory"):
        ours(x, None, None, cache=static)


@pytest.mark.parametrize("call", ["key_only", "value_only", "padding_only"])
def test_filled_static_cache_refuses_a_memory_it_would_not_read(call):
    """On a filled static cache a key without its value (or a value without its key), or
    a key_padding_mask without the memory, raises, naming the fix, instead of silently
    attending the stored memory with its stored padding."""
    g = torch.Generator().manual_seed(21)
    theirs, ours = build_pair(30, 5, dtype=F64)
    memory, other, x = _randn(g, 6, N, 30), _randn(g, 4, N, 30), _randn(g, 1, N, 30)
    static = ours.new_cache(N, 8, static=True)
    ours(x, memory, memory, cache=static)
    state = _cache_state(static)
    key, value = {"key_only": (other, None), "value_only": (None, other), "padding_only": (None, None)}[call]
    padding = torch.zeros(N, 4, dtype=torch.bool) if call == "padding_only" else None
    match = "key_padding_mask with key=None" if call == "padding_only" else "key and value may be None only together"
    with pytest.raises(ValueError, match=match):
        ours(x, key, value, key_padding_mask=padding, cache=static)
    with pytest.raises(ValueError, match=match):
        mha.explain(ours, x, key, value, key_padding_mask=padding, cache=static)
    _assert_unchanged(static, state)
    out, _ = ours(x, None, None, cache=static)
    torch.testing.assert_close(out, theirs(x, memory, memory)[0], **TOL[F64])


def _causal(L: int, dtype=F64) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_self_attention_matches_torch_full_forward(batch_first):
    """Ragged prompts through key_padding_mask, then single tokens: each real token's
    output equals torch's full causal forward over its sequence so far."""
    theirs, ours = build_pair(30, 5, batch_first=batch_first, dtype=F64)
    g = torch.Generator().manual_seed(8)
    prompt_lengths, steps, Tp = [4, 1, 3], 4, 4
    seqs = [_randn(g, prompt_lengths[n] + steps, 30) for n in range(N)]
    cache = ours.new_cache(N, 13)

    def batch(rows: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(rows, 0)  # (N, T, E)
        return x if batch_first else x.transpose(0, 1)

    prompt = batch([torch.cat([s[:p], s.new_zeros(Tp - p, 30)]) for s, p in zip(seqs, prompt_lengths, strict=True)])
    kpm = torch.arange(Tp)[None, :] >= torch.tensor(prompt_lengths)[:, None]
    out, weights = ours(prompt, prompt, prompt, key_padding_mask=kpm, cache=cache)
    outputs = [[(out[n] if batch_first else out[:, n])[:p]] for n, p in enumerate(prompt_lengths)]
    last_weights = []
    for i in range(steps):
        x = batch([s[p + i : p + i + 1] for s, p in zip(seqs, prompt_lengths, strict=True)])
        out, weights = ours(x, x, x, cache=cache)
        last_weights.append(weights)
        for n in range(N):
            outputs[n].append(out[n] if batch_first else out[:, n])
    for n in range(N):
        s = seqs[n][:, None] if not batch_first else seqs[n][None]
        ref, ref_weights = theirs(s, s, s, attn_mask=_causal(len(seqs[n])))
        torch.testing.assert_close(torch.cat(outputs[n]), ref[:, 0] if not batch_first else ref[0], **TOL[F64])
        p, S = prompt_lengths[n], len(seqs[n])
        for i, w in enumerate(last_weights):  # (N, 1, S') over the cache, zero past the sequence
            torch.testing.assert_close(w[n, 0, : p + i + 1], ref_weights[0, p + i, : p + i + 1], **TOL[F64])
            assert not w[n, 0, p + i + 1 :].any()
        assert p + steps == S


def test_module_cross_attention_stores_memory_and_padding():
    theirs, ours = build_pair(30, 5, kdim=7, vdim=11, dtype=F64)
    g = torch.Generator().manual_seed(9)
    memory_k, memory_v = _randn(g, 9, N, 7), _randn(g, 9, N, 11)
    x = _randn(g, 5, N, 30)
    for kpm in (None, torch.arange(9)[None, :] >= torch.tensor([9, 3, 6])[:, None], torch.rand(N, 9, generator=g) < 0.4):
        cache = ours.new_cache(N, 12, static=True)
        out1, w1 = ours(x[:2], memory_k, memory_v, key_padding_mask=kpm, cache=cache, average_attn_weights=False)
        out2, w2 = ours(x[2:], None, None, cache=cache, average_attn_weights=False)
        ref, ref_w = theirs(x, memory_k, memory_v, key_padding_mask=kpm, average_attn_weights=False)
        torch.testing.assert_close(torch.cat([out1, out2]), ref, **TOL[F64])
        torch.testing.assert_close(torch.cat([w1, w2], 2), ref_w, **TOL[F64])


def test_module_cache_errors():
    _, ours = build_pair(30, 5, dtype=F64)
    x = torch.ones(2, N, 30, dtype=F64)
    cache = ours.new_cache(N, 8)
    with pytest.raises(NotImplementedError, match="attn_mask is not supported"):
        ours(x, x, x, attn_mask=torch.zeros(2, 2, dtype=torch.bool), cache=cache)
    with pytest.raises(ValueError, match="must be right padding"):
        ours(x, x, x, key_padding_mask=torch.tensor([[True, False]] * N), cache=cache)
    with pytest.raises(TypeError, match="key_padding_mask must be boolean"):
        ours(x, x, x, key_padding_mask=torch.zeros(N, 2, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match="query must be batched"):
        ours(x[:, 0], x[:, 0], x[:, 0], cache=cache)
    with pytest.raises(TypeError, match=r"cache must be an mha\.KVCache"):
        ours(x, x, x, cache=object())  # type: ignore[arg-type]
    # A memory that does not fit leaves a static cache's padding mask as it was.
    static = ours.new_cache(N, 8, static=True)
    memory = torch.ones(9, N, 30, dtype=F64)
    with pytest.raises(ValueError, match="the memory has S=9 tokens, more than the cache's max_length=8"):
        ours(x, memory, memory, key_padding_mask=torch.eye(N, 9, dtype=torch.bool), cache=static)
    with pytest.raises(ValueError, match="the memory has N=2 sequences but the cache holds batch_size=3"):
        ours(x[:, :2], memory[:4, :2], memory[:4, :2], key_padding_mask=torch.eye(2, 4, dtype=torch.bool), cache=static)
    assert static.key_padding_mask is None
    _, with_bias_kv = build_pair(30, 5, add_bias_kv=True, dtype=F64)
    with pytest.raises(NotImplementedError, match="add_bias_kv and add_zero_attn"):
        with_bias_kv(x, x, x, cache=with_bias_kv.new_cache(N, 8))
    assert cache.lengths.tolist() == [0] * N


def test_is_causal_on_a_static_cache_is_refused_not_ignored():
    """Without a cache is_causal=True masks the memory causally (top-left); on a static
    (cross-attention) cache it was dropped silently, by the module and by explain."""
    _, ours = build_pair(30, 5, dtype=F64)
    x, memory = torch.ones(2, N, 30, dtype=F64), torch.ones(4, N, 30, dtype=F64)
    static = ours.new_cache(N, 8, static=True)
    for call in (ours, functools.partial(mha.explain, ours)):
        with pytest.raises(NotImplementedError, match="is_causal=True is not supported on a static"):
            call(x, memory, memory, is_causal=True, cache=static)
    assert static.lengths.tolist() == [0] * N
    ours(x, memory, memory, cache=static)
    with pytest.raises(NotImplementedError, match="is_causal=True is not supported on a static"):
        ours(x, None, None, is_causal=True, cache=static)
    self_cache = ours.new_cache(N, 8)  # causal already: is_causal=True is what it does
    ours(x, x, x, is_causal=True, cache=self_cache)
    assert self_cache.lengths.tolist() == [2] * N


@pytest.mark.parametrize("padding", ["right", "holes"])
def test_compiled_static_fill_reads_any_memory_padding(padding):
    """Under torch.compile the memory's key_padding_mask cannot be read to tell right
    padding from any other pattern: it is stored, so a mask with holes stays right."""
    theirs, ours = build_pair(30, 5, batch_first=True)
    ours.eval()
    g = torch.Generator().manual_seed(11)
    x, memory = torch.randn(2, 3, 30, generator=g), torch.randn(2, 6, 30, generator=g)
    kpm = torch.tensor([[False, False, False, False, True, True], [False, True, False, True, False, True]])
    if padding == "right":
        kpm = torch.tensor([[False] * 4 + [True] * 2, [False] * 5 + [True]])

    def fill(q, mem, mask, cache):
        return ours(q, mem, mem, key_padding_mask=mask, need_weights=False, cache=cache)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fill, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x, memory, kpm, ours.new_cache(2, 8, static=True))
        want, _ = theirs(x, memory, memory, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_compiled_step_does_not_recompile():
    """One compiled decode step serves every step of a generation: the cache's shapes
    never change, its lengths are tensors."""
    _, ours = build_pair(30, 5, batch_first=True)
    ours.eval()
    cache = ours.new_cache(2, 12)
    g = torch.Generator().manual_seed(10)
    xs = torch.randn(2, 9, 30, generator=g)
    with torch.no_grad():
        ours(xs[:, :3], xs[:, :3], xs[:, :3], cache=cache)

    def step(x):
        return ours(x, x, x, need_weights=False, cache=cache)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    outs = []
    with torch.no_grad():
        outs.append(compiled(xs[:, 3:4]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(4, 9):
                outs.append(compiled(xs[:, i : i + 1]))
    assert cache.lengths.tolist() == [9, 9]
    theirs = nn.MultiheadAttention(30, 5, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref, _ = theirs(xs, xs, xs, attn_mask=_causal(9, torch.float32))
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, 3:], **TOL[torch.float32])
    # After a compiled step the host-side bound is unknown; eager steps still read it right.
    with torch.no_grad():
        x = torch.randn(2, 1, 30, generator=g)
        ours(x, x, x, cache=cache)
    assert cache.lengths.tolist() == [10, 10]


def test_cache_route_uses_decode_backend_and_reports_it(monkeypatch):
    from mha._backends import decode
    from mha._core import _validate_call
    from mha._dispatch import explain_dispatch

    q = torch.ones(1, 4, 1, 8)
    k = torch.ones(1, 2, 5, 8)
    reasons = explain_dispatch(_validate_call(q, k, k, None, None, 0.0, None, False))
    # It can serve, but dispatch picks it only when asked (the cached route asks).
    assert reasons["decode"] == [
        "picked automatically never (only when asked for) (force it with backend='decode' or "
        "mha.use_backend('decode'))"
    ]
    big = torch.ones(1, 4, 33, 8)
    reasons = explain_dispatch(_validate_call(big, k, k, None, None, 0.0, None, False))
    assert "66 query rows per key/value head, more than 64" in reasons["decode"][0]

    served = []
    forward = decode.BACKEND.forward
    monkeypatch.setattr(decode.BACKEND, "forward", lambda call: served.append(call.shape) or forward(call))
    cache = mha.KVCache(1, 40, 2, 8)
    mha.attention(big, k[:, :, :1].expand(1, 2, 33, 8), k[:, :, :1].expand(1, 2, 33, 8), cache=cache)
    mha.attention(q, k[:, :, :1], k[:, :, :1], cache=cache)
    assert served == [(1, 4, 2, 1, 34, 8, 8)]  # the prompt (66 rows per head) went elsewhere
    with mha.use_backend("tiled"):  # a forced backend wins over the cached route's choice
        mha.attention(q, k[:, :, :1], k[:, :, :1], cache=cache)
    assert len(served) == 1


def test_lengths_set_by_hand_are_honoured():
    """A cache whose lengths are written directly (e.g. loaded) is read to those lengths:
    the host-side bound the eager path slices by is void once lengths change."""
    g = torch.Generator().manual_seed(11)
    cache = mha.KVCache(2, 8, 1, 4, dtype=F64)
    cache.key.copy_(_randn(g, 2, 1, 8, 4))
    cache.value.copy_(_randn(g, 2, 1, 8, 4))
    cache.lengths.copy_(torch.tensor([6, 3]))
    q, k, v = _randn(g, 2, 2, 1, 4), _randn(g, 2, 1, 1, 4), _randn(g, 2, 1, 1, 4)
    out = mha.attention(q, k, v, cache=cache).output
    keys, values = cache.key[:, :, :7], cache.value[:, :, :7]
    ref = mha.attention(q, keys, values, KeyPadding(torch.tensor([7, 4])), backend="reference").output
    torch.testing.assert_close(out, ref, **TOL[F64])


def test_gradients_of_a_step_reach_the_new_tokens():
    """Gradients of one cached step with respect to its query and new key/value equal
    those of the reference over the whole sequence."""
    g = torch.Generator().manual_seed(12)
    cache = mha.KVCache(N, M, HKV, DK, DV, dtype=F64)
    k0, v0 = _randn(g, N, HKV, 4, DK), _randn(g, N, HKV, 4, DV)
    mha.attention(_randn(g, N, HQ, 4, DK), k0, v0, cache=cache)
    q, k, v = (_randn(g, *shape).requires_grad_() for shape in ((N, HQ, 2, DK), (N, HKV, 2, DK), (N, HKV, 2, DV)))
    grad = _randn(g, N, HQ, 2, DV)
    mha.attention(q, k, v, cache=cache).output.backward(grad)
    mine = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    full = mha.attention(
        q, torch.cat([k0, k], 2), torch.cat([v0, v], 2), Causal("bottom_right"), backend="reference"
    ).output
    full.backward(grad)
    for got, t in zip(mine, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, **TOL[F64])


def test_equal_lengths_need_no_padding_mask(monkeypatch):
    """While every sequence holds as many positions as the others (known on the host), a
    step masks no padding: no mask for one new token, a bottom-right causal band for
    more. A ragged write brings KeyPadding back until reset(), or until the lengths,
    written by hand or reordered, are equal again."""
    from mha._backends import decode

    masks = []
    forward = decode.BACKEND.forward
    monkeypatch.setattr(decode.BACKEND, "forward", lambda call: masks.append(call.mask) or forward(call))

    def kinds() -> list[set[str]]:
        seen = [set() if m is None else {type(p).__name__ for p in m.parts()} for m in masks]
        masks.clear()
        return seen

    g = torch.Generator().manual_seed(13)
    cache = mha.KVCache(N, M, HKV, DK, dtype=F64)
    for _ in _steps(cache, History(N), g, [(3, None), (1, None), (2, [2, 1, 0]), (1, None)], Dv=DK):
        pass
    assert kinds() == [{"Window"}, set(), {"KeyPadding", "Allowed"}, {"KeyPadding"}]
    assert masks == []
    cache.reset()
    history = History(N)
    for _ in _steps(cache, history, g, [(2, None), (1, None)], Dv=DK):
        pass
    cache.reorder(torch.tensor([2, 0, 0]))
    history.reorder([2, 0, 0])
    for _ in _steps(cache, history, g, [(1, None)], Dv=DK):
        pass
    assert kinds() == [{"Window"}, set(), set()]
    cache.lengths.copy_(torch.tensor([4, 4, 4]))  # by hand: read back once, found equal
    mha.attention(_randn(g, N, HQ, 1, DK), _randn(g, N, HKV, 1, DK), _randn(g, N, HKV, 1, DK), cache=cache)
    cache.lengths[0] = 2
    mha.attention(_randn(g, N, HQ, 1, DK), _randn(g, N, HKV, 1, DK), _randn(g, N, HKV, 1, DK), cache=cache)
    assert kinds() == [set(), {"KeyPadding"}]
    assert cache.lengths.tolist() == [3, 6, 6]


def test_caches_made_and_used_in_inference_mode():
    """Decoding runs under torch.inference_mode, whose tensors have no version counter:
    making a cache there (module, decoder or KVCache) raised RuntimeError from reading
    lengths._version, and so did a reorder there that changed the batch size."""
    theirs, ours = build_pair(30, 5, dtype=F64)
    decoder = mha.swap(nn.TransformerDecoder(nn.TransformerDecoderLayer(30, 5, 16, dropout=0.0), 1)).double().eval()
    g = torch.Generator().manual_seed(12)
    x, memory = _randn(g, 4, 2, 30), _randn(g, 3, 2, 30)
    want, _ = theirs(x, x, x, attn_mask=_causal(4))
    with torch.inference_mode():
        cache = ours.new_cache(2, 6)
        out = torch.cat([ours(x[:2], x[:2], x[:2], cache=cache)[0]] + [ours(t, t, t, cache=cache)[0] for t in x[2:, None]])
        cache.reorder(torch.tensor([1, 0, 1]))
        ours(x[:1, [0, 0, 0]], x[:1, [0, 0, 0]], x[:1, [0, 0, 0]], cache=cache)
        cache.lengths = torch.tensor([2, 2, 2])  # set by hand: an inference tensor
        ours(x[:1, [0, 0, 0]], x[:1, [0, 0, 0]], x[:1, [0, 0, 0]], cache=cache)
        layer_cache = decoder.new_cache(2, max_length=4, memory_length=3)
        decoder(x[:1], memory, cache=layer_cache)
        layer_cache.reorder(torch.tensor([0]))
        decoder(x[1:2, :1], memory[:, :1], cache=layer_cache)
    torch.testing.assert_close(out, want, **TOL[F64])
    assert cache.lengths.tolist() == [3, 3, 3]


def test_cache_made_in_inference_mode_and_written_outside_it_says_so():
    """Its buffers are inference tensors, which torch refuses to write outside inference
    mode: that was RuntimeError from inside the write."""
    with torch.inference_mode():
        cache = mha.KVCache(2, 4, 1, 8)
    q = torch.randn(2, 2, 1, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"inference_mode.*new_cache"):
            mha.attention(q, q[:, :1], q[:, :1], cache=cache)
    assert cache.lengths.tolist() == [0, 0]


def test_lengths_set_by_hand_in_inference_mode_and_written_in_place_are_read():
    """Lengths set by hand to an inference tensor have no version counter: a write of
    them in place (a hand-made reset) went unseen, the next step wrote after the stale
    bound of 3 positions instead of at 0, and attended them."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (_randn(g, 2, 1, 1, 8) for _ in range(3))
    with torch.inference_mode():
        cache = mha.KVCache(2, 6, 1, 8, dtype=F64)
        mha.attention(*(_randn(g, 2, 1, 2, 8) for _ in range(3)), cache=cache)
        cache.lengths = torch.tensor([2, 2])
        mha.attention(q, k, v, cache=cache)
        cache.lengths.zero_()
        got = mha.attention(q, k, v, cache=cache).output
        assert cache.lengths.tolist() == [1, 1]
    torch.testing.assert_close(got, v, **TOL[F64])


def test_cache_made_in_inference_mode_and_reordered_outside_it_says_so():
    """Reordering in place writes the buffers, inference tensors: torch's RuntimeError
    from inside the copy. A reorder that changes the batch size makes new buffers, and
    runs."""
    with torch.inference_mode():
        cache = mha.KVCache(2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"inference_mode.*new_cache"):
        cache.reorder(torch.tensor([1, 0]))
    cache.reorder(torch.tensor([1, 0, 0]))
    assert not cache.key.is_inference()
    mha.attention(*(torch.randn(3, 1, 1, 8) for _ in range(3)), cache=cache)
    assert cache.lengths.tolist() == [1, 1, 1]
