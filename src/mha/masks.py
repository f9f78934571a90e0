"""Attention masks as objects whose names say what they mean.

A bare boolean tensor means "blocked" in :class:`torch.nn.MultiheadAttention`
and "may attend" in :func:`torch.nn.functional.scaled_dot_product_attention`.
:func:`mha.attention` never takes a bare tensor; it takes these objects::

    Causal("top_left")          key j allowed for query i  iff  j <= i
    Causal("bottom_right")      key j allowed for query i  iff  j <= i + S - L
    Window(before, after)       i + off - before <= j <= i + off + after
                                (off from the alignment, plus ``shift``)
    KeyPadding(lengths)         key j of batch n allowed   iff  j < lengths[n]
    Allowed(t)                  allowed iff t (True = may attend)
    Blocked(t)                  allowed iff not t (True = masked out)
    Bias(t)                     adds t to the scores (-inf blocks)

Shapes: ``N`` batch, ``H`` heads, ``L`` queries, ``S`` keys. ``Allowed``,
``Blocked`` and ``Bias`` take tensors broadcastable to ``(N, H, L, S)``
(right-aligned, like torch broadcasting); they are read through their own
strides and never expanded. ``a & b`` allows what both allow; biases add.

Causal alignment when ``L != S`` (``x`` = allowed)::

    top_left, L=3, S=5        bottom_right, L=3, S=5
        x . . . .                 x x x . .
        x x . . .                 x x x x .
        x x x . .                 x x x x x

``materialize`` builds the dense ``(N, H, L, S)`` additive form. It exists for
the reference backend and for tests; no fast path calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.types import Device

from ._validate import as_int

__all__ = [
    "Allowed",
    "Bias",
    "Blocked",
    "Causal",
    "KeyPadding",
    "Mask",
    "Window",
    "band_allowed",
    "causal_blocked",
    "right_padding_lengths",
]

Align = Literal["top_left", "bottom_right"]
_ALIGNS = ("top_left", "bottom_right")


class Mask:
    """Base class of every mask. Combine masks with ``&``."""

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return _And.of(self, other)

    def parts(self) -> tuple[Mask, ...]:
        """The elementary masks this one intersects (itself, unless combined)."""
        return (self,)

    def materialize(
        self,
        N: int,
        H: int,
        L: int,
        S: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Dense additive form, shape ``(N, H, L, S)``: 0 where allowed, -inf where
        blocked, plus any bias, in the floating-point ``dtype``. For the reference
        backend and tests only. Raises ValueError if the mask cannot apply to
        ``(N, H, L, S)``."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"materialize builds the additive form (0 and -inf) in a floating-point dtype, got {dtype}; "
                "for a boolean mask of allowed positions take torch.isfinite(materialize(...))"
            )
        self._check_shape(N, H, L, S)
        out = torch.zeros(N, H, L, S, device=device, dtype=dtype)
        for part in self.parts():
            out = out + part._additive(N, H, L, S, device=device, dtype=dtype)
        return out

    def _additive(  # pragma: no cover - abstract
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        """This elementary mask's additive ``(N, H, L, S)`` term (broadcastable views allowed)."""
        raise NotImplementedError

    def _check_shape(self, N: int, H: int, L: int, S: int) -> None:
        """Raise ValueError if this mask cannot apply to ``(N, H, L, S)``."""

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors this mask reads (to check their device against the query's)."""
        return tuple(t for part in self.parts() if part is not self for t in part.tensors())


def band_allowed(i: Tensor, j: Tensor, lo: int | None, hi: int | None) -> Tensor:
    """The band predicate ``i + lo <= j <= i + hi`` (None: unbounded side), broadcast
    over query indices ``i`` and key indices ``j``; the single home of this test. (Not
    through ``torch.broadcast_shapes``, whose first call imports sympy: 0.4 s.)"""
    if lo is not None and hi is not None:
        return (j >= i + lo) & (j <= i + hi)
    if hi is not None:
        return j <= i + hi
    if lo is not None:
        return j >= i + lo
    return torch.ones_like(i + j, dtype=torch.bool)


def causal_blocked(L: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """The standard causal mask as torch writes it for ``nn.MultiheadAttention``: boolean
    ``(L, S)``, True (blocked) where ``j > i``, i.e. ``torch.ones(L, S).triu(1)``."""
    return torch.ones(L, S, dtype=torch.bool, device=device).triu(1)


def _blocked_to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def _validate_align(align: str) -> None:
    if not isinstance(align, str):
        raise TypeError(f"align must be the str 'top_left' or 'bottom_right', got {type(align).__name__} {align!r}")
    if align not in _ALIGNS:
        raise ValueError(f"align must be 'top_left' or 'bottom_right', got {align!r}")


# The widest window side and shift: with them, i + shift + (S - L) +- before/after stays
# inside int64 for any L and S a tensor can have (an int beyond it overflowed or wrapped).
_MAX_OFFSET = 2**60


@dataclass(frozen=True, repr=False)
class Window(Mask):
    """Local band: query ``i`` may attend key ``j`` iff
    ``i + off - before <= j <= i + off + after`` where ``off = shift`` for
    ``align="top_left"`` and ``off = S - L + shift`` for ``align="bottom_right"``.
    ``before``/``after`` of ``None`` mean unlimited on that side. ``shift`` (any
    int, default 0) moves the band right by that many keys: a block of a longer
    sequence, queries from global row ``q0`` and keys from ``k0``, keeps the
    band of the whole with ``shift = q0 - k0``."""

    before: int | None = None
    after: int | None = None
    align: Align = "top_left"
    shift: int = 0

    def __post_init__(self) -> None:
        _validate_align(self.align)
        for name in ("before", "after", "shift"):
            given = getattr(self, name)
            side = name != "shift"
            if type(given) is not int and not (side and given is None):  # a numpy or torch integer: an int
                expected = "a non-negative int (a number of keys) or None" if side else "an int (a number of keys)"
                object.__setattr__(self, name, as_int(given, f"Window {name}", expected))
        for name in ("before", "after"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 0:
                raise ValueError(
                    f"Window {name} must be a non-negative int (a number of keys) or None, got {value}; "
                    "use None for no limit on that side"
                )
            if value > _MAX_OFFSET:
                raise ValueError(
                    f"Window {name} must be at most 2**60 (band offsets are int64 indices), got {value}; "
                    "use None for no limit on that side"
                )
        if abs(self.shift) > _MAX_OFFSET:
            raise ValueError(f"Window shift must be within -2**60..2**60 (band offsets are int64 indices), got {self.shift}")

    def offset(self, L: int, S: int) -> int:
        return self.shift + (0 if self.align == "top_left" else S - L)

    def allowed(self, L: int, S: int, device: Device = None) -> Tensor:
        """Boolean ``(L, S)`` band."""
        i = torch.arange(L, device=device)[:, None] + self.offset(L, S)
        j = torch.arange(S, device=device)[None, :]
        return band_allowed(i, j, None if self.before is None else -self.before, self.after)

    def _additive(
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        return _blocked_to_additive(self.allowed(L, S, device), dtype)

    def __repr__(self) -> str:
        shift = f", shift={self.shift}" if self.shift else ""
        return f"Window(before={self.before}, after={self.after}, align={self.align!r}{shift})"


class Causal(Window):
    """Causal mask: query ``i`` sees key ``j`` iff ``j <= i`` (``top_left``) or
    ``j <= i + S - L`` (``bottom_right``, what a KV cache needs). Equal to
    ``Window(None, 0, align)``."""

    def __init__(self, align: Align = "top_left") -> None:
        super().__init__(None, 0, align)

    def __repr__(self) -> str:
        return f"Causal({self.align!r})"


class KeyPadding(Mask):
    """Right padding: key ``j`` of batch ``n`` is allowed iff ``j < lengths[n]``.

    ``lengths`` is an integer tensor of shape ``(N,)``. Build it from a torch-style
    padding mask (True = padding, shape ``(N, S)``) with :meth:`from_padding_mask`.
    """

    def __init__(self, lengths: Tensor) -> None:
        if not isinstance(lengths, Tensor):
            raise TypeError(
                f"KeyPadding lengths must be an integer Tensor of shape (N,), got {type(lengths).__name__}; "
                "build it with torch.tensor(lengths)"
            )
        _require_dense(lengths, "KeyPadding lengths")
        if lengths.dim() != 1:
            raise ValueError(f"KeyPadding lengths must have shape (N,), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"KeyPadding lengths must be an integer tensor, got dtype {lengths.dtype}")
        self.lengths = lengths

    @classmethod
    def from_padding_mask(cls, padding_mask: Tensor) -> KeyPadding:
        """From a boolean ``(N, S)`` mask, True at padded keys, padding on the right.

        Raises ValueError if some row has a real key after a padded one; use
        ``Blocked(padding_mask[:, None, None, :])`` for arbitrary key masks."""
        if not isinstance(padding_mask, Tensor):
            raise TypeError(
                f"KeyPadding.from_padding_mask takes a boolean (N, S) tensor, got {type(padding_mask).__name__}"
            )
        if padding_mask.dtype != torch.bool:
            raise TypeError(
                f"KeyPadding.from_padding_mask takes a boolean (N, S) tensor (True = padding), got dtype "
                f"{padding_mask.dtype}; convert with padding_mask.bool() if 1 means padding"
            )
        if padding_mask.dim() != 2:
            raise ValueError(
                f"KeyPadding.from_padding_mask takes a boolean (N, S) tensor, got shape {tuple(padding_mask.shape)}"
            )
        lengths = right_padding_lengths(padding_mask)
        if lengths is None:
            raise ValueError(
                "KeyPadding.from_padding_mask needs right padding (each row False, then only True); "
                "for an arbitrary key mask use Blocked(padding_mask[:, None, None, :])"
            )
        return cls(lengths)

    def _check_shape(self, N: int, H: int, L: int, S: int) -> None:
        if self.lengths.shape[0] != N:
            raise ValueError(f"KeyPadding has {self.lengths.shape[0]} lengths but the batch has N={N}")

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.lengths,)

    def allowed(self, S: int) -> Tensor:
        """Boolean ``(N, S)``: True at real keys."""
        return torch.arange(S, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def _additive(
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        return _blocked_to_additive(self.allowed(S).to(device)[:, None, None, :], dtype)

    def __repr__(self) -> str:
        lengths = self.lengths
        if lengths.device.type == "meta" or lengths.numel() > 16:
            return f"KeyPadding(lengths of shape {tuple(lengths.shape)} on {lengths.device})"
        return f"KeyPadding(lengths={lengths.tolist()})"



def _require_dense(tensor: Tensor, what: str) -> None:
    """TypeError unless ``tensor`` is dense (strided, not nested): masks are read as dense tensors."""
    if tensor.layout != torch.strided or tensor.is_nested:
        kind = "nested" if tensor.is_nested else str(tensor.layout)
        raise TypeError(
            f"{what} takes a dense tensor, got a {kind} one; masks are read as dense tensors: pass "
            f"{'a padded one (nested.to_padded_tensor(...))' if tensor.is_nested else 'tensor.to_dense()'}"
        )


def right_padding_lengths(padding_mask: Tensor) -> Tensor | None:
    """Lengths ``(N,)`` if the boolean ``(N, S)`` mask (True = padding) is right
    padding, else None. Reads the mask once: O(N*S), no (L, S) work."""
    lengths = (~padding_mask).sum(dim=-1)
    positions = torch.arange(padding_mask.shape[-1], device=padding_mask.device)
    if torch.equal(padding_mask, positions[None, :] >= lengths[:, None]):
        return lengths
    return None


class _TensorMask(Mask):
    """A mask given as a tensor broadcastable to (N, H, L, S)."""

    _kind: str = ""

    def __init__(self, tensor: Tensor) -> None:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{type(self).__name__} takes a Tensor, got {type(tensor).__name__}")
        _require_dense(tensor, type(self).__name__)
        if tensor.dim() > 4:
            raise ValueError(
                f"{type(self).__name__} takes a tensor broadcastable to (N, H, L, S), "
                f"got {tensor.dim()} dimensions {tuple(tensor.shape)}"
            )
        self._validate_dtype(tensor)
        self.tensor = tensor

    def _validate_dtype(self, tensor: Tensor) -> None:
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"{type(self).__name__} takes a boolean tensor, got dtype {tensor.dtype}; "
                "use Bias(...) for additive float masks"
            )

    @property
    def tensor4d(self) -> Tensor:
        """The tensor viewed with 4 dims (leading 1s added), no copy."""
        t = self.tensor
        return t if t.dim() == 4 else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.tensor,)

    def _check_shape(self, N: int, H: int, L: int, S: int) -> None:
        target = (N, H, L, S)
        for have, want, name in zip(self.tensor4d.shape, target, "NHLS", strict=True):
            if have not in (1, want):
                raise ValueError(
                    f"{type(self).__name__} tensor of shape {tuple(self.tensor.shape)} does not broadcast "
                    f"to (N, H, L, S) = {target}: dimension {name} is {have}, expected 1 or {want}"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.tensor.shape)}, dtype={self.tensor.dtype})"


class Allowed(_TensorMask):
    """Boolean tensor, True where the query may attend the key (SDPA's convention)."""

    def _additive(
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        return _blocked_to_additive(self.tensor4d.to(device), dtype).expand(N, H, L, S)


class Blocked(_TensorMask):
    """Boolean tensor, True where the key is masked out (nn.MultiheadAttention's convention)."""

    def _additive(
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        return _blocked_to_additive(~self.tensor4d.to(device), dtype).expand(N, H, L, S)


class Bias(_TensorMask):
    """Float tensor added to the scaled scores; ``-inf`` blocks. Its values are not read:
    a ``+inf`` or NaN entry makes its row's output NaN (keep biases finite)."""

    def _validate_dtype(self, tensor: Tensor) -> None:
        if not tensor.is_floating_point():
            raise TypeError(
                f"Bias takes a floating-point tensor, got dtype {tensor.dtype}; "
                "use Allowed(...) or Blocked(...) for boolean masks"
            )

    def _additive(
        self, N: int, H: int, L: int, S: int, *, device: Device, dtype: torch.dtype
    ) -> Tensor:
        return self.tensor4d.to(device=device, dtype=dtype).expand(N, H, L, S)


class _And(Mask):
    """Intersection of masks (biases add)."""

    def __init__(self, parts: tuple[Mask, ...]) -> None:
        self._parts = parts

    @classmethod
    def of(cls, *masks: Mask) -> Mask:
        flat: list[Mask] = []
        for m in masks:
            flat.extend(m.parts())
        return flat[0] if len(flat) == 1 else cls(tuple(flat))

    def parts(self) -> tuple[Mask, ...]:
        return self._parts

    def _check_shape(self, N: int, H: int, L: int, S: int) -> None:
        for p in self._parts:
            p._check_shape(N, H, L, S)

    def __repr__(self) -> str:
        return " & ".join(repr(p) for p in self._parts)
