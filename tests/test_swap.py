"""mha.swap: torch's attention out, mha's in (and back), outputs unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mha

MODES = ["train", "eval", "eval_no_grad"]


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def _padding(N: int, S: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]


def _run(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _round_trip(model: nn.Module, fn, n_attention: int) -> None:
    """fn(model) gives the same output with torch's attention, with mha's, and with torch's again."""
    params = dict(model.named_parameters())
    ref = _run(lambda: fn(model))
    swapped = mha.swap(model, to="mha")
    assert swapped is model
    assert _count(model, mha.MultiheadAttention) == n_attention
    assert _count(model, nn.MultiheadAttention) == 0
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(_run(lambda: fn(model)), ref, rtol=1e-5, atol=1e-6)
    mha.swap(model, to="torch")
    assert _count(model, nn.MultiheadAttention) == n_attention
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(_run(lambda: fn(model)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_with_padding_and_causal_masks(mode):
    torch.manual_seed(0)
    model = nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48, dropout=0.0,
        batch_first=True,
    )
    model.train(mode == "train")
    src, tgt = torch.randn(3, 9, 32), torch.randn(3, 6, 32)
    src_pad = _padding(3, 9, [9, 5, 7])
    tgt_pad = _padding(3, 6, [6, 6, 4])
    causal = nn.Transformer.generate_square_subsequent_mask(6)

    def fn(m):
        with torch.set_grad_enabled(mode != "eval_no_grad"):
            return m(
                src, tgt, tgt_mask=causal, src_key_padding_mask=src_pad,
                tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad, tgt_is_causal=True,
            )

    _round_trip(model, fn, n_attention=2 + 2 * 2)


@pytest.mark.parametrize("mode", MODES)
def test_encoder_batch_first_with_padding_and_causal(mode):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d_model=24, nhead=4, dim_feedforward=40, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    model.train(mode == "train")
    x = torch.randn(4, 7, 24)
    pad = _padding(4, 7, [7, 3, 5, 6])
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)

    def fn(m):
        with torch.set_grad_enabled(mode != "eval_no_grad"):
            padded = m(x, src_key_padding_mask=pad)
            masked = m(x, mask=causal, is_causal=True)
        # The nested fast path leaves padded positions at 0: compare the real tokens.
        return torch.cat([padded[~pad], masked.flatten(0, 1)])

    _round_trip(model, fn, n_attention=2)


def test_decoder_layer_and_bare_module():
    torch.manual_seed(2)
    layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
    tgt, memory = torch.randn(5, 2, 16), torch.randn(8, 2, 16)
    _round_trip(layer, lambda m: m(tgt, memory, tgt_is_causal=False), n_attention=2)

    attention = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, add_bias_kv=True)
    q, k, v = torch.randn(5, 2, 16), torch.randn(8, 2, 12), torch.randn(8, 2, 10)
    ref = attention(q, k, v)
    ours = mha.swap(attention)
    assert type(ours) is mha.MultiheadAttention
    assert ours.q_proj_weight is attention.q_proj_weight
    assert ours.bias_k is attention.bias_k
    torch.testing.assert_close(ours(q, k, v), ref)
    back = mha.swap(ours, to="torch")
    assert type(back) is nn.MultiheadAttention
    torch.testing.assert_close(back(q, k, v), ref)


def test_keeps_dtype_mode_grad_flags_and_sharing():
    shared = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, dtype=torch.float64).eval()
    shared.in_proj_weight.requires_grad_(False)
    model = nn.ModuleDict({"a": shared, "b": shared, "head": nn.Linear(8, 8)})
    mha.swap(model)
    assert model["a"] is model["b"]
    new = model["a"]
    assert type(new) is mha.MultiheadAttention
    assert not new.training
    assert new.batch_first
    assert new.in_proj_bias is None
    assert new.out_proj.weight.dtype == torch.float64
    assert new.out_proj.weight.device.type == "cpu"
    assert not new.in_proj_weight.requires_grad
    assert type(model["head"]) is nn.Linear


def test_rejects_unknown_target():
    with pytest.raises(ValueError, match="to must be 'mha' or 'torch', got 'flash'"):
        mha.swap(nn.Linear(2, 2), to="flash")


