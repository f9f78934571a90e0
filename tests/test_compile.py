"""torch.compile (fullgraph) and torch.export on mha.MultiheadAttention, against eager."""

from __future__ import annotations

import warnings

import pytest
import torch

import mha
from mha._backends import tiled


def _inputs(batch_first: bool = False, L: int = 7, S: int = 11, N: int = 3):
    """query, key, value, key_padding_mask ``(N, S)`` and boolean attn_mask ``(L, S)``."""
    g = torch.Generator().manual_seed(0)
    E = 24

    def seq(length: int) -> torch.Tensor:
        return torch.randn((N, length, E) if batch_first else (length, N, E), generator=g)

    kpm = torch.rand(N, S, generator=g) < 0.3
    kpm[1] = True  # one batch row with no key: zeros, not NaN, compiled too
    kpm[2, -3:] = True
    return seq(L), seq(S), seq(S), kpm, torch.rand(L, S, generator=g) < 0.3


def _module(**kwargs) -> mha.MultiheadAttention:
    torch.manual_seed(0)
    module = mha.MultiheadAttention(24, 4, **kwargs).eval()
    with torch.no_grad():
        module.in_proj_bias.normal_()
    return module


def _eager(module, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(*args, **kwargs)


def _check(module, args, kwargs, backend="aot_eager"):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out, weights = compiled(*args, **kwargs)
    ref_out, ref_weights = _eager(module, *args, **kwargs)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out)
    if ref_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize(("need_weights", "batch_first"), [(False, False), (True, True)])
def test_compile_dense(need_weights, batch_first):
    q, k, v, _, _ = _inputs(batch_first)
    _check(_module(batch_first=batch_first), (q, k, v), {"need_weights": need_weights})


def test_compile_self_attention_is_causal():
    q, _, _, _, _ = _inputs()
    _check(_module(), (q, q, q), {"is_causal": True, "need_weights": False})


def test_compile_eager_backend():
    q, k, v, _, _ = _inputs()
    _check(_module(), (q, k, v), {}, backend="eager")


@pytest.mark.parametrize("need_weights", [False, True])
def test_compile_key_padding_mask(need_weights):
    q, k, v, kpm, _ = _inputs()
    _check(_module(), (q, k, v), {"key_padding_mask": kpm, "need_weights": need_weights})


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_compile_attn_mask(dtype):
    q, k, v, _, am = _inputs()
    mask = am if dtype == torch.bool else torch.zeros(am.shape).masked_fill(am, float("-inf"))
    _check(_module(), (q, k, v), {"attn_mask": mask})


def test_compile_both_masks_per_head_weights():
    q, k, v, kpm, am = _inputs()
    _check(_module(), (q, k, v), {"key_padding_mask": kpm, "attn_mask": am, "average_attn_weights": False})


@pytest.mark.parametrize("need_weights", [False, True])
def test_export_dense(need_weights):
    q, k, v, _, _ = _inputs()
    module = _module()
    program = torch.export.export(module, (q, k, v), {"need_weights": need_weights})
    out, weights = program.module()(q, k, v, need_weights=need_weights)
    ref_out, ref_weights = module(q, k, v, need_weights=need_weights)
    torch.testing.assert_close(out, ref_out)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights)


# (batch_first, self-attention, masks, average_attn_weights, dynamic N): a few cases that
# between them cover both layouts, both weights, every torch-style mask and a dynamic batch.
_DYNAMIC_CASES = [
    pytest.param(False, False, (), True, False, id="cross-averaged"),
    pytest.param(True, False, ("key_padding_mask", "attn_mask"), False, False, id="batch-first-masks-per-head"),
    pytest.param(False, True, ("is_causal",), True, True, id="self-causal-dynamic-batch"),
]


