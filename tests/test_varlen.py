"""Variable-length batches: jagged (and strided) nested tensors against torch run per sequence."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import mha
import mha._core
import mha._dispatch
from mha.masks import Causal, KeyPadding, Window

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

E, H = 12, 4  # torch's nested fast path needs an even num_heads
LENGTHS = [3, 7, 1, 7, 4]


def _pair(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True, dtype=dtype, **kwargs)
    ours = mha.MultiheadAttention(E, H, batch_first=True, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _seqs(lengths, width=E, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, dtype=dtype, generator=g) for n in lengths]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_jagged_self_attention_matches_torch_per_sequence(is_causal, training):
    theirs, ours = _pair()
    theirs.train(training)
    ours.train(training)
    xs = _seqs(LENGTHS)
    nt = torch.nested.nested_tensor(xs, layout=torch.jagged, requires_grad=True)
    out, weights = ours(nt, nt, nt, need_weights=True, is_causal=is_causal)
    assert out.is_nested
    assert out.layout == torch.jagged
    out.values().square().sum().backward()
    ref_grads = {name: torch.zeros_like(p) for name, p in theirs.named_parameters()}
    for x, o, w in zip(xs, out.unbind(), weights.unbind(), strict=True):
        x = x[None].requires_grad_()
        causal = torch.ones(len(x[0]), len(x[0]), dtype=torch.bool).triu(1) if is_causal else None
        ref, ref_w = theirs(x, x, x, attn_mask=causal)
        torch.testing.assert_close(o, ref[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(w, ref_w[0], rtol=1e-9, atol=1e-9)
        theirs.zero_grad()
        ref.square().sum().backward()
        for name, p in theirs.named_parameters():
            ref_grads[name] += p.grad
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_jagged_cross_attention_and_input_gradients():
    theirs, ours = _pair(kdim=5, vdim=7)
    qs, ks, vs = _seqs(LENGTHS), _seqs([2, 5, 4, 1, 6], 5, seed=2), _seqs([2, 5, 4, 1, 6], 7, seed=3)
    q = torch.nested.nested_tensor(qs, layout=torch.jagged, requires_grad=True)
    k = torch.nested.nested_tensor(ks, layout=torch.jagged, requires_grad=True)
    v = torch.nested.nested_tensor(vs, layout=torch.jagged, requires_grad=True)
    out, weights = ours(q, k, v, need_weights=False)
    assert weights is None
    gq, gk, gv = torch.autograd.grad(out.values().sum(), (q, k, v))
    for i, (a, b, c) in enumerate(zip(qs, ks, vs, strict=True)):
        a, b, c = (t[None].requires_grad_() for t in (a, b, c))
        ref, _ = theirs(a, b, c)
        torch.testing.assert_close(out.unbind()[i], ref[0], rtol=1e-9, atol=1e-9)
        ra, rb, rc = torch.autograd.grad(ref.sum(), (a, b, c))
        torch.testing.assert_close(gq.unbind()[i], ra[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gk.unbind()[i], rb[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gv.unbind()[i], rc[0], rtol=1e-9, atol=1e-9)


def test_strided_nested_matches_torch_fast_path():
    theirs, ours = _pair(dtype=torch.float32)
    theirs.eval()
    ours.eval()
    xs = _seqs(LENGTHS, dtype=torch.float32)
    nt = torch.nested.nested_tensor(xs)
    with torch.no_grad():
        ref, _ = theirs(nt, nt, nt, need_weights=False)
        out, _ = ours(nt, nt, nt, need_weights=False)
    assert out.is_nested
    assert out.layout == torch.strided
    for a, b in zip(out.unbind(), ref.unbind(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mask", [None, Causal("top_left"), Causal("bottom_right"), Window(1, 2)])
def test_core_jagged_matches_reference_per_sequence(mask):
    g = torch.Generator().manual_seed(0)
    lq, lk = [3, 5, 1, 5], [4, 5, 2, 6]
    qs = [torch.randn(n, 4, 6, dtype=torch.float64, generator=g) for n in lq]
    ks = [torch.randn(n, 2, 6, dtype=torch.float64, generator=g) for n in lk]
    vs = [torch.randn(n, 2, 5, dtype=torch.float64, generator=g) for n in lk]

    def jag(ts):
        return torch.nested.nested_tensor(ts, layout=torch.jagged).transpose(1, 2)

    res = mha.attention(jag(qs), jag(ks), jag(vs), mask, weights="per_head", return_lse=True)
    for i, (q, k, v) in enumerate(zip(qs, ks, vs, strict=True)):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        ref = mha.attention(q, k, v, mask, weights="per_head", return_lse=True, backend="reference")
        torch.testing.assert_close(res.output.unbind()[i], ref.output[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.lse.unbind()[i], ref.lse[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.weights.unbind()[i], ref.weights[0], rtol=1e-9, atol=1e-9)


def test_jagged_rejects_padding_masks():
    xs = [torch.randn(n, 2, 4) for n in (2, 3)]
    q = torch.nested.nested_tensor(xs, layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="only Causal or Window"):
        mha.attention(q, q, q, KeyPadding(torch.tensor([1, 2])))


def test_nested_module_errors_name_the_problem():
    _, ours = _pair()
    nt = torch.nested.nested_tensor(_seqs([2, 3]), layout=torch.jagged)
    with pytest.raises(ValueError, match="key_padding_mask must be None"):
        ours(nt, nt, nt, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal=True"):
        ours(nt, nt, nt, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="key must be one too"):
        ours(nt, torch.randn(2, 3, E, dtype=torch.float64), nt)
    seq_first = mha.MultiheadAttention(E, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_first=True"):
        seq_first(nt, nt, nt)


def test_jagged_output_shares_the_query_ragged_size_for_residuals():
    _, ours = _pair()
    q = torch.nested.nested_tensor(_seqs(LENGTHS), layout=torch.jagged)
    kv = torch.nested.nested_tensor(_seqs([2, 5, 4, 1, 6], seed=2), layout=torch.jagged)
    for key in (q, kv):
        out, _ = ours(q, key, key, need_weights=False)
        residual = out + q  # raises if out has a ragged size of its own
        for r, o, x in zip(residual.unbind(), out.unbind(), q.unbind(), strict=True):
            torch.testing.assert_close(r, o + x)


def test_jagged_weights_raise_no_prototype_warning():
    # torch warns once per process, so a fresh one: nothing may warn on a jagged call with weights.
    script = (
        "import torch, mha\n"
        "m = mha.MultiheadAttention(8, 2, batch_first=True)\n"
        "q = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)\n"
        "_, w = m(q, q, q, average_attn_weights=False)\n"
        "assert [tuple(x.shape) for x in w.unbind()] == [(2, 3, 3), (2, 5, 5)]\n"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _jagged_heads(lengths, H=2, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, H, D, generator=g) for n in lengths]
    return torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)  # (N, H, j, D)


@pytest.mark.parametrize("backend", mha._dispatch.backend_names())
def test_jagged_key_and_value_with_different_lengths_are_rejected(backend):
    q = _jagged_heads([3, 4])
    k = _jagged_heads([2, 5], seed=1)
    v = _jagged_heads([5, 2], seed=2)  # the same total, other lengths
    with pytest.raises(ValueError, match=r"key and value must have the same sequence lengths S_n, got key \[2, 5\] and value \[5, 2\]"):
        mha.attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", mha._dispatch.backend_names())
def test_jagged_query_and_key_with_different_numbers_of_sequences_are_rejected(backend):
    q = _jagged_heads([3, 4, 2])
    k = _jagged_heads([2, 7], seed=1)
    with pytest.raises(ValueError, match=r"same number of sequences N, got query 3 \(lengths \[3, 4, 2\]\), key 2 \(lengths \[2, 7\]\)"):
        mha.attention(q, k, k, backend=backend)
    with pytest.raises(ValueError, match=r"query holds 3 sequences \(lengths \[3, 4, 2\]\) but key holds 2"):
        mha._core.packed_attention(q.values().transpose(0, 1), k.values().transpose(0, 1), k.values().transpose(0, 1),
                                   [0, 3, 7, 9], [0, 2, 9], backend=backend)


def test_jagged_tensors_with_holes_are_rejected():
    dense = torch.randn(2, 6, 2, 3)
    holes = torch.nested.narrow(dense, 1, torch.tensor([0, 1]), torch.tensor([2, 4]), layout=torch.jagged)
    x = holes.transpose(1, 2)  # (N, H, j, D) with offsets and lengths
    with pytest.raises(ValueError, match=r"query is a jagged tensor with holes .*lengths \[2, 4\].*query.contiguous\(\)"):
        mha.attention(x, x, x)
    # What the message says to do works, and gives each sequence its own attention.
    c = holes.contiguous().transpose(1, 2)
    out = mha.attention(c, c, c).output
    for n, (start, length) in enumerate(((0, 2), (1, 4))):
        seq = dense[n, start : start + length].transpose(0, 1)[None]
        torch.testing.assert_close(out.unbind()[n], mha.attention(seq, seq, seq).output[0])
    module = mha.MultiheadAttention(3 * 2, 2, batch_first=True)
    packed = torch.nested.narrow(torch.randn(2, 6, 6), 1, torch.tensor([0, 1]), torch.tensor([2, 4]), layout=torch.jagged)
    with pytest.raises(ValueError, match="jagged tensor with holes"):
        module(packed, packed, packed)


def test_a_jagged_call_prints_nothing():
    """torch.nested.nested_tensor_from_jagged logs an 'is_fx_tracing' line on its first
    call in a process; mha's jagged calls, with and without gradients, print nothing."""
    code = (
        "import torch, mha\n"
        "x = torch.nested.nested_tensor([torch.randn(n, 2, 3) for n in (3, 5)], layout=torch.jagged)\n"
        "x = x.transpose(1, 2)\n"
        "with torch.no_grad():\n"
        "    mha.attention(x, x, x)\n"
        "y = torch.nested.nested_tensor([torch.randn(n, 2, 3) for n in (3, 5)], layout=torch.jagged,\n"
        "                               requires_grad=True).transpose(1, 2)\n"
        "mha.attention(y, y, y, return_lse=True).output.values().sum().backward()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert run.stderr == ""


def test_jagged_value_at_other_rows_than_key_is_rejected():
    """Equal lengths are not enough: the call reads value at the key's offsets."""
    values = torch.randn(8, 2, 3)
    k = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 7])).transpose(1, 2)
    v = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([1, 4, 8])).transpose(1, 2)
    q = _jagged_heads([2, 3])
    with pytest.raises(ValueError, match=r"same rows, got key offsets \[0, 3, 7\] and value offsets \[1, 4, 8\]"):
        mha.attention(q, k, v)
    module = mha.MultiheadAttention(6, 2, batch_first=True)
    values = torch.randn(8, 6)
    k = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 7]))
    v = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([1, 4, 8]))
    q = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)], layout=torch.jagged)
    with pytest.raises(ValueError, match=r"same rows, got key offsets \[0, 3, 7\] and value offsets \[1, 4, 8\]"):
        module(q, k, v)


@pytest.mark.parametrize("offsets", [[0, 5, 3, 8], [0, 3, 12], [-1, 3, 8], []])
def test_malformed_offsets_are_rejected(offsets):
    values = torch.randn(8, 2, 3)
    pattern = rf"query offsets \(N \+ 1,\) must rise .* 8 packed rows.*got {re.escape(str(offsets))}"
    with pytest.raises(ValueError, match=pattern):
        mha._core.packed_attention(values, values, values, offsets, [0, 4, 8])
    if offsets:
        q = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor(offsets)).transpose(1, 2)
        with pytest.raises(ValueError, match=pattern):
            mha.attention(q, q, q)
