"""The behaviours torch's own tests check for nn.MultiheadAttention and the transformer layers
(test/nn/test_multihead_attention.py, test/test_transformers.py), written afresh for mha:
invalid shapes give mha's error types on every path, 3-D and 4-D masks mean what per-row
2-D masks mean, the inference fast path agrees with the training path, dtypes come back
as they went in, modules copy, pickle and train. Scripting and tracing: test_script.py."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import mha
from conftest import TOL, build_pair

L, S, N, E, H = 5, 7, 3, 12, 3  # distinct, so a swapped axis fails; head dim 4
F64 = torch.float64
TOL64 = TOL[F64]
MODES = ["train", "eval_no_grad"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _run(module: nn.Module, mode: str, *args, **kwargs):
    """Call in training mode with autograd, or in eval under no_grad (torch's fast-path conditions)."""
    module.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        return _quiet(module, *args, **kwargs)


# Invalid shapes: torch raises AssertionError, on the fast path too; mha raises ValueError
# naming the argument, in training and in eval under no_grad alike.


def _batched_bad_calls():
    q = k = v = torch.randn(4, 4, 4)
    return {
        "key_2d": ((q, torch.randn(4, 4), v), {}, "key"),
        "value_2d": ((q, k, torch.randn(4, 4)), {}, "value"),
        "key_2d_other_size": ((q, torch.randn(3, 3), v), {"need_weights": False}, "key"),
        "kpm_1d": ((q, k, v), {"key_padding_mask": torch.tensor([False, False, True, True])}, "key_padding_mask"),
        "attn_1d": ((q, k, v), {"attn_mask": torch.tensor([False, False, True, True])}, "attn_mask"),
    }


def _unbatched_bad_calls():
    q = k = v = torch.randn(4, 4)
    return {
        "key_3d": ((q, torch.randn(4, 4, 4), v), {}, "key"),
        "value_3d": ((q, k, torch.randn(4, 4, 4)), {}, "value"),
        "kpm_2d": ((q, k, v), {"key_padding_mask": torch.tensor([[False, False, True, True] * 2])}, "key_padding_mask"),
        "attn_1d": ((q, k, v), {"attn_mask": torch.tensor([False, False, True, True])}, "attn_mask"),
        "attn_3d_wrong_heads": ((q, k, v), {"attn_mask": torch.zeros(5, 4, 4, dtype=torch.bool)}, "attn_mask"),
    }


BAD_CALLS = {f"batched-{k}": v for k, v in _batched_bad_calls().items()} | {
    f"unbatched-{k}": v for k, v in _unbatched_bad_calls().items()
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_shapes_raise_value_error_naming_the_argument(case, mode, batch_first):
    args, kwargs, name = BAD_CALLS[case]
    theirs = nn.MultiheadAttention(4, 4, batch_first=batch_first)
    with pytest.raises((AssertionError, RuntimeError)):  # RuntimeError from torch's fast path
        _run(theirs, mode, *args, **kwargs)
    ours = mha.MultiheadAttention(4, 4, batch_first=batch_first)
    with pytest.raises(ValueError, match=name):
        _run(ours, mode, *args, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_query_and_module_of_different_dtypes_raise_type_error(mode):
    ours = mha.MultiheadAttention(4, 4, batch_first=True)
    q = torch.randn(4, 4, 4, dtype=F64)
    with pytest.raises(TypeError, match=r"module\.to"):
        _run(ours, mode, q, q, q)


# Masks of every rank mean what one 2-D mask per batch row means.


@pytest.mark.parametrize("dtype", [torch.bool, F64])
def test_3d_and_4d_attn_masks_equal_one_2d_mask_per_batch_row(dtype):
    _, ours = build_pair(E, H, batch_first=True, dtype=F64)
    q, k = torch.randn(N, L, E, dtype=F64), torch.randn(N, S, E, dtype=F64)
    blocked = torch.rand(N, L, S) < 0.4
    blocked[..., 0] = False
    per_row = blocked if dtype == torch.bool else torch.randn(N, L, S, dtype=F64).masked_fill(blocked, float("-inf"))
    rows = [_quiet(ours, q[n : n + 1], k[n : n + 1], k[n : n + 1], attn_mask=per_row[n]) for n in range(N)]
    expected_out = torch.cat([r[0] for r in rows])
    expected_weights = torch.cat([r[1] for r in rows])
    for mask in (per_row.repeat_interleave(H, dim=0), per_row[:, None], per_row[:, None].expand(N, H, L, S)):
        out, weights = _quiet(ours, q, k, k, attn_mask=mask)
        torch.testing.assert_close(out, expected_out, **TOL64)
        torch.testing.assert_close(weights, expected_weights, **TOL64)


def test_is_causal_with_the_causal_mask_equals_the_mask_alone():
    theirs, ours = build_pair(E, H, dtype=F64)
    x = torch.randn(L, N, E, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    expected = theirs(x, x, x, attn_mask=causal)
    for kwargs in ({"attn_mask": causal}, {"attn_mask": causal, "is_causal": True}, {"is_causal": True}):
        out, weights = ours(x, x, x, **kwargs)
        torch.testing.assert_close(out, expected[0], **TOL64)
        torch.testing.assert_close(weights, expected[1], **TOL64)


def test_batch_first_and_unbatched_agree_with_sequence_first():
    _, ours = build_pair(E, H, dtype=F64)
    bf = mha.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    bf.load_state_dict(ours.state_dict())
    q, k = torch.randn(L, N, E, dtype=F64), torch.randn(S, N, E, dtype=F64)
    kpm = torch.rand(N, S) < 0.4
    kpm[:, 0] = False
    out, weights = ours(q, k, k, key_padding_mask=kpm, average_attn_weights=False)
    bf_out, bf_weights = bf(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), key_padding_mask=kpm, average_attn_weights=False)
    torch.testing.assert_close(bf_out.transpose(0, 1), out, **TOL64)
    torch.testing.assert_close(bf_weights, weights, **TOL64)
    for n in range(N):
        one_out, one_weights = ours(q[:, n], k[:, n], k[:, n], key_padding_mask=kpm[n], average_attn_weights=False)
        torch.testing.assert_close(one_out, out[:, n], **TOL64)
        torch.testing.assert_close(one_weights, weights[n], **TOL64)


# Parameters: no bias, separate projection weights, dtypes.


@pytest.mark.parametrize("mode", MODES)
def test_no_bias_has_neither_projection_bias_and_matches_torch(mode):
    theirs, ours = build_pair(E, H, bias=False, dtype=F64)
    assert ours.in_proj_bias is None
    assert ours.out_proj.bias is None
    x = torch.randn(L, N, E, dtype=F64)
    torch.testing.assert_close(_run(ours, mode, x, x, x)[0], _run(theirs, mode, x, x, x)[0], **TOL64)


@pytest.mark.parametrize("mode", MODES)
def test_separate_projection_weights_match_torch(mode):
    """kdim and vdim != embed_dim: in_proj_weight is None and q/k/v_proj_weight serve."""
    theirs, ours = build_pair(E, H, kdim=5, vdim=7, dtype=F64)
    assert ours.in_proj_weight is None
    q, k, v = torch.randn(L, N, E, dtype=F64), torch.randn(S, N, 5, dtype=F64), torch.randn(S, N, 7, dtype=F64)
    for got, expected in zip(_run(ours, mode, q, k, v), _run(theirs, mode, q, k, v), strict=True):
        torch.testing.assert_close(got, expected, **TOL64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_output_has_the_inputs_dtype_and_shape(dtype, mode):
    ours = mha.MultiheadAttention(E, H, batch_first=True, dtype=dtype)
    q = torch.randn(N, L, E, dtype=dtype)
    out, weights = _run(ours, mode, q, q, q)
    assert (out.dtype, out.shape) == (dtype, q.shape)
    assert (weights.dtype, weights.shape) == (dtype, (N, L, L))
    out, weights = _run(ours, mode, q, q, q, need_weights=False)
    assert (out.dtype, out.shape, weights) == (dtype, q.shape, None)


@pytest.mark.parametrize("mode", MODES)
def test_half_in_proj_bias_on_a_float64_module_returns_float64_like_torch(mode):
    theirs, ours = build_pair(4, 4, batch_first=True, dtype=F64)
    for module in (theirs, ours):
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.detach().half())
    q = torch.randn(4, 4, 4, dtype=F64)
    expected = _run(theirs, mode, q, q, q)[0]
    assert expected.dtype == F64
    torch.testing.assert_close(_run(ours, mode, q, q, q)[0], expected, **TOL64)


# The inference fast path (eval, no_grad) agrees with the training path.


def test_two_masks_in_eval_under_no_grad_match_training_and_torch_where_torch_has_no_nan():
    theirs, ours = build_pair(14, 7, batch_first=True, dtype=F64)
    x = torch.rand(8, 5, 14, dtype=F64)
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(5, 5, generator=g) < 0.5
    kpm = torch.rand(8, 5, generator=g) < 0.5
    kpm[0] = True  # one batch row with no key
    empty = (attn[None] | kpm[:, None]).all(-1)  # (N, L): rows with every key blocked
    assert empty.any()
    assert not empty.all()
    train = _run(ours, "train", x, x, x, attn_mask=attn, key_padding_mask=kpm, need_weights=False)[0]
    fast = _run(ours, "eval_no_grad", x, x, x, attn_mask=attn, key_padding_mask=kpm, need_weights=False)[0]
    reference = _run(theirs, "eval_no_grad", x, x, x, attn_mask=attn, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(fast, train, **TOL64)
    torch.testing.assert_close(fast[~empty], reference[~empty], **TOL64)
    torch.testing.assert_close(fast[empty], ours.out_proj.bias.detach().expand(int(empty.sum()), 14))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("enable_nested_tensor", [False, True])
def test_encoder_fast_path_after_swap_equals_torch_and_the_attention_path(enable_nested_tensor):
    """In eval under no_grad torch's encoder runs its fused layer kernel on the attention weights.
    After mha.swap the nested path (no mask reaches the layers) still does, a padding mask
    passed to the layers runs through mha; both agree with torch and with training mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 4, 2 * E, dropout=0.0, batch_first=True)  # nested needs even heads
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=enable_nested_tensor).to(F64).eval()
    ours = mha.swap(copy.deepcopy(theirs))
    x = torch.randn(N, L, E, dtype=F64)
    kpm = torch.arange(L)[None, :] >= torch.tensor([L, 3, 4])[:, None]
    with torch.no_grad():
        expected = theirs(x, src_key_padding_mask=kpm)
        fast = ours(x, src_key_padding_mask=kpm)
    through_attention = _quiet(ours, x, src_key_padding_mask=kpm)  # autograd on: no fast path
    real = ~kpm  # the fast nested path leaves padded rows 0
    torch.testing.assert_close(fast, expected, **TOL64)
    torch.testing.assert_close(fast[real], through_attention.detach()[real], **TOL64)


# Nested inputs outside torch's fast path.


@pytest.mark.parametrize("mode", ["train", "eval_no_grad", "inference_mode"])
def test_nested_query_key_value_of_different_lengths_match_torch_per_sequence(mode):
    theirs, ours = build_pair(10, 5, batch_first=True, dtype=F64)
    lengths = [(4, 7), (6, 16)]
    qs = [torch.randn(lq, 10, dtype=F64) for lq, _ in lengths]
    ks = [torch.randn(lk, 10, dtype=F64) for _, lk in lengths]
    vs = [torch.randn(lk, 10, dtype=F64) for _, lk in lengths]
    nested = [torch.nested.nested_tensor(ts, layout=torch.jagged) for ts in (qs, ks, vs)]
    ours.train(mode == "train")
    with torch.inference_mode() if mode == "inference_mode" else torch.set_grad_enabled(mode == "train"):
        out, _ = ours(*nested, need_weights=False)
    for n, (q, k, v) in enumerate(zip(qs, ks, vs, strict=True)):
        expected = theirs(q[None], k[None], v[None], need_weights=False)[0][0]
        torch.testing.assert_close(out[n], expected, **TOL64)


def test_empty_nested_query_raises_value_error():
    ours = mha.MultiheadAttention(10, 5, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that an empty nested tensor is odd
        empty = torch.nested.nested_tensor([])
    with pytest.raises(ValueError, match="query"):
        ours(empty, empty, empty)


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True}])
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_nested_input_with_appended_keys_matches_torch_per_sequence(extra, layout):
    """add_bias_kv / add_zero_attn append their keys to every sequence of a nested batch: each
    sequence's output, weights and gradients are torch's for that sequence alone (torch
    itself refuses nested inputs here: its nested path is the fast path, which these turn off)."""
    theirs, ours = build_pair(10, 5, batch_first=True, dtype=F64, **extra)
    seqs = [torch.randn(4, 10, dtype=F64), torch.randn(6, 10, dtype=F64), torch.randn(1, 10, dtype=F64)]
    x = torch.nested.nested_tensor(seqs, layout=layout)
    out, weights = ours(x, x, x, average_attn_weights=False)
    sum(o.sum() for o in out.unbind()).backward()
    for n, seq in enumerate(seqs):
        expected, expected_weights = theirs(seq[None], seq[None], seq[None], average_attn_weights=False)
        torch.testing.assert_close(out.unbind()[n], expected[0], **TOL64)
        torch.testing.assert_close(weights.unbind()[n], expected_weights[0], **TOL64)
        expected.sum().backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(theirs.named_parameters())[name].grad, **TOL64, msg=name)


def test_nested_input_with_appended_keys_and_is_causal_is_refused():
    _, ours = build_pair(10, 5, batch_first=True, dtype=F64, add_bias_kv=True)
    x = torch.nested.nested_tensor([torch.randn(4, 10, dtype=F64)], layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="is_causal=True with add_bias_kv or add_zero_attn"):
        ours(x, x, x, is_causal=True)


# Copies, pickles, training.


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_give_the_same_results_with_their_own_parameters(how):
    _, ours = build_pair(E, H, kdim=5, vdim=7, add_bias_kv=True, batch_first=True, dtype=F64)
    clone = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    assert type(clone) is mha.MultiheadAttention
    q, k, v = torch.randn(N, L, E, dtype=F64), torch.randn(N, S, 5, dtype=F64), torch.randn(N, S, 7, dtype=F64)
    for got, expected in zip(clone(q, k, v), ours(q, k, v), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for (name, p), c in zip(ours.named_parameters(), clone.parameters(), strict=True):
        assert c.data_ptr() != p.data_ptr(), name


def test_training_with_padding_after_swap_gives_torch_gradients():
    """A training step of an encoder with right padding: mha's gradients are torch's."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(F64)
    ours = mha.swap(copy.deepcopy(theirs))
    x = torch.randn(N, L, E, dtype=F64)
    kpm = torch.arange(L)[None, :] >= torch.tensor([L, 2, 4])[:, None]
    for model in (theirs, ours):
        loss = _quiet(model, x, src_key_padding_mask=kpm).masked_fill(kpm[..., None], 0).pow(2).sum()
        loss.backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        assert q.grad.isfinite().all(), name
        torch.testing.assert_close(q.grad, p.grad, **TOL64, msg=name)
