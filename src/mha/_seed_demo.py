"""The seed's three examples, run through torch and mha side by side."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import mha


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**kwargs)
    ours = mha.MultiheadAttention(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run() -> None:
    torch.manual_seed(0)
    examples = []
    query, key, value = torch.randn(10, 32, 64), torch.randn(10, 32, 64), torch.randn(10, 32, 64)
    examples.append(("Example 1: fixed length", (query, key, value), {}))
    key2, value2 = torch.randn(15, 32, 64), torch.randn(15, 32, 64)
    kpm = torch.randint(0, 2, (32, 15)).bool()
    examples.append(("Example 2: random key_padding_mask", (query, key2, value2), {"key_padding_mask": kpm}))
    tril = torch.tril(torch.ones(10, 10)).bool()
    examples.append(("Example 3: the seed's 'causal' tril mask", (query, key, value), {"attn_mask": tril}))
    for title, args, kwargs in examples:
        ref, ours = _pair(embed_dim=64, num_heads=8)
        print(f"== {title}")
        out_t, w_t = ref(*args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out_m, w_m = ours(*args, **kwargs)
        print(f"  output {tuple(out_m.shape)}, weights {tuple(w_m.shape)}")
        print(f"  torch NaN outputs: {int(out_t.isnan().sum())}, mha NaN outputs: {int(out_m.isnan().sum())}")
        finite = ~out_t.isnan()
        print(f"  max |torch - mha| where torch is finite: {(out_t - out_m)[finite].abs().max():.2e}")
        for w in caught:
            print(f"  mha warns: {w.message}")
