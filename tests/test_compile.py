"""torch.compile (fullgraph) and torch.export on mha.MultiheadAttention, against eager."""

from __future__ import annotations

import warnings

import pytest
import torch

import mha


def _inputs(batch_first: bool = False):
    g = torch.Generator().manual_seed(0)
    L, S, N, E = 7, 11, 3, 24

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
