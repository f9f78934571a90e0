"""Softmax and log-sum-exp that stay finite on fully masked rows: the single home of both."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim that gives 0, not NaN, on rows that are all ``-inf``.

    torch's own ``_safe_softmax`` (what SDPA's math path uses), called through
    ``torch.ops.aten`` so that dynamo traces it."""
    return torch.ops.aten._safe_softmax(scores, -1)


def masked_logsumexp(scores: Tensor) -> Tensor:
    """``logsumexp`` over the last dim, ``-inf`` on all ``-inf`` rows, with a zero (not NaN)
    gradient there: such rows are filled with 0 first and set back after (the gradient of
    ``logsumexp`` on an all ``-inf`` row is ``exp(-inf - -inf) = NaN`` otherwise)."""
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    return torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty[..., 0], float("-inf"))
