"""The decode backend: few queries against many keys, each key read once.

A decode step has ``L`` (often 1) new queries per sequence and a long cache of
``S`` keys: its cost is reading K and V, so the scores are computed with the
``G = Hq / Hkv`` query heads of a key/value head as the rows of one matmul
(GQA without repeating K and V):

    q (N, Hkv, G*L, Dk) @ k^T (N, Hkv, Dk, S) -> s (N, Hkv, G*L, S)
    p = softmax(scale * s + mask)                 (0 on fully masked rows)
    o = p @ v  (N, Hkv, G*L, Dv) -> (N, Hq, L, Dv)

That picture is the simple path, kept for weights, dropout and ``Dv != Dk``: it
holds every score. Otherwise the keys are read in blocks whose partial results
merge by their log-sum-exp, without a score buffer of ``(N, Hq, L, S)``:

- on CPU, by torch's fused flash-attention kernel (the one under SDPA), with the
  ``G * L`` query rows of a key/value head as its queries and the masks as one
  additive ``(N, Hkv, G*L, S)`` tensor at its broadcast shape. One op, one
  parallel region: at N=8, Hq=32, Hkv=8, D=128 and 4096 cached tokens it is as
  fast as the same blocked online softmax written in torch ops on an idle
  machine, and several times faster on a busy one, where each of their dozen
  ops per block waits for both threads (``benchmarks/decode.py --sections
  formulations``);
- on CUDA, calls with no mask but key lengths (a decode step on a cache) run
  the Triton flash-decoding kernel of :mod:`._triton_decode`, which splits the
  keys across programs.

Dispatch never picks this backend by itself (its record has no automatic
devices); the cached route of :func:`mha.attention` asks for it when there are at most
:data:`MAX_ROWS` query rows per key/value head.
"""

# No ``from __future__ import annotations``: custom_op reads the annotations as types.

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from .._types import AttentionOutput, Call, Capabilities, zeros_in_graph
from ._ops import masked_logsumexp, masked_softmax

MAX_ROWS = 64


