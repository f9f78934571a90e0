"""torch.autograd.gradcheck in fp64 through mha.MultiheadAttention: inputs and parameters,
with and without masks, with and without weights. Finite differences, not torch, are the
oracle here, so rows with no key (where torch has no gradient to compare) are checked too."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

import mha

E, H, L, S, N = 6, 2, 3, 4, 2
DT = torch.float64


def _masks(name: str, g: torch.Generator) -> dict:
    if name == "none":
        return {}
    if name == "right_padding":
        return {"key_padding_mask": torch.arange(S)[None, :] >= torch.tensor([S, 2])[:, None]}
    if name == "arbitrary_padding":
        return {"key_padding_mask": torch.tensor([[False, True, False, True], [True, False, True, True]])}
    if name == "float_attn_mask":
        return {"attn_mask": torch.randn(L, S, generator=g, dtype=DT)}
    if name == "per_head_bool":
        return {"attn_mask": torch.rand(N, H, L, S, generator=g) < 0.3}
    if name == "is_causal":
        return {"is_causal": True}
    if name == "empty_rows":  # batch 1 fully padded and row 0 blocked: no key for those rows
        attn = torch.zeros(L, S, dtype=torch.bool)
        attn[0] = True
        return {"attn_mask": attn, "key_padding_mask": torch.tensor([[False] * S, [True] * S])}
    raise ValueError(name)


MASKS = ["none", "right_padding", "arbitrary_padding", "float_attn_mask", "per_head_bool", "is_causal", "empty_rows"]


def _check(
    module: mha.MultiheadAttention, masks: dict, need_weights: bool, param: str, kd=E, vd=E, fast=True
) -> None:
    """gradcheck w.r.t. query, key, value and one parameter; ``fast`` checks a random
    projection of the Jacobian (torch's fast_mode), otherwise every entry."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(L, N, E, generator=g, dtype=DT, requires_grad=True)
    k = torch.randn(S, N, kd, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(S, N, vd, generator=g, dtype=DT, requires_grad=True)
    weight = dict(module.named_parameters())[param].detach().clone().requires_grad_()

    def f(q, k, v, weight):
        out, w = functional_call(module, {param: weight}, (q, k, v), {"need_weights": need_weights, **masks})
        return (out, w) if need_weights else out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty rows warn
        assert torch.autograd.gradcheck(f, (q, k, v, weight), fast_mode=fast)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", MASKS)
def test_gradcheck_with_masks(masks, need_weights):
    torch.manual_seed(0)
    module = mha.MultiheadAttention(E, H, dtype=DT)
    masks_ = _masks(masks, torch.Generator().manual_seed(2))
    _check(module, masks_, need_weights, "in_proj_weight", fast=not (masks == "empty_rows" and need_weights))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"add_bias_kv": True}, "bias_k"),
        ({"add_bias_kv": True, "add_zero_attn": True}, "bias_v"),
        ({"kdim": 5, "vdim": 3}, "k_proj_weight"),
        ({"kdim": 5, "vdim": 3}, "v_proj_weight"),
        ({}, "out_proj.bias"),
        ({}, "in_proj_bias"),
    ],
)
def test_gradcheck_parameters(kwargs, param):
    torch.manual_seed(0)
    module = mha.MultiheadAttention(E, H, dtype=DT, **kwargs)
    masks = {"key_padding_mask": torch.tensor([[False, False, True, True], [True, True, True, True]])}
    _check(module, masks, True, param, kwargs.get("kdim", E), kwargs.get("vdim", E))


def test_gradcheck_per_head_weights_unbatched_batch_first():
    torch.manual_seed(0)
    module = mha.MultiheadAttention(E, H, dtype=DT, batch_first=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(L, E, generator=g, dtype=DT, requires_grad=True)

    def f(x):
        return module(x, x, x, average_attn_weights=False, is_causal=True)

    assert torch.autograd.gradcheck(f, (x,))