@pytest.mark.parametrize(("batch_first", "self_attention", "masks", "average", "dynamic_batch"), _DYNAMIC_CASES)
def test_export_dynamic_lengths_with_weights(monkeypatch, batch_first, self_attention, masks, average, dynamic_batch):
    """torch.export with a Dim for L and S (and N) and need_weights=True: the tiled backend's
    loop over blocks specialised the symbolic sizes. The program runs at other sizes, some
    that eager splits into several blocks, as eager mha and torch's module."""
    monkeypatch.setattr(tiled, "_BLOCK_BYTES", 1 << 10)  # eager: blocks of a few rows
    monkeypatch.setattr(tiled, "_BATCH_BLOCK_BYTES", 1 << 9)
    module = _module(batch_first=batch_first)
    theirs = torch.nn.MultiheadAttention(24, 4, batch_first=batch_first).eval()
    theirs.load_state_dict(module.state_dict())

    def call(N, L, S):
        q, k, v, kpm, am = _inputs(batch_first, L, L if self_attention else S, N)
        args = (q, q, q) if self_attention else (q, k, v)
        kwargs = {"average_attn_weights": average}
        if "key_padding_mask" in masks:
            kwargs["key_padding_mask"] = kpm
        if "attn_mask" in masks:
            kwargs["attn_mask"] = am
        if "is_causal" in masks:
            kwargs["is_causal"] = True
        return args, kwargs

    seq, batch = (1, 0) if batch_first else (0, 1)
    n, length = torch.export.Dim("N"), torch.export.Dim("L")
    keys = length if self_attention else torch.export.Dim("S")
    spec = {batch: n} if dynamic_batch else {}
    args, kwargs = call(3, 7, 11)
    shapes = {"query": {seq: length, **spec}, "key": {seq: keys, **spec}, "value": {seq: keys, **spec}}
    shapes |= {name: None for name in kwargs}
    if "key_padding_mask" in masks:
        shapes["key_padding_mask"] = {1: keys}
    if "attn_mask" in masks:
        shapes["attn_mask"] = {0: length, 1: keys}
    program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes).module()
    assert tiled._block_shape(3, 4, 40, 53, 4)[1] < 40  # eager splits (3, 40, 53) into blocks
    for N, L, S in [(3, 40, 53), (3, 2, 3), (5 if dynamic_batch else 3, 9, 13)]:
        args, kwargs = call(N, L, S)
        out, weights = program(*args, **kwargs)
        ref_out, ref_weights = _eager(module, *args, **kwargs)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(weights, ref_weights)
        if kwargs.get("is_causal"):  # torch takes is_causal only as a hint with the mask
            kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L)
        their_out, their_weights = theirs(*args, **kwargs)
        rows = their_out.isfinite()  # torch gives NaN where a batch row has no key, mha zeros
        torch.testing.assert_close(out[rows], their_out[rows])
        rows = their_weights.isfinite()
        torch.testing.assert_close(weights[rows], their_weights[rows])


def test_compile_dynamic_lengths_with_weights_compiles_once(monkeypatch):
    """torch.compile(dynamic=True) with need_weights=True: one graph for every length (the
    tiled backend's loop over blocks specialised L and S, and each new length recompiled)."""
    import torch._dynamo.testing

    monkeypatch.setattr(tiled, "_BLOCK_BYTES", 1 << 10)
    monkeypatch.setattr(tiled, "_BATCH_BLOCK_BYTES", 1 << 9)
    module = _module()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter, dynamic=True)
    for L, S in [(7, 11), (9, 13), (40, 53)]:
        q, k, v, kpm, _ = _inputs(L=L, S=S)
        out, weights = compiled(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
        ref_out, ref_weights = _eager(module, q, k, v, key_padding_mask=kpm, average_attn_weights=False)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(weights, ref_weights)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compile_inductor_dense():
    q, k, v, _, _ = _inputs()
    _check(_module(), (q, k, v), {"need_weights": False}, backend="inductor")


@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"key_padding_mask": True}])
def test_compile_first_calls_in_a_process_do_not_recompile(monkeypatch, kwargs):
    """The memo dicts of device types and causal band plans start empty in a fresh
    process: read while tracing, dynamo guarded on their contents, and the next call
    after one that filled them (compiled or eager) recompiled."""
    import torch._dynamo.testing

    from mha import _plan, _types

    monkeypatch.setattr(_types, "_DEVICE_TYPES", {})
    monkeypatch.setattr(_plan, "_TOP_LEFT_BAND_PLANS", {})
    q, k, v, kpm, _ = _inputs()
    module = _module()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for step in range(3):
        call = dict(kwargs)
        if "key_padding_mask" in call:
            call["key_padding_mask"] = kpm.roll(step, dims=1)
        out, _ = compiled(q, k, v, **call)
        torch.testing.assert_close(out, _eager(module, q, k, v, **call)[0])
    assert counter.frame_count == 1
