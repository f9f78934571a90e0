"""``mha.TransformerDecoderLayer`` and ``mha.TransformerDecoder``: torch's decoder, with caches.

Drop-ins for :class:`torch.nn.TransformerDecoderLayer` and
:class:`torch.nn.TransformerDecoder` (same constructors, parameter names and
results; a ``state_dict`` loads both ways) whose attention is
:class:`mha.MultiheadAttention`, plus decoding one step at a time::

    cache = decoder.new_cache(batch_size, max_length, memory_length=S)
    for step in range(max_length):
        y = decoder(tgt_new, memory, cache=cache)     # tgt_new (T, N, E): new tokens only

Each layer holds a self-attention cache (keys and values of the tokens so far)
and a cross-attention cache (the projected memory, stored on the first call and
reused after: ``memory`` is then not read again). ``y`` equals the matching rows
of the full forward over every token so far with a causal ``tgt_mask``. A call
that raises leaves every cache as it was: what a layer's step could reject is
checked before its self-attention cache is written, and a decoder checks every
layer before the first runs.
"""


from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from ._cache import KVCache, holds_nothing, length_bound
from ._dispatch import forced_backend
from ._fx import leaf_call
from ._module import MultiheadAttention, built_like
from ._module_cache import check_memory, check_step
from ._validate import module_member


