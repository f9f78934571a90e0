"""mha.attention: every mask and combination, every backend against the reference.

The reference backend materialises the mask with ``Mask.materialize``; the fast
backends read a ``MaskPlan``. Each case compares output, lse, weights (mean and
per head) and the gradients of q, k, v and of any Bias tensor that requires grad.
"""

from __future__ import annotations

import fractions
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mha
from mha import masks as M
from mha._plan import MaskPlan

NEG_INF = float("-inf")
FP64 = {"rtol": 1e-9, "atol": 1e-10}
FP32 = {"rtol": 2e-4, "atol": 2e-5}
FAST = ["tiled", "sdpa"]

MaskFactory = Callable[[int, int, int, int, torch.Generator], "M.Mask | None"]


def _bias(shape, g, *, neg_inf=0.2, grad=True):
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = t.masked_fill(torch.rand(shape, generator=g) < neg_inf, NEG_INF)
    return t.requires_grad_(grad)


def _bool(shape, g, p=0.7):
    return torch.rand(shape, generator=g) < p


# name -> factory(N, H, L, S, generator). Sizes are those of the query heads H = Hq.
MASKS: dict[str, MaskFactory] = {
    "none": lambda N, H, L, S, g: None,
    "causal_tl": lambda N, H, L, S, g: M.Causal("top_left"),
    "causal_br": lambda N, H, L, S, g: M.Causal("bottom_right"),
    "window_2_1_tl": lambda N, H, L, S, g: M.Window(2, 1, "top_left"),
    "window_none_1_br": lambda N, H, L, S, g: M.Window(None, 1, "bottom_right"),
    "window_1_none_br": lambda N, H, L, S, g: M.Window(1, None, "bottom_right"),
    "window_0_0": lambda N, H, L, S, g: M.Window(0, 0),
    "window_none_none": lambda N, H, L, S, g: M.Window(None, None),
    "keypad": lambda N, H, L, S, g: M.KeyPadding(torch.tensor([0, S + 3, 2][:N])),
    "keypad_from_mask": lambda N, H, L, S, g: M.KeyPadding.from_padding_mask(
        torch.arange(S)[None, :] >= torch.tensor([S, 1, S - 1][:N])[:, None]
    ),
    "allowed_LS": lambda N, H, L, S, g: M.Allowed(_bool((L, S), g)),
    "allowed_11LS": lambda N, H, L, S, g: M.Allowed(_bool((1, 1, L, S), g)),
    "allowed_N11S": lambda N, H, L, S, g: M.Allowed(_bool((N, 1, 1, S), g)),
    "allowed_NHLS": lambda N, H, L, S, g: M.Allowed(_bool((N, H, L, S), g, 0.5)),
    "blocked_HLS": lambda N, H, L, S, g: M.Blocked(_bool((H, L, S), g, 0.3)),
    "blocked_1H1S": lambda N, H, L, S, g: M.Blocked(_bool((1, H, 1, S), g, 0.3)),
    "blocked_N1L1": lambda N, H, L, S, g: M.Blocked(_bool((N, 1, L, 1), g, 0.3)),
    "bias_LS": lambda N, H, L, S, g: M.Bias(_bias((L, S), g)),
    "bias_S": lambda N, H, L, S, g: M.Bias(_bias((S,), g)),
    "bias_11LS": lambda N, H, L, S, g: M.Bias(_bias((1, 1, L, S), g)),
    "bias_N11S": lambda N, H, L, S, g: M.Bias(_bias((N, 1, 1, S), g)),
    "bias_NHLS": lambda N, H, L, S, g: M.Bias(_bias((N, H, L, S), g, neg_inf=0.4)),
    "bias_HLS": lambda N, H, L, S, g: M.Bias(_bias((H, L, S), g)),
    "bias_1H1S": lambda N, H, L, S, g: M.Bias(_bias((1, H, 1, S), g)),
    "bias_no_grad": lambda N, H, L, S, g: M.Bias(_bias((L, S), g, grad=False)),
    "bias_row_all_neg_inf": lambda N, H, L, S, g: M.Bias(
        _bias((L, S), g, neg_inf=0.0).detach().index_fill(0, torch.tensor([0]), NEG_INF).requires_grad_()
    ),
    "causal_br&keypad": lambda N, H, L, S, g: M.Causal("bottom_right") & M.KeyPadding(torch.tensor([S, 1, 0][:N])),
    "causal_tl&keypad": lambda N, H, L, S, g: M.Causal("top_left") & M.KeyPadding(torch.tensor([3, S, 1][:N])),
    "window_tl&window_br": lambda N, H, L, S, g: M.Window(1, 2, "top_left") & M.Window(3, 0, "bottom_right"),
    "keypad&keypad": lambda N, H, L, S, g: M.KeyPadding(torch.tensor([S, 2, 4][:N], dtype=torch.int32))
    & M.KeyPadding(torch.tensor([3, S + 1, -1][:N])),
    "bias&bias": lambda N, H, L, S, g: M.Bias(_bias((L, S), g)) & M.Bias(_bias((N, 1, 1, S), g)),
    "causal&allowed&bias": lambda N, H, L, S, g: M.Causal("bottom_right")
    & M.Allowed(_bool((1, H, L, S), g))
    & M.Bias(_bias((N, 1, L, S), g)),
    "window&blocked&keypad": lambda N, H, L, S, g: M.Window(2, 2, "bottom_right")
    & M.Blocked(_bool((N, 1, 1, S), g, 0.2))
    & M.KeyPadding(torch.tensor([S - 1, 4, 2][:N])),
    "causal&window&keypad&bias": lambda N, H, L, S, g: M.Causal()
    & M.Window(3, None)
    & M.KeyPadding(torch.tensor([5, 2, S][:N]))
    & M.Bias(_bias((S,), g)),
}


def bias_tensors(mask: M.Mask | None) -> list[torch.Tensor]:
    if mask is None:
        return []
    return [p.tensor for p in mask.parts() if isinstance(p, M.Bias) and p.tensor.requires_grad]


