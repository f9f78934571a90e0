"""The reference backend: plain PyTorch, everything materialised, obviously right.

Upcasts to fp32 (fp64 stays fp64). Every other backend is tested against it.
It reads the mask through ``Mask.materialize``, not through the plan the fast
backends use, so it checks the plan too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._types import AttentionOutput, Call, Capabilities
from ._grouped import by_groups
from ._ops import masked_logsumexp


class _Reference:
    name = "reference"
    caps = Capabilities(label="the reference backend")

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        return f"({N}, {H}, {L}, {S}) scores x3", 3 * N * H * L * S * score_bytes

    def forward(self, call: Call) -> AttentionOutput:
        return by_groups(call, self._dense) if call.is_varlen else self._dense(call)

    def _dense(self, call: Call) -> AttentionOutput:
        N, Hq, Hkv, L, S, _, _ = call.shape
        dtype = torch.float64 if call.query.dtype == torch.float64 else torch.float32
        q, k, v = (t.to(dtype) for t in (call.query, call.key, call.value))
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
        if call.mask is not None:
            # Each part in the heads' dtype, as the plan casts a Bias of another dtype, and
            # added to the scores in theirs: a sum of float16 Biases does not overflow.
            for part in call.mask.parts():
                scores = scores + part.materialize(N, Hq, L, S, device=q.device, dtype=call.query.dtype).to(dtype)
        lse = masked_logsumexp(scores)
        # Fully masked rows are filled with 0 before the softmax and set to 0 after.
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        if call.dropout_p > 0:
            probs = F.dropout(probs, call.dropout_p)
        out = torch.matmul(probs, v).to(call.query.dtype)
        weights = None
        if call.weights == "mean":
            weights = probs.mean(dim=1).to(call.query.dtype)
        elif call.weights == "per_head":
            weights = probs.to(call.query.dtype)
        return AttentionOutput(out, weights, lse.to(call.query.dtype) if call.return_lse else None)


BACKEND = _Reference()
