"""``MultiheadAttention.forward(..., cache=)``: one decoding step of the module on a :class:`KVCache`.

Self-attention (``cache.static`` False): ``key``/``value`` are the new tokens,
projected once and appended; attention is causal over the cache. The output of
each real token equals the matching row of a full causal forward over the whole
sequence so far. Cross-attention (``cache.static`` True): the first call projects
``key``/``value`` (the encoder memory) and stores them with their
``key_padding_mask``; later calls pass ``key=None, value=None``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._cache import KVCache
from ._core import plan_cached
from ._mask_analysis import values_readable
from .masks import right_padding_lengths


def new_module_cache(module: Any, batch_size: int, max_length: int, static: bool) -> KVCache:
    """A cache for ``module`` (an ``mha.MultiheadAttention``), on its parameters' device and dtype."""
    weight = module.out_proj.weight
    return KVCache(
        batch_size, max_length, module.num_heads, module.head_dim,
        static=static, dtype=weight.dtype, device=weight.device,
    )


def check_cached_call(
    module: Any, query: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: object
) -> None:
    """Raise what ``module(query, ..., attn_mask=attn_mask, is_causal=is_causal, cache=cache)``
    cannot run."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"MultiheadAttention: cache must be an mha.KVCache, got {type(cache).__name__}")
    H, D = module.num_heads, module.head_dim
    if (cache.key.shape[1], cache.key.shape[3], cache.value.shape[3]) != (H, D, D):
        raise ValueError(
            f"MultiheadAttention with cache=: {cache!r} was not made for this module (embed_dim="
            f"{module.embed_dim}, num_heads={H}), whose keys and values are num_heads={H} heads of head_dim "
            f"= embed_dim // num_heads = {D}: the cache needs num_heads={H}, head_dim={D}, value_head_dim={D}; "
            "make it with this module's new_cache(batch_size, max_length) (a decoder's with its own new_cache)"
        )
    if is_causal and cache.static:
        raise NotImplementedError(
            "MultiheadAttention with cache=: is_causal=True is not supported on a static "
            "(cross-attention) cache, whose memory every query attends whole; drop it, or run "
            "without cache="
        )
    _fail_unsupported(module, query, attn_mask)


def _fail_unsupported(module: Any, query: Tensor, attn_mask: Tensor | None) -> None:
    if module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(
            "MultiheadAttention with cache=: add_bias_kv and add_zero_attn are not supported with a "
            "cache; run without cache= (recomputing the prefix)"
        )
    if attn_mask is not None:
        raise NotImplementedError(
            "MultiheadAttention with cache=: attn_mask is not supported (attention on a cache is causal "
            "already); for other masks over cache positions call mha.attention(q, k, v, mask, cache=cache)"
        )
    if not isinstance(query, Tensor) or query.dim() != 3:
        raise ValueError(
            "MultiheadAttention with cache=: query must be batched, (T, N, E) (or (N, T, E) with "
            f"batch_first), got {tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__}; "
            "add a batch dimension of 1 with query.unsqueeze(1)"
        )


def new_token_lengths(key_padding_mask: Tensor | None, N: int, T: int) -> Tensor | None:
    """Real tokens per sequence from a right-padding ``key_padding_mask`` ``(N, T)``."""
    if key_padding_mask is None:
        return None
    _new_lengths_checked(key_padding_mask, N, T)
    if not values_readable(key_padding_mask):  # compiling, or meta: taken as right padding
        return (~key_padding_mask).sum(-1)
    lengths = right_padding_lengths(key_padding_mask)
    if lengths is None:
        raise ValueError(
            "MultiheadAttention with cache=: key_padding_mask (N, T) of the new tokens must be right "
            "padding (each row False, then only True): padded tokens are not stored"
        )
    return lengths


def _new_lengths_checked(key_padding_mask: Tensor, N: int, T: int) -> None:
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"MultiheadAttention with cache=: key_padding_mask must be boolean (True = padding), got "
            f"dtype {key_padding_mask.dtype}"
        )
    if key_padding_mask.shape != (N, T):
        raise ValueError(
            f"MultiheadAttention with cache=: key_padding_mask must be (N, T) = ({N}, {T}), one "
            f"column per new key, got {tuple(key_padding_mask.shape)}"
        )


def check_memory(module: Any, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, cache: KVCache) -> None:
    """Raise what filling the static ``cache`` of ``module`` with the memory ``key``
    ``(S, N, kdim)`` and ``value`` ``(S, N, vdim)`` (batch-first: ``N`` first) and its
    ``key_padding_mask`` ``(N, S)`` cannot run, before anything is stored: a failed fill
    leaves the cache's padding mask (and a decoder layer's self-attention cache) as it was."""
    for name, t, dim in (("key", key, module.kdim), ("value", value, module.vdim)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != dim:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"MultiheadAttention with a static cache: {name} (the memory) must be batched, "
                f"{'(N, S, ' if module.batch_first else '(S, N, '}{dim}), got {shape}"
            )
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(
            f"MultiheadAttention with a static cache: key {tuple(key.shape)} and value {tuple(value.shape)} "
            "must hold the same memory tokens"
        )
    batch, length = (key.shape[0], key.shape[1]) if module.batch_first else (key.shape[1], key.shape[0])
    if batch != cache.batch_size:
        raise ValueError(
            f"MultiheadAttention with a static cache: the memory has N={batch} sequences but the cache holds "
            f"batch_size={cache.batch_size}; reorder() the cache or make one per batch"
        )
    if length > cache.max_length:
        raise ValueError(
            f"MultiheadAttention with a static cache: the memory has S={length} tokens, more than the cache's "
            f"max_length={cache.max_length}; make the cache with max_length >= {length} (a decoder's: "
            f"new_cache(..., memory_length={length}))"
        )
    if key_padding_mask is not None:
        _new_lengths_checked(key_padding_mask, batch, length)


def _memory_padding(
    key_padding_mask: Tensor | None, N: int, S: int, max_length: int
) -> tuple[Tensor | None, Tensor | None]:
    """``(new_lengths, stored mask)`` for the memory of a static cache: right padding
    becomes lengths; any other boolean pattern is stored, padded to ``(N, max_length)``,
    and so is every mask whose values cannot be read (under ``torch.compile``, on meta):
    stored, it is right whatever its pattern."""
    if key_padding_mask is None:
        return None, None
    _new_lengths_checked(key_padding_mask, N, S)
    lengths = right_padding_lengths(key_padding_mask) if values_readable(key_padding_mask) else None
    if lengths is not None:
        return lengths, None
    return None, F.pad(key_padding_mask, (0, max_length - S), value=True)


def check_read(key: Tensor | None, value: Tensor | None, key_padding_mask: Tensor | None, cache: KVCache) -> None:
    """Raise for a cached call with ``key`` or ``value`` None that would not be a plain read
    of a filled static cache: one of them given (it would be ignored), or a
    ``key_padding_mask`` for a static cache (its padding is the stored memory's)."""
    if key is not None or value is not None:
        raise ValueError(
            "MultiheadAttention with cache=: key and value may be None only together (a filled static "
            f"cache read as it is), got {'value' if value is None else 'key'}=None alone; pass both, the "
            "memory to store, or neither"
        )
    if key_padding_mask is not None and cache.static:
        raise ValueError(
            "MultiheadAttention with cache=: key_padding_mask with key=None, value=None is not read: the "
            "memory's padding is stored when the static cache is filled; pass it with the memory (key, "
            "value), or drop it on calls that read the cache"
        )


def _step_inputs(
    module: Any,
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    key_padding_mask: Tensor | None,
    cache: KVCache,
) -> tuple[Tensor | None, Tensor | None]:
    """``(new_lengths, padding)`` of ``module(query, key, value, key_padding_mask=...,
    cache=cache)``, checked: the real new tokens per sequence ``(N,)`` (None: all), and
    the key padding mask ``(N, max_length)`` a static cache reads (the memory's, which
    a fill stores; else the cache's own)."""
    if key is None or value is None:
        check_read(key, value, key_padding_mask, cache)
        return None, cache.key_padding_mask
    batch_first = module.batch_first
    N = query.shape[0 if batch_first else 1]
    S = key.shape[1 if batch_first else 0]
    if cache.static:
        check_memory(module, key, value, key_padding_mask, cache)
        return _memory_padding(key_padding_mask, N, S, cache.max_length)
    return new_token_lengths(key_padding_mask, N, S), cache.key_padding_mask


def check_step(
    module: Any, query: Tensor, key: Tensor | None, value: Tensor | None, key_padding_mask: Tensor | None,
    cache: KVCache,
) -> None:
    """Raise what ``module(query, key, value, key_padding_mask=key_padding_mask,
    need_weights=False, cache=cache)`` would raise after its projections (the backend
    it would run refusing the call included), from the shapes of its heads: nothing is
    projected or written. Shapes as for :func:`cached_forward`."""
    check_cached_call(module, query, None, False, cache)
    new_lengths, padding = _step_inputs(module, query, key, value, key_padding_mask, cache)
    batch_first = module.batch_first
    N, T = (query.shape[0], query.shape[1]) if batch_first else (query.shape[1], query.shape[0])
    weight = module.out_proj.weight

    def heads(length: int) -> Tensor:
        """``(N, H, length, E // H)`` heads of the module's dtype, on its device: no memory."""
        return torch.empty((), dtype=weight.dtype, device=weight.device).expand(
            N, module.num_heads, length, module.head_dim
        )

    k = v = None if key is None or value is None else heads(key.shape[1 if batch_first else 0])
    dropout_p = module.dropout if module.training else 0.0
    plan_cached(heads(T), k, v, None, cache, new_lengths, padding, dropout_p=dropout_p)


def cached_forward(
    module: Any,
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    attn_mask: Tensor | None,
    is_causal: bool,
    cache: KVCache,
) -> tuple[Tensor, Tensor | None]:
    """One step of ``module`` on ``cache``. Shapes (``batch_first=False``): query
    ``(T, N, E)``, key ``(T, N, kdim)`` (``(S, N, kdim)`` filling a static cache, or
    None on a filled one), key_padding_mask ``(N, T)`` / ``(N, S)`` right padding
    (any boolean pattern on a static cache). Returns output ``(T, N, E)`` and
    weights ``(N, T, S')`` (or ``(N, h, T, S')``) over the cache's first ``S'``
    positions. A step that raises leaves the cache as it was."""
    check_cached_call(module, query, attn_mask, is_causal, cache)
    new_lengths, padding = _step_inputs(module, query, key, value, key_padding_mask, cache)
    batch_first = module.batch_first
    if key is None or value is None:
        q = module._query_heads(query, batch_first)
        k = v = None
    else:
        q, k, v = module._project_heads(query, key, value, batch_first)
    result = plan_cached(
        q,
        k,
        v,
        None,
        cache,
        new_lengths,
        padding,
        dropout_p=module.dropout if module.training else 0.0,
        weights=("mean" if average_attn_weights else "per_head") if need_weights else None,
    ).run()
    out = result.output.permute((0, 2, 1, 3) if batch_first else (2, 0, 1, 3))
    return module._out_projection(out.reshape(*out.shape[:2], module.embed_dim)), result.weights
