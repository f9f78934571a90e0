"""A mask reduced to the few primitive pieces that backends know how to read.

Every backend sees the same :class:`MaskPlan`: at most one band (causal or
window, with explicit integer offsets), at most one vector of key lengths, and
lists of boolean and additive tensors, each kept at its own broadcast shape.
Offsets are explicit so that slicing keys off the right end (what padding
removal does) does not move a bottom-right alignment.

:class:`Band` and :class:`MaskPlan` are NamedTuples: immutable, and built on every
call at a fraction of a frozen dataclass's cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import masks as m

_NEG_INF = float("-inf")


class Band(NamedTuple):
    """Query ``i`` may attend key ``j`` iff ``i + lo <= j <= i + hi``; ``None`` is unbounded."""

    lo: int | None
    hi: int | None

    def intersect(self, other: Band) -> Band:
        lo = self.lo if other.lo is None else other.lo if self.lo is None else max(self.lo, other.lo)
        hi = self.hi if other.hi is None else other.hi if self.hi is None else min(self.hi, other.hi)
        return Band(lo, hi)

    @property
    def is_top_left_causal(self) -> bool:
        return self.lo is None and self.hi == 0

    def allowed(self, rows: Tensor, S: int) -> Tensor:
        """Boolean ``(len(rows), S)`` for the given query row indices."""
        return m.band_allowed(rows[:, None], torch.arange(S, device=rows.device)[None, :], self.lo, self.hi)

    def rows_with_keys(self, L: int, S: int) -> tuple[int, int]:
        """Half-open range of query rows that have at least one key in ``[0, S)``."""
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            return 0, 0
        first = 0 if self.hi is None else max(0, -self.hi)
        last = L if self.lo is None else min(L, S - self.lo)
        return first, max(first, last)


class MaskPlan(NamedTuple):
    """The intersection of everything a mask allows, in primitive form.

    ``allowed`` tensors are boolean (True = may attend) and ``bias`` tensors are
    additive, each 4-D and broadcastable to ``(N, H, L, S)``.

    ``align`` is set for a variable-length plan only (:func:`plan_varlen_mask`):
    its band is that of a square sequence (``L_n == S_n``), and ``align`` says how
    it moves per sequence: ``"top_left"`` not at all, ``"bottom_right"`` by
    ``S_n - L_n``, ``"mixed"`` when the mask intersects bands of both alignments.
    """

    band: Band | None = None
    lengths: Tensor | None = None
    allowed: tuple[Tensor, ...] = ()
    bias: tuple[Tensor, ...] = ()
    align: str | None = None

    @property
    def is_empty(self) -> bool:
        # len() rather than truthiness: dynamo traces len() of a tuple, not `not tuple`.
        return self.band is None and self.lengths is None and len(self.allowed) == 0 and len(self.bias) == 0

    @property
    def has_tensors(self) -> bool:
        return len(self.allowed) + len(self.bias) > 0

    def without_lengths(self) -> MaskPlan:
        return self._replace(lengths=None)

    def batch_slice(self, n0: int, n1: int) -> MaskPlan:
        """The plan for batch rows ``[n0, n1)``."""

        def part(t: Tensor) -> Tensor:
            return t[n0:n1] if t.shape[0] > 1 else t

        return MaskPlan(
            band=self.band,
            lengths=None if self.lengths is None else self.lengths[n0:n1],
            allowed=tuple(part(t) for t in self.allowed),
            bias=tuple(part(t) for t in self.bias),
        )

    def select_batch(self, n: int, S: int) -> MaskPlan:
        """The plan for batch row ``n`` alone, keys cut to ``[0, S)``."""

        def one(t: Tensor) -> Tensor:
            t = t[n : n + 1] if t.shape[0] > 1 else t
            return t[..., :S] if t.shape[-1] > 1 else t

        return MaskPlan(
            band=self.band,
            lengths=None,
            allowed=tuple(one(t) for t in self.allowed),
            bias=tuple(one(t) for t in self.bias),
        )

    def allowed_rows(self, start: int, stop: int, S: int, device: torch.device) -> Tensor | None:
        """Boolean mask (True = may attend) for query rows ``[start, stop)``, broadcastable
        to ``(N, H, stop - start, S)`` at the smallest shape the pieces need; None if
        nothing is blocked by a band, lengths or boolean tensor."""
        allowed: Tensor | None = None
        if self.band is not None:
            allowed = self.band.allowed(torch.arange(start, stop, device=device), S)[None, None]
        if self.lengths is not None:
            keys = torch.arange(S, device=device)[None, :] < self.lengths.to(device)[:, None]
            keys = keys[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        for t in self.allowed:
            t = _rows(t, start, stop).to(device)
            allowed = t if allowed is None else allowed & t
        return allowed

    def bias_rows(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Sum of the additive tensors for query rows ``[start, stop)``; None if there are none."""
        bias: Tensor | None = None
        for t in self.bias:
            t = _rows(t, start, stop).to(device=device, dtype=dtype)
            bias = t if bias is None else bias + t
        return bias

    def additive_rows(
        self, start: int, stop: int, S: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """Everything as one additive mask (0 / -inf plus biases) for rows ``[start, stop)``."""
        allowed = self.allowed_rows(start, stop, S, device)
        bias = self.bias_rows(start, stop, dtype, device)
        if allowed is None:
            return bias
        zero = torch.zeros((), dtype=dtype, device=device)
        add = torch.where(allowed, zero, torch.full((), _NEG_INF, dtype=dtype, device=device))
        return add if bias is None else add + bias


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    """Query rows ``[start, stop)`` of a 4-D mask tensor whose L dimension may be broadcast."""
    return t if t.shape[2] == 1 else t[:, :, start:stop]


def plan_varlen_mask(mask: m.Mask | None) -> MaskPlan:
    """The plan of a band mask (``Causal``/``Window``) aligned per sequence of a
    variable-length batch: the band of a square sequence, with its ``align``."""
    if mask is None:
        return MaskPlan()
    parts = mask.parts()
    validate_band_only(parts)
    band: Band | None = None
    aligns = set()
    for part in parts:
        if not isinstance(part, m.Window):
            continue  # validate_band_only let nothing else through
        aligns.add(part.align)
        b = _window_band(part, 0, 0)
        band = b if band is None else band.intersect(b)
    return MaskPlan(band, align=aligns.pop() if len(aligns) == 1 else "mixed")


def validate_band_only(parts: tuple[m.Mask, ...]) -> None:
    """Variable-length calls take only band masks (``Causal``/``Window``), aligned per sequence."""
    for part in parts:
        if not isinstance(part, m.Window):
            raise ValueError(
                f"variable-length (jagged) inputs take only Causal or Window masks, got {part!r}; "
                "jagged sequences carry their own lengths, so no padding mask is needed"
            )


def _window_band(part: m.Window, L: int, S: int) -> Band:
    off = part.offset(L, S)
    return Band(None if part.before is None else off - part.before, None if part.after is None else off + part.after)


_NO_MASK = MaskPlan()
# The plans of lone top-left bands (Causal() above all), by (before, after, shift): they do
# not depend on L and S, so they are built once instead of on every call.
_TOP_LEFT_BAND_PLANS: dict[tuple[int | None, int | None, int], MaskPlan] = {}


def plan_mask(mask: m.Mask | None, L: int, S: int, dtype: torch.dtype) -> MaskPlan:
    """Reduce a mask object to a :class:`MaskPlan` for a call with ``L`` queries and ``S`` keys
    on heads of ``dtype``. Bias tensors are cast to ``dtype`` here, once for every backend:
    ``sdpa`` adds them in it, the others in float32, so a wider Bias (-1e9 in float32 on
    float16 heads: -inf once cast) would otherwise give rows that depend on the backend."""
    if mask is None:
        return _NO_MASK
    # Not while compiling: dynamo would guard on the memo's contents, and a call that fills
    # it (compiled or eager) would force a recompile.
    if (
        (type(mask) is m.Causal or type(mask) is m.Window)
        and mask.align == "top_left"
        and not torch.compiler.is_compiling()
    ):
        key = (mask.before, mask.after, mask.shift)
        plan = _TOP_LEFT_BAND_PLANS.get(key)
        if plan is None:
            plan = _TOP_LEFT_BAND_PLANS[key] = MaskPlan(_window_band(mask, L, S))
        return plan
    band: Band | None = None
    lengths: Tensor | None = None
    allowed: tuple[Tensor, ...] = ()
    bias: tuple[Tensor, ...] = ()
    for part in mask.parts():
        if isinstance(part, m.Window):
            b = _window_band(part, L, S)
            band = b if band is None else band.intersect(b)
        elif isinstance(part, m.KeyPadding):
            lengths = part.lengths if lengths is None else torch.minimum(lengths, part.lengths)
        elif isinstance(part, m.Allowed):
            allowed += (part.tensor4d,)
        elif isinstance(part, m.Blocked):
            allowed += (~part.tensor4d,)
        elif isinstance(part, m.Bias):
            t = part.tensor4d
            bias += (t if t.dtype == dtype else t.to(dtype),)
        else:
            raise TypeError(f"unknown mask type {type(part).__name__}")
    return MaskPlan(band, lengths, allowed, bias)
