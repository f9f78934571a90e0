"""The Triton flash-decoding kernel under Triton's CPU interpreter, against the fp64 reference.

``TRITON_INTERPRET=1`` must be set when the kernel is defined, so this module sets
it, imports the kernel, and puts the variable back as it was (as test_triton.py
does). Tolerance: the kernel's error against fp64 at most twice plain torch's
error in the same dtype, plus one ulp.
"""

from __future__ import annotations

import os

import pytest
import torch

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from mha._backends import _triton_decode  # defined under the interpreter
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import mha  # noqa: E402
from mha.masks import KeyPadding  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check(N, Hq, Hkv, L, S, Dk, Dv, lengths, noncontig=False, seed=0, lengths_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Hq, L, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(N, Hkv, S, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(N, Hkv, S, Dv, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths, dtype=lengths_dtype)
    ref = mha.attention(q, k, v, KeyPadding(lengths), backend="reference", return_lse=True)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    if noncontig:  # (N, S, H, D) in memory, as a module's head split gives
        q32, k32, v32 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q32, k32, v32))
    out, lse = _triton_decode.decode(q32, k32, v32, lengths, Dk**-0.5)
    plain = mha.attention(q32, k32, v32, KeyPadding(lengths), backend="reference", return_lse=True)
    ulp = torch.finfo(torch.float32).eps
    for got, mine, want in ((out, plain.output, ref.output), (lse, plain.lse, ref.lse)):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        budget = 2 * (mine.double() - want)[finite].abs().max() + ulp * want[finite].abs().max().clamp(min=1)
        assert (got.double() - want)[finite].abs().max() <= budget
    assert not out.isnan().any()
    return out, lse


@pytest.mark.parametrize(
    ("N", "Hq", "Hkv", "L", "S", "Dk", "Dv", "lengths"),
    [
        (3, 6, 2, 1, 257, 40, 24, [257, 97, 1]),  # GQA, Dv != Dk, ragged lengths, many splits
        (1, 4, 4, 1, 97, 80, 80, [97]),  # one sequence: keys split across programs
        (2, 7, 1, 3, 33, 16, 16, [0, 33]),  # MQA, 3 queries, an empty sequence
    ],
)
def test_decode_kernel_matches_reference(N, Hq, Hkv, L, S, Dk, Dv, lengths):
    out, lse = _check(N, Hq, Hkv, L, S, Dk, Dv, lengths)
    for n, length in enumerate(lengths):
        if length == 0:
            assert not out[n].any()
            assert torch.isneginf(lse[n]).all()


def test_decode_kernel_reads_strides():
    _check(2, 4, 2, 1, 70, 40, 40, [70, 9], noncontig=True)


def test_decode_kernel_splits_the_keys():
    """One sequence, one head: the keys go to several programs, merged by lse."""
    from triton import cdiv

    S = 300
    splits = min(cdiv(S, 64), cdiv(264, 1))
    assert splits > 1
    _check(1, 1, 1, 1, S, 16, 16, [S])


@pytest.mark.parametrize("lengths", [[100, 70], [2**31 + 5, 3]], ids=["past_S", "past_int32"])
def test_decode_kernel_clamps_lengths_past_the_cache(lengths):
    """KeyPadding takes lengths past S (every key allowed): the kernel reads no key
    past S, and an int64 length of 2**31 or more does not wrap in int32."""
    _check(2, 2, 1, 1, 70, 16, 16, lengths)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_decode_kernel_takes_narrow_integer_lengths(dtype):
    """uint8/int8 lengths against more keys than their dtype holds (S = 300)."""
    _check(2, 2, 1, 1, 300, 16, 16, [5, 100], lengths_dtype=dtype)


@pytest.mark.parametrize(("L", "S"), [(1, 0), (0, 5)], ids=["no_keys", "no_queries"])
def test_decode_backend_kernel_route_without_keys_or_queries(monkeypatch, L, S):
    """The decode backend's Triton route (CUDA only, forced here) on an empty cache or
    no queries: zeros and lse -inf, shaped like the reference's."""
    from mha._backends import decode

    monkeypatch.setattr(decode, "_triton_serves", lambda call: True)
    q, k, v = torch.randn(2, 4, L, 16), torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    got = mha.attention(q, k, v, backend="decode", return_lse=True)
    ref = mha.attention(q, k, v, backend="reference", return_lse=True)
    torch.testing.assert_close(got.output, ref.output)
    torch.testing.assert_close(got.lse, ref.lse)
