"""The triton backend under Triton's CPU interpreter, against the reference backend.

``TRITON_INTERPRET=1`` must be set when the kernels are defined (``triton.jit``
reads it then), so this module sets it, imports the kernels, and puts the
variable back as it was: the backend accepts CPU tensors only while the variable
is set, and other test modules must keep dispatching CPU calls to the CPU
backends. An autouse fixture sets it again for the tests here.

Tolerances follow the design notes: the kernel's error against an fp64
reference is at most twice plain torch's error in the same dtype (plus one ulp
at 1.0, for results plain torch gets exactly).
"""

from __future__ import annotations

import collections
import itertools
import math
import os

import pytest
import torch

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from mha._backends import _triton_kernels  # defined under the interpreter
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import mha  # noqa: E402
from mha._backends import triton as triton_backend  # noqa: E402
from mha._core import _validate_call, _validate_varlen_call, packed_attention  # noqa: E402
from mha._dispatch import explain_dispatch, not_supported_reasons, select_backend  # noqa: E402
from mha._types import Offsets  # noqa: E402
from mha.masks import Allowed, Bias, Blocked, Causal, KeyPadding, Window  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


N, HQ, HKV, L, S, DK, DV = 2, 4, 2, 17, 33, 40, 24


def _inputs(N=N, Hq=HQ, Hkv=HKV, L=L, S=S, Dk=DK, Dv=DV, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((N, Hq, L, Dk), (N, Hkv, S, Dk), (N, Hkv, S, Dv))
    )


def _plain(q, k, v, mask, scale=None):
    """Attention in plain torch ops, in the inputs' own dtype (the rounding yardstick)."""
    N, Hq, L, Dk = q.shape
    S = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (Dk**-0.5 if scale is None else scale)
    if mask is not None:
        s = s + mask.materialize(N, Hq, L, S, dtype=q.dtype)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.matmul(p, v), lse, p


def _close(actual, exact, plain, what, ulps=1.0):
    """``max |actual - exact| <= 2 max |plain - exact| + ulps * ulp``, the ulp taken at the
    largest exact value (a floor for results plain torch gets exactly)."""
    assert actual.shape == exact.shape, what
    # The ulp of the dtype computed in (fp32's for an fp64 plain result), read before the casts.
    eps = torch.finfo(plain.dtype if plain.dtype != torch.float64 else torch.float32).eps
    actual, plain = actual.double(), plain.double()
    assert torch.equal(torch.isneginf(actual), torch.isneginf(exact)), what
    finite = torch.isfinite(exact)
    err = (actual - exact)[finite].abs().max().item() if finite.any() else 0.0
    ref = (plain - exact)[finite].abs().max().item() if finite.any() else 0.0
    ulp = eps * max(1.0, exact[finite].abs().max().item() if finite.any() else 0.0)
    assert err <= 2 * ref + ulps * ulp, f"{what}: error {err:.3g} vs plain torch {ref:.3g}"


def _check(mask, dtype=torch.float32, shapes=None, grads=True, lse_grad=False, grad_ulps=1.0):
    """Output, lse, both kinds of weights and the gradients against fp64.

    ``grad_ulps``: extra ulps allowed on dq, dk, dv, whose flash-style backward takes
    ``delta = rowsum(dO * O)`` over Dv terms where autograd takes ``rowsum(p * dp)``."""
    q64, k64, v64 = _inputs(**(shapes or {}))
    results = {}
    for name, dt in (("exact", torch.float64), ("plain", dtype), ("triton", dtype)):
        q, k, v = (t.to(dt).requires_grad_(grads) for t in (q64, k64, v64))
        if name == "triton":
            res = mha.attention(q, k, v, mask, return_lse=True, backend="triton")
            out, lse = res.output, res.lse
            with torch.no_grad():
                w_mean = mha.attention(q, k, v, mask, weights="mean", backend="triton").weights
                w_head = mha.attention(q, k, v, mask, weights="per_head", backend="triton").weights
        else:
            out, lse, p = _plain(q, k, v, mask)
            w_mean, w_head = p.mean(dim=1), p
        got = {"output": out, "lse": lse, "weights mean": w_mean, "weights per_head": w_head}
        if grads:
            g = torch.Generator().manual_seed(1)
            dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dt)
            loss = (out * dout).sum()
            if lse_grad:
                loss = loss + (lse.masked_fill(torch.isneginf(lse), 0.0) * 0.5).sum()
            got.update(zip(("dq", "dk", "dv"), torch.autograd.grad(loss, (q, k, v)), strict=True))
        results[name] = {key: t.detach() for key, t in got.items()}
    for key, exact in results["exact"].items():
        ulps = grad_ulps if key in ("dq", "dk", "dv") else 1.0
        _close(results["triton"][key], exact, results["plain"][key], f"{key} ({dtype}, {mask!r})", ulps)
    return results["triton"]