class LayerCache:
    """The caches of one decoder layer: ``self_attn`` (appended to each step) and
    ``cross_attn`` (static: the projected memory and its padding)."""

    def __init__(self, self_attn: KVCache, cross_attn: KVCache) -> None:
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.memory_stored = False
        # Set by TransformerDecoder for one step, after it checked every layer's step
        # before the first write: the layer then does not check again.
        self._checked_for_step = False

    @property
    def lengths(self) -> Tensor:
        """``(N,)`` tokens cached per sequence."""
        return self.self_attn.lengths

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` ``(N',)`` (beam search), in both caches."""
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)

    def reset(self) -> None:
        """Empty both caches: the next call stores ``memory`` again."""
        self.self_attn.reset()
        self.cross_attn.reset()
        self.memory_stored = False


class DecoderCache:
    """One :class:`LayerCache` per layer of a :class:`TransformerDecoder`, in ``layers``."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    @property
    def lengths(self) -> Tensor:
        """``(N,)`` tokens cached per sequence."""
        return self.layers[0].lengths

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` ``(N',)`` (beam search), in every layer."""
        for layer in self.layers:
            layer.reorder(index)

    def reset(self) -> None:
        """Empty every layer's caches."""
        for layer in self.layers:
            layer.reset()


def _reject_masks(tgt_mask: Tensor | None, memory_mask: Tensor | None, memory_is_causal: bool) -> None:
    if tgt_mask is not None or memory_mask is not None:
        raise NotImplementedError(
            "TransformerDecoderLayer with cache=: tgt_mask and memory_mask are not supported (attention "
            "on the self-attention cache is causal already); pass key padding masks for padding, or run "
            "without cache="
        )
    if memory_is_causal:
        raise NotImplementedError(
            "TransformerDecoderLayer with cache=: memory_is_causal=True is not supported (the memory is "
            "attended whole, without causality, by every new token); drop it, or run without cache="
        )


class _DecoderCall(nn.Module):
    """What mha's decoder layer and decoder share beyond torch's classes."""

    @torch.jit.unused
    def _fx_node(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None,
        memory_mask: Tensor | None,
        tgt_key_padding_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        tgt_is_causal: bool | None,
        memory_is_causal: bool,
        cache: Any | None,
    ) -> Tensor | None:
        """Under ``torch.fx`` tracing, this call as one node (a proxy of the output), as
        torch's is recorded; None otherwise."""
        kwargs = {
            "tgt_mask": tgt_mask, "memory_mask": memory_mask, "tgt_key_padding_mask": tgt_key_padding_mask,
            "memory_key_padding_mask": memory_key_padding_mask, "tgt_is_causal": tgt_is_causal,
            "memory_is_causal": memory_is_causal,
        }
        return leaf_call(self, (tgt, memory), kwargs, cache)  # a proxy of the output, or None


class TransformerDecoderLayer(_DecoderCall, nn.TransformerDecoderLayer):
    """:class:`torch.nn.TransformerDecoderLayer` with :class:`mha.MultiheadAttention`
    for ``self_attn`` and ``multihead_attn``, and :meth:`new_cache` for decoding.

    Same constructor, parameters and outputs as torch's; ``forward`` takes one more
    argument, ``cache``. Shapes (``batch_first=False``): tgt ``(T, N, E)``, memory
    ``(S, N, E)``, tgt_key_padding_mask ``(N, T)``, memory_key_padding_mask ``(N, S)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # torch annotates these as its own class; mha's is a drop-in, not a subclass.
        self.self_attn = built_like(self.self_attn)  # type: ignore[assignment]
        self.multihead_attn = built_like(self.multihead_attn)  # type: ignore[assignment]

    def new_cache(self, batch_size: int, max_length: int, memory_length: int | None = None) -> LayerCache:
        """Caches for ``batch_size`` sequences of up to ``max_length`` tokens and a memory
        of up to ``memory_length`` (default ``max_length``) tokens."""
        return LayerCache(
            cast(MultiheadAttention, self.self_attn).new_cache(batch_size, max_length),
            cast(MultiheadAttention, self.multihead_attn).new_cache(
                batch_size, max_length if memory_length is None else memory_length, static=True
            ),
        )

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        # Any, not LayerCache: TorchScript would try to compile the class; the cached
        # route is a @torch.jit.unused method, so a scripted layer runs without caches.
        cache: Any | None = None,
    ) -> Tensor:
        """torch's forward; with ``cache``, ``tgt`` ``(T, N, E)`` holds the new tokens
        only (``tgt_key_padding_mask`` ``(N, T)`` their right padding) and attention
        is causal over the cache. ``memory`` is stored on the first cached call."""
        if not torch.jit.is_scripting():
            traced = self._fx_node(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                tgt_is_causal, memory_is_causal, cache,
            )
            if traced is not None:
                return traced
        if cache is not None:
            return self._forward_cached(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                memory_is_causal, cache,
            )
        # torch's own forward, written out: TorchScript compiles no super() call.
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return self.norm3(x + self._ff_block(x))

    @torch.jit.unused
    def _forward_cached(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None,
        memory_mask: Tensor | None,
        tgt_key_padding_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        memory_is_causal: bool,
        cache: Any,
    ) -> Tensor:
        _reject_masks(tgt_mask, memory_mask, memory_is_causal)
        if isinstance(cache, LayerCache) and cache._checked_for_step:
            cache._checked_for_step = False
        else:
            self._check_cached(tgt, memory, tgt_key_padding_mask, memory_key_padding_mask, cache)
        # Submodules read from the registry (module_member): through nn.Module.__getattr__ a
        # lookup costs ~10 us between the step's kernels, and a step makes dozens.
        norm1, norm2, norm3 = module_member(self, "norm1"), module_member(self, "norm2"), module_member(self, "norm3")
        x = tgt
        if self.norm_first:
            x = x + self._cached_sa(norm1(x), tgt_key_padding_mask, cache)
            x = x + self._cached_mha(norm2(x), memory, memory_key_padding_mask, cache)
            return x + self._ff_block(norm3(x))
        x = norm1(x + self._cached_sa(x, tgt_key_padding_mask, cache))
        x = norm2(x + self._cached_mha(x, memory, memory_key_padding_mask, cache))
        return norm3(x + self._ff_block(x))

    def _check_cached(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_key_padding_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        cache: Any,
    ) -> None:
        """Raise, before anything is written, what this layer's cached step would raise
        after its self-attention cache is written: a cache of another batch, a memory
        the cross-attention cache cannot take (shape, dtype, device), a cross-attention
        cache emptied while the memory is marked stored, and a forced backend refusing
        either attention call. Shapes as for :meth:`forward`."""
        if not isinstance(cache, LayerCache):
            raise TypeError(
                f"TransformerDecoderLayer: cache must be a LayerCache from new_cache(), got {type(cache).__name__}"
            )
        self_attn = module_member(self, "self_attn")
        if isinstance(tgt, Tensor) and tgt.dim() == 3:  # else the self-attention's own check names it
            N, T = (tgt.shape[0], tgt.shape[1]) if self_attn.batch_first else (tgt.shape[1], tgt.shape[0])
            for name, kv in (("self-attention", cache.self_attn), ("cross-attention", cache.cross_attn)):
                if kv.batch_size != N:
                    raise ValueError(
                        f"TransformerDecoderLayer with cache=: tgt holds N={N} sequences but the layer's {name} "
                        f"cache holds batch_size={kv.batch_size}; reorder() the whole cache (the DecoderCache or "
                        "LayerCache), not one of its caches"
                    )
            # Caches built by hand may differ in max_length: a step that would overflow this
            # layer's must fail before an earlier layer writes (the full check counts the
            # real tokens of a padded step).
            if not torch.compiler.is_compiling() and length_bound(cache.self_attn) + T > cache.self_attn.max_length:
                check_step(self_attn, tgt, tgt, tgt, tgt_key_padding_mask, cache.self_attn)
        if not cache.memory_stored:
            check_memory(self.multihead_attn, memory, memory, memory_key_padding_mask, cache.cross_attn)
            _check_memory_dtype(cast(MultiheadAttention, self.multihead_attn), memory)
        elif not torch.compiler.is_compiling() and holds_nothing(cache.cross_attn):
            raise ValueError(
                f"TransformerDecoderLayer with cache=: the cross-attention cache {cache.cross_attn!r} is empty: "
                "it was emptied while its LayerCache says the memory is stored; reset() the LayerCache (or "
                "the DecoderCache), so that the next call stores the memory again"
            )
        if forced_backend() is not None:  # it may serve one attention call of the step and not the other
            check_step(self.self_attn, tgt, tgt, tgt, tgt_key_padding_mask, cache.self_attn)
            stored = cache.memory_stored
            check_step(
                self.multihead_attn, tgt, None if stored else memory, None if stored else memory,
                None if stored else memory_key_padding_mask, cache.cross_attn,
            )

    def _cached_sa(self, x: Tensor, key_padding_mask: Tensor | None, cache: LayerCache) -> Tensor:
        out = module_member(self, "self_attn")(
            x, x, x, key_padding_mask=key_padding_mask, need_weights=False, cache=cache.self_attn
        )[0]
        return module_member(self, "dropout1")(out)

    def _cached_mha(
        self, x: Tensor, memory: Tensor, key_padding_mask: Tensor | None, cache: LayerCache
    ) -> Tensor:
        attention = module_member(self, "multihead_attn")
        if cache.memory_stored:
            out = attention(x, None, None, need_weights=False, cache=cache.cross_attn)[0]
        else:
            out = attention(
                x, memory, memory, key_padding_mask=key_padding_mask, need_weights=False,
                cache=cache.cross_attn,
            )[0]
            cache.memory_stored = True
        return module_member(self, "dropout2")(out)


def _check_memory_dtype(attention: MultiheadAttention, memory: Tensor) -> None:
    """``memory`` in the dtype and on the device of the layer's parameters (those of its
    cross-attention ``attention``)."""
    weight = attention.out_proj.weight
    if memory.dtype != weight.dtype:
        raise TypeError(
            f"TransformerDecoderLayer with cache=: memory has dtype {memory.dtype} but the layer's parameters "
            f"are {weight.dtype}; pass memory.to({weight.dtype}) (or cast the model with .to({memory.dtype}))"
        )
    if memory.device != weight.device:
        raise ValueError(
            f"TransformerDecoderLayer with cache=: memory is on {memory.device} but the layer's parameters on "
            f"{weight.device}; pass memory.to({str(weight.device)!r})"
        )


class TransformerDecoder(_DecoderCall, nn.TransformerDecoder):
    """:class:`torch.nn.TransformerDecoder` with :meth:`new_cache` and ``forward(..., cache=)``.

    Built from a :class:`TransformerDecoderLayer` (cloned ``num_layers`` times, as
    torch does); same parameters and outputs as torch's."""

    def new_cache(self, batch_size: int, max_length: int, memory_length: int | None = None) -> DecoderCache:
        """One :class:`LayerCache` per layer (see :meth:`TransformerDecoderLayer.new_cache`)."""
        return DecoderCache(
            [layer.new_cache(batch_size, max_length, memory_length) for layer in self.layers]
        )

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        # Any, not DecoderCache: see TransformerDecoderLayer.forward.
        cache: Any | None = None,
    ) -> Tensor:
        """torch's forward; with ``cache`` (from :meth:`new_cache`), ``tgt`` holds the new
        tokens only, as in :meth:`TransformerDecoderLayer.forward`."""
        if not torch.jit.is_scripting():
            traced = self._fx_node(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                tgt_is_causal, memory_is_causal, cache,
            )
            if traced is not None:
                return traced
        if cache is not None:
            return self._forward_cached(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                memory_is_causal, cache,
            )
        # torch's own forward, written out: TorchScript compiles no super() call.
        seq_len = _get_seq_len(tgt, self.layers[0].self_attn.batch_first)
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, seq_len)
        x = tgt
        for layer in self.layers:
            x = layer(
                x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal,
            )
        return x if self.norm is None else self.norm(x)

    @torch.jit.unused
    def _forward_cached(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None,
        memory_mask: Tensor | None,
        tgt_key_padding_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        memory_is_causal: bool,
        cache: Any,
    ) -> Tensor:
        layers = module_member(self, "layers")
        if not isinstance(cache, DecoderCache) or len(cache.layers) != len(layers):
            raise TypeError(
                f"TransformerDecoder: cache must be a DecoderCache from new_cache() with one entry per layer "
                f"({len(layers)}), got {type(cache).__name__}"
            )
        _reject_masks(tgt_mask, memory_mask, memory_is_causal)
        for i, layer in enumerate(layers):
            if not isinstance(layer, TransformerDecoderLayer):
                raise TypeError(
                    f"TransformerDecoder with cache=: layers[{i}] is a {type(layer).__module__}."
                    f"{type(layer).__qualname__}, not an "
                    "mha.TransformerDecoderLayer; convert the model with mha.swap(model)"
                )
            # Every layer's step is checked before the first layer writes; the layers then skip
            # their own check (each writes its caches as it runs).
            layer._check_cached(tgt, memory, tgt_key_padding_mask, memory_key_padding_mask, cache.layers[i])
        x = tgt
        try:
            for layer_cache in cache.layers:
                layer_cache._checked_for_step = True
            for layer, layer_cache in zip(layers, cache.layers, strict=True):
                x = layer(
                    x, memory, tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask, cache=layer_cache,
                )
        finally:  # a layer that raised leaves the later ones unconsumed
            for layer_cache in cache.layers:
                layer_cache._checked_for_step = False
        norm = module_member(self, "norm")
        return x if norm is None else norm(x)
