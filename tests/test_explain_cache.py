"""mha.explain of a decoding step on a KV cache agrees with what the module then does."""

from __future__ import annotations

import pytest
import torch

import mha
from conftest import spy_on_dispatch

E, H, N = 15, 3, 7  # Dh = 5


def _module(**kwargs) -> mha.MultiheadAttention:
    torch.manual_seed(0)
    return mha.MultiheadAttention(E, H, **kwargs).eval()


def _state(cache: mha.KVCache) -> tuple[torch.Tensor, ...]:
    return cache.lengths.clone(), cache.key.clone(), cache.value.clone()


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_step_matches_the_module(T, need_weights, batch_first, monkeypatch):
    module = _module(batch_first=batch_first)
    cache = module.new_cache(N, 13)
    x = torch.randn(N, 2, E) if batch_first else torch.randn(2, N, E)
    new = torch.randn(N, T, E) if batch_first else torch.randn(T, N, E)
    with torch.no_grad():
        module(x, x, x, cache=cache)
        before = _state(cache)
        report = mha.explain(module, new, new, new, need_weights=need_weights, average_attn_weights=False, cache=cache)
        assert all(torch.equal(a, b) for a, b in zip(before, _state(cache), strict=True))
        used = spy_on_dispatch(monkeypatch)
        out, weights = module(new, new, new, need_weights=need_weights, average_attn_weights=False, cache=cache)
    assert report.output_shape == tuple(out.shape)
    assert report.weights_shape == (None if weights is None else tuple(weights.shape))
    assert used == [report.backend] == ["decode"]
    assert report.dispatch["decode"] == []
    assert f"S' = {2 + T} of max_length = 13" in report.path
    text = str(report)
    assert "cache key + value buffers" in text
    assert "lengths 2..2" in text


def test_cross_attention_fill_then_read(monkeypatch):
    module = _module()
    cache = module.new_cache(N, 17, static=True)
    q, memory = torch.randn(1, N, E), torch.randn(11, N, E)
    with torch.no_grad():
        fill = mha.explain(module, q, memory, memory, cache=cache)
        assert cache.lengths.tolist() == [0] * N
        out, weights = module(q, memory, memory, cache=cache)
        read = mha.explain(module, q, None, None, cache=cache)
        used = spy_on_dispatch(monkeypatch)
        out2, weights2 = module(q, None, None, cache=cache)
    assert (fill.output_shape, fill.weights_shape) == (tuple(out.shape), tuple(weights.shape)) == ((1, N, E), (N, 1, 11))
    assert (read.output_shape, read.weights_shape) == (tuple(out2.shape), tuple(weights2.shape))
    assert used == [read.backend]
    assert "projected once and stored" in fill.path
    assert "not projected again" in read.path


def test_many_query_rows_go_to_dispatch(monkeypatch):
    # T * Hq / Hkv > 64 rows: the cached route leaves the choice to dispatch.
    module = _module()
    cache = module.new_cache(N, 97)
    x = torch.randn(67, N, E)
    report = mha.explain(module, x, x, x, need_weights=False, cache=cache)
    used = spy_on_dispatch(monkeypatch)
    with torch.no_grad():
        module(x, x, x, need_weights=False, cache=cache)
    assert used == [report.backend] != ["decode"]
    assert any("67 query rows per key/value head" in reason for reason in report.dispatch["decode"])


BAD = {
    "not_a_cache": (lambda m: "cache", {}),
    "batch_mismatch": (lambda m: m.new_cache(N + 1, 5), {}),
    "attn_mask": (lambda m: m.new_cache(N, 5), {"attn_mask": torch.zeros(1, 1, dtype=torch.bool)}),
    "key_none_on_self_cache": (lambda m: m.new_cache(N, 5), {"key": None, "value": None}),
    "kpm_transposed": (lambda m: m.new_cache(N, 5), {"key_padding_mask": torch.zeros(1, N, dtype=torch.bool)}),
    "kpm_float": (lambda m: m.new_cache(N, 5), {"key_padding_mask": torch.zeros(N, 1)}),
    "memory_wider_than_kdim": (lambda m: m.new_cache(N, 5, static=True), {"key": torch.randn(3, N, E + 1)}),
    "empty_static_cache": (lambda m: m.new_cache(N, 5, static=True), {"key": None, "value": None}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_cached_calls_raise_what_the_module_raises(case):
    make, kwargs = BAD[case]
    module = _module()
    x = torch.randn(1, N, E)
    args = {"query": x, "key": x, "value": x, **kwargs}
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as from_module:
        module(**args, cache=make(module))
    with pytest.raises(from_module.type) as from_explain:
        mha.explain(module, **args, cache=make(module))
    assert str(from_explain.value) == str(from_module.value)


def test_use_backend_names_the_backend_the_step_runs(monkeypatch):
    # A forced backend skips the decode kernel: explain names the forced one, as the call runs it.
    module = _module()
    cache = module.new_cache(N, 13)
    x, new = torch.randn(2, N, E), torch.randn(1, N, E)
    with torch.no_grad():
        module(x, x, x, cache=cache)
        with mha.use_backend("reference"):
            report = mha.explain(module, new, new, new, cache=cache)
            used = spy_on_dispatch(monkeypatch)
            module(new, new, new, cache=cache)
    assert used == [report.backend] == ["reference"]
