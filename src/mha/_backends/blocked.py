"""The blocked backend: attention in query-row blocks, in plain PyTorch ops.

It serves every call, and is the path for what SDPA cannot give: attention
weights (averaged over heads without keeping per-head weights beyond one
block), the log-sum-exp, and any mask. Memory beyond the outputs is one block
of scores, ``N * Hq * block * S`` elements, whatever L is. Masks are read at
their own broadcast shape, one block of rows at a time.

Half-precision inputs are computed in fp32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core import AttentionOutput, Call

# Elements of one block of scores (fp32: 32 MiB). Large enough that the matmuls
# stay efficient, small enough that memory does not grow with L.
_BLOCK_ELEMENTS = 1 << 23


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    """``(N, Hkv, S, D)`` -> ``(N, Hkv * groups, S, D)`` for GQA, sharing storage when groups == 1."""
    if groups == 1:
        return t
    N, Hkv, S, D = t.shape
    return t[:, :, None].expand(N, Hkv, groups, S, D).reshape(N, Hkv * groups, S, D)


def masked_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim that gives 0 (not NaN) on rows that are all ``-inf``.

    Returns ``(probs, lse)`` with ``lse`` of shape ``scores.shape[:-1]``, ``-inf`` on such rows.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max).detach()
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return probs, lse


class _Blocked:
    name = "blocked"

    def not_supported_reasons(self, call: Call) -> list[str]:
        return []

    def forward(self, call: Call) -> AttentionOutput:
        N, Hq, Hkv, L, S, _, _ = call.shape
        in_dtype = call.query.dtype
        dtype = in_dtype if in_dtype in (torch.float32, torch.float64) else torch.float32
        device = call.query.device
        q = call.query.to(dtype) * call.scale
        kt = _expand_kv(call.key.to(dtype), Hq // Hkv).transpose(-1, -2)
        v = _expand_kv(call.value.to(dtype), Hq // Hkv)
        block = max(1, _BLOCK_ELEMENTS // max(1, N * Hq * S))
        outs, weights, lses = [], [], []
        for start in range(0, L, block):
            stop = min(L, start + block)
            scores = torch.matmul(q[:, :, start:stop], kt)
            bias = call.plan.bias_rows(start, stop, dtype, device)
            if bias is not None:
                scores = scores + bias
            allowed = call.plan.allowed_rows(start, stop, S, device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs, lse = masked_softmax(scores)
            if call.dropout_p > 0:
                probs = F.dropout(probs, call.dropout_p)
            outs.append(torch.matmul(probs, v))
            if call.weights == "mean":
                weights.append(probs.mean(dim=1))
            elif call.weights == "per_head":
                weights.append(probs)
            if call.return_lse:
                lses.append(lse)
        out = _cat(outs, 2, (N, Hq, 0, v.shape[-1]), dtype, device).to(in_dtype)
        w = None
        if call.weights == "mean":
            w = _cat(weights, 1, (N, 0, S), dtype, device).to(in_dtype)
        elif call.weights == "per_head":
            w = _cat(weights, 2, (N, Hq, 0, S), dtype, device).to(in_dtype)
        lse_out = _cat(lses, 2, (N, Hq, 0), dtype, device).to(in_dtype) if call.return_lse else None
        return AttentionOutput(out, w, lse_out)


def _cat(parts: list[Tensor], dim: int, empty_shape, dtype, device) -> Tensor:
    if not parts:
        return torch.zeros(empty_shape, dtype=dtype, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


BACKEND = _Blocked()
