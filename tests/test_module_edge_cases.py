"""The module on inputs that are valid but unusual, compared with torch: mixed parameter
dtypes, masks that require grad, meta and fake tensors, empty queries, nested tensors
where dense ones belong, and which paths draw the same dropout as torch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import mha
from conftest import TOL, build_pair

N, L, S, E, H = 3, 5, 7, 8, 2


def _right_padding(lengths: list[int], s: int = S) -> torch.Tensor:
    return torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_in_proj_bias_of_another_dtype_gives_the_inputs_dtype_like_torch(batch_first, training):
    """torch promotes the half bias to the float64 inputs (on its batch-first path; its
    sequence-first path raises): compare with torch holding the promoted bias."""
    theirs, ours = build_pair(E, H, batch_first=batch_first, dtype=torch.float64)
    half = theirs.in_proj_bias.detach().to(torch.half)
    theirs.in_proj_bias = nn.Parameter(half.to(torch.float64))
    ours.in_proj_bias = nn.Parameter(half)
    theirs.train(training), ours.train(training)
    x = torch.randn(N, L, E, dtype=torch.float64)
    want = theirs(x, x, x)
    got = ours(x, x, x)
    assert got[0].dtype == got[1].dtype == torch.float64
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float64])
    if batch_first:
        theirs.in_proj_bias = nn.Parameter(half)
        torch.testing.assert_close(got[0], theirs(x, x, x)[0], **TOL[torch.float64])


@pytest.mark.parametrize(
    "case", ["bf16_inputs", "fp32_query_bf16_memory", "fp32_causal", "one_position", "no_grad_per_head"]
)
def test_autocast_regions_run_mixed_dtypes_like_torch(case):
    """Under torch.autocast the projections cast inputs and parameters to one dtype, so
    torch's module takes a bf16 activation with fp32 parameters, or a fp32 query with a
    bf16 memory; mha takes them too, with torch's results and dtypes."""
    theirs, ours = build_pair(E, H)
    x, x32, memory = torch.randn(L, N, E).bfloat16(), torch.randn(L, N, E), torch.randn(S, N, E).bfloat16()
    padding = torch.arange(S)[None, :] >= torch.tensor([S, 3, 5])[:, None]
    calls = {
        "bf16_inputs": ((x, x, x), {}),
        "fp32_query_bf16_memory": ((x32, memory, memory), {"key_padding_mask": padding}),
        "fp32_causal": ((x32, x32, x32), {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True}),
        "one_position": ((x[:1], x[:1], x[:1]), {}),
        "no_grad_per_head": ((x, memory, memory), {"average_attn_weights": False}),
    }
    args, kwargs = calls[case]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(case != "no_grad_per_head"):
        got, want = ours(*args, **kwargs), theirs(*args, **kwargs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.bfloat16
        # One bfloat16 ulp at 1.0 (2**-7): mha's tiled weights path computes in fp32 and
        # rounds once, torch's rounds each product to bfloat16.
        torch.testing.assert_close(g, w, rtol=1.6e-2, atol=2**-7)


def test_mixed_dtypes_outside_autocast_are_a_type_error():
    _, ours = build_pair(E, H)
    x = torch.randn(L, N, E).bfloat16()
    with pytest.raises(TypeError, match=r"module's parameters are torch\.float32"):
        ours(x, x, x)


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_causal_float_mask_that_requires_grad_keeps_its_gradient(need_weights):
    theirs, ours = build_pair(E, H, dtype=torch.float64)
    x = torch.randn(L, N, E, dtype=torch.float64)
    grads = []
    for m in (theirs, ours):
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64).requires_grad_()
        out, w = m(x, x, x, attn_mask=mask, need_weights=need_weights)
        (out.sum() + (0 if w is None else w.sum())).backward()
        grads.append(mask.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


def test_a_float_padding_mask_that_requires_grad_keeps_its_gradient():
    theirs, ours = build_pair(E, H, dtype=torch.float64)
    x = torch.randn(L, N, E, dtype=torch.float64)
    padding = _right_padding([7, 4, 2])
    grads = []
    for m in (theirs, ours):
        kpm = torch.zeros(N, S, dtype=torch.float64).masked_fill(padding, float("-inf")).requires_grad_()
        m(x, torch.randn(S, N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
          torch.randn(S, N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
          key_padding_mask=kpm, need_weights=False)[0].sum().backward()
        grads.append(kpm.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


def _masks(device: str | None = None) -> list[dict[str, torch.Tensor]]:
    kpm = _right_padding([7, 4, 2]).to(device)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1).to(device)
    return [
        {"key_padding_mask": kpm},
        {"attn_mask": causal},
        {"key_padding_mask": kpm, "attn_mask": causal},
        {"key_padding_mask": torch.zeros(N, S, device=device).masked_fill(kpm, float("-inf"))},
        {"attn_mask": torch.zeros(L, S, device=device).masked_fill(causal, float("-inf"))},
    ]


@pytest.mark.parametrize("case", range(len(_masks())))
@pytest.mark.parametrize("need_weights", [False, True])
def test_meta_module_and_inputs_with_masks_give_torch_shapes(case, need_weights):
    theirs = nn.MultiheadAttention(E, H, device="meta")
    ours = mha.MultiheadAttention(E, H, device="meta")
    q, kv = torch.empty(L, N, E, device="meta"), torch.empty(S, N, E, device="meta")
    kwargs = _masks("meta")[case]
    want = theirs(q, kv, kv, need_weights=need_weights, **kwargs)
    got = ours(q, kv, kv, need_weights=need_weights, **kwargs)
    assert got[0].device.type == "meta"
    assert got[0].shape == want[0].shape
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        assert got[1].shape == want[1].shape


@pytest.mark.parametrize("case", range(len(_masks())))
def test_fake_tensors_with_masks_give_torch_shapes(case):
    with FakeTensorMode():
        theirs, ours = nn.MultiheadAttention(E, H), mha.MultiheadAttention(E, H)
        q, kv = torch.empty(L, N, E), torch.empty(S, N, E)
        kwargs = _masks()[case]
        want = theirs(q, kv, kv, **kwargs)
        got = ours(q, kv, kv, **kwargs)
    assert got[0].shape == want[0].shape
    assert got[1].shape == want[1].shape


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key_padding_mask": _right_padding([7, 4, 2])},
        {"key_padding_mask": _right_padding([7, 4, 2]), "attn_mask": torch.zeros(0, S, dtype=torch.bool)},
        {"attn_mask": torch.zeros(0, S, dtype=torch.bool)},
        {"attn_mask": torch.zeros(0, S)},
        {"attn_mask": torch.zeros(0, S), "is_causal": True},
        {"attn_mask": torch.zeros(0, S, dtype=torch.bool), "is_causal": True},
    ],
)
@pytest.mark.parametrize("average", [True, False])
def test_empty_query_with_masks_gives_empty_outputs_like_torch(kwargs, average):
    theirs, ours = build_pair(E, H)
    q, kv = torch.randn(0, N, E), torch.randn(S, N, E)
    want = theirs(q, kv, kv, average_attn_weights=average, **kwargs)
    got = ours(q, kv, kv, average_attn_weights=average, **kwargs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape


@pytest.mark.parametrize("which", ["key", "value", "both"])
def test_a_dense_query_with_a_nested_key_or_value_is_a_type_error(which):
    m = mha.MultiheadAttention(E, H, batch_first=True)
    q = torch.randn(2, L, E)
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(6, E)], layout=torch.jagged)
    dense = torch.randn(2, S, E)
    key = nested if which in ("key", "both") else dense
    value = nested if which in ("value", "both") else dense
    with pytest.raises(TypeError, match=r"query is a dense tensor, so (key|value) must be dense too.*nested"):
        m(q, key, value)


