"""What a torch-style ``attn_mask`` is, read once per mask tensor.

Recognising the standard causal mask (so that it runs as ``Causal`` and skips
the blocked half), the seed's inverted ``tril`` mask, and rows with no key all
need the mask's values. The summary is cached per tensor object and its
version counter, so a mask built once and reused costs its reading once; a
mask that is modified in place is read again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttnMaskSummary:
    """standard_causal: equal to ``triu(ones(L, S), 1)`` (bool) or to ``-inf`` above the
    diagonal and 0 elsewhere (float, as ``nn.Transformer.generate_square_subsequent_mask``).
    inverted_causal: a square bool ``tril(ones(L, L))``, the seed's Example 3.
    empty_rows: query rows whose every key is blocked, in any batch element or head."""

    standard_causal: bool
    inverted_causal: bool
    empty_rows: tuple[int, ...]


# id(mask) -> (weak reference to it, its version counter, summary). Tensors compare
# elementwise, so they cannot key a WeakKeyDictionary; the weak reference's callback
# drops the entry when the mask is freed.
_cache: dict[int, tuple[weakref.ref, int, AttnMaskSummary]] = {}


def summarize_attn_mask(mask: Tensor) -> AttnMaskSummary:
    """Summary of a bool (True = blocked) or float (additive) ``attn_mask`` of any rank."""
    key = id(mask)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    summary = _summarize(mask)
    _cache[key] = (weakref.ref(mask, lambda _, key=key: _cache.pop(key, None)), mask._version, summary)
    return summary


def _blocked(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def _corner(mask: Tensor, i: int, j: int) -> bool:
    value = mask[i, j]
    return bool(value) if mask.dtype == torch.bool else bool(torch.isneginf(value))


def _summarize(mask: Tensor) -> AttnMaskSummary:
    if mask.dim() == 2 and mask.numel() > 0:
        L, S = mask.shape
        # Corners first: most masks are told apart without a full pass.
        top_right_blocked = S > 1 and _corner(mask, 0, S - 1)
        if not _corner(mask, 0, 0) and not _corner(mask, L - 1, 0) and (S == 1 or top_right_blocked):
            triu = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
            if mask.dtype == torch.bool:
                causal = torch.equal(mask, triu)
            else:
                causal = torch.equal(mask, torch.zeros_like(mask).masked_fill(triu, float("-inf")))
            if causal:
                return AttnMaskSummary(True, False, ())
        if mask.dtype == torch.bool and L == S and L > 1 and _corner(mask, 0, 0) and not top_right_blocked:
            tril = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
            if torch.equal(mask, tril):
                return AttnMaskSummary(False, True, (L - 1,))
    empty = _blocked(mask).all(dim=-1)
    rows = empty.reshape(-1, empty.shape[-1]).any(dim=0).nonzero().flatten().tolist()
    return AttnMaskSummary(False, False, tuple(rows))