g = torch.Generator().manual_seed(7)
MASKS = {
    "none": None,
    "causal": Causal(),
    "causal_bottom_right": Causal("bottom_right"),
    "window": Window(3, 2),
    "window_bottom_right_after": Window(None, 4, align="bottom_right"),
    "key_padding": KeyPadding(torch.tensor([5, 33])),
    "allowed_per_head": Allowed(torch.rand(1, HQ, 1, S, generator=g) < 0.7),
    "blocked_rows_keys": Blocked(torch.rand(L, S, generator=g) < 0.3),
    "bias_full": Bias(torch.randn(N, HQ, L, S, generator=g)),
    "bias_keys": Bias(torch.randn(S, generator=g)),
    "causal_padding_bias": Causal() & KeyPadding(torch.tensor([7, 30])) & Bias(torch.randn(N, 1, 1, S, generator=g)),
    "window_allowed_blocked": Window(4, 4, align="bottom_right")
    & Allowed(torch.rand(N, 1, L, 1, generator=g) < 0.8)
    & Blocked(torch.rand(1, 1, 1, S, generator=g) < 0.2),
}


@pytest.mark.parametrize("name", MASKS)
def test_every_mask_matches_reference_fp32(name):
    _check(MASKS[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal_padding_bias", "window_allowed_blocked"])
def test_half_precision_within_twice_plain_torch_error(name, dtype):
    _check(MASKS[name], dtype=dtype)


@pytest.mark.parametrize(
    "shapes",
    [
        {"N": 1, "Hq": 2, "Hkv": 2, "L": 1, "S": 1, "Dk": 16, "Dv": 8},
        {"N": 1, "Hq": 3, "Hkv": 1, "L": 3, "S": 17, "Dk": 16, "Dv": 24},
        {"N": 2, "Hq": 2, "Hkv": 1, "L": 33, "S": 3, "Dk": 40, "Dv": 8},
    ],
    ids=["one_query_one_key", "mqa_L3_S17", "L33_S3"],
)
def test_awkward_shapes(shapes):
    _check(Causal("bottom_right"), shapes=shapes)


@pytest.mark.parametrize(("Dk", "Dv"), [(80, 96), (96, 80), (256, 256)])
def test_large_and_non_power_of_two_head_dims(Dk, Dv):
    # The rounding of delta grows like sqrt(Dv) ulps (random-walk accumulation).
    shapes = {"L": 9, "S": 11, "Dk": Dk, "Dv": Dv}
    _check(Causal() & KeyPadding(torch.tensor([9, 4])), shapes=shapes, grad_ulps=math.sqrt(Dv))


@pytest.mark.parametrize(
    ("name", "weights"),
    [("causal_padding_bias", "mean"), ("window_allowed_blocked", "mean"), ("none", "per_head")],
)
def test_weights_gradient_enters_backward(name, weights):
    """q, k, v gradients through the weights (GQA 4:2, Dk 40 != Dv 24) against fp64."""
    mask = MASKS[name]
    q64, k64, v64 = _inputs()
    grads = {}
    for kind, dt in (("exact", torch.float64), ("plain", torch.float32), ("triton", torch.float32)):
        q, k, v = (t.to(dt).requires_grad_() for t in (q64, k64, v64))
        if kind == "triton":
            res = mha.attention(q, k, v, mask, weights=weights, backend="triton")
            out, w = res.output, res.weights
        else:
            out, _, p = _plain(q, k, v, mask)
            w = p.mean(dim=1) if weights == "mean" else p
        g = torch.Generator().manual_seed(2)
        dout, dw = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(dt) for t in (out, w))
        loss = (out * dout).sum() + (w * dw).sum()
        grads[kind] = torch.autograd.grad(loss, (q, k, v))
    # delta's weights term sums S products p * dW where autograd sums p * dp: sqrt(S) ulps of slack
    for i, what in enumerate(("dq", "dk", "dv")):
        _close(grads["triton"][i], grads["exact"][i], grads["plain"][i], f"{what} ({weights}, {mask!r})", math.sqrt(S))


def test_weights_alone_give_gradients():
    """A loss on the weights only (the output unused) still reaches q and k, and not v."""
    q64, k64, v64 = _inputs(L=9, S=11)
    got = {}
    for backend, dt in (("reference", torch.float64), ("triton", torch.float32)):
        q, k, v = (t.to(dt).requires_grad_() for t in (q64, k64, v64))
        w = mha.attention(q, k, v, Causal(), weights="mean", backend=backend).weights
        got[backend] = torch.autograd.grad((w * w).sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    for ours, ref in zip(got["triton"], got["reference"], strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["triton"][2], torch.zeros_like(got["triton"][2]))


def _huge_bias_against_fp32_reference(bias, weights):
    """Output, weights, q/k/v gradients and lse of the reference and triton backends,
    both in fp32 (in fp64, -1e10 + q.k keeps q.k): the triton ones close to the
    reference's; returns triton's weights and lse."""
    mask = Bias(bias)
    q64, k64, v64 = _inputs()
    res = {}
    for backend in ("reference", "triton"):
        q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
        out, _, lse = mha.attention(q, k, v, mask, return_lse=True, backend=backend)
        grads = torch.autograd.grad((out * out).sum(), (q, k, v))
        with torch.no_grad():
            w = mha.attention(q, k, v, mask, weights=weights, backend=backend).weights
        res[backend] = (out, w, *grads)
    for ours, ref in zip(res["triton"], res["reference"], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    return res["triton"][1], lse


@pytest.mark.parametrize("value", [torch.finfo(torch.float32).min, -1e10])
def test_huge_negative_bias_rows_average_uniformly(value):
    """Rows whose every key has a huge finite bias average their keys, as the reference
    does; -inf still blocks. (In log2 units -3.4e38 overflowed to -inf; and an lse of
    -1.4e10 has no room left for log2 of the row sum, which weights and gradients need.)"""
    bias = torch.randn(L, S, generator=torch.Generator().manual_seed(3))
    bias[2] = value  # every key of row 2
    bias[5, :4] = value  # some keys of row 5: they get no weight
    bias[7, 1:] = float("-inf")  # row 7: one key left
    w, lse = _huge_bias_against_fp32_reference(bias, "mean")
    torch.testing.assert_close(w[:, 2], torch.full((N, S), 1 / S, dtype=torch.float32))
    # the lse of such a row: finite, near value (fp32 keeps no room below -2.35e38 in log2 units)
    assert ((lse[:, :, 2] / value - 1).abs() < 0.35).all()


def test_huge_positive_bias_keeps_rows_finite():
    """A finite bias above 2.35e38 (its score overflowed to +inf in log2 units, and the
    softmax to NaN) takes the keys it is on, averaged, as the fp32 reference does."""
    bias = torch.randn(L, S, generator=torch.Generator().manual_seed(4))
    bias[2] = 3e38  # every key of row 2
    bias[5, :4] = 3e38  # some keys of row 5: only they get weight
    w, lse = _huge_bias_against_fp32_reference(bias, "per_head")
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(w[:, :, 5, :4], torch.full((N, HQ, 4), 0.25))


def test_key_lengths_past_int32_are_clamped():
    q, k, v = (t.float() for t in _inputs())
    huge = mha.attention(q, k, v, KeyPadding(torch.tensor([2**31 + 3, 2**32 + 5])), weights="mean", backend="triton")
    full = mha.attention(q, k, v, KeyPadding(torch.tensor([S, S])), weights="mean", backend="triton")
    assert torch.equal(huge.output, full.output)
    assert torch.equal(huge.weights, full.weights)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_narrow_integer_key_lengths_with_more_keys_than_they_hold(dtype):
    """uint8/int8 lengths against S = 300 keys: clamping them to S in their own dtype
    raised 'value cannot be converted to type uint8_t without overflow'."""
    q, k, v = (t.float() for t in _inputs(L=2, S=300, Dk=16, Dv=16))
    mask = KeyPadding(torch.tensor([5, 100], dtype=dtype))
    got = mha.attention(q, k, v, mask, backend="triton").output
    torch.testing.assert_close(got, mha.attention(q, k, v, mask, backend="reference").output)


@pytest.mark.parametrize(
    "mask",
    [Window(None, 2**31 - 1), Window(2**31 - 1, 2**31 - 1), Window(2**31 - 9, 2**31 - 9, align="bottom_right")],
    ids=["after", "both", "both_bottom_right"],
)
def test_bands_wider_than_int32_allow_every_key(mask):
    """A window side of 2**31 - 1 (as good as unbounded) wrapped the kernels' int32 index
    arithmetic to no key at all: zeros instead of full attention."""
    _check(mask, shapes={"L": 9, "S": 11})


def test_lse_gradient_enters_backward():
    _check(Window(5, 0) & KeyPadding(torch.tensor([20, 9])), lse_grad=True)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    blocked = torch.zeros(N, 1, L, S, dtype=torch.bool)
    blocked[0, :, 2] = True  # row 2 of batch 0 sees nothing
    mask = KeyPadding(torch.tensor([0, 9])) & Blocked(blocked)  # batch 0: no keys at all
    q, k, v = (t.float().requires_grad_() for t in _inputs())
    res = mha.attention(q, k, v, mask, return_lse=True, backend="triton")
    assert torch.equal(res.output[0], torch.zeros_like(res.output[0]))
    assert torch.isneginf(res.lse[0]).all()
    assert torch.isfinite(res.lse[1]).all()
    res.output.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    w = mha.attention(q.detach(), k.detach(), v.detach(), mask, weights="mean", backend="triton").weights
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    # the band can empty rows too: bottom-right causal with L > S
    q, k, v = (t.float() for t in _inputs(L=33, S=3))
    out = mha.attention(q, k, v, Causal("bottom_right"), backend="triton").output
    assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30]))