def test_a_strided_nested_tensor_ragged_in_its_features_is_a_value_error():
    m = mha.MultiheadAttention(E, H, batch_first=True)
    with warnings.catch_warnings():  # torch's strided nested tensors warn "prototype", once per process
        warnings.simplefilter("ignore", UserWarning)
        x = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(4, E + 2)])
    with pytest.raises(ValueError, match=r"nested query \(N, j, features\) must have the same number of features.*\[8, 10\]"):
        m(x, x, x, need_weights=False)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"key_padding_mask": _right_padding([7, 4, 2])},
        {"key_padding_mask": _right_padding([7, 4, 2]), "attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1)},
        {"attn_mask": torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))},
    ],
)
def test_the_dense_route_draws_the_same_dropout_as_torch(kwargs, need_weights):
    theirs, ours = build_pair(E, H, dropout=0.5)
    q, kv = torch.randn(L, N, E), torch.randn(S, N, E)
    results = []
    for m in (theirs, ours):
        torch.manual_seed(1234)
        results.append(m(q, kv, kv, need_weights=need_weights, **kwargs))
    (want_out, want_w), (got_out, got_w) = results
    torch.testing.assert_close(got_out, want_out, **TOL[torch.float32])
    if need_weights:
        torch.testing.assert_close(got_w, want_w, **TOL[torch.float32])


