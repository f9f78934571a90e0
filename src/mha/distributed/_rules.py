"""A mask's global meaning, evaluated on one block of global positions.

Ring attention never ships a mask. Every rank reduces the user's mask once to
a :class:`Rule` (a band of allowed ``j - i``, key lengths, packed-sequence
offsets) and evaluates it on each block of queries ``[q0, q0 + Lb)`` and keys
``[k0, k0 + Sb)``. For the core the block's mask is again a mask object: the
band keeps its meaning with ``Window(shift=q0 - k0)``, the lengths become the
block's own, and packed sequences become a boolean "same sequence" tensor of
the block.
"""

from __future__ import annotations

import bisect
import functools
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import Allowed, KeyPadding, Mask, Window
from ._layout import Piece


@dataclass(frozen=True)
class Rule:
    """Query ``i`` may attend key ``j`` (global positions) iff ``lo <= j - i <= hi``
    (``None``: unbounded), ``j < lengths[n]`` and, with ``offsets``, ``i`` and ``j``
    lie in the same packed sequence ``[offsets[b], offsets[b + 1])``.

    ``lengths`` is ``(N,)``; ``min_length``, ``max_length`` and ``bounds`` are host
    copies of ``min(lengths)``, ``max(lengths)`` and ``offsets``, read once so that deciding which blocks
    to skip never waits on the device."""

    lo: int | None = None
    hi: int | None = None
    lengths: Tensor | None = None
    min_length: int = 0
    max_length: int = 0
    offsets: Tensor | None = None
    bounds: tuple[int, ...] = ()

    def signature(self) -> list[int]:
        """Integers that equal ranks' rules share (compared across ranks before the ring)."""
        none = -(1 << 62)
        lengths_sum = lengths_moment = offsets_sum = offsets_moment = none
        if self.lengths is not None:
            lengths = self.lengths.to(torch.int64).cpu()
            lengths_sum = int(lengths.sum())
            lengths_moment = int((lengths * torch.arange(1, lengths.numel() + 1)).sum())
        if self.offsets is not None:
            offsets_sum = sum(self.bounds)
            offsets_moment = sum((k + 1) * b for k, b in enumerate(self.bounds))
        return [
            none if self.lo is None else self.lo,
            none if self.hi is None else self.hi,
            lengths_sum,
            lengths_moment,
            offsets_sum,
            offsets_moment,
        ]

    def _band(self, q: Piece, k: Piece) -> tuple[int | None, int | None]:
        """The band in block coordinates: query ``a``, key ``b`` allowed iff ``lo <= b - a <= hi``."""
        shift = q.start - k.start
        return (
            None if self.lo is None else self.lo + shift,
            None if self.hi is None else self.hi + shift,
        )

    def _sequences(self, p: Piece) -> tuple[int, int]:
        """Indices of the first and last packed sequence that positions of ``p`` lie in."""
        return (
            bisect.bisect_right(self.bounds, p.start) - 1,
            bisect.bisect_right(self.bounds, p.stop - 1) - 1,
        )

    def is_open(self, q: Piece, k: Piece) -> bool:
        """Whether some query of ``q`` may attend some key of ``k`` (False: skip the block)."""
        if q.length == 0 or k.length == 0:
            return False
        lo, hi = self._band(q, k)
        if lo is not None and lo > k.length - 1:
            return False
        if hi is not None and hi < -(q.length - 1):
            return False
        if lo is not None and hi is not None and lo > hi:
            return False
        if self.lengths is not None and self.max_length <= k.start:
            return False
        if self.offsets is not None:
            q_first, q_last = self._sequences(q)
            k_first, k_last = self._sequences(k)
            if q_last < k_first or k_last < q_first:
                return False
        return True

    def block_mask(self, q: Piece, k: Piece, device: torch.device) -> Mask | None:
        """The mask object of block ``(q, k)`` for :func:`mha.attention`."""
        parts: list[Mask] = []
        lo, hi = self._band(q, k)
        if lo is not None and hi is not None:
            parts.append(Window(0, hi - lo, shift=lo))
        elif hi is not None:
            parts.append(Window(None, 0, shift=hi))
        elif lo is not None:
            parts.append(Window(0, None, shift=lo))
        if self.lengths is not None and self.min_length < k.stop:
            parts.append(KeyPadding((self.lengths - k.start).clamp(0, k.length)))
        if self.offsets is not None:
            parts.append(Allowed(_same_sequence(self.offsets, q, k, device)))
        return functools.reduce(operator.and_, parts) if parts else None

    def block_allowed(self, q: Piece, k: Piece, device: torch.device) -> Tensor | None:
        """Boolean ``(N or 1, 1, Lb or 1, Sb)``, True where block ``(q, k)`` may attend (one row
        for every query when only key padding applies); None if all may."""
        allowed: Tensor | None = None
        lo, hi = self._band(q, k)
        if lo is not None or hi is not None:
            rel = torch.arange(k.length, device=device)[None, :] - torch.arange(q.length, device=device)[:, None]
            band = torch.ones(q.length, k.length, dtype=torch.bool, device=device)
            if lo is not None:
                band &= rel >= lo
            if hi is not None:
                band &= rel <= hi
            allowed = band[None, None]
        if self.lengths is not None and self.min_length < k.stop:
            keys = torch.arange(k.start, k.stop, device=device)[None, :] < self.lengths.to(device)[:, None]
            keys = keys[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        if self.offsets is not None:
            same = _same_sequence(self.offsets, q, k, device)[None, None]
            allowed = same if allowed is None else allowed & same
        return allowed


def rule_from_mask(mask: Mask | None, L: int, S: int, offsets: Tensor | None) -> Rule:
    """Reduce ``mask`` (global meaning, ``L`` queries and ``S`` keys in all) to a :class:`Rule`.

    Raises NotImplementedError for tensor masks (``Allowed``, ``Blocked``, ``Bias``):
    their ``(L, S)`` values would have to travel with the keys."""
    lo: int | None = None
    hi: int | None = None
    lengths: Tensor | None = None
    for part in () if mask is None else mask.parts():
        if isinstance(part, Window):
            off = part.offset(L, S)
            p_lo = None if part.before is None else off - part.before
            p_hi = None if part.after is None else off + part.after
            lo = p_lo if lo is None else lo if p_lo is None else max(lo, p_lo)
            hi = p_hi if hi is None else hi if p_hi is None else min(hi, p_hi)
        elif isinstance(part, KeyPadding):
            lengths = part.lengths if lengths is None else torch.minimum(lengths, part.lengths)
        else:
            raise NotImplementedError(
                f"ring_attention: mask {part!r} is a tensor over (N, H, L, S); ring attention takes the masks "
                "that every rank can evaluate on its own blocks: Causal, Window, KeyPadding and their &. "
                "Express key masks as KeyPadding(lengths) (right padding) or run mha.attention on one device"
            )
    if offsets is not None and lengths is not None:
        raise NotImplementedError(
            "ring_attention: KeyPadding with packed sequences (offsets=...); leave the padding out of "
            "the packed sequences instead, each sequence's keys are its own"
        )
    host = [] if lengths is None else lengths.tolist()
    bounds = () if offsets is None else tuple(int(b) for b in offsets.tolist())
    return Rule(lo, hi, lengths, min(host, default=0), max(host, default=0), offsets, bounds)


def _same_sequence(offsets: Tensor, q: Piece, k: Piece, device: torch.device) -> Tensor:
    """Boolean ``(Lb, Sb)``: query and key in the same packed sequence of ``offsets``."""
    offsets = offsets.to(device)
    qs = torch.bucketize(torch.arange(q.start, q.stop, device=device), offsets, right=True)
    ks = torch.bucketize(torch.arange(k.start, k.stop, device=device), offsets, right=True)
    return qs[:, None] == ks[None, :]