@pytest.mark.parametrize(("L", "S"), [(0, 4), (3, 0)])
def test_no_queries_or_no_keys(L, S):
    q, k, v = (t.float().requires_grad_() for t in _inputs(L=L, S=S, Dk=16, Dv=8))
    res = mha.attention(q, k, v, Causal(), return_lse=True, backend="triton")
    assert res.output.shape == (N, HQ, L, 8)
    assert torch.equal(res.output, torch.zeros_like(res.output))
    assert torch.isneginf(res.lse).all()
    dq, dk, dv = torch.autograd.grad(res.output.sum(), (q, k, v))
    for grad in (dq, dk, dv):
        assert torch.equal(grad, torch.zeros_like(grad))
    w = mha.attention(q.detach(), k.detach(), v.detach(), weights="mean", backend="triton").weights
    assert w.shape == (N, L, S)


def test_non_contiguous_inputs_and_custom_scale():
    q, k, v = (t.float() for t in _inputs())
    # (N, L, H, D) storage viewed as (N, H, L, D), as the module's projections give it
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    mask = Causal() & Bias(torch.randn(S).expand(L, S))  # a stride-0 view, read as such
    ours = mha.attention(qs, ks, vs, mask, scale=0.3, return_lse=True, backend="triton")
    ref = mha.attention(q, k, v, mask, scale=0.3, return_lse=True, backend="reference")
    torch.testing.assert_close(ours.output, ref.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lse, ref.lse, rtol=1e-5, atol=1e-5)


