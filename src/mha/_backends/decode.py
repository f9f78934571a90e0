"""The decode backend: few queries against many keys, each key read once.

A decode step has ``L`` (often 1) new queries per sequence and a long cache of
``S`` keys: its cost is reading K and V, so the scores are computed with the
``G = Hq / Hkv`` query heads of a key/value head as the rows of one matmul
(GQA without repeating K and V):

    q (N, Hkv, G*L, Dk) @ k^T (N, Hkv, Dk, S) -> s (N, Hkv, G*L, S)
    p = softmax(scale * s + mask)                 (0 on fully masked rows)
    o = p @ v  (N, Hkv, G*L, Dv) -> (N, Hq, L, Dv)

On CUDA, calls whose only mask is key lengths (a decode step on a cache) run the
Triton flash-decoding kernel of :mod:`._triton_decode`, which splits the keys
across programs and merges the partial results by their log-sum-exp.

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
        return f"({N}, {H}, {L}, {S}) scores and probabilities", 2 * N * H * L * S * score_bytes

    def forward(self, call: Call) -> AttentionOutput:
        lengths = call.plan.lengths
        if lengths is not None and _triton_serves(call):
            out, lse = triton_decode(call.query, call.key, call.value, lengths, call.scale)
            return AttentionOutput(out, None, lse.to(call.query.dtype) if call.return_lse else None)
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
    """Whether the Triton decode kernel serves ``call``: CUDA, key lengths as the only
    mask, no weights, dropout or gradients, head dims up to 256."""
    plan = call.plan
    return (
        call.query.is_cuda
        and plan.lengths is not None
        and plan.band is None
        and not plan.has_tensors
        and call.weights is None
        and call.dropout_p == 0.0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (call.query, call.key, call.value)))
        and call.query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and max(call.key.shape[-1], call.value.shape[-1]) <= 256
        and importlib.util.find_spec("triton") is not None
    )


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