def make_qkv(N, Hq, Hkv, L, S, Dk, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Hq, L, Dk, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(N, Hkv, S, Dk, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(N, Hkv, S, Dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def run(backend, q, k, v, mask, *, weights=None, return_lse=False, scale=None, seed=1):
    """Forward and backward of a loss that touches every output; returns a dict of tensors."""
    res = mha.attention(q, k, v, mask, weights=weights, return_lse=return_lse, scale=scale, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (res.output * torch.randn(res.output.shape, generator=g, dtype=torch.float64).to(q.dtype)).sum()
    if res.weights is not None:
        loss = loss + (res.weights * torch.randn(res.weights.shape, generator=g, dtype=torch.float64).to(q.dtype)).sum()
    if res.lse is not None:
        gl = torch.randn(res.lse.shape, generator=g, dtype=torch.float64).to(q.dtype)
        loss = loss + (res.lse.masked_fill(torch.isneginf(res.lse), 0.0) * gl).sum()
    inputs = [q, k, v, *bias_tensors(mask)]
    grads = torch.autograd.grad(loss, inputs)
    out = {"output": res.output.detach(), "weights": res.weights, "lse": res.lse}
    for i, gr in enumerate(grads):
        out[f"grad{i}"] = gr
    return out


def assert_matches(got: dict, want: dict, tol: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        a = got[name]
        if w is None:
            assert a is None, name
            continue
        a = a.detach()
        w = w.detach()
        assert a.shape == w.shape, name
        assert a.dtype == w.dtype, name
        assert not torch.isnan(a).any(), f"NaN in {name}"
        if name == "lse":
            assert torch.equal(torch.isneginf(a), torch.isneginf(w)), "lse -inf rows differ"
            finite = ~torch.isneginf(w)
            a, w = a[finite], w[finite]
        torch.testing.assert_close(a, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


def empty_rows(mask, N, H, L, S) -> torch.Tensor:
    if mask is None:
        return torch.zeros(N, H, L, dtype=torch.bool)
    return torch.isneginf(mask.materialize(N, H, L, S, dtype=torch.float64)).all(dim=-1)


SIZES = [(2, 4, 2, 5, 7, 5, 3), (3, 4, 4, 7, 5, 3, 6), (2, 2, 1, 6, 6, 4, 4)]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "N{}Hq{}Hkv{}L{}S{}Dk{}Dv{}".format(*s))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_every_mask_against_reference(mask_name, sizes):
    N, Hq, Hkv, L, S, Dk, Dv = sizes
    mask = MASKS[mask_name](N, Hq, L, S, torch.Generator().manual_seed(7))
    q, k, v = make_qkv(N, Hq, Hkv, L, S, Dk, Dv)
    empty = empty_rows(mask, N, Hq, L, S)
    for weights in ("per_head", "mean"):
        want = run("reference", q, k, v, mask, weights=weights, return_lse=True)
        # The reference itself: zeros and -inf on fully masked rows, rows sum to 1 elsewhere.
        assert torch.equal(torch.isneginf(want["lse"]), empty)
        assert (want["output"][empty] == 0).all()
        if weights == "per_head":
            assert (want["weights"][empty] == 0).all()
            torch.testing.assert_close(
                want["weights"].sum(-1)[~empty], torch.ones_like(want["weights"].sum(-1)[~empty]), **FP64
            )
        got = run("tiled", q, k, v, mask, weights=weights, return_lse=True)
        assert_matches(got, want, FP64)
    want = run("reference", q, k, v, mask)
    for backend in FAST:
        assert_matches(run(backend, q, k, v, mask), want, FP64)


BLOCKING_MASKS = [
    "none",
    "causal_tl",
    "causal_br",
    "window_2_1_tl",
    "window_1_none_br",
    "keypad",
    "allowed_N11S",
    "blocked_N1L1",
    "bias_NHLS",
    "causal_br&keypad",
    "window_tl&window_br",
    "causal&allowed&bias",
    "window&blocked&keypad",
]


@pytest.mark.parametrize("rows_per_block", [1, 3, "sequence", "two_sequences"])
@pytest.mark.parametrize("mask_name", BLOCKING_MASKS)
def test_tiled_in_small_blocks(mask_name, rows_per_block, monkeypatch):
    """The tiled backend cut into many row and batch blocks (skipping key blocks that
    the band or the lengths close) still gives the reference's results."""
    from mha._backends import tiled

    N, Hq, Hkv, L, S, Dk, Dv = 3, 4, 2, 7, 9, 3, 2
    per_row = Hq * S
    rows = {"sequence": L, "two_sequences": L}.get(rows_per_block, rows_per_block)
    sequences = 2 if rows_per_block == "two_sequences" else 1  # N = 3: blocks of 2 and 1
    monkeypatch.setattr(tiled, "_BLOCK_BYTES", per_row * rows * 8)  # fp64 scores
    monkeypatch.setattr(tiled, "_BATCH_BLOCK_BYTES", per_row * L * sequences * 8)
    assert tiled._block_shape(N, Hq, L, S, 8) == (sequences, rows)
    mask = MASKS[mask_name](N, Hq, L, S, torch.Generator().manual_seed(11))
    q, k, v = make_qkv(N, Hq, Hkv, L, S, Dk, Dv)
    for weights in ("per_head", "mean"):
        want = run("reference", q, k, v, mask, weights=weights, return_lse=True)
        assert_matches(run("tiled", q, k, v, mask, weights=weights, return_lse=True), want, FP64)
        # Without gradients the blocks are written into results allocated once.
        with torch.no_grad():
            got = mha.attention(q, k, v, mask, weights=weights, return_lse=True, backend="tiled")
        for name in ("output", "weights", "lse"):
            torch.testing.assert_close(getattr(got, name), want[name], **FP64)


@pytest.mark.parametrize("rows_per_block", [2, "all"])
@pytest.mark.parametrize("mask_name", ["none", "causal_tl", "keypad", "causal&allowed&bias"])
def test_tiled_reads_heads_stored_transposed(mask_name, rows_per_block, monkeypatch):
    """Heads stored ``(N, H, D, X)`` and handed over transposed (the module's
    feature-major projection) are read without copies when one block holds every
    row, the output then transposed too; with smaller blocks they are copied. Both
    give the reference's results, in every layout of the output."""
    from mha._backends import tiled

    N, Hq, Hkv, L, S, Dk, Dv = 2, 4, 2, 7, 7, 3, 5
    if rows_per_block != "all":
        monkeypatch.setattr(tiled, "_BLOCK_BYTES", Hq * S * rows_per_block * 8)
        monkeypatch.setattr(tiled, "_BATCH_BLOCK_BYTES", Hq * S * rows_per_block * 8)
    mask = MASKS[mask_name](N, Hq, L, S, torch.Generator().manual_seed(5))
    q, k, v = (t.detach() for t in make_qkv(N, Hq, Hkv, L, S, Dk, Dv))
    qt, kt, vt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert qt.transpose(2, 3).is_contiguous()
    for weights in ("mean", "per_head"):
        want = mha.attention(q, k, v, mask, weights=weights, return_lse=True, backend="reference")
        with torch.no_grad():
            got = mha.attention(qt, kt, vt, mask, weights=weights, return_lse=True, backend="tiled")
        assert got.output.transpose(2, 3).is_contiguous() == (rows_per_block == "all")
        for name in ("output", "weights", "lse"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **FP64)


def test_tiled_never_copies_position_major_queries_whole(monkeypatch):
    """Without autograd, queries stored position-major ``(N, L, H, D)`` (the module's
    batched projection) read a block of one sequence as they are: no copy of every
    query, which would grow with N * L beyond one block of scores."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mha._backends import tiled

    N, H, L, S, D = 3, 2, 16, 8, 4
    monkeypatch.setattr(tiled, "_BLOCK_BYTES", H * S * 4 * 8)  # blocks of 4 rows of one sequence, fp64
    q, k, v = (t.detach() for t in make_qkv(N, H, H, L, S, D, D))
    q_position_major = q.transpose(1, 2).contiguous().transpose(1, 2)
    copied: list[int] = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                copied.append(out.numel())
            return out

    with torch.no_grad(), Copies():
        got = mha.attention(q_position_major, k, v, weights="mean", backend="tiled")
    assert max(copied, default=0) < q.numel()
    want = mha.attention(q, k, v, weights="mean", backend="reference")
    torch.testing.assert_close(got.output, want.output, **FP64)
    torch.testing.assert_close(got.weights, want.weights, **FP64)


def test_mean_weights_are_the_mean_of_per_head():
    N, Hq, L, S = 2, 6, 5, 7
    mask = MASKS["causal&allowed&bias"](N, Hq, L, S, torch.Generator().manual_seed(0))
    q, k, v = make_qkv(N, Hq, 3, L, S, 4, 4)
    per_head = mha.attention(q, k, v, mask, weights="per_head", backend="tiled").weights
    mean = mha.attention(q, k, v, mask, weights="mean", backend="tiled").weights
    assert per_head.shape == (N, Hq, L, S)
    assert mean.shape == (N, L, S)
    torch.testing.assert_close(mean, per_head.mean(1), **FP64)


def test_lse_is_the_log_sum_exp_of_scaled_masked_scores():
    N, H, L, S, D = 2, 3, 4, 6, 5
    q, k, v = make_qkv(N, H, H, L, S, D, D)
    mask = M.Causal("bottom_right") & M.KeyPadding(torch.tensor([6, 1]))
    scale = 0.37
    scores = (q @ k.transpose(-1, -2)) * scale + mask.materialize(N, H, L, S, dtype=torch.float64)
    want = torch.logsumexp(scores, dim=-1)
    for backend in ("reference", "tiled"):
        lse = mha.attention(q, k, v, mask, scale=scale, return_lse=True, backend=backend).lse
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want))
        torch.testing.assert_close(lse[torch.isfinite(want)], want[torch.isfinite(want)], **FP64)


def test_formula_and_default_scale():
    """The reference itself against the docstring's formula, written out by hand."""
    N, Hq, Hkv, L, S, Dk, Dv = 1, 4, 2, 3, 5, 7, 2
    q, k, v = (t.detach() for t in make_qkv(N, Hq, Hkv, L, S, Dk, Dv))
    out = torch.empty(N, Hq, L, Dv, dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[0, h // 2], v[0, h // 2]
        for i in range(L):
            s = [float(q[0, h, i] @ kh[j]) / math.sqrt(Dk) for j in range(S)]
            m = max(s)
            p = [math.exp(x - m) for x in s]
            out[0, h, i] = sum(p[j] / sum(p) * vh[j] for j in range(S))
    for backend in ("reference", "tiled", "sdpa"):
        torch.testing.assert_close(mha.attention(q, k, v, backend=backend).output, out, **FP64)
    twice = mha.attention(q, k, v, scale=2 / math.sqrt(Dk), backend="reference").output
    assert_matches(
        {"o": mha.attention(q * 2, k, v, backend="tiled").output}, {"o": twice}, FP64
    )


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.5])
@pytest.mark.parametrize("backend", FAST)
def test_zero_and_negative_scales(backend, scale):
    """scale=0 gives every allowed key the same weight. torch's SDPA with is_causal=True
    multiplies its -inf mask by the scale and returns NaN at scale 0 (0 * -inf) in its
    fused CPU kernel, which serves Dk == Dv."""
    q, k, v = make_qkv(2, 2, 2, 3, 5, 4, 4)
    for mask in (M.Causal(), M.Causal() & M.KeyPadding(torch.tensor([5, 2])), M.Window(1, 0)):
        assert_matches(run(backend, q, k, v, mask, scale=scale), run("reference", q, k, v, mask, scale=scale), FP64)


def test_attention_output_is_a_named_tuple():
    q, k, v = make_qkv(1, 1, 1, 2, 3, 4, 4)
    res = mha.attention(q, k, v)
    assert isinstance(res, mha.AttentionOutput)
    out, w, lse = res
    assert w is None
    assert lse is None
    assert out.shape == (1, 1, 2, 4)


# ---------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize(
    "mask_name", ["causal_br", "keypad", "bias_row_all_neg_inf", "allowed_NHLS", "causal_br&keypad"]
)
def test_fully_masked_rows_are_zero_never_nan(backend, mask_name):
    N, H, L, S = 3, 2, 7, 4  # L > S: bottom-right causal leaves rows empty
    mask = MASKS[mask_name](N, H, L, S, torch.Generator().manual_seed(3))
    empty = empty_rows(mask, N, H, L, S)
    assert empty.any()
    q, k, v = make_qkv(N, H, H, L, S, 3, 3, dtype=torch.float32)
    kwargs = {} if backend == "sdpa" else {"weights": "per_head", "return_lse": True}
    got = run(backend, q, k, v, mask, **kwargs)
    for name, t in got.items():
        if t is not None:
            assert not torch.isnan(t).any(), name
    assert (got["output"][empty] == 0).all()
    if backend != "sdpa":
        assert (got["weights"][empty] == 0).all()
        assert torch.isneginf(got["lse"][empty]).all()
        assert torch.isfinite(got["lse"][~empty]).all()


def test_everything_masked():
    q, k, v = make_qkv(2, 2, 1, 3, 4, 5, 6)
    mask = M.KeyPadding(torch.tensor([0, 0]))
    for backend in ("reference", "tiled"):
        res = mha.attention(q, k, v, mask, weights="mean", return_lse=True, backend=backend)
        assert torch.equal(res.output, torch.zeros(2, 2, 3, 6, dtype=torch.float64))
        assert torch.equal(res.weights, torch.zeros(2, 3, 4, dtype=torch.float64))
        assert torch.isneginf(res.lse).all()
    assert torch.equal(mha.attention(q, k, v, mask, backend="sdpa").output, torch.zeros(2, 2, 3, 6, dtype=torch.float64))


def test_tiled_lse_gradient_on_rows_a_bias_masks_fully():
    q, k, v = make_qkv(1, 1, 1, 2, 3, 2, 2)
    bias = torch.tensor([[NEG_INF] * 3, [0.0] * 3], dtype=torch.float64)
    lse = mha.attention(q, k, v, M.Bias(bias), return_lse=True, backend="tiled").lse
    (gq,) = torch.autograd.grad(lse.masked_fill(torch.isneginf(lse), 0.0).sum(), (q,))
    assert not torch.isnan(gq).any()


def test_reference_lse_gradient_on_fully_masked_rows():
    q, k, v = make_qkv(1, 1, 1, 2, 3, 2, 2)
    bias = torch.tensor([[NEG_INF] * 3, [0.0] * 3], dtype=torch.float64, requires_grad=True)
    lse = mha.attention(q, k, v, M.Bias(bias), return_lse=True, backend="reference").lse
    gq, gb = torch.autograd.grad(lse.masked_fill(torch.isneginf(lse), 0.0).sum(), (q, bias))
    assert torch.equal(gq[0, 0, 0], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(gb[0], torch.zeros(3, dtype=torch.float64))
    # d lse / d score = softmax of the row.
    p = torch.softmax((q[0, 0, 1] @ k[0, 0].T) / math.sqrt(2), dim=-1)
    torch.testing.assert_close(gb[1], p.detach(), **FP64)


def test_sdpa_output_keeps_the_graph():
    q, k, v = make_qkv(2, 1, 1, 3, 4, 2, 2)
    out = mha.attention(q, k, v, M.KeyPadding(torch.tensor([0, 0])), backend="sdpa").output
    assert out.requires_grad


def test_output_keeps_the_graph_when_everything_is_masked():
    q, k, v = make_qkv(2, 1, 1, 3, 4, 2, 2)
    for backend in ("reference", "tiled", "sdpa"):
        out = mha.attention(q, k, v, M.KeyPadding(torch.tensor([0, 0])), backend=backend).output
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize(
    ("backend", "L", "S"),
    [
        ("reference", 0, 4),
        ("reference", 3, 0),
        ("tiled", 0, 4),
        ("tiled", 3, 0),
        ("sdpa", 0, 4),
        ("sdpa", 3, 0),
    ],
)
def test_empty_query_or_key_sequences(backend, L, S):
    q, k, v = (t.detach() for t in make_qkv(2, 2, 1, L, S, 3, 5))
    kwargs = {} if backend == "sdpa" else {"weights": "per_head", "return_lse": True}
    res = mha.attention(q, k, v, M.Causal("bottom_right"), backend=backend, **kwargs)
    assert torch.equal(res.output, torch.zeros(2, 2, L, 5, dtype=torch.float64))
    if backend != "sdpa":
        assert res.weights.shape == (2, 2, L, S)
        assert res.lse.shape == (2, 2, L)
        assert torch.isneginf(res.lse).all()


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa", "decode"])
@pytest.mark.parametrize(("N", "L"), [(0, 3), (2, 0)])
def test_empty_batch_or_queries_keep_the_graph(backend, N, L):
    """An empty batch in training: backward() runs and every input gets a zero gradient."""
    q, k, v = make_qkv(N, 2, 1, L, 4, 3, 5)
    out = mha.attention(q, k, v, backend=backend).output
    assert out.shape == (N, 2, L, 5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, (q, k, v), strict=True))


@pytest.mark.parametrize("Hkv", [1, 2, 3, 6])
def test_gqa_and_mqa(Hkv):
    N, Hq, L, S = 2, 6, 5, 7
    mask = MASKS["causal_br&keypad"](N, Hq, L, S, torch.Generator())
    q, k, v = make_qkv(N, Hq, Hkv, L, S, 4, 3)
    want = run("reference", q, k, v, mask, weights="per_head", return_lse=True)
    assert_matches(run("tiled", q, k, v, mask, weights="per_head", return_lse=True), want, FP64)
    want = run("reference", q, k, v, mask)
    assert_matches(run("sdpa", q, k, v, mask), want, FP64)
    # GQA equals plain attention with k and v repeated per group.
    kr, vr = (t.detach().repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    plain = mha.attention(q.detach(), kr, vr, mask, backend="reference").output
    torch.testing.assert_close(want["output"], plain, **FP64)


@pytest.mark.parametrize(
    "sizes",
    [(1, 1, 1, 1, 1, 1, 1), (1, 3, 1, 1, 7, 3, 1), (3, 1, 1, 7, 3, 7, 97), (1, 2, 2, 97, 97, 8, 3), (2, 1, 1, 3, 97, 1, 7)],
    ids=lambda s: "N{}Hq{}Hkv{}L{}S{}Dk{}Dv{}".format(*s),
)
@pytest.mark.parametrize("mask_name", ["none", "causal_tl", "causal_br", "window&blocked&keypad", "bias_LS"])
def test_odd_sizes(sizes, mask_name):
    N, Hq, Hkv, L, S, Dk, Dv = sizes
    mask = MASKS[mask_name](N, Hq, L, S, torch.Generator().manual_seed(5)) if N <= 3 else None
    q, k, v = make_qkv(N, Hq, Hkv, L, S, Dk, Dv)
    want = run("reference", q, k, v, mask, weights="per_head", return_lse=True)
    assert_matches(run("tiled", q, k, v, mask, weights="per_head", return_lse=True), want, FP64)
    want = run("reference", q, k, v, mask)
    assert_matches(run("sdpa", q, k, v, mask), want, FP64)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend):
    N, Hq, Hkv, L, S, Dk, Dv = 2, 4, 2, 6, 9, 5, 3
    g = torch.Generator().manual_seed(0)
    # q as (N, L, H, D) transposed; k strided over S; v sliced out of a wider head dim.
    q = torch.randn(N, L, Hq, Dk, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k_big = torch.randn(N, Hkv, 2 * S, Dk, generator=g, dtype=torch.float64)
    k = k_big[:, :, ::2].requires_grad_()
    v_big = torch.randn(N, S, Hkv, Dv + 4, generator=g, dtype=torch.float64)
    v = v_big.transpose(1, 2)[..., 2 : 2 + Dv].requires_grad_()
    assert not q.is_contiguous()
    assert not k.is_contiguous()
    assert not v.is_contiguous()
    bias = torch.randn(S, L, generator=g, dtype=torch.float64).t().requires_grad_()  # (L, S), transposed
    allowed = (torch.rand(N, S, 1, 1, generator=g) < 0.8).permute(0, 3, 2, 1)  # (N, 1, 1, S)
    mask = M.Causal("bottom_right") & M.Bias(bias) & M.Allowed(allowed)
    kwargs = {} if backend == "sdpa" else {"weights": "mean", "return_lse": True}
    want = run("reference", q, k, v, mask, **kwargs)
    assert_matches(run(backend, q, k, v, mask, **kwargs), want, FP64)
    contiguous = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    assert_matches(run(backend, *contiguous, mask, **kwargs), want, FP64)


def test_bias_in_another_dtype_than_the_inputs():
    q, k, v = make_qkv(2, 2, 2, 4, 5, 3, 3, dtype=torch.float32)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    want = run("reference", q, k, v, M.Bias(bias), weights="mean", return_lse=True)
    assert_matches(run("tiled", q, k, v, M.Bias(bias), weights="mean", return_lse=True), want, FP32)
    assert_matches(run("sdpa", q, k, v, M.Bias(bias)), run("reference", q, k, v, M.Bias(bias)), FP32)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("mask_name", ["causal_br&keypad", "causal&allowed&bias", "bias_NHLS", "none"])
def test_fp32_against_reference(mask_name):
    N, Hq, Hkv, L, S = 2, 4, 2, 13, 17
    mask = MASKS[mask_name](N, Hq, L, S, torch.Generator().manual_seed(2))
    if mask is not None:  # float32 biases for float32 inputs
        mask = mask_to(mask, torch.float32)
    q, k, v = make_qkv(N, Hq, Hkv, L, S, 8, 16, dtype=torch.float32)
    want = run("reference", q, k, v, mask, weights="per_head", return_lse=True)
    assert_matches(run("tiled", q, k, v, mask, weights="per_head", return_lse=True), want, FP32)
    want = run("reference", q, k, v, mask)
    assert_matches(run("sdpa", q, k, v, mask), want, FP32)


def mask_to(mask: M.Mask, dtype: torch.dtype) -> M.Mask:
    parts = []
    for p in mask.parts():
        if isinstance(p, M.Bias):
            p = M.Bias(p.tensor.detach().to(dtype).requires_grad_(p.tensor.requires_grad))
        parts.append(p)
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def plain_torch(q, k, v, mask, scale):
    """Attention in q's dtype with nothing but torch ops: the rounding-error yardstick."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.materialize(q.shape[0], Hq, q.shape[2], k.shape[2], dtype=q.dtype)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa"])
def test_half_precision_within_twice_plain_torch_error(dtype, backend):
    """Error against an fp64 reference at most about twice that of plain torch math in
    the same dtype (flash-attention's rule), for the output and every gradient."""
    N, Hq, Hkv, L, S, D = 2, 4, 2, 33, 41, 16
    mask = M.Causal("bottom_right") & M.KeyPadding(torch.tensor([41, 30]))  # no empty rows
    q64, k64, v64 = make_qkv(N, Hq, Hkv, L, S, D, D, seed=4)
    g = torch.Generator().manual_seed(9)
    dout = torch.randn(N, Hq, L, D, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in (q64, k64, v64))
        out = fn(q, k, v)
        gq, gk, gv = torch.autograd.grad((out * dout.to(dt)).sum(), (q, k, v))
        return [t.double() for t in (out, gq, gk, gv)]

    scale = 1 / math.sqrt(D)
    exact = grads(lambda q, k, v: plain_torch(q, k, v, mask, scale), torch.float64)
    plain = grads(lambda q, k, v: plain_torch(q, k, v, mask, scale), dtype)
    ours = grads(lambda q, k, v: mha.attention(q, k, v, mask, backend=backend).output, dtype)
    for name, e, p, o in zip(("output", "dq", "dk", "dv"), exact, plain, ours, strict=True):
        err_ours = (o - e).abs().max().item()
        err_plain = (p - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-5 * e.abs().max().item(), (name, err_ours, err_plain)


def test_half_precision_weights_and_lse():
    N, H, L, S, D = 2, 2, 9, 11, 8
    mask = M.Window(3, 1, "bottom_right") & M.KeyPadding(torch.tensor([11, 6]))
    q, k, v = make_qkv(N, H, H, L, S, D, D, dtype=torch.bfloat16)
    want = mha.attention(q, k, v, mask, weights="per_head", return_lse=True, backend="reference")
    got = mha.attention(q, k, v, mask, weights="per_head", return_lse=True, backend="tiled")
    assert got.weights.dtype == got.lse.dtype == got.output.dtype == torch.bfloat16
    # Both compute in fp32 and round once: at most one bf16 ulp apart.
    torch.testing.assert_close(got.weights, want.weights, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got.lse, want.lse, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got.output, want.output, rtol=2**-7, atol=1e-3)


# ---------------------------------------------------------------- masks are never expanded


@pytest.mark.parametrize("backend", FAST)
def test_fast_backends_never_materialize_or_expand_masks(backend, monkeypatch):
    N, H, L, S = 2, 4, 6, 8
    q, k, v = make_qkv(N, H, H, L, S, 3, 3)

    def forbidden(*args, **kwargs):
        raise AssertionError("a fast backend called Mask.materialize")

    seen: list[tuple[int, ...]] = []
    for method in ("allowed_rows", "bias_rows", "additive_rows"):
        original = getattr(MaskPlan, method)

        def recording(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not None:
                seen.append(tuple(out.shape))
            return out

        monkeypatch.setattr(MaskPlan, method, recording)
    want = {
        "keypad": mha.attention(q, k, v, M.KeyPadding(torch.tensor([5, 8])), backend="reference").output,
        "key_bias": mha.attention(q, k, v, M.Bias(torch.zeros(N, 1, 1, S, dtype=torch.float64)), backend="reference").output,
    }
    monkeypatch.setattr(M.Mask, "materialize", forbidden)
    kwargs = {} if backend == "sdpa" else {"weights": "mean", "return_lse": True}
    out = mha.attention(q, k, v, M.KeyPadding(torch.tensor([5, 8])), backend=backend, **kwargs).output
    torch.testing.assert_close(out, want["keypad"], **FP64)
    bias = M.Bias(torch.zeros(N, 1, 1, S, dtype=torch.float64)) & M.Blocked(torch.zeros(S, dtype=torch.bool))
    out = mha.attention(q, k, v, bias, backend=backend, **kwargs).output
    torch.testing.assert_close(out, want["key_bias"], **FP64)
    assert seen, "the backend read no mask rows"
    for shape in seen:
        assert shape[1] == 1, f"mask expanded over heads: {shape}"
        assert math.prod(shape) <= N * S, f"mask expanded: {shape}"


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_dropout_zeroes_a_fraction_and_rescales(backend):
    N, H, L, S, p = 2, 4, 16, 16, 0.3
    q, k, v = (t.detach() for t in make_qkv(N, H, H, L, S, 4, 4))
    mask = M.Causal()
    ev = mha.attention(q, k, v, mask, weights="per_head", backend=backend).weights
    torch.manual_seed(0)
    tr = mha.attention(q, k, v, mask, weights="per_head", dropout_p=p, backend=backend).weights
    live = ev > 0
    dropped = (tr[live] == 0).float().mean().item()
    n = int(live.sum())
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma of a binomial
    kept = tr[live] != 0
    torch.testing.assert_close(tr[live][kept], ev[live][kept] / (1 - p), **FP64)
    assert (tr[~live] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa"])
def test_dropout_is_unbiased(backend):
    """The mean over many draws approaches the eval output (error shrinks like 1/sqrt(draws))."""
    N, H, L, S, p = 1, 2, 8, 8, 0.25
    q, k, v = (t.detach() for t in make_qkv(N, H, H, L, S, 4, 4))
    mask = M.Causal("bottom_right") & M.KeyPadding(torch.tensor([6]))
    ev = mha.attention(q, k, v, mask, backend=backend).output
    torch.manual_seed(0)
    draws = torch.stack([mha.attention(q, k, v, mask, dropout_p=p, backend=backend).output for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    err_one = (draws[0] - ev).abs().mean()
    err_mean = (draws.mean(0) - ev).abs().mean()
    assert err_mean < err_one / 5  # sqrt(400) = 20: a factor 4 of slack


def test_dropout_keeps_fully_masked_rows_zero():
    q, k, v = make_qkv(1, 2, 2, 6, 3, 4, 4)
    for backend in ("reference", "tiled", "sdpa"):
        out = mha.attention(q, k, v, M.Causal("bottom_right"), dropout_p=0.5, backend=backend).output
        assert (out[:, :, :3] == 0).all()
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa", None])
def test_dropout_of_one_drops_every_weight(backend):
    """dropout_p=1.0, which torch's F.dropout and SDPA take, zeroes every probability:
    output and weights 0, no NaN from the 1 / (1 - p) rescaling; gradients are 0 too."""
    q, k, v = make_qkv(2, 2, 2, 3, 5, 4, 4)
    weights = None if backend == "sdpa" else "per_head"
    result = mha.attention(q, k, v, M.Causal(), dropout_p=1.0, weights=weights, backend=backend)
    assert torch.equal(result.output, torch.zeros_like(result.output))
    if weights is not None:
        assert torch.equal(result.weights, torch.zeros_like(result.weights))
    result.output.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


@pytest.mark.parametrize("dropout_p", [np.float32(0.0), np.float64(0.0), 0, fractions.Fraction(0)])
def test_dropout_p_of_any_real_type(dropout_p):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 3, 5, 4, 4))
    torch.testing.assert_close(mha.attention(q, k, v, dropout_p=dropout_p).output, mha.attention(q, k, v).output)


# ---------------------------------------------------------------- validation


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((_t(2, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {}, ValueError, r"query must be 4-D \(N, H, L, D\), got 3-D"),
        ((_t(2, 1, 3, 4), _t(2, 5, 4), _t(2, 1, 5, 4)), {}, ValueError, r"key must be 4-D \(N, H, S, D\)"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 1, 5, 4)), {}, ValueError, "value must be 4-D"),
        ((_t(2, 1, 3, 4), _t(3, 1, 5, 4), _t(3, 1, 5, 4)), {}, ValueError, "batch sizes differ"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(1, 1, 5, 4)), {}, ValueError, "batch sizes differ"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 6), _t(2, 1, 5, 4)), {}, ValueError, "must have the query's Dk = 4"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 6, 4)), {}, ValueError, "must match key .* in Hkv and S"),
        ((_t(2, 2, 3, 4), _t(2, 2, 5, 4), _t(2, 1, 5, 4)), {}, ValueError, "must match key .* in Hkv and S"),
        ((_t(2, 6, 3, 4), _t(2, 4, 5, 4), _t(2, 4, 5, 4)), {}, ValueError, "Hq=6 must be a multiple of .* Hkv=4"),
        ((_t(2, 1, 3, 4), _t(2, 0, 5, 4), _t(2, 0, 5, 4)), {}, ValueError, "Hkv=0"),
        ((_t(2, 1, 3, 4, dtype=torch.long), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {}, TypeError, "floating point"),
        ((_t(2, 1, 3, 4, dtype=torch.float64), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {}, TypeError, "share a dtype"),
        (([[1.0]], _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {}, TypeError, "query must be a torch.Tensor"),
        (
            (_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4), torch.ones(3, 5, dtype=torch.bool)),
            {},
            TypeError,
            r"mha.masks object.*Blocked\(t\).*Allowed\(t\)",
        ),
        (
            (_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4), M.Bias(_t(4, 5))),
            {},
            ValueError,
            r"does not broadcast to \(N, H, L, S\) = \(2, 1, 3, 5\): dimension L is 4",
        ),
        (
            (_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4), M.Causal() & M.KeyPadding(torch.tensor([1, 2, 3]))),
            {},
            ValueError,
            "3 lengths but the batch has N=2",
        ),
        ((_t(2, 1, 3, 4).to_sparse(), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {}, TypeError, r"query is a torch.sparse_coo tensor.*query.to_dense\(\)"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4).to_sparse()), {}, TypeError, r"value is a torch.sparse_coo tensor"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"weights": "all"}, ValueError, "weights must be None, 'mean' or 'per_head'"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"weights": True}, ValueError, "weights must be"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": 1.5}, ValueError, r"dropout_p must be in \[0, 1\] .*, got dropout_p=1.5"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": float("nan")}, ValueError, "dropout_p"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float in \\[0, 1\\], got str"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": True}, TypeError, "dropout_p .* got bool"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"dropout_p": torch.tensor(0.1)}, TypeError, r"dropout_p .* got Tensor .* float\(dropout_p\)"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"backend": "flash"}, ValueError, r"unknown backend 'flash'; choose one of \["),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"scale": float("nan")}, ValueError, "scale must be finite, got nan"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"scale": float("inf")}, ValueError, "scale must be finite"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"scale": -math.inf}, ValueError, "scale must be finite"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"scale": "0.5"}, TypeError, "scale must be a number or None"),
        ((_t(2, 1, 3, 4), _t(2, 1, 5, 4), _t(2, 1, 5, 4)), {"scale": True}, TypeError, "scale must be a number or None"),
    ],
)
def test_validation_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mha.attention(*args, **kwargs)