def test_forward_is_deterministic():
    q, k, v = (t.float() for t in _inputs())
    mask = MASKS["causal_padding_bias"]
    a = mha.attention(q, k, v, mask, weights="mean", return_lse=True, backend="triton")
    b = mha.attention(q, k, v, mask, weights="mean", return_lse=True, backend="triton")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_jagged_batches_through_the_core():
    torch.manual_seed(0)
    lengths = [3, 17, 5]
    seqs = [torch.randn(n, HQ, DK) for n in lengths]
    q = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    ours = mha.attention(q, q, q, Causal(), weights="mean", backend="triton")
    for n, x in enumerate(seqs):
        x = x.transpose(0, 1)[None]
        ref = mha.attention(x, x, x, Causal(), weights="mean", backend="reference")
        torch.testing.assert_close(ours.output.unbind()[n], ref.output[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.weights[n], ref.weights[0], rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_the_custom_ops():
    q, k, v = (t.float().requires_grad_() for t in _inputs(N=1, Hq=2, Hkv=1, L=3, S=5, Dk=16, Dv=8))
    mask = KeyPadding(torch.tensor([4]))

    def f(q, k, v):
        return mha.attention(q, k, v, mask, return_lse=True, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.lse, want.lse)
    (dq,) = torch.autograd.grad(got.output.sum(), q)
    (dq_eager,) = torch.autograd.grad(want.output.sum(), q)
    torch.testing.assert_close(dq, dq_eager)


def test_output_is_laid_out_heads_last():
    """(N, L, Hq, Dv) in memory, so merging the heads into (N, L, E) costs no copy."""
    q, k, v = (t.float() for t in _inputs())
    out = mha.attention(q, k, v, Causal(), backend="triton").output
    assert out.shape == (N, HQ, L, DV)
    assert out.transpose(1, 2).is_contiguous()


def test_custom_op_registrations_pass_opcheck():
    q, k, v = (t.float() for t in _inputs(N=1, Hq=2, Hkv=1, L=3, S=5, Dk=16, Dv=8))
    allowed = torch.rand(1, 1, 3, 5) < 0.8
    args = (q, k, v, torch.tensor([4], dtype=torch.int32), allowed, None, 0.25, None, 0)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(triton_backend.attention_fwd, args, test_utils=tests)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(triton_backend.attention_fwd, (*args, "mean"), test_utils=tests)


def _call(mask=None, dtype=torch.float32, **kwargs):
    q, k, v = (t.to(dtype) for t in _inputs(L=3, S=5, Dk=16, Dv=8))
    return _validate_call(q, k, v, mask, None, kwargs.get("dropout_p", 0.0), kwargs.get("weights"), False)


def test_declines_with_reasons(monkeypatch):
    def reasons(call):
        return not_supported_reasons(triton_backend.BACKEND.caps, call)

    assert reasons(_call()) == []
    assert any("float16, bfloat16 or float32" in r for r in reasons(_call(dtype=torch.float64)))
    assert any("no dropout" in r for r in reasons(_call(dropout_p=0.1)))
    q, k, v = (t.float().requires_grad_() for t in _inputs(L=3, S=5))
    for weights in ("mean", "per_head"):  # differentiable: served
        assert reasons(_validate_call(q, k, v, None, None, 0.0, weights, False)) == []
    wide = q.detach()[:1, :1, :1].expand(20_000, 4, 3, q.shape[-1])  # stride 0: nothing allocated
    call = _validate_call(wide, k.detach()[:1, :1].expand(20_000, 4, 5, -1), v.detach()[:1, :1].expand(20_000, 4, 5, -1), None, None, 0.0, None, False)
    assert any("at most 65535, got N=20000 * Hq=4" in r for r in reasons(call))
    bias = torch.zeros(5, requires_grad=True)
    assert any("Bias tensor" in r for r in reasons(_validate_call(q, k, v, Bias(bias), None, 0.0, None, False)))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("need CUDA tensors" in r for r in explain_dispatch(_call())["triton"])
    monkeypatch.setattr(triton_backend, "_INSTALLED", False)
    assert reasons(_call()) == ["triton is not installed: pip install 'mha[triton]'"]


def test_dispatch_picks_triton_on_cpu_only_when_forced():
    q, k, v = (t.float() for t in _inputs(L=3, S=5, Dk=16, Dv=8))
    why = explain_dispatch(_validate_call(q, k, v, None, None, 0.0, None, False))
    assert why["sdpa"] == []  # dense without weights: SDPA first
    call = _validate_call(q, k, v, Causal(), None, 0.0, "mean", False)
    why = explain_dispatch(call)
    assert why["sdpa"]
    # The interpreter can serve it, but only a forced call runs CPU tensors through it.
    assert why["triton"] == [
        "picked automatically only on cuda, not cpu (force it with backend='triton' or mha.use_backend('triton'))"
    ]
    assert select_backend(call).name == "tiled"
    assert select_backend(call, "triton").name == "triton"


# --------------------------------------------------------------------------- variable length

# Sequences with no queries, no keys or neither, one query or one key, L_n > S_n (a
# bottom-right band empties rows), L_n < S_n, and lengths crossing the 16-row tiles.
LQ = [5, 0, 1, 19, 3, 2, 0]
LK = [7, 3, 0, 17, 1, 20, 0]

VARLEN_MASKS = {
    "none": None,
    "causal": Causal(),
    "causal_bottom_right": Causal("bottom_right"),
    "window": Window(3, 2),
    "window_bottom_right": Window(2, 4, align="bottom_right"),
    "window_before": Window(4, None),
    "window_before_bottom_right": Window(3, None, align="bottom_right"),
    "window_after": Window(None, 2),
    "window_after_bottom_right": Window(None, 1, align="bottom_right"),
    "causal_and_window": Causal() & Window(5, None),
}


def _jagged(values, lengths):
    """Packed ``(T, H, D)`` values as a jagged ``(N, H, j, D)`` nested tensor."""
    offsets = torch.tensor([0, *itertools.accumulate(lengths)])
    return torch.nested.nested_tensor_from_jagged(values, offsets).transpose(1, 2)


def _varlen_run(how, q, k, v, lq, lk, mask, dout, shared):
    """Packed output ``(Tq, Hq, Dv)``, lse ``(Tq, Hq)`` and gradients of
    ``<output, dout> + lse / 2`` for a jagged batch: the triton backend on the whole
    batch, or the reference backend / plain torch on each sequence alone."""
    if how == "triton":
        qj = _jagged(q, lq)
        kj, vj = (qj, qj) if shared else (_jagged(k, lk), _jagged(v, lk))
        res = mha.attention(qj, kj, vj, mask, return_lse=True, backend="triton")
        out, lse = res.output.transpose(1, 2).values(), res.lse.transpose(1, 2).values()
    else:
        outs, lses = [], []
        for qn, kn, vn in zip(q.split(lq), k.split(lk), v.split(lk), strict=True):
            qn, kn, vn = (t.transpose(0, 1)[None] for t in (qn, kn, vn))
            if how == "reference":
                o, lse_n = mha.attention(qn, kn, vn, mask, return_lse=True, backend="reference")[::2]
            else:
                o, lse_n, _ = _plain(qn, kn, vn, mask)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse_n[0].transpose(0, 1))
        out, lse = torch.cat(outs), torch.cat(lses)
    loss = (out * dout).sum() + (lse.masked_fill(torch.isneginf(lse), 0.0) * 0.5).sum()
    grads = torch.autograd.grad(loss, (q,) if shared else (q, k, v))
    names = ("dqkv",) if shared else ("dq", "dk", "dv")
    return {"output": out.detach(), "lse": lse.detach(), **dict(zip(names, grads, strict=True))}


def _varlen_check(mask, dtype=torch.float32, lq=LQ, lk=LK, Hq=HQ, Hkv=HKV, Dk=24, Dv=40, shared=False):
    """The triton backend on a jagged batch against each sequence alone: fp32 within
    fp32 tolerances of the reference backend, half precision within twice plain torch's error."""
    g = torch.Generator().manual_seed(3)
    Tq, Tk = sum(lq), sum(lk)
    q64, k64, v64, dout = (
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((Tq, Hq, Dk), (Tk, Hkv, Dk), (Tk, Hkv, Dv), (Tq, Hq, Dv))
    )
    if shared:
        k64, v64 = q64, q64

    def run(how, dt):
        q, k, v = (t.to(dt).requires_grad_() for t in (q64, k64, v64))
        if shared:
            k, v = q, q
        return _varlen_run(how, q, k, v, lq, lk, mask, dout.to(dt), shared)

    ours = run("triton", dtype)
    if dtype == torch.float32:
        ref = run("reference", torch.float32)
        for key, want in ref.items():
            torch.testing.assert_close(ours[key], want, rtol=1e-5, atol=1e-5, msg=f"{key} ({mask!r})")
    else:
        exact, plain = run("reference", torch.float64), run("plain", dtype)
        for key, want in exact.items():
            _close(ours[key], want, plain[key], f"{key} ({dtype}, {mask!r})")
    return ours


@pytest.mark.parametrize("name", VARLEN_MASKS)
def test_varlen_cross_attention_matches_reference_per_sequence_fp32(name):
    _varlen_check(VARLEN_MASKS[name])


@pytest.mark.parametrize(
    ("mask", "shape"),
    [
        (Causal("bottom_right"), {"lq": [9, 0, 1, 17], "lk": [9, 0, 1, 17], "Hkv": 1}),
        (Window(2, 1, align="bottom_right"), {"lq": [4, 1, 0, 18], "lk": [4, 1, 0, 18], "Hq": 2, "Hkv": 2, "Dk": 24, "Dv": 24, "shared": True}),
        (Window(None, 0, align="bottom_right"), {"lq": [3, 1, 21], "lk": [6, 0, 2], "Hq": 3, "Hkv": 1, "Dk": 40, "Dv": 8}),
    ],
    ids=["self_attention_mqa", "query_is_key_is_value", "mqa_dk40_dv8"],
)
def test_varlen_shapes_match_reference_per_sequence_fp32(mask, shape):
    _varlen_check(mask, **shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal_bottom_right", "window"])
def test_varlen_half_precision_within_twice_plain_torch_error(name, dtype):
    _varlen_check(VARLEN_MASKS[name], dtype=dtype)


def test_varlen_band_wider_than_int32_allows_every_key():
    _varlen_check(Window(2**31 - 1, 2**31 - 1, align="bottom_right"), lq=[5, 3], lk=[2, 7])


def test_varlen_rows_without_keys_give_zeros_and_zero_gradients():
    # Every key length 0, or no key inside the band (bottom-right, L_n > S_n): output 0,
    # lse -inf, gradients 0, nothing NaN.
    for lq, lk, mask in (([3, 0, 18], [0, 0, 0], None), ([18, 4], [1, 2], Causal("bottom_right"))):
        res = _varlen_check(mask, lq=lq, lk=lk)
        empty = torch.isneginf(res["lse"])
        assert empty.any()
        assert torch.equal(res["output"][empty.all(-1)], torch.zeros_like(res["output"][empty.all(-1)]))
        assert torch.equal(res["dq"][empty.all(-1)], torch.zeros_like(res["dq"][empty.all(-1)]))
        for key in ("output", "dq", "dk", "dv"):
            assert torch.isfinite(res[key]).all(), key


def test_varlen_batch_of_no_tokens():
    q, k, v = torch.zeros(0, HQ, 16), torch.zeros(0, HKV, 16), torch.zeros(0, HKV, 8)
    for q_offsets, k_offsets in (([0], [0]), ([0, 0, 0], [0, 0, 0])):
        res = packed_attention(q, k, v, q_offsets, k_offsets, Causal(), return_lse=True, backend="triton")
        assert res.output.shape == (0, HQ, 8)
        assert [x.shape for x in res.lse] == [(HQ, 0)] * (len(q_offsets) - 1)


def test_varlen_rows_outside_the_offsets_are_left_out():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((12, HQ, 16), (9, HKV, 16), (9, HKV, 8)))
    q_offsets, k_offsets = [2, 5, 5, 10], [1, 3, 8, 8]  # rows before and after are no sequence's
    ours = packed_attention(q, k, v, q_offsets, k_offsets, Causal("bottom_right"), return_lse=True, backend="triton")
    ref = packed_attention(q, k, v, q_offsets, k_offsets, Causal("bottom_right"), return_lse=True, backend="reference")
    assert ours.output.shape == (8, HQ, 8)
    torch.testing.assert_close(ours.output, ref.output, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.lse, ref.lse, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _count_launches(monkeypatch) -> collections.Counter:
    """Counts the launches of each Triton kernel, by kernel name, from now on."""
    counts: collections.Counter = collections.Counter()

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.kernel[grid]

    for name in ("_fwd_kernel", "_weights_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        monkeypatch.setattr(_triton_kernels, name, Counting(name, getattr(_triton_kernels, name)))
    return counts


def _small_jagged(requires_grad=False):
    """A jagged batch of 4 sequences with 4 distinct (L_n, S_n)."""
    g = torch.Generator().manual_seed(0)
    lq, lk = [3, 5, 1, 5], [4, 5, 2, 6]
    q = torch.randn(sum(lq), HQ, 16, generator=g, requires_grad=requires_grad)
    k = torch.randn(sum(lk), HKV, 16, generator=g, requires_grad=requires_grad)
    v = torch.randn(sum(lk), HKV, 8, generator=g, requires_grad=requires_grad)
    return (q, k, v), (_jagged(q, lq), _jagged(k, lk), _jagged(v, lk))


def test_forced_triton_runs_a_jagged_batch_in_one_launch(monkeypatch):
    counts = _count_launches(monkeypatch)
    (q, k, v), jagged = _small_jagged(requires_grad=True)
    res = mha.attention(*jagged, Causal("bottom_right"), backend="triton")
    assert counts == {"_fwd_kernel": 1}
    torch.autograd.grad(res.output.values().sum(), (q, k, v))
    assert counts == {"_fwd_kernel": 1, "_bwd_dq_kernel": 1, "_bwd_dkdv_kernel": 1}
    # Weights keep the grouping path: one forward and one weights launch per distinct (L_n, S_n).
    counts.clear()
    with torch.no_grad():
        mha.attention(*jagged, Causal("bottom_right"), weights="mean", backend="triton")
    assert counts == {"_fwd_kernel": 4, "_weights_kernel": 4}


def test_a_jagged_batch_that_knows_its_longest_sequence_reads_nothing_back(monkeypatch):
    """On CUDA a host read waits for the GPU. The varlen kernels need only the offsets
    tensor and the longest length, which a jagged tensor built from a list caches."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, HQ, 16, generator=g) for n in (3, 7, 1)]
    q = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    want = mha.attention(q, q, q, Causal(), backend="reference").output.values()

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("tolist", "item", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    got = mha.attention(q, q, q, Causal(), backend="triton").output
    monkeypatch.undo()
    torch.testing.assert_close(got.values(), want)
    assert got._maybe_max_seqlen == 7  # the output keeps the cache for the next layer


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_jagged_offsets_that_leave_rows_out(backend):
    """Offsets may start past row 0 and end before the last row of the values: the
    triton path reads the sequences in place, the others pack them first."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(12, HQ, 16, generator=g)
    q = torch.nested.nested_tensor_from_jagged(values, torch.tensor([2, 5, 10])).transpose(1, 2)
    res = mha.attention(q, q, q, Causal(), return_lse=True, backend=backend)
    # Read each sequence where its offsets say, as nested-tensor ops do (unbind alone
    # splits the values by length from row 0, whatever the first offset).
    out_offsets = res.output.offsets().tolist()
    for i, (a, b) in enumerate(((2, 5), (5, 10))):
        x = values[a:b].transpose(0, 1)[None]
        ref = mha.attention(x, x, x, Causal(), return_lse=True, backend="reference")
        rows = slice(out_offsets[i], out_offsets[i + 1])
        torch.testing.assert_close(res.output.values()[:, rows], ref.output[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.lse.unbind()[i], ref.lse[0], rtol=1e-5, atol=1e-5)


def test_jagged_auto_dispatch_on_cpu_never_uses_triton(monkeypatch):
    counts = _count_launches(monkeypatch)
    _, jagged = _small_jagged()
    forced = mha.attention(*jagged, Window(2, 1), return_lse=True, backend="triton")
    counts.clear()
    auto = mha.attention(*jagged, Window(2, 1), return_lse=True)
    torch.testing.assert_close(auto.output.values(), forced.output.values(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto.lse.values(), forced.lse.values(), rtol=1e-5, atol=1e-5)
    module = mha.MultiheadAttention(8, 2, batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(n, 8) for n in (3, 5, 1)], layout=torch.jagged)
    module(x, x, x, is_causal=True)
    module(x, x, x, need_weights=False)
    assert counts == {}


def test_forced_triton_on_jagged_input_declines_with_reasons():
    _, (q, k, v) = _small_jagged()
    with pytest.raises(NotImplementedError, match=r"backend 'triton' cannot serve this variable-length.*\n.*float16, bfloat16 or float32"):
        mha.attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(NotImplementedError, match="no dropout"):
        mha.attention(q, k, v, dropout_p=0.5, backend="triton")
    with pytest.raises(NotImplementedError, match="bands of one alignment"):
        mha.attention(q, k, v, Causal() & Window(2, None, align="bottom_right"), backend="triton")

    def reasons(q, k, v, n_seq, mask=None, weights=None):
        offsets = Offsets(device=torch.zeros(n_seq + 1, dtype=torch.int32))
        call = _validate_varlen_call(q, k, v, offsets, offsets, mask, None, 0.0, weights, False)
        return not_supported_reasons(triton_backend.BACKEND.caps, call)

    packed = [t.values().transpose(0, 1) for t in (q, k, v)]  # values() of (N, H, j, D) is (H, T, D)
    assert reasons(*packed, 4, Causal("bottom_right")) == []
    assert any("at most 65535, got N=20000 * Hq=4" in r for r in reasons(*packed, 20_000))
    huge = packed[0][:1].expand(2**31, HQ, 16)  # stride 0: nothing allocated
    assert any("int32 offsets" in r for r in reasons(huge, *packed[1:], 4))
    # Weights run per group of equal lengths through the dense kernels: no varlen limit applies.
    assert reasons(*packed, 4, Causal() & Window(2, None, align="bottom_right"), "per_head") == []


def test_torch_compile_traces_the_varlen_path():
    (q, k, v), _ = _small_jagged(requires_grad=True)

    def f(q, k, v):
        res = packed_attention(q, k, v, [0, 3, 9], [0, 5, 11], Causal("bottom_right"), return_lse=True, backend="triton")
        return res.output, res.lse[1]

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)) for out, lse in (got, want)]
    torch.testing.assert_close(grads[0], grads[1])


def test_varlen_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((6, 2, 16), (7, 1, 16), (7, 1, 8)))
    offsets = (torch.tensor([0, 2, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 7, 7], dtype=torch.int32))
    args = (q, k, v, *offsets, 4, 4, 0.25, None, 0, True)
    torch.library.opcheck(triton_backend.varlen_fwd, args)
    grad_args = tuple(t.requires_grad_() for t in (q.clone(), k.clone(), v.clone()))
    torch.library.opcheck(triton_backend.varlen_fwd, (*grad_args, *args[3:]))
    out, lse, stats = triton_backend.varlen_fwd(*args)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    torch.library.opcheck(triton_backend.varlen_bwd, (dout, dlse, q, k, v, out, stats, *args[3:]))


