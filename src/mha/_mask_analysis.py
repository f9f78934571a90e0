"""What a torch-style ``attn_mask`` or ``key_padding_mask`` is, read from its values.

Recognising the standard causal mask (so that it runs as ``Causal`` and skips
the blocked half), the inverted ``tril`` mask, right padding (so that the
padded keys need not be projected), and rows or sequences with no key all need
the mask's values: on a GPU, a read that waits for the queue to drain.

Each mask is read when a call is planned, once per call, and never remembered
across calls: a mask's memory can change without torch's version counter
moving (a ``torch.from_numpy`` buffer refilled per batch, ``mask.data[...] =
...``, ``mask.data = ...``, a storage alias), so a summary kept from an earlier
call could be stale. Host reads per call: for a ``key_padding_mask``, 1 (whether some sequence has no key:
its first column, or the whole mask when it is small), or,
where dropping right padding could pay, 2 (whether it is right padding, its
lengths; 3 for a float mask: whether its values are exactly 0 and ``-inf``); 1 for the standard causal
``attn_mask``, 1 more for the inverted one, 1 to 2 more for the rows any other
leaves without a key.

Values are read only from plain tensors on a real device, outside
``torch.compile``, ``make_fx`` tracing and ``torch.func`` transforms (:func:`values_readable`): never
from ``meta`` tensors, fake tensors or other tensor subclasses. A mask that requires grad is never
summarised as a causal mask or as padding lengths, so its gradient is kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._types import in_functorch_transform
from .masks import causal_blocked, right_padding_lengths

_PLAIN = (Tensor, nn.Parameter)


_PROXY_MODE = torch._C._TorchDispatchModeKey.PROXY


def _make_fx_tracing() -> bool:
    """Whether ``make_fx`` is tracing: its mode on the dispatch stack, or, with
    ``pre_dispatch=True``, on the pre-dispatch stack, which such tracing always pairs with a
    torch function mode (the cheap test first: this runs on every call)."""
    if torch._C._len_torch_dispatch_stack() and torch._C._get_dispatch_mode(_PROXY_MODE) is not None:
        return True
    return torch._C._is_torch_function_mode_enabled() and (
        torch._ops._get_dispatch_mode_pre_dispatch(_PROXY_MODE) is not None
    )


def values_readable(*tensors: Tensor | None) -> bool:
    """Whether the values of every given tensor can be read on the host: eager mode, plain
    tensors (no fake or other subclass) on a device other than ``meta``, outside
    ``torch.func`` transforms (a mask batched by ``vmap`` has no storage to read) and
    outside ``make_fx`` tracing (its "real" mode traces plain tensors, refuses some reads
    and bakes the others into the graph, which would then serve other masks wrongly)."""
    if torch.compiler.is_compiling() or _make_fx_tracing():
        return False
    for t in tensors:  # a loop, not all(<generator>): this runs on every call
        if t is not None and (type(t) not in _PLAIN or t.is_meta or in_functorch_transform()):
            return False
    return True


@dataclass(frozen=True)
class AttnMaskSummary:
    """standard_causal: equal to ``triu(ones(L, S), 1)`` (bool) or to ``-inf`` above the
    diagonal and 0 elsewhere (float, as ``nn.Transformer.generate_square_subsequent_mask``),
    and not requiring grad. inverted_causal: a square bool ``tril(ones(L, L))``.
    empty_rows: query rows whose every key is blocked, in any batch element or head.
    zeros_and_ones: a float mask of 0s and 1s, both present: likely a boolean mask cast
    to float, which adds 1 where it meant to block."""

    standard_causal: bool
    inverted_causal: bool
    empty_rows: tuple[int, ...]
    zeros_and_ones: bool = False


@dataclass(frozen=True)
class KeyPaddingSummary:
    """empty_batches: batch elements whose every key is blocked. For a mask that is
    right padding (each row open keys, then only padding; True in a boolean mask, or a
    float mask of exactly 0 then ``-inf``) and does not require grad: ``lengths``, the
    number of open keys ``(N,)`` on the mask's device, and ``lengths_list``, the same on
    the host; both None otherwise. zeros_and_ones: as in :class:`AttnMaskSummary`."""

    empty_batches: tuple[int, ...]
    lengths: Tensor | None
    lengths_list: tuple[int, ...] | None
    zeros_and_ones: bool = False


# The commonest summaries, built once.
_STANDARD_CAUSAL = AttnMaskSummary(True, False, ())
_EVERY_BATCH_OPEN = KeyPaddingSummary((), None, None)


def masked_out(mask: Tensor) -> Tensor:
    """A torch-style mask as booleans, True = masked out (``-inf`` in a float mask)."""
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def _read_with_zeros_and_ones(flags: Tensor, mask: Tensor, name: str) -> tuple[list[bool], bool]:
    """``flags`` (1-D boolean) on the host, and for a float ``mask`` whether it holds only
    0s and 1s, both present. The mask's smallest and largest values ride in the same read
    as the flags (a 0 / -inf mask is cleared by its -inf); only a mask spanning exactly
    [0, 1] is read a second time, to tell 0s and 1s from values between them. ValueError
    for a float mask holding +inf or NaN (``name``: the argument): its rows' scores would
    be +inf or NaN, and their softmax NaN."""
    if mask.dtype == torch.bool or mask.numel() == 0:  # aminmax refuses an empty tensor
        return flags.tolist(), False
    *values, low, high = torch.cat([flags.to(mask.dtype), torch.stack(torch.aminmax(mask))]).tolist()
    if high == _INF or high != high:
        raise _not_finite_error(name, mask, "+inf" if high == _INF else "NaN")
    zeros_and_ones = low == 0 and high == 1 and bool(((mask == 0) | (mask == 1)).all())
    return [bool(v) for v in values], zeros_and_ones


_INF = float("inf")


def _not_finite_error(name: str, mask: Tensor, what: str) -> ValueError:
    return ValueError(
        f"{name} {tuple(mask.shape)} holds {what} in the heads' dtype {mask.dtype}; a float mask is added "
        "to the scores, and a row with a +inf or NaN score has NaN attention. Mask out with -inf "
        f"(or pass a bool {name}, True = masked out) and keep added biases finite"
    )


# A key_padding_mask of at most this many elements is read whole, in one host read, and
# summarised in Python. Its first column alone costs more torch calls (a select, and for a
# float mask isneginf, aminmax, stack and cat), and right after a call's projections, with
# the caches cold, each torch call costs 10-20 us on a CPU; reading 1024 values and
# summing them in Python costs less than two.
_READ_WHOLE_ELEMENTS = 1024


def _summary_of_values(mask: Tensor) -> KeyPaddingSummary:
    """The summary without lengths of a non-empty ``(N, S)`` ``key_padding_mask`` of at most
    :data:`_READ_WHOLE_ELEMENTS` values, read whole. The same as the column read's, and
    the same ValueError for a float mask holding +inf or NaN."""
    rows = mask.tolist()
    if mask.dtype == torch.bool:
        empty = tuple(n for n, row in enumerate(rows) if all(row))
        return KeyPaddingSummary(empty, None, None) if empty else _EVERY_BATCH_OPEN
    # The sum is -inf or finite unless the mask holds a NaN or +inf (or large values overflow).
    total = sum(map(sum, rows))
    if total != total or total == _INF:
        if any(v != v for row in rows for v in row):
            raise _not_finite_error("key_padding_mask", mask, "NaN")
        if max(map(max, rows)) == _INF:
            raise _not_finite_error("key_padding_mask", mask, "+inf")
    if min(map(min, rows)) == 0 and max(map(max, rows)) == 1 and all(v in (0, 1) for row in rows for v in row):
        return KeyPaddingSummary((), None, None, True)  # no -inf: no sequence is empty
    empty = tuple(n for n, row in enumerate(rows) if max(row) == -_INF)
    return KeyPaddingSummary(empty, None, None) if empty else _EVERY_BATCH_OPEN


def summarize_key_padding_mask(mask: Tensor, lengths_wanted: bool = True) -> KeyPaddingSummary:
    """Summary of a bool (True = padding) or float (additive) ``(N, S)`` ``key_padding_mask``.
    ``lengths_wanted=False`` skips the right-padding test: then a mask whose first key is
    open in every sequence (right padding, the usual case) is cleared by reading that
    column alone, N values (a sequence with every key padded has its first key padded)."""
    if not lengths_wanted or mask.requires_grad:
        if 0 < mask.numel() <= _READ_WHOLE_ELEMENTS:
            return _summary_of_values(mask)
        if mask.shape[-1] > 0:
            first, zeros_and_ones = _read_with_zeros_and_ones(masked_out(mask[:, 0]), mask, "key_padding_mask")
            if zeros_and_ones:  # no -inf: no sequence is empty
                return KeyPaddingSummary((), None, None, True)
            if True not in first:
                return _EVERY_BATCH_OPEN
        return _empty_batches(masked_out(mask), mask)
    is_blocked = masked_out(mask)
    lengths = right_padding_lengths(is_blocked)
    if (
        lengths is not None
        and mask.dtype != torch.bool
        and not torch.equal(mask, torch.zeros_like(mask).masked_fill(is_blocked, float("-inf")))
    ):
        lengths = None
    if lengths is None:
        return _empty_batches(is_blocked, mask)
    host = tuple(lengths.tolist())
    return KeyPaddingSummary(tuple(n for n, count in enumerate(host) if count == 0), lengths, host)


def _empty_batches(is_blocked: Tensor, mask: Tensor) -> KeyPaddingSummary:
    """The summary without lengths of ``mask`` ``(N, S)``, ``is_blocked`` its booleans (True =
    padding), read once: N booleans through ``tolist``, not ``any()`` and a second read
    through ``bool()``."""
    empty, zeros_and_ones = _read_with_zeros_and_ones(is_blocked.all(dim=-1), mask, "key_padding_mask")
    if True not in empty and not zeros_and_ones:
        return _EVERY_BATCH_OPEN
    return KeyPaddingSummary(tuple(n for n, e in enumerate(empty) if e), None, None, zeros_and_ones)


def _standard_causal(L: int, S: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The standard causal ``attn_mask`` to compare with: boolean, True above the diagonal,
    or float, ``-inf`` there and 0 elsewhere. Small ones (decoding builds one mask per
    length) are built once; never handed out."""
    if L * S <= _CACHED_REFERENCE_ELEMENTS:
        return _cached_standard_causal(L, S, dtype, device)
    return _build_standard_causal(L, S, dtype, device)