@pytest.mark.parametrize("need_weights", [False, True])
def test_float_mask_of_a_wider_dtype_is_added_in_the_inputs_dtype(need_weights):
    """A float32 attn_mask on a float16 module: the path without weights added it in
    float16 (a row of -1e9 became -inf: blocked, output out_proj.bias) and the weights path
    in float32 (-1e9 finite: uniform attention), so need_weights changed the output."""
    ours = mha.MultiheadAttention(E, H).half()
    x = torch.randn(L, N, E).half()
    mask = torch.zeros(L, L)
    mask[1] = -1e9  # -inf in float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
        want, _ = ours(x, x, x, attn_mask=mask.half(), need_weights=need_weights)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(out[1], ours.out_proj.bias.expand(N, E))
    assert caught
    assert "query row(s) [1]" in str(caught[0].message)  # warned as for the float16 mask


def test_float_mask_of_a_wider_dtype_overflowing_the_inputs_dtype_raises():
    """A finite float64 attn_mask on float32 inputs whose value overflows float32 became
    +inf after the +inf check, and the row NaN."""
    ours = mha.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    mask = torch.zeros(L, L, dtype=torch.float64)
    mask[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"attn_mask \(5, 5\) holds \+inf in the heads' dtype torch.float32"):
        ours(x, x, x, attn_mask=mask)
    padding = torch.zeros(N, L, dtype=torch.float64)
    padding[0, 2] = 1e300
    with pytest.raises(ValueError, match=r"key_padding_mask \(3, 5\) holds \+inf"):
        ours(x, x, x, key_padding_mask=padding)


@pytest.mark.parametrize("need_weights", [False, True])
def test_float_mask_under_autocast_is_read_in_the_heads_dtype(need_weights):
    """Under float16 autocast the inputs are float32 but the heads float16: the float32
    mask was read in float32 and cast to float16 only when added, so a 7e4 (+inf once
    cast) gave NaN rows instead of the ValueError, and a row of -1e9 (-inf once cast) was
    blocked without the warning, as they are on float16 inputs."""
    ours = mha.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    overflowing = torch.zeros(L, L)
    overflowing[1, 2] = 7e4
    blocking = torch.zeros(L, L)
    blocking[1] = -1e9
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(ValueError, match=r"attn_mask \(5, 5\) holds \+inf in the heads' dtype torch.float16"):
            ours(x, x, x, attn_mask=overflowing, need_weights=need_weights)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = ours(x, x, x, attn_mask=blocking, need_weights=need_weights)
    assert not out.isnan().any()
    assert any("query row(s) [1]" in str(w.message) for w in caught)
