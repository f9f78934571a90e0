"""Three usage examples: fixed-length self-attention, a random key padding mask, and
the inverted `tril` "causal" mask, with mha in place of nn.MultiheadAttention."""

from __future__ import annotations

import warnings

import pytest
import torch

import mha


def test_example_1_fixed_length():
    attention = mha.MultiheadAttention(embed_dim=64, num_heads=8)
    query = torch.randn(10, 32, 64)  # L=10, N=32, E=64
    key = torch.randn(10, 32, 64)  # S=10, N=32, E=64
    value = torch.randn(10, 32, 64)  # S=10, N=32, D=64
    attn_output, attn_output_weights = attention(query, key, value)
    assert attn_output.shape == torch.Size([10, 32, 64])
    assert attn_output_weights.shape == torch.Size([32, 10, 10])
    torch.testing.assert_close(attn_output_weights.sum(-1), torch.ones(32, 10))


def test_example_2_random_key_padding_mask_gives_no_nan():
    attention = mha.MultiheadAttention(embed_dim=64, num_heads=8)
    query = torch.randn(10, 32, 64)
    key = torch.randn(15, 32, 64)
    value = torch.randn(15, 32, 64)

    # Create key padding mask
    key_padding_mask = torch.randint(0, 2, (32, 15)).bool()
    key_padding_mask[3] = True  # make sure one batch element has every key masked

    with pytest.warns(UserWarning, match="key_padding_mask blocks every key of some batch elements"):
        attn_output, attn_output_weights = attention(query, key, value, key_padding_mask=key_padding_mask)
    assert attn_output.shape == torch.Size([10, 32, 64])
    assert not torch.isnan(attn_output).any()
    assert not torch.isnan(attn_output_weights).any()
    assert (attn_output_weights[3] == 0).all()
    # Masked keys get no weight.
    assert (attn_output_weights.masked_select(key_padding_mask[:, None, :]) == 0).all()


def test_example_3_inverted_causal_mask_warns_and_gives_no_nan():
    attention = mha.MultiheadAttention(embed_dim=64, num_heads=8)
    query = torch.randn(10, 32, 64)
    key = torch.randn(10, 32, 64)
    value = torch.randn(10, 32, 64)

    # Create causal attention mask
    attn_mask = torch.tril(torch.ones(10, 10)).bool()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn_output, attn_output_weights = attention(query, key, value, attn_mask=attn_mask)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("attn_mask" in m and "tril" in m for m in messages), messages
    assert all(w.filename == __file__ for w in caught), "warnings must point at the caller's line"
    assert attn_output.shape == torch.Size([10, 32, 64])
    assert not torch.isnan(attn_output).any()
    assert not torch.isnan(attn_output_weights).any()
    assert (attn_output_weights[:, 9] == 0).all()  # row 9 sees no key: zero attention
