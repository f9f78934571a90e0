"""What a torch-style ``attn_mask`` or ``key_padding_mask`` is, read from its values.

Recognising the standard causal mask (so that it runs as ``Causal`` and skips
the blocked half), the inverted ``tril`` mask, right padding (so that the
padded keys need not be projected), and rows or sequences with no key all need
the mask's values: on a GPU, a read that waits for the queue to drain.

Each mask is read when a call is planned, once per call, and never remembered
across calls: a mask's memory can change without torch's version counter
moving (a ``torch.from_numpy`` buffer refilled per batch, ``mask.data[...] =
...``, ``mask.data = ...``, a storage alias), so a summary kept from an earlier
call could be stale. Host reads per call: 2 for a boolean ``key_padding_mask``
(open keys per row, whether it is right padding), 3 for a float one (and
whether its values are exactly 0 and ``-inf``); for an ``(L, S)`` ``attn_mask``,
2 to 4 to recognise the standard causal mask by its corners and then in full,
and 1 for the rows it leaves without a key.

Values are read only from plain tensors on a real device, outside
``torch.compile`` (:func:`values_readable`): never from ``meta`` tensors, fake
tensors or other tensor subclasses. A mask that requires grad is never
summarised as a causal mask or as padding lengths, so its gradient is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .masks import Causal, right_padding_lengths

_PLAIN = (Tensor, nn.Parameter)


def values_readable(*tensors: Tensor | None) -> bool:
    """Whether the values of every given tensor can be read on the host: eager mode, plain
    tensors (no fake or other subclass) on a device other than ``meta``."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) in _PLAIN and t.device.type != "meta") for t in tensors)


@dataclass(frozen=True)
class AttnMaskSummary:
    """standard_causal: equal to ``triu(ones(L, S), 1)`` (bool) or to ``-inf`` above the
    diagonal and 0 elsewhere (float, as ``nn.Transformer.generate_square_subsequent_mask``),
    and not requiring grad. inverted_causal: a square bool ``tril(ones(L, L))``.
    empty_rows: query rows whose every key is blocked, in any batch element or head."""

    standard_causal: bool
    inverted_causal: bool
    empty_rows: tuple[int, ...]


@dataclass(frozen=True)
class KeyPaddingSummary:
    """empty_batches: batch elements whose every key is blocked. For a mask that is
    right padding (each row open keys, then only padding; True in a boolean mask, or a
    float mask of exactly 0 then ``-inf``) and does not require grad: ``lengths``, the
    number of open keys ``(N,)`` on the mask's device, and ``lengths_list``, the same on
    the host; both None otherwise."""

    empty_batches: tuple[int, ...]
    lengths: Tensor | None
    lengths_list: tuple[int, ...] | None


def blocked(mask: Tensor) -> Tensor:
    """A torch-style mask as booleans, True = blocked (``-inf`` in a float mask)."""
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def causal_blocked(L: int, S: int, device: torch.device) -> Tensor:
    """Boolean ``(L, S)``, True above the diagonal: what top-left causality blocks."""
    return ~Causal("top_left").allowed(L, S, device)


def summarize_key_padding_mask(mask: Tensor) -> KeyPaddingSummary:
    """Summary of a bool (True = padding) or float (additive) ``(N, S)`` ``key_padding_mask``."""
    is_blocked = blocked(mask)
    lengths = None if mask.requires_grad else right_padding_lengths(is_blocked)
    if (
        lengths is not None
        and mask.dtype != torch.bool
        and not torch.equal(mask, torch.zeros_like(mask).masked_fill(is_blocked, float("-inf")))
    ):
        lengths = None
    if lengths is None:
        counts = (~is_blocked).sum(dim=-1)
        return KeyPaddingSummary(tuple((counts == 0).nonzero().flatten().tolist()), None, None)
    host = tuple(lengths.tolist())
    return KeyPaddingSummary(tuple(n for n, count in enumerate(host) if count == 0), lengths, host)


def _corner(mask: Tensor, i: int, j: int) -> bool:
    value = mask[i, j]
    return bool(value) if mask.dtype == torch.bool else bool(torch.isneginf(value))


def summarize_attn_mask(mask: Tensor) -> AttnMaskSummary:
    """Summary of a bool (True = blocked) or float (additive) ``attn_mask`` of any rank."""
    if mask.numel() == 0:
        return AttnMaskSummary(False, False, ())
    if mask.dim() == 2 and not mask.requires_grad:
        L, S = mask.shape
        # Corners first: most masks are told apart without a full pass.
        top_right_blocked = S > 1 and _corner(mask, 0, S - 1)
        if not _corner(mask, 0, 0) and not _corner(mask, L - 1, 0) and (S == 1 or top_right_blocked):
            triu = causal_blocked(L, S, mask.device)
            if mask.dtype == torch.bool:
                causal = torch.equal(mask, triu)
            else:
                causal = torch.equal(mask, torch.zeros_like(mask).masked_fill(triu, float("-inf")))
            if causal:
                return AttnMaskSummary(True, False, ())
        inverted = mask.dtype == torch.bool and L == S and L > 1 and _corner(mask, 0, 0) and not top_right_blocked
        if inverted and torch.equal(mask, ~causal_blocked(L, L, mask.device)):
            return AttnMaskSummary(False, True, (L - 1,))
    empty = blocked(mask).all(dim=-1)
    rows = empty.reshape(-1, empty.shape[-1]).any(dim=0).nonzero().flatten().tolist()
    return AttnMaskSummary(False, False, tuple(rows))