def _few_rows(call: Call) -> list[str]:
    _, Hq, Hkv, L, _, _, _ = call.shape
    rows = L * (Hq // Hkv)
    if rows > MAX_ROWS:
        return [
            f"L * Hq / Hkv = {rows} query rows per key/value head, more than {MAX_ROWS}: "
            "the decode backend is for few queries against many keys"
        ]
    return []


CAPABILITIES = Capabilities(
    label="the decode backend",
    auto_devices=frozenset(),  # only when asked for, by the cached route of mha.attention
    varlen=False,
    extra=_few_rows,
)


class _Decode:
    name = "decode"
    caps = CAPABILITIES

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        return f"({N}, {H}, {L}, {S}) scores and probabilities at most", 2 * N * H * L * S * score_bytes

    def forward(self, call: Call) -> AttentionOutput:
        if _triton_serves(call):
            lengths = call.plan.lengths
            if lengths is None:  # no padding: every sequence holds all S keys
                N, S = call.query.shape[0], call.key.shape[2]
                lengths = torch.full((N,), S, dtype=torch.int64, device=call.query.device)
            out, lse = triton_decode(call.query, call.key, call.value, lengths, call.scale)
            return AttentionOutput(out, None, lse.to(call.query.dtype) if call.return_lse else None)
        if _fused_serves(call):
            return _fused(call)
        return _grouped(call)


@torch.library.custom_op("mha::triton_decode", mutates_args=())
def triton_decode(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output ``(N, Hq, L, Dv)`` and natural lse ``(N, Hq, L)`` (fp32) of q ``(N, Hq, L, Dk)``
    against the keys ``j < lengths[n]`` of k ``(N, Hkv, S, Dk)``, v ``(N, Hkv, S, Dv)``:
    the flash-decoding kernel of :mod:`._triton_decode` (inference only, no autograd)."""
    from . import _triton_decode

    return _triton_decode.decode(q, k, v, lengths, scale)


@triton_decode.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    N, Hq, L, _ = q.shape
    return q.new_empty(N, Hq, L, v.shape[-1]), q.new_empty(N, Hq, L, dtype=torch.float32)


def _triton_serves(call: Call) -> bool:
    """Whether the Triton decode kernel serves ``call``: CUDA, no mask but key lengths,
    no weights, dropout or gradients, head dims up to 256."""
    plan = call.plan
    return (
        call.query.is_cuda
        and plan.band is None
        and not plan.has_tensors
        and call.weights is None
        and call.dropout_p == 0.0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (call.query, call.key, call.value)))
        and call.query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and max(call.key.shape[-1], call.value.shape[-1]) <= 256
        and importlib.util.find_spec("triton") is not None
    )


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fused_serves(call: Call) -> bool:
    """Whether torch's fused CPU kernel serves ``call``: no weights or dropout, ``Dk ==
    Dv``, some queries and keys (it divides by both counts), unit-stride head dims, and
    no Bias tensor that needs a gradient (its mask input takes none)."""
    N, Hq, _, L, S, Dk, Dv = call.shape
    q, k, v = call.query, call.key, call.value
    return (
        q.device.type == "cpu"
        and call.weights is None
        and call.dropout_p == 0.0
        and Dk == Dv
        and N * Hq * L * S > 0
        and q.dtype in _FUSED_DTYPES
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in call.plan.bias))
    )


def _fused(call: Call) -> AttentionOutput:
    """Torch's fused CPU flash-attention kernel, the ``G`` query heads of a key/value
    head (times ``L`` queries) as its query rows: K and V are read once, in blocks."""
    N, Hq, Hkv, L, S, Dk, Dv = call.shape
    G = Hq // Hkv
    dtype = torch.float64 if call.query.dtype == torch.float64 else torch.float32
    mask = call.plan.additive_rows(0, L, S, dtype, call.query.device)
    if mask is not None:
        mask = _as_rows(mask, Hkv, G, L)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        call.query.reshape(N, Hkv, G * L, Dk), call.key, call.value, attn_mask=mask, scale=call.scale
    )
    if not call.return_lse:
        return AttentionOutput(out.reshape(N, Hq, L, Dv), None, None)
    if mask is not None:  # the kernel gives a row without keys lse 0: it is -inf
        lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
    return AttentionOutput(out.reshape(N, Hq, L, Dv), None, lse.reshape(N, Hq, L).to(call.query.dtype))


def _as_rows(mask: Tensor, Hkv: int, G: int, L: int) -> Tensor:
    """A mask broadcastable to ``(N, Hq, L, S)`` as one broadcastable to ``(N, Hkv, G*L, S)``
    (row ``g * L + l`` is query ``l`` of head ``g`` of the key/value head), expanded
    only along what it varies with."""
    n, h, rows, keys = mask.shape
    if h == 1 and rows == 1:
        return mask
    grouped = mask.reshape(n, Hkv, G, rows, keys) if h > 1 else mask[:, :, None]
    return grouped.expand(n, grouped.shape[1], G, L, keys).reshape(n, grouped.shape[1], G * L, keys)


def _grouped(call: Call) -> AttentionOutput:
    N, Hq, Hkv, L, S, Dk, Dv = call.shape
    G = Hq // Hkv
    if N * Hq * L == 0 or S == 0:
        out = zeros_in_graph((N, Hq, L, Dv), call.query, call.key, call.value)
        lse = out.new_full((N, Hq, L), float("-inf")) if call.return_lse else None
        weights = None
        if call.weights is not None:
            weights = out.new_zeros((N, L, S) if call.weights == "mean" else (N, Hq, L, S))
        return AttentionOutput(out, weights, lse)
    dtype = torch.float64 if call.query.dtype == torch.float64 else torch.float32
    # The scale goes on q (N*Hq*L*Dk elements), not on the scores (N*Hq*L*S).
    q = (call.query * call.scale).reshape(N, Hkv, G * L, Dk)
    scores = torch.matmul(q, call.key.transpose(-1, -2)).to(dtype).view(N, Hkv, G, L, S)
    allowed = call.plan.allowed_rows(0, L, S, call.query.device)
    if allowed is not None:
        # In place on the fresh scores: no additive mask of -inf to build and add.
        scores = scores.masked_fill_(~_grouped_mask(allowed, Hkv, G), float("-inf"))
    bias = call.plan.bias_rows(0, L, dtype, call.query.device)
    if bias is not None:
        scores = scores + _grouped_mask(bias, Hkv, G)
    probs = masked_softmax(scores)
    lse = masked_logsumexp(scores).reshape(N, Hq, L).to(call.query.dtype) if call.return_lse else None
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)
    out = torch.matmul(probs.view(N, Hkv, G * L, S).to(call.value.dtype), call.value)
    weights = None
    if call.weights == "mean":
        weights = probs.mean(dim=(1, 2)).to(call.query.dtype)
    elif call.weights == "per_head":
        weights = probs.reshape(N, Hq, L, S).to(call.query.dtype)
    return AttentionOutput(out.view(N, Hq, L, Dv), weights, lse)


def _grouped_mask(additive: Tensor, Hkv: int, G: int) -> Tensor:
    """A mask broadcastable to ``(N, Hq, L, S)`` as one broadcastable to ``(N, Hkv, G, L, S)``."""
    n, h, rows, keys = additive.shape
    if h == 1:
        return additive[:, :, None]
    return additive.reshape(n, Hkv, G, rows, keys)


BACKEND = _Decode()