def test_nested_key_and_value_beside_a_dense_query():
    """Built here, not in a parametrize list: a jagged tensor made at import imports Triton's
    language before tests/test_catalogue.py sets TRITON_INTERPRET for its kernels."""
    kv = torch.nested.nested_tensor([torch.zeros(n, 1, 4) for n in (5, 3)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(TypeError, match="key is a nested tensor but query is not"):
        mha.attention(_t(2, 1, 3, 4), kv, kv)


def test_forced_backend_that_cannot_serve_lists_every_reason():
    q, k, v = _t(1, 1, 2, 3), _t(1, 1, 4, 3), _t(1, 1, 4, 3)
    with pytest.raises(NotImplementedError) as info:
        mha.attention(q, k, v, weights="mean", return_lse=True, backend="sdpa")
    msg = str(info.value)
    assert "backend 'sdpa' cannot serve this call" in msg
    assert "weights='mean'" in msg
    assert "return_lse=True" in msg
    assert msg.count("\n  - ") == 2


# ---------------------------------------------------------------- random combinations


def random_mask(draw_kinds: list[int], N, H, L, S, g) -> M.Mask | None:
    pool = [
        lambda: M.Causal(("top_left", "bottom_right")[int(torch.randint(2, (), generator=g))]),
        lambda: M.Window(
            None if torch.rand((), generator=g) < 0.3 else int(torch.randint(0, 4, (), generator=g)),
            None if torch.rand((), generator=g) < 0.3 else int(torch.randint(0, 4, (), generator=g)),
            ("top_left", "bottom_right")[int(torch.randint(2, (), generator=g))],
        ),
        lambda: M.KeyPadding(torch.randint(0, S + 2, (N,), generator=g)),
        lambda: M.Allowed(_bool(_random_shape(N, H, L, S, g), g, 0.75)),
        lambda: M.Blocked(_bool(_random_shape(N, H, L, S, g), g, 0.25)),
        lambda: M.Bias(_bias(_random_shape(N, H, L, S, g), g, neg_inf=0.15)),
    ]
    mask = None
    for kind in draw_kinds:
        part = pool[kind]()
        mask = part if mask is None else mask & part
    return mask


def _random_shape(N, H, L, S, g) -> tuple[int, ...]:
    full = (N, H, L, S)
    keep = torch.rand(4, generator=g) < 0.5
    shape = tuple(d if keep[i] else 1 for i, d in enumerate(full))
    drop = int(torch.randint(0, 3, (), generator=g))  # leading dims may be left out
    return shape[drop:]


def check_random_call(kinds, N, group, Hkv, L, S, Dk, Dv, weights, seed):
    g = torch.Generator().manual_seed(seed)
    Hq = group * Hkv
    mask = random_mask(kinds, N, Hq, L, S, g)
    q, k, v = make_qkv(N, Hq, Hkv, L, S, Dk, Dv, seed=seed)
    want = run("reference", q, k, v, mask, weights=weights, return_lse=True)
    assert_matches(run("tiled", q, k, v, mask, weights=weights, return_lse=True), want, FP64)
    want = run("reference", q, k, v, mask)
    assert_matches(run("sdpa", q, k, v, mask), want, FP64)


CALLS = {
    "kinds": st.lists(st.integers(0, 5), min_size=0, max_size=4),
    "N": st.integers(1, 3),
    "group": st.integers(1, 3),
    "Hkv": st.integers(1, 2),
    "L": st.integers(1, 9),
    "S": st.integers(1, 9),
    "Dk": st.integers(1, 5),
    "Dv": st.integers(1, 5),
    "weights": st.sampled_from([None, "mean", "per_head"]),
    "seed": st.integers(0, 2**20),
}


@settings(max_examples=40, deadline=None)
@given(**CALLS)
def test_random_combinations(**call):
    check_random_call(**call)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(**CALLS)
def test_random_combinations_many(**call):
    check_random_call(**call)


@pytest.mark.parametrize(
    "make",
    [
        lambda: M.KeyPadding(torch.tensor([3, 1], device="meta")),
        lambda: M.Bias(torch.zeros(5, 7, device="meta")),
        lambda: M.Blocked(torch.zeros(2, 1, 1, 7, dtype=torch.bool, device="meta")),
        lambda: M.Causal() & M.Allowed(torch.ones(7, dtype=torch.bool, device="meta")),
    ],
    ids=["keypad", "bias", "blocked", "causal&allowed"],
)
def test_mask_on_another_device_than_the_query(make):
    mask = make()
    q, k, v = make_qkv(2, 4, 2, 5, 7, 3, 2)
    with pytest.raises(ValueError, match=r"holds a tensor on meta but the query is on cpu; build the mask on the query's device"):
        mha.attention(q, k, v, mask)
    assert "meta" in repr(mask) or "shape=" in repr(mask)


def test_repr_of_masks_never_reads_meta_values():
    assert repr(M.KeyPadding(torch.tensor([3, 1], device="meta"))) == "KeyPadding(lengths of shape (2,) on meta)"
    assert repr(M.KeyPadding(torch.tensor([3, 1]))) == "KeyPadding(lengths=[3, 1])"


def test_jit_trace_through_sdpa_with_gqa():
    """Under torch.jit.trace sizes are traced tensors; SDPA's enable_gqa must still get a bool."""
    q, k, v = (t.detach().float() for t in make_qkv(2, 6, 3, 5, 7, 4, 4))

    def f(q, k, v):
        return mha.attention(q, k, v, M.Causal(), backend="sdpa").output

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(f, (q, k, v), check_trace=False)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    torch.testing.assert_close(traced(q, k, v), f(q, k, v))
    q2, k2, v2 = (t + 1 for t in (q, k, v))
    torch.testing.assert_close(traced(q2, k2, v2), f(q2, k2, v2))


@pytest.mark.parametrize("weights", [None, "mean", "per_head"])
def test_checked_attention_is_attention_without_the_second_check(weights: str | None) -> None:
    """The module's entry to the core (its inputs checked by the front end) gives what
    mha.attention gives: the default scale 1/sqrt(Dk), the same mask and weights."""
    from mha._core import checked_attention

    g = torch.Generator().manual_seed(0)
    N, H, L, S, D = 3, 2, 7, 5, 40  # distinct sizes: a swapped axis fails
    q = torch.randn(N, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)  # non-contiguous
    k = torch.randn(N, H, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(N, H, S, D, generator=g, dtype=torch.float64)
    mask = M.Causal("bottom_right") & M.Blocked(torch.rand(N, 1, 1, S, generator=g) < 0.3)
    ours = checked_attention(q, k, v, mask, 0.0, weights)
    ref = mha.attention(q, k, v, mask, weights=weights, backend="reference")
    torch.testing.assert_close(ours.output, ref.output)
    if weights is None:
        assert ours.weights is None
    else:
        torch.testing.assert_close(ours.weights, ref.weights)


@pytest.mark.parametrize("backend", [None, "reference", "tiled", "sdpa"])
def test_bias_of_a_wider_dtype_is_added_in_the_query_dtype_on_every_backend(backend):
    """A float32 Bias with float16 heads: sdpa took it in float16 (-1e9 became -inf, a
    fully masked row, zeros) while reference and tiled added it in float32 (-1e9 finite,
    uniform attention), so the same call gave different rows by backend."""
    q, k, v = make_qkv(1, 2, 2, 3, 4, 8, 8, dtype=torch.float16)
    bias = torch.zeros(3, 4)
    bias[1] = -1e9  # -inf in float16
    bias[2, 0] = 0.3
    weights = None if backend == "sdpa" else "per_head"  # sdpa returns no weights
    got = mha.attention(q, k, v, M.Bias(bias), backend=backend, weights=weights)
    want = mha.attention(q, k, v, M.Bias(bias.half()), backend="reference", weights=weights)
    assert torch.equal(got.output[:, :, 1], torch.zeros(1, 2, 8, dtype=torch.float16))
    torch.testing.assert_close(got.output, want.output, rtol=2**-10, atol=1e-3)
    if weights is not None:
        torch.testing.assert_close(got.weights, want.weights, rtol=2**-10, atol=1e-3)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16])
def test_reference_adds_float16_biases_in_float32_like_tiled(bias_dtype):
    """Two float16 Biases of 4e4 each: the reference backend materialised the whole mask
    in float16, so their sum overflowed to +inf and the row was NaN, where tiled casts
    each Bias to float16 and adds them to float32 scores (8e4: the row attends key 0)."""
    q, k, v = make_qkv(1, 2, 2, 3, 4, 8, 8, dtype=torch.float16)
    bias = torch.zeros(3, 4, dtype=bias_dtype)
    bias[1, 0] = 4e4
    mask = M.Bias(bias) & M.Bias(bias.clone())
    got = mha.attention(q, k, v, mask, backend="reference", weights="per_head")
    want = mha.attention(q, k, v, mask, backend="tiled", weights="per_head")
    assert torch.equal(got.output[:, :, 1], v[:, :, 0].detach())
    torch.testing.assert_close(got.output, want.output, rtol=2**-10, atol=1e-3)
    torch.testing.assert_close(got.weights, want.weights, rtol=2**-10, atol=1e-3)
