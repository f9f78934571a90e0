"""Decoding with a key/value cache: :class:`KVCache` and the cached call of :func:`mha.attention`.

A cache holds, for each sequence ``n`` of a batch, the keys and values of its
first ``lengths[n]`` positions in preallocated buffers ``(N, Hkv, max_length, D)``.
A cached call writes the ``T`` new tokens of each sequence after its cached ones,
in place, and attends::

    query t of sequence n sits at position p = lengths[n] + t
    it may attend cache position j  iff  j <= p  and  j < lengths[n] + new_lengths[n]

Cache positions, L = T = 2 new tokens, sequence 0 had 3 cached, sequence 1 had 1
(``x`` = allowed, ``.`` = blocked, ``-`` = not written)::

    n=0:  x x x x . -      (query at 3)      n=1:  x x . - - -   (query at 1)
          x x x x x -      (query at 4)            x x x - - -   (query at 2)

Shapes never depend on the lengths, so a compiled step does not recompile as the
cache fills; in eager mode the keys beyond every sequence's length are sliced off
(with a host-side bound, no device sync) so a step costs what is cached, not
``max_length``. While every sequence is known (on the host) to hold as many
positions as the others, as in batched greedy decoding, a step writes its new
tokens as one slice of positions and masks no padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import torch
from torch import Tensor

from . import masks as _masks
from ._backends.decode import MAX_ROWS
from ._dispatch import forced_backend
from ._mask_analysis import values_readable
from ._validate import as_int


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    value = as_int(value, f"KVCache: {name}")
    if value < minimum:
        raise ValueError(f"KVCache: {name} must be >= {minimum}, got {value}")
    return value


class KVCache:
    """Preallocated keys and values of a batch of sequences being decoded.

    Args:
        batch_size: ``N``.
        max_length: ``M``, the most positions a sequence may hold.
        num_heads: ``Hkv``, key/value heads.
        head_dim: ``Dk``.
        value_head_dim: ``Dv`` (default ``Dk``).
        static: a cross-attention cache: each write replaces the contents (the
            projected encoder memory) instead of appending, and attention over it
            is not causal.
        dtype, device: of the buffers.

    Attributes:
        key: ``(N, Hkv, M, Dk)`` buffer; positions ``>= lengths[n]`` hold no data.
        value: ``(N, Hkv, M, Dv)`` buffer.
        lengths: ``(N,)`` int64 on the buffers' device, positions written per sequence.
        key_padding_mask: static caches only: None, or ``(N, M)`` bool, True at
            positions no query may attend (the memory's padding, as in
            ``nn.MultiheadAttention``).

    Under ``torch.compile``, and on the ``meta`` device (whose tensors hold no values),
    the overflow check, which reads the lengths, is skipped; tokens that would go past
    ``max_length`` are then dropped. Where the lengths are unknown on the host there (a
    meta cache whose lengths were written by hand), a step reads all ``max_length``
    positions.
    """

    def __init__(
        self,
        batch_size: int,
        max_length: int,
        num_heads: int,
        head_dim: int,
        value_head_dim: int | None = None,
        *,
        static: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        N = _positive_int("batch_size", batch_size)
        M = _positive_int("max_length", max_length)
        H = _positive_int("num_heads", num_heads)
        Dk = _positive_int("head_dim", head_dim)
        Dv = Dk if value_head_dim is None else _positive_int("value_head_dim", value_head_dim)
        self.key = torch.zeros(N, H, M, Dk, dtype=dtype, device=device)
        self.value = torch.zeros(N, H, M, Dv, dtype=dtype, device=device)
        if not self.key.is_floating_point():
            raise TypeError(f"KVCache: dtype must be a floating-point dtype, got {self.key.dtype}")
        self.lengths = _version_tracked(torch.zeros(N, dtype=torch.int64, device=self.key.device))
        self.static = bool(static)
        self.key_padding_mask: Tensor | None = None
        # An upper bound on lengths.max() known on the host, so that eager steps read only
        # the written part without a sync, and whether every length equals it (then a step
        # masks no padding); valid while lengths is the tensor, at the version, that they
        # were computed for (a compiled step or a user's write voids them).
        self._bound: int | None = 0
        self._uniform = True
        self._bound_for = self._lengths_state()

    @property
    def max_length(self) -> int:
        return self.key.shape[2]

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    def __repr__(self) -> str:
        N, H, M, Dk = self.key.shape
        kind = ", static=True" if self.static else ""
        return (
            f"KVCache(batch_size={N}, max_length={M}, num_heads={H}, head_dim={Dk}, "
            f"value_head_dim={self.value.shape[-1]}{kind}, dtype={self.key.dtype}, device={self.key.device})"
        )

    def _lengths_state(self) -> tuple[int, int] | None:
        # None for lengths set by hand to an inference tensor, which has no version counter:
        # a write of them in place could not be told, so no bound is trusted for them.
        lengths = self.lengths
        return None if lengths.is_inference() else (id(lengths), lengths._version)

    def _host_state(self) -> tuple[int, bool]:
        """``(bound, uniform)``: an upper bound on ``lengths.max()`` and whether every length
        equals it; from the host when still valid, else read from ``lengths`` (one sync),
        or ``(max_length, False)`` where its values cannot be read (meta, fake tensors)."""
        state = self._lengths_state()
        if self._bound is None or state is None or self._bound_for != state:
            if not values_readable(self.lengths):
                self._set_bound(self.max_length)
            else:
                low, high = (int(x) for x in torch.aminmax(self.lengths))
                self._set_bound(high, uniform=low == high)
        return cast(int, self._bound), self._uniform

    def _set_bound(self, bound: int | None, uniform: bool = False) -> None:
        self._bound = bound
        self._uniform = uniform and bound is not None
        if bound is not None:
            self._bound_for = self._lengths_state()

    def reset(self) -> None:
        """Empty every sequence (the buffers are kept)."""
        self.lengths.zero_()
        self.key_padding_mask = None
        self._set_bound(0, uniform=True)

    def reorder(self, index: Tensor) -> None:
        """Make the batch the rows ``index`` ``(N',)`` of the current one (beam search).

        Rows may repeat; ``N' >= 1``. With ``N' == N`` the buffers are updated in place."""
        if not isinstance(index, Tensor):
            raise TypeError(f"KVCache.reorder: index must be an integer Tensor (N',), got {type(index).__name__}")
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(
                f"KVCache.reorder: index must be a 1-D integer tensor of batch rows, got shape "
                f"{tuple(index.shape)} dtype {index.dtype}"
            )
        N = self.batch_size
        if index.numel() == 0:
            raise ValueError(
                f"KVCache.reorder: index is empty: it would leave no sequence (batch_size=0), which no call "
                f"can use and no reorder can fill again; the cache keeps its {N} sequences. When every "
                "sequence is done, stop decoding (or reset() the cache, or make a new one, for the next "
                "batch); to keep some of them, pass their rows"
            )
        if values_readable(index):
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= N:
                raise ValueError(
                    f"KVCache.reorder: index values must be batch rows in [0, {N}), got values in [{low}, {high}]"
                )
        if index.shape[0] == N:  # the buffers are written in place
            _refuse_inference_write(self, "KVCache.reorder")
        index = index.to(self.key.device, torch.int64)  # index_select takes int32 or int64 only
        # Rows of the old lengths: the bound still bounds them, and equal ones stay equal.
        state = self._lengths_state()
        known = state is not None and self._bound_for == state
        bound, uniform = self._bound, self._uniform
        tensors = ["key", "value", "lengths"] + ([] if self.key_padding_mask is None else ["key_padding_mask"])
        for name in tensors:
            old = getattr(self, name)
            new = old.index_select(0, index)
            if new.shape == old.shape:
                old.copy_(new)
            else:
                setattr(self, name, _version_tracked(new) if name == "lengths" else new)
        if known:
            self._set_bound(bound, uniform)


def _version_tracked(lengths: Tensor) -> Tensor:
    """``lengths``, copied out of inference mode if made in it: the cache tells a write of
    its lengths by hand from its own by their version counter, which inference tensors
    (made under ``torch.inference_mode``, where decoding runs) lack. Writing a normal
    tensor in place inside inference mode is allowed and counts."""
    if not lengths.is_inference():
        return lengths
    with torch.inference_mode(False):
        return lengths.clone()


def _refuse_inference_write(cache: KVCache, who: str) -> None:
    """ValueError if ``cache``'s buffers are inference tensors and inference mode is off,
    where torch refuses to write them."""
    # Dynamo cannot trace is_inference(); a compiled step is left to torch's own error.
    if not torch.compiler.is_compiling() and cache.key.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{who}: this cache was made under torch.inference_mode, so its buffers are inference "
            "tensors, which torch does not let code outside inference mode write; run the decoding "
            "steps under torch.inference_mode() too, or make the cache (new_cache / KVCache) outside it "
            "(torch.no_grad() is enough to decode without gradients)"
        )


def _validate_new(cache: KVCache, key: Tensor, value: Tensor, N: int, Hq: int) -> None:
    _refuse_inference_write(cache, "attention")
    for name, t, buf, dim in (("key", key, cache.key, "Dk"), ("value", value, cache.value, "Dv")):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        want = (N, buf.shape[1], buf.shape[3])
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
            raise ValueError(
                f"attention: with a cache, {name} (N, Hkv, T, {dim}) must be the new tokens with "
                f"(N, Hkv, {dim}) = {want} of the cache {tuple(buf.shape)} and of query N={N}, "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != buf.dtype or t.device != buf.device:
            raise TypeError(
                f"attention: {name} has dtype {t.dtype} on {t.device}, the cache {buf.dtype} on "
                f"{buf.device}; make the cache with dtype= and device= of the inputs"
            )
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"attention: key {tuple(key.shape)} and value {tuple(value.shape)} must hold the same T new tokens"
        )
    if cache.key.shape[1] == 0 or Hq % cache.key.shape[1] != 0:
        raise ValueError(
            f"attention: query heads Hq={Hq} must be a multiple of the cache's key/value heads "
            f"Hkv={cache.key.shape[1]} (GQA/MQA)"
        )


def _validate_new_lengths(new_lengths: Tensor | None, N: int, T: int) -> None:
    if new_lengths is None:
        return
    if not isinstance(new_lengths, Tensor):
        raise TypeError(f"attention: new_lengths must be an integer Tensor (N,), got {type(new_lengths).__name__}")
    if new_lengths.is_floating_point() or new_lengths.dtype == torch.bool or new_lengths.is_complex():
        raise TypeError(f"attention: new_lengths must be an integer tensor, got dtype {new_lengths.dtype}")
    if new_lengths.shape != (N,):
        raise ValueError(f"attention: new_lengths must have shape (N,) = ({N},), got {tuple(new_lengths.shape)}")
    if values_readable(new_lengths):
        low, high = int(new_lengths.min()), int(new_lengths.max())
        if low < 0 or high > T:
            raise ValueError(
                f"attention: new_lengths must count real tokens among the T={T} new ones, in [0, {T}], "
                f"got values in [{low}, {high}]"
            )


def _check_room(cache: KVCache, counts: Tensor, T: int, bound: int) -> int:
    """The host-side bound on the lengths after this write, given ``bound`` before it.
    Raises ValueError if some sequence would go past ``max_length`` (not checked where
    the lengths hold no values to read: meta, fake tensors)."""
    M = cache.max_length
    if bound + T <= M:
        return bound + T
    if not values_readable(cache.lengths, counts):
        return M
    after = cache.lengths + counts
    if bool((after > M).any()):
        raise ValueError(
            f"KVCache: writing {counts.tolist()} new tokens after lengths {cache.lengths.tolist()} goes past "
            f"max_length={M}; make the cache with a larger max_length, or reset() it / start a new one"
        )
    return M


def _write(buffer: Tensor, new: Tensor, lengths: Tensor, counts: Tensor) -> None:
    """Store ``new[n, :, t]`` at position ``lengths[n] + t`` for ``t < counts[n]``, in place.

    Each sequence's ``T`` slots form one window ``[start, start + T)`` with ``start =
    min(lengths[n], M - T)``: slots before ``lengths[n]`` keep their value, slots
    after the real tokens keep theirs, and nothing is written past ``M``. The indices
    of a window are distinct, so the scatter is deterministic."""
    N, H, T, D = new.shape
    M = buffer.shape[2]
    start = torch.clamp(lengths, max=M - T)
    slots = start[:, None] + torch.arange(T, device=buffer.device)
    t = slots - lengths[:, None]
    keep_new = ((t >= 0) & (t < counts[:, None]))[:, None, :, None]
    index = slots[:, None, :, None].expand(N, H, T, D)
    taken = new.gather(2, t.clamp(0, T - 1)[:, None, :, None].expand(N, H, T, D))
    buffer.scatter_(2, index, torch.where(keep_new, taken, buffer.gather(2, index)))


def _append(buffer: Tensor, new: Tensor, slots: Tensor) -> None:
    """Store ``new[n, :, t]`` ``(N, H, T, D)`` at position ``slots[n, 0, t, 0]`` of
    ``buffer`` ``(N, H, M, D)``, in place; the slots must be distinct and ``< M``."""
    buffer.scatter_(2, slots.expand(new.shape), new)


def _cache_masks(
    mask: _masks.Mask | None, lengths: tuple[Tensor, Tensor] | None, T: int, S: int, causal: bool
) -> _masks.Mask | None:
    """The mask of a cached call over cache positions ``[0, S)``: the padding, per-sequence
    causality and the user's ``mask``, whose ``Window`` parts count from each query's
    position and whose tensors span ``(N, Hq, T, max_length)``.

    ``lengths``: ``(before, total)`` ``(N,)``, each sequence's positions before and after
    this call's write: ``KeyPadding(total)``, query ``t`` at ``before[n] + t``; a window
    with ``shift`` spans ``[p + shift - before, p + shift + after]`` around that position
    ``p``, as over the whole sequence (either alignment: queries and keys are then one
    square sequence). None when
    every sequence holds all ``S`` positions: no padding is left to mask, and query ``t``
    of every sequence sits at ``S - T + t``, so causality and windows are bottom-right
    bands, not tensors; a one-token step then has no mask at all."""
    out: _masks.Mask | None = None if lengths is None else _masks.KeyPadding(lengths[1])
    window: int | None = None  # the narrowest ``before`` of the unshifted windows
    shifted: list[_masks.Window] = []  # windows moved by ``shift``: their ``after`` counts too
    for part in () if mask is None else mask.parts():
        if isinstance(part, _masks.Window):
            if part.shift:
                shifted.append(part)
            elif part.before is not None:
                window = part.before if window is None else min(window, part.before)
        elif isinstance(part, _masks.KeyPadding):
            out = part if out is None else out & part
        elif isinstance(part, _masks._TensorMask):
            tensor = part.tensor4d
            part = type(part)(tensor[..., :S] if tensor.shape[-1] > 1 else tensor)
            out = part if out is None else out & part
    if (causal and T > 1) or window is not None or shifted:
        band: _masks.Mask
        if lengths is None:
            band = _masks.Window(window, 0 if causal else None, "bottom_right")
            for part in shifted:
                band = band & _masks.Window(part.before, part.after, "bottom_right", part.shift)
        else:
            before = lengths[0]
            position = before[:, None] + torch.arange(T, device=before.device)  # (N, T)
            j = torch.arange(S, device=before.device)
            ok = torch.ones(before.shape[0], T, S, dtype=torch.bool, device=before.device)
            if causal:
                ok &= j <= position[:, :, None]
            if window is not None:
                ok &= j >= position[:, :, None] - window
            for part in shifted:
                if part.before is not None:
                    ok &= j >= position[:, :, None] + part.shift - part.before
                if part.after is not None:
                    ok &= j <= position[:, :, None] + part.shift + part.after
            band = _masks.Allowed(ok[:, None])
        out = band if out is None else out & band
    return out


class CachedStep(NamedTuple):
    """A cached call planned and checked, nothing written yet.

    ``key``/``value``: ``(N, Hkv, S, Dk)``/``(N, Hkv, S, Dv)`` views of the cache's
    buffers, the positions the call reads (they hold the new tokens once ``write()``
    has run); ``mask`` over them; ``backend``: the forced one, or ``"decode"`` when
    none is forced and there are few query rows per key/value head (None: dispatch's
    choice); ``write()`` stores the new tokens (and a static cache's ``padding``);
    ``gains_grad``: whether the views will require grad once written though they do not
    now (new tokens that require grad, with grad mode on)."""

    key: Tensor
    value: Tensor
    mask: _masks.Mask | None
    backend: str | None
    write: Callable[[], None]
    gains_grad: bool


def cached_step(
    cache: KVCache,
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mask: _masks.Mask | None,
    new_lengths: Tensor | None,
    backend: str | None,
    padding: Tensor | None,
) -> CachedStep:
    """Check a call on ``cache`` with query ``(N, Hq, T, Dk)`` and the new tokens ``key``/
    ``value`` ``(N, Hkv, T, D)`` (None on a filled static cache) and plan it, writing
    nothing: whatever the call would reject raises here, before the cache changes.
    ``padding``: a static cache's key padding mask ``(N, M)`` for this call (stored by a
    fill), else None."""
    _check_call(cache, query, mask)
    N, Hq, T, _ = query.shape
    M = cache.max_length
    compiling = torch.compiler.is_compiling()
    chosen = _cached_backend(backend, T, Hq, cache.key.shape[1])
    if key is None or value is None:
        if key is not None or value is not None or not cache.static:
            raise _missing_key_value()
        S = M if compiling else stored_length(cache)
        mask = _static_mask(_read_lengths(cache), padding, mask, T, S)
        return CachedStep(cache.key[:, :, :S], cache.value[:, :, :S], mask, chosen, _nothing, False)
    _validate_new(cache, key, value, N, Hq)
    T_new = key.shape[2]
    if T_new > M:
        raise ValueError(
            f"attention: {T_new} new tokens do not fit a cache of max_length={M}; make the cache with "
            f"max_length >= {T_new}"
        )
    _validate_new_lengths(new_lengths, N, T_new)
    if not cache.static and T_new != T:
        raise ValueError(
            f"attention: with a self-attention cache, query (N, Hq, T, Dk) = {tuple(query.shape)} and key "
            f"{tuple(key.shape)} must hold the same T new tokens"
        )
    gains_grad = (
        torch.is_grad_enabled()
        and (key.requires_grad or value.requires_grad)
        and not (cache.key.requires_grad or cache.value.requires_grad)
    )
    if not (compiling or cache.static) and new_lengths is None:
        start, uniform = cache._host_state()
        if uniform and start + T <= M:
            # Every sequence holds `start` positions and every new token is real: the new
            # tokens of all sequences go to one slice of positions, and no padding is masked.
            S = start + T

            def write_slice() -> None:
                cache.key[:, :, start:S].copy_(key)
                cache.value[:, :, start:S].copy_(value)
                cache.lengths.fill_(S)
                cache._set_bound(S, uniform=True)

            mask = _cache_masks(mask, None, T, S, causal=True)
            return CachedStep(cache.key[:, :, :S], cache.value[:, :, :S], mask, chosen, write_slice, gains_grad)
    counts = (
        torch.full((N,), T_new, dtype=torch.int64, device=cache.key.device)
        if new_lengths is None
        else new_lengths.to(device=cache.key.device, dtype=torch.int64)
    )
    if cache.static:
        S = M if compiling else T_new

        def fill() -> None:
            if new_lengths is None:  # every token real: the first T_new positions of every sequence
                cache.key[:, :, :T_new].copy_(key)
                cache.value[:, :, :T_new].copy_(value)
                cache.lengths.fill_(T_new)
            else:
                cache.lengths.zero_()
                _write(cache.key, key, cache.lengths, counts)
                _write(cache.value, value, cache.lengths, counts)
                cache.lengths.copy_(counts)
            cache.key_padding_mask = padding
            cache._set_bound(None if compiling else T_new, uniform=new_lengths is None)

        lengths = counts if compiling or new_lengths is not None else None
        mask = _static_mask(lengths, padding, mask, T, S)
        return CachedStep(cache.key[:, :, :S], cache.value[:, :, :S], mask, chosen, fill, gains_grad)
    bound = None if compiling else _check_room(cache, counts, T_new, cache._host_state()[0])
    before = cache.lengths.clone()
    if bound is not None and new_lengths is None:
        # Every token is real and fits (the room was checked): one scatter per buffer.
        slots = (before[:, None] + torch.arange(T_new, device=before.device))[:, None, :, None]
        total = before + T_new

        def write_new() -> None:
            _append(cache.key, key, slots)
            _append(cache.value, value, slots)
            cache.lengths.copy_(total)
            cache._set_bound(bound)

    else:
        total = torch.clamp(before + counts, max=M)

        def write_new() -> None:
            _write(cache.key, key, before, counts)
            _write(cache.value, value, before, counts)
            cache.lengths.copy_(total)
            cache._set_bound(bound)

    S = M if bound is None else bound
    mask = _cache_masks(mask, (before, total), T, S, causal=True)
    return CachedStep(cache.key[:, :, :S], cache.value[:, :, :S], mask, chosen, write_new, gains_grad)


def _nothing() -> None:
    """The write of a call that reads a static cache as it is."""


def _cached_backend(backend: str | None, T: int, Hq: int, Hkv: int) -> str | None:
    """``backend``, or ``"decode"`` when none is forced (by ``backend=`` or
    :func:`mha.use_backend`) and there are few query rows (``T * Hq / Hkv <= MAX_ROWS``)
    per key/value head."""
    if backend is None and forced_backend() is None and T * (Hq // Hkv) <= MAX_ROWS:
        return "decode"
    return backend


def _check_call(cache: KVCache, query: Tensor, mask: _masks.Mask | None) -> None:
    """The cache, query ``(N, Hq, T, Dk)`` and ``mask`` of a cached call, before its new tokens."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"attention: cache must be an mha.KVCache, got {type(cache).__name__}")
    if not isinstance(query, Tensor) or query.dim() != 4:
        raise ValueError(
            "attention: with a cache, query must be a 4-D tensor (N, Hq, T, Dk) of the new tokens, got "
            f"{tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__}"
        )
    if mask is not None and not isinstance(mask, _masks.Mask):
        raise TypeError(
            f"attention: mask must be an mha.masks object, got {type(mask).__name__}; wrap a boolean "
            "tensor over cache positions (N, Hq, T, max_length) as Blocked(t) or Allowed(t)"
        )
    N, Hq, T, _ = query.shape
    if mask is not None:
        mask._check_shape(N, Hq, T, cache.max_length)
        if cache.static and any(isinstance(part, _masks.Window) for part in mask.parts()):
            raise NotImplementedError(
                "attention: Window and Causal masks count from each query's position in a self-attention "
                "cache; a static (cross-attention) cache has no query positions. Pass Allowed/Blocked/Bias "
                "tensors over its positions instead"
            )
    _check_batch(cache, tuple(query.shape))
    _check_query(cache, query)
    if mask is not None:  # before the mask is sliced to the positions read: the user's own shapes
        check_mask_devices(mask, query.device)


def check_mask_devices(mask: _masks.Mask, device: torch.device) -> None:
    """ValueError naming the part of ``mask`` that holds a tensor on another ``device`` than the query's."""
    for part in mask.parts():
        for t in part.tensors():
            if t.device != device:
                raise ValueError(
                    f"attention: mask {part!r} holds a tensor on {t.device} but the query is on {device}; "
                    f"build the mask on the query's device (e.g. tensor.to(query.device))"
                )


def _check_batch(cache: KVCache, query_shape: tuple[int, ...]) -> None:
    if cache.batch_size != query_shape[0]:
        raise ValueError(
            f"attention: query (N, Hq, T, Dk) = {query_shape} has N={query_shape[0]} but the cache holds "
            f"batch_size={cache.batch_size} sequences; reorder() the cache or make one per batch"
        )


def _check_query(cache: KVCache, query: Tensor) -> None:
    """Query ``(N, Hq, T, Dk)`` in the cache's dtype, on its device, with its ``Dk``: checked
    before the cache is written, so that a call that fails leaves the cache as it was."""
    Dk = cache.key.shape[-1]
    if query.dtype != cache.key.dtype or query.device != cache.key.device:
        raise TypeError(
            f"attention: query has dtype {query.dtype} on {query.device}, the cache {cache.key.dtype} on "
            f"{cache.key.device}; make the cache with dtype= and device= of the inputs"
        )
    if query.shape[-1] != Dk:
        raise ValueError(
            f"attention: query (N, Hq, T, Dk) = {tuple(query.shape)} must have the cache's Dk = {Dk} "
            f"(cache key {tuple(cache.key.shape)})"
        )


def _missing_key_value() -> ValueError:
    return ValueError(
        "attention: key and value may be None only together, on a static (cross-attention) cache "
        "already filled; pass the new tokens' key and value (N, Hkv, T, D)"
    )


def length_bound(cache: KVCache) -> int:
    """An upper bound on the longest sequence ``cache`` holds, from the host (one read of
    its lengths when they were changed by hand; ``max_length`` where they hold no values)."""
    return cache._host_state()[0]


def holds_nothing(cache: KVCache) -> bool:
    """Whether ``cache`` is known to hold no position: its host-side bound is 0 (from the
    host while it is valid, else one read of the lengths)."""
    return length_bound(cache) == 0


def stored_length(cache: KVCache) -> int:
    """The host-side bound ``S' > 0`` on the positions a static ``cache`` holds; ValueError
    naming the cache and the fix if it holds none (never filled, or reset)."""
    bound = length_bound(cache)
    if bound == 0:
        raise ValueError(
            f"attention: the static (cross-attention) cache {cache!r} is empty: nothing was stored since it "
            "was made or reset(); pass key and value, the encoder memory, on the first call (key=None, "
            "value=None then reuse what it holds)"
        )
    return bound


def _read_lengths(cache: KVCache) -> Tensor | None:
    """The lengths a read of the static ``cache`` masks: None while every sequence is known
    (on the host) to hold as many positions as the others."""
    return None if not torch.compiler.is_compiling() and cache._host_state()[1] else cache.lengths


def _static_mask(
    lengths: Tensor | None, padding: Tensor | None, mask: _masks.Mask | None, T: int, S: int
) -> _masks.Mask | None:
    """The mask over a static cache's first ``S`` positions: its ``lengths`` ``(N,)`` (None:
    every sequence holds all ``S``), its key ``padding`` mask ``(N, M)`` and ``mask``; not
    causal."""
    out = _cache_masks(mask, None if lengths is None else (lengths, lengths), T, S, causal=False)
    if padding is not None:
        blocked = _masks.Blocked(padding[:, None, None, :S])
        out = blocked if out is None else out & blocked
    return out


def preview(
    cache: KVCache, query_shape: tuple[int, int, int, int], T_new: int | None
) -> tuple[int, _masks.Mask | None, str | None]:
    """What a cached call with query ``(N, Hq, T, Dk)`` and ``T_new`` new key/value tokens
    (None: a filled static cache read as it is) would attend, without writing: the
    positions ``S'`` it reads, its mask over them (every new token counted real), and
    the backend the cached route asks for (``"decode"`` or None: dispatch's choice)."""
    _, Hq, T, _ = query_shape
    _check_batch(cache, query_shape)
    M = cache.max_length
    backend = _cached_backend(None, T, Hq, cache.key.shape[1])
    if T_new is None:
        if not cache.static:
            raise _missing_key_value()
        S = stored_length(cache)
        return S, _static_mask(_read_lengths(cache), cache.key_padding_mask, None, T, S), backend
    if cache.static:  # filled with every new token: no padding
        return min(T_new, M), None, backend
    before, (start, uniform) = cache.lengths, cache._host_state()
    S = min(start + T_new, M)
    lengths = None if uniform and start + T_new <= M else (before, torch.clamp(before + T_new, max=M))
    return S, _cache_masks(None, lengths, T, S, causal=True), backend