_CACHED_REFERENCE_ELEMENTS = 1 << 14  # with 64 sizes at most 4 MiB in fp32


def _build_standard_causal(L: int, S: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        above = causal_blocked(L, S, device)
        return above if dtype == torch.bool else torch.zeros(L, S, dtype=dtype, device=device).masked_fill(above, float("-inf"))


_cached_standard_causal = functools.lru_cache(maxsize=64)(_build_standard_causal)


def blocks_or_passes(mask: Tensor | None) -> bool:
    """Whether ``mask`` (a torch-style mask, or None) only blocks or passes keys: None,
    boolean, or float holding only 0 and ``-inf`` (one host read), as opposed to a float
    mask that adds other values to the scores."""
    if mask is None or mask.dtype == torch.bool:
        return True
    return bool(((mask == 0) | torch.isneginf(mask)).all())


def is_standard_causal(mask: Tensor) -> bool:
    """Whether ``mask`` is the standard causal ``attn_mask`` ``(L, S)``: boolean, True above
    the diagonal (``triu(ones(L, S), 1)``), or float, ``-inf`` there and 0 elsewhere
    (``nn.Transformer.generate_square_subsequent_mask``). One host read."""
    if mask.dim() != 2:
        return False
    L, S = mask.shape
    return torch.equal(mask, _standard_causal(L, S, mask.dtype, mask.device))


def summarize_attn_mask(mask: Tensor) -> AttnMaskSummary:
    """Summary of a bool (True = blocked) or float (additive) ``attn_mask`` of any rank.
    One host read for the standard causal mask, one more for an inverted one, one more
    for the rows of any other mask."""
    if mask.numel() == 0:
        return AttnMaskSummary(False, False, ())
    if mask.dim() == 2 and not mask.requires_grad:
        L, S = mask.shape
        standard = _standard_causal(L, S, mask.dtype, mask.device)
        if torch.equal(mask, standard):
            return _STANDARD_CAUSAL
        if mask.dtype == torch.bool and L == S and L > 1 and torch.equal(mask, ~standard):
            return AttnMaskSummary(False, True, (L - 1,))
    empty = masked_out(mask).all(dim=-1)
    rows, zeros_and_ones = _read_with_zeros_and_ones(
        empty.reshape(-1, empty.shape[-1]).any(dim=0), mask, "attn_mask"
    )
    return AttnMaskSummary(False, False, tuple(i for i, e in enumerate(rows) if e), zeros_and_ones)