# --------------------------------------------------------------------------- code hygiene


def test_kernel_records_name_the_kernels_parameters():
    """MaskArgs, Layout and WeightsGrad are passed as keyword arguments: each field must be
    a parameter of every kernel that takes the record."""
    K = _triton_kernels
    takes = {
        K.MaskArgs: (K._fwd_kernel, K._weights_kernel, K._bwd_weights_delta_kernel, K._bwd_dkdv_kernel, K._bwd_dq_kernel),
        K.Layout: (K._fwd_kernel, K._bwd_dkdv_kernel, K._bwd_dq_kernel),
        K.WeightsGrad: (K._bwd_weights_delta_kernel, K._bwd_dkdv_kernel, K._bwd_dq_kernel),
    }
    for record, kernels in takes.items():
        for kernel in kernels:
            assert set(record._fields) <= set(kernel.arg_names), (record.__name__, kernel.__name__)


def test_kernels_do_not_import_the_backend_and_one_place_reads_the_interpreter_flag():
    import ast
    import pathlib
    import re

    src = pathlib.Path(mha.__file__).parent
    tree = ast.parse((src / "_backends" / "_triton_kernels.py").read_text())
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == [], [ast.unparse(node) for node in relative]
    reads = [
        (path.name, line)
        for path in src.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"environ(\.get\(|\[)\s*['\"]TRITON_INTERPRET", line)
    ]
    assert len(reads) == 1, reads