@pytest.mark.parametrize("model", [nn.Linear, [nn.MultiheadAttention(4, 2)], None])
def test_rejects_what_is_not_a_module(model):
    """A class, a list of modules or None raised AttributeError ('... has no attribute
    modules') from inside swap."""
    with pytest.raises(TypeError, match=r"swap: model must be a torch\.nn\.Module instance, got "):
        mha.swap(model)


class _Block(nn.Module):
    """Calls its attention with keyword arguments, as nn.TransformerEncoderLayer does."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_hooks_move_with_the_module_and_back():
    torch.manual_seed(0)
    block = _Block()
    calls: list[tuple[str, type]] = []

    def record(name):
        def hook(module, *args):
            calls.append((name, type(module)))
            if name == "pre_kwargs":  # (module, args, kwargs): kwargs reach the hook
                assert args[1]["need_weights"] is False
            if name == "fwd_kwargs":  # (module, args, kwargs, output)
                assert args[1]["need_weights"] is False
                assert isinstance(args[2], tuple)

        return hook

    attn = block.attn
    handles = [
        attn.register_forward_pre_hook(record("pre")),
        attn.register_forward_pre_hook(record("pre_kwargs"), with_kwargs=True),
        attn.register_forward_hook(record("fwd")),
        attn.register_forward_hook(record("fwd_kwargs"), with_kwargs=True, always_call=True),
        attn.register_full_backward_pre_hook(record("bwd_pre")),
        attn.register_full_backward_hook(record("bwd")),
        attn.register_state_dict_post_hook(record("state_dict")),
    ]
    names = ["pre", "pre_kwargs", "fwd", "fwd_kwargs", "bwd_pre", "bwd", "state_dict"]
    x = torch.randn(2, 5, 12, requires_grad=True)

    def run(cls):
        calls.clear()
        block(x).sum().backward()
        block.state_dict()
        assert sorted(calls) == sorted((name, cls) for name in names)

    run(nn.MultiheadAttention)
    mha.swap(block)
    run(mha.MultiheadAttention)
    mha.swap(block, to="torch")
    run(nn.MultiheadAttention)
    mha.swap(block)
    for handle in handles:  # the handles from registration still remove the hooks
        handle.remove()
    calls.clear()
    block(x).sum().backward()
    block.state_dict()
    assert calls == []


def test_always_call_hook_fires_when_the_swapped_module_raises():
    block = _Block()
    fired = []
    block.attn.register_forward_hook(lambda *a: fired.append(True), always_call=True)
    mha.swap(block)
    with pytest.raises(ValueError, match="query"):
        block.attn(torch.randn(2, 5, 7), torch.randn(2, 5, 12), torch.randn(2, 5, 12))
    assert fired == [True]


def test_keeps_buffers_attributes_submodules_and_weight_norm():
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    attention.register_buffer("scale_table", torch.arange(3.0))
    attention.register_buffer("scratch", torch.zeros(2), persistent=False)
    attention.adapter = nn.Linear(8, 8)
    attention.tag = "layer0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        nn.utils.weight_norm(attention, "in_proj_weight")  # in_proj_weight_g/_v; in_proj_weight computed
    x = torch.randn(2, 3, 8)
    ref = attention(x, x, x)[0]
    keys = list(attention.state_dict())
    for to, cls in (("mha", mha.MultiheadAttention), ("torch", nn.MultiheadAttention)):
        attention = mha.swap(attention, to=to)
        assert type(attention) is cls
        assert list(attention.state_dict()) == keys
        assert dict(attention.named_buffers()).keys() == {"scale_table", "scratch"}
        assert isinstance(attention.adapter, nn.Linear)
        assert attention.tag == "layer0"
        torch.testing.assert_close(attention(x, x, x)[0], ref)


def test_training_with_dropout_after_swap_draws_as_torch():
    """A batch-first layer with dropout, in training: after the swap the same random state
    gives the same output (the dropouts after the attention see torch's memory layout)."""
    torch.manual_seed(3)
    model = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, dropout=0.1, batch_first=True)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(5)
    want = model(x)
    mha.swap(model)
    torch.manual_seed(5)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
