"""The decode backend on CPU against the fp64 reference: the fused path (torch's flash
kernel with the G query heads of a key/value head as its query rows, keys read in
blocks merged by their log-sum-exp) and the calls left to the simple path."""

from __future__ import annotations

import pytest
import torch

import mha
from conftest import TOL
from mha._backends import decode
from mha.masks import Allowed, Bias, Blocked, Causal, KeyPadding, Window

F64 = torch.float64
# S = 1000 keys: not a multiple of the kernel's blocks of 512 keys.
N, S = 4, 1000
LENGTHS = [0, 513, 1000, 7]  # a sequence without keys, lengths across and inside a block


@pytest.fixture
def fused(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the calls the fused path serves from now on."""
    served: list[tuple[int, ...]] = []
    run = decode._fused

    def spy(call):
        served.append(call.shape)
        return run(call)

    monkeypatch.setattr(decode, "_fused", spy)
    return served


def _inputs(Hq, Hkv, L, Dk, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, Hq, L, Dk, generator=g, dtype=F64).to(dtype),
        torch.randn(N, Hkv, S, Dk, generator=g, dtype=F64).to(dtype),
        torch.randn(N, Hkv, S, Dv, generator=g, dtype=F64).to(dtype),
    )


def _masks(Hq: int, L: int) -> dict[str, mha.masks.Mask | None]:
    g = torch.Generator().manual_seed(1)
    lengths = KeyPadding(torch.tensor(LENGTHS))
    return {
        "none": None,
        "lengths": lengths,
        "causal": Causal("bottom_right") & lengths,
        "window": Window(3, 0, "bottom_right"),
        "bias per head": Bias(torch.randn(N, Hq, 1, S, generator=g, dtype=F64)) & lengths,
        "allowed per head and query": Allowed(torch.rand(1, Hq, L, S, generator=g) > 0.3),
        "blocked per sequence": Blocked(torch.rand(N, 1, 1, S, generator=g) > 0.5),
    }


@pytest.mark.parametrize(("Hq", "Hkv"), [(6, 2), (7, 1), (3, 3)])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("name", list(_masks(1, 1)))
def test_fused_matches_reference(fused, Hq, Hkv, L, name):
    mask = _masks(Hq, L)[name]
    q, k, v = _inputs(Hq, Hkv, L, 40, 40)
    got = mha.attention(q, k, v, mask, backend="decode", return_lse=True)
    ref = mha.attention(q, k, v, mask, backend="reference", return_lse=True)
    assert fused == [(N, Hq, Hkv, L, S, 40, 40)]
    torch.testing.assert_close(got.output, ref.output, **TOL[F64])
    torch.testing.assert_close(got.lse, ref.lse, **TOL[F64])
    if name in ("lengths", "causal"):  # sequence 0 has no keys: zero output, lse -inf
        assert not got.output[0].any()
        assert torch.isneginf(got.lse[0]).all()


def test_fused_fp32_within_rounding(fused):
    """fp32: error against fp64 at most twice plain torch's (matmuls and softmax in fp32)."""
    mask = KeyPadding(torch.tensor(LENGTHS))
    q, k, v = _inputs(8, 2, 1, 64, 64)
    exact = mha.attention(q, k, v, mask, backend="reference").output
    q32, k32, v32 = (t.float() for t in (q, k, v))
    got = mha.attention(q32, k32, v32, mask, backend="decode").output
    blocked = torch.arange(S)[None, None, None, :] >= torch.tensor(LENGTHS)[:, None, None, None]
    scores = (q32 @ k32.repeat_interleave(4, 1).transpose(-1, -2) / 8).masked_fill(blocked, float("-inf"))
    plain = (torch.ops.aten._safe_softmax(scores, -1) @ v32.repeat_interleave(4, 1)).double()
    assert len(fused) == 1
    assert (got.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-7


def test_fused_bfloat16_close_to_fp32(fused):
    q, k, v = _inputs(6, 2, 1, 32, 32, dtype=torch.float32)
    mask = KeyPadding(torch.tensor(LENGTHS))
    want = mha.attention(q, k, v, mask, backend="reference").output
    got = mha.attention(*(t.bfloat16() for t in (q, k, v)), mask, backend="decode").output
    assert got.dtype == torch.bfloat16
    assert len(fused) == 1
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_gradients_through_fused(fused):
    q, k, v = (t.requires_grad_() for t in _inputs(6, 2, 3, 16, 16))
    mask = Causal("bottom_right") & KeyPadding(torch.tensor(LENGTHS))
    grad = torch.randn(N, 6, 3, 16, dtype=F64)
    mha.attention(q, k, v, mask, backend="decode").output.backward(grad)
    mine = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    mha.attention(q, k, v, mask, backend="reference").output.backward(grad)
    assert len(fused) == 1
    for got, t in zip(mine, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, **TOL[F64])


@pytest.mark.parametrize(
    "case", ["Dv != Dk", "weights", "dropout", "bias needing a gradient", "no keys", "no queries"]
)
def test_simple_path_serves_what_the_kernel_cannot(fused, case):
    Dv = 24 if case == "Dv != Dk" else 40
    q, k, v = _inputs(6, 2, 0 if case == "no queries" else 2, 40, Dv)
    if case == "no keys":
        k, v = k[:, :, :0], v[:, :, :0]
    bias = torch.randn(N, 1, 1, k.shape[2], dtype=F64, requires_grad=case == "bias needing a gradient")
    weights = "per_head" if case == "weights" else None
    dropout = 0.5 if case == "dropout" else 0.0
    got = mha.attention(q, k, v, Bias(bias), backend="decode", weights=weights, dropout_p=dropout, return_lse=True)
    assert fused == []
    if case == "dropout":
        assert not got.output.isnan().any()
        return
    ref = mha.attention(q, k, v, Bias(bias), backend="reference", weights=weights, return_lse=True)
    torch.testing.assert_close(got.output, ref.output, **TOL[F64])
    torch.testing.assert_close(got.lse, ref.lse, **TOL[F64])
    if case == "bias needing a gradient":
        got.output.sum().backward()
        assert bias.grad is not None
        assert bias.grad.abs().sum() > 0
