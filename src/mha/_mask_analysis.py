"""What a torch-style ``attn_mask`` or ``key_padding_mask`` is, read once per mask tensor.

Recognising the standard causal mask (so that it runs as ``Causal`` and skips
the blocked half), the seed's inverted ``tril`` mask, right padding (so that the
padded keys are never projected), and rows or sequences with no key all need
the mask's values: on a GPU, a read that waits for the queue to drain. The
summaries are cached per tensor object and its version counter, so a mask built
once and passed to every layer costs its reading once; a mask modified in place
is read again. Inference tensors keep no version counter, so they are read
again on every call, but, as views made for one call, once within it
(:func:`reading_once`).
"""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
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


@dataclass(frozen=True)
class KeyPaddingSummary:
    """empty_batches: batch elements whose every key is blocked. For a boolean mask
    that is right padding (each row open keys, then only padding): ``lengths``, the
    number of open keys ``(N,)`` on the mask's device, and ``lengths_list``, the
    same on the host; both None otherwise."""

    empty_batches: tuple[int, ...]
    lengths: Tensor | None
    lengths_list: tuple[int, ...] | None


# (id(mask), kind) -> (weak reference to it, its version counter, summary). Tensors
# compare elementwise, so they cannot key a WeakKeyDictionary; the weak reference's
# callback drops the entry when the mask is freed.
_cache: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}


# Summaries of the call in progress, by (id(mask), kind): the masks are alive until it ends.
_call_reads: ContextVar[dict | None] = ContextVar("mha_call_reads", default=None)


class _ReadingOnce:
    def __enter__(self) -> None:
        self._token = _call_reads.set({})

    def __exit__(self, *exc) -> None:
        _call_reads.reset(self._token)


def reading_once() -> contextlib.AbstractContextManager:
    """Context for one forward call: in it, each mask tensor's values are read at most
    once, whether or not the cache across calls can hold it. Nothing under ``torch.compile``,
    where no values are read."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _ReadingOnce()


def _cached(mask: Tensor, kind: str, summarize):
    key = (id(mask), kind)
    reads = _call_reads.get()
    if reads is not None and key in reads:
        return reads[key]
    if mask.is_inference():
        summary = summarize(mask)
    else:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is mask and hit[1] == mask._version:
            summary = hit[2]
        else:
            summary = summarize(mask)
            _cache[key] = (weakref.ref(mask, lambda _, key=key: _cache.pop(key, None)), mask._version, summary)
    if reads is not None:
        reads[key] = summary
    return summary


def summarize_attn_mask(mask: Tensor) -> AttnMaskSummary:
    """Summary of a bool (True = blocked) or float (additive) ``attn_mask`` of any rank."""
    return _cached(mask, "attn_mask", _summarize)


def summarize_key_padding_mask(mask: Tensor) -> KeyPaddingSummary:
    """Summary of a bool (True = padding) or float (additive) ``(N, S)`` ``key_padding_mask``.
    Two host reads: the open keys per row, and whether the mask is right padding."""
    return _cached(mask, "key_padding_mask", _summarize_key_padding)


def _summarize_key_padding(mask: Tensor) -> KeyPaddingSummary:
    open_keys = (~_blocked(mask)).sum(dim=-1)
    counts = tuple(open_keys.tolist())
    empty = tuple(n for n, count in enumerate(counts) if count == 0)
    if mask.dtype == torch.bool:
        positions = torch.arange(mask.shape[-1], device=mask.device)
        if torch.equal(mask, positions[None, :] >= open_keys[:, None]):
            return KeyPaddingSummary(empty, open_keys, counts)
    return KeyPaddingSummary(empty, None, None)


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
