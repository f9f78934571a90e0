"""``mha.MultiheadAttention``: the torch-compatible module over :func:`mha.attention`."""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._cache import KVCache
from ._core import checked_attention, packed_attention
from ._frontend import ForwardPlan, KeyLengths, ShardedMasks, plan_forward
from ._fx import leaf_call
from ._module_cache import cached_forward, new_module_cache
from ._script import ScriptableAttention, sequence_major
from ._types import device_type
from ._validate import module_member, validate_constructor
from ._varlen import (
    Offsets,
    check_same_sequences,
    jagged_from_packed,
    nested_packed,
    nested_weights,
    with_appended_keys,
)
from .distributed._context import context_parallel_attention


class MultiheadAttention(ScriptableAttention):
    r"""Multi-head attention, a drop-in for :class:`torch.nn.MultiheadAttention`.

    .. math::

        \text{MultiHead}(Q, K, V) = \text{Concat}(\text{head}_1, \dots, \text{head}_h) W^O,
        \quad \text{head}_i = \text{softmax}\!\left(\frac{Q W_i^Q (K W_i^K)^\top}{\sqrt{E / h}} + M\right) V W_i^V

    Same constructor, parameters (names, shapes, initialisation), ``forward`` and
    results as torch, so a ``state_dict`` loads both ways. What changes:

    * every malformed call raises ``ValueError``/``TypeError`` naming the argument,
      the expected and actual shapes, and the fix;
    * a query row whose keys are all masked gets zero attention (output =
      ``out_proj.bias``, weights 0), never NaN;
    * an inverted ``tril`` causal mask, a float mask of 0s and 1s and masks that
      empty rows warn;
    * ``is_causal=True`` works without ``attn_mask``; ``attn_mask`` may also be
      ``(N, num_heads, L, S)``; boolean and float masks mix freely;
    * right padding is dropped before the key/value projections where that pays,
      the standard causal mask runs as causal, and averaged weights never
      materialise per-head weights.

    Dropout (``dropout > 0`` in training) draws the same random numbers as torch
    for the same random state on dense inputs, except where right padding is
    dropped (large right-padded batches: see :func:`mha._frontend.key_lengths_pay`)
    and with ``is_causal=True`` and no ``attn_mask`` (which torch rejects); nested
    inputs attend each sequence on its own and draw differently.

    Args:
        embed_dim: ``E``, width of query and of the output.
        num_heads: ``h``; ``E`` must be divisible by it.
        dropout: dropout probability on the attention weights, in [0, 1] (1 drops every weight in training).
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``).
        add_zero_attn: append a zero key and value.
        kdim: width of key (default ``E``).
        vdim: width of value, ``D`` (default ``E``).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.

    Shapes (``batch_first=False``; swap the first two dims for ``True``):
        query ``(L, N, E)``, key ``(S, N, kdim)``, value ``(S, N, D)``;
        key_padding_mask ``(N, S)``; attn_mask ``(L, S)``, ``(N*h, L, S)`` or
        ``(N, h, L, S)``. Unbatched: query ``(L, E)``, key ``(S, kdim)``,
        value ``(S, D)``, key_padding_mask ``(S,)``, attn_mask ``(L, S)`` or ``(h, L, S)``.
        Output ``(L, N, E)``; weights ``(N, L, S)`` averaged or ``(N, h, L, S)``.
        L: target length, S: source length, N: batch, E: embed_dim, D: vdim.
    """

    __constants__: ClassVar[list[str]] = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        embed_dim, num_heads, kdim, vdim = validate_constructor(embed_dim, num_heads, dropout, kdim, vdim)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        # Registration order and initialisation follow torch, so that the same random state gives
        # the same parameters.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        _keep_whole_under_fsdp()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    # torch's TransformerEncoderLayer, in eval under no_grad, skips self_attn.forward and
    # runs its own fused layer kernel on these weights, asking self_attn for the merged
    # mask. Keeping torch's method (it reads only num_heads) keeps that path, and its
    # results, exactly as they were before mha.swap.
    merge_masks = nn.MultiheadAttention.merge_masks

    def __setstate__(self, state: dict) -> None:
        # Modules pickled before kdim/vdim existed.
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        extra = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if not self._qkv_same_embed_dim:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.batch_first:
            extra += ", batch_first=True"
        return extra

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        # Any, not KVCache: TorchScript would try to compile the class; the cached route
        # is a @torch.jit.unused method, so a scripted module runs without caches.
        cache: Any | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``(L, N, E)`` (``(N, L, E)`` if ``batch_first``) or unbatched ``(L, E)``.
            key: ``(S, N, kdim)`` or ``(S, kdim)``.
            value: ``(S, N, D)`` or ``(S, D)`` with ``D = vdim``.
            key_padding_mask: ``(N, S)`` or ``(S,)``; bool (True = padding, ignored)
                or float (added to the scores).
            need_weights: also return attention weights.
            attn_mask: ``(L, S)``, ``(N*num_heads, L, S)``, ``(N, num_heads, L, S)``
                (or ``(num_heads, L, S)`` unbatched); bool (True = blocked) or float
                (added to the scores).
            average_attn_weights: average the weights over heads.
            is_causal: apply a causal mask (query ``i`` sees keys ``j <= i``); with
                ``attn_mask`` given as well, both apply.
            cache: a :class:`mha.KVCache` from :meth:`new_cache`, for decoding.
                ``query`` ``(T, N, E)`` and ``key``/``value`` are then the ``T`` new
                tokens (self-attention: appended, attention causal over the cache;
                ``key_padding_mask`` ``(N, T)`` marks right padding, not stored), or
                for a static cache the memory to store with its
                ``key_padding_mask`` (``key=value=None`` on later calls). Weights
                span the cache's first ``S' <= max_length`` positions.

        Returns:
            ``(attn_output, attn_output_weights)``: output ``(L, N, E)`` (or
            ``(N, L, E)``, or ``(L, E)``); weights ``(N, L, S)`` averaged, ``(N,
            num_heads, L, S)`` per head, ``(L, S)``/``(num_heads, L, S)`` unbatched,
            or None when ``need_weights=False``. With ``add_bias_kv`` or
            ``add_zero_attn`` the weights have one more column per added key.
        """
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._forward_scripted(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        # A proxy of torch.fx (or a nested or other subclass); the query may be a constant
        # (a buffer) while the key and value are traced.
        if type(query) is not Tensor or type(key) is not Tensor or type(value) is not Tensor:
            node = leaf_call(
                self, (query, key, value),
                {"key_padding_mask": key_padding_mask, "need_weights": need_weights, "attn_mask": attn_mask,
                 "average_attn_weights": average_attn_weights, "is_causal": is_causal},
                cache,
            )
            if node is not None:
                return node  # a proxy of the (output, weights) pair
        if cache is not None:
            return self._forward_cached(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, cache
            )
        plan = plan_forward(
            self, query, key, value, key_padding_mask, attn_mask, is_causal,
            need_weights, average_attn_weights, self.training,
        )
        if plan.warnings:
            level = _caller_stacklevel()
            for message in plan.warnings:
                warnings.warn(message, UserWarning, stacklevel=level)
        out, weights = getattr(self, self._ROUTES[plan.route])(plan)
        if not plan.batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def new_cache(self, batch_size: int, max_length: int, *, static: bool = False) -> KVCache:
        """A :class:`mha.KVCache` for :meth:`forward`'s ``cache=``: ``batch_size``
        sequences of up to ``max_length`` tokens (``static=True``: cross-attention,
        memory of up to ``max_length`` tokens), on this module's device and dtype."""
        return new_module_cache(self, batch_size, max_length, static)

    @torch.jit.unused
    def _forward_cached(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
        cache: Any,
    ) -> tuple[Tensor, Tensor | None]:
        return cached_forward(
            self, query, key, value, key_padding_mask, need_weights, average_attn_weights, attn_mask, is_causal,
            cache,
        )

    def _dense(self, plan: ForwardPlan) -> tuple[Tensor, Tensor | None]:
        """Heads ``(N, H, L, S)`` through :func:`mha.attention`, with the appended keys of
        ``add_bias_kv`` and ``add_zero_attn``, in the inputs' own layout."""
        N, H, batch_first = plan.N, self.num_heads, plan.batch_first
        query, key, value = plan.query, plan.key, plan.value
        if self.bias_k is not None and self.bias_v is not None:
            q, k, v = self._in_projection(query, key, value)
            k = torch.cat([k, _batched_token(self.bias_k, N, batch_first)], dim=1 if batch_first else 0)
            v = torch.cat([v, _batched_token(self.bias_v, N, batch_first)], dim=1 if batch_first else 0)
            q, k, v = _split_heads(q, H, batch_first), _split_heads(k, H, batch_first), _split_heads(v, H, batch_first)
        elif plan.N == 1 and plan.weights is not None and device_type(query.device) == "cpu" and self._packed_self(plan):
            q, k, v = self._feature_major_heads(query)
        else:
            q, k, v = self._project_heads(query, key, value, batch_first)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, k.shape[-1])], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, v.shape[-1])], dim=2)
        result = checked_attention(q, k, v, plan.mask, plan.dropout_p, plan.weights)
        return self._merged_heads_out(result.output, batch_first), result.weights

    def _one_key(self, plan: ForwardPlan) -> tuple[Tensor, Tensor | None]:
        """Self-attention over one position (``L = S = 1``, query is key is value, so one
        ``in_proj_weight``): each head's softmax over one score is exactly 1, so the output
        is ``out_proj`` of the value projection. No scores, no query or key projection;
        the weights are ones ``(N, 1, 1)`` or ``(N, H, 1, 1)``, NaN for a sequence whose
        input holds a NaN or an infinity (its scores are not finite, and torch's softmax
        over them NaN). Non-finite query or key projection weights do not reach the
        output here (they would through torch's scores)."""
        E, N = self.embed_dim, plan.N
        b = self._in_bias(plan.value.dtype)
        weight = module_member(self, "in_proj_weight")[2 * E :]
        out = self._out_projection(F.linear(plan.value, weight, None if b is None else b[2 * E :]))
        weights = None
        if plan.weights is not None:
            shape = (N, 1, 1) if plan.weights == "mean" else (N, self.num_heads, 1, 1)
            # 0 per sequence, or NaN where its input is not finite (a sum of x * 0 cannot overflow).
            not_finite = (plan.value * 0).sum(-1).view((N,) + (1,) * (len(shape) - 1))
            weights = torch.ones(shape, dtype=out.dtype, device=out.device).add_(not_finite)
        return out, weights

    def _key_lengths(self, plan: ForwardPlan) -> tuple[Tensor, Tensor | None]:
        """Right-padded keys: only the real keys are projected and attended, every query row
        is computed (as torch does). Sequences are packed batch-major. The key lengths are
        at hand on the host and the device, so nothing here waits for the GPU."""
        key_lengths = cast(KeyLengths, plan.key_lengths)  # set on this route
        lengths, lengths_host = key_lengths.lengths, key_lengths.host
        N, L, S, H, E = plan.N, plan.L, plan.S, self.num_heads, self.embed_dim
        dev = lengths.device
        T = sum(lengths_host)
        # Row of each real key in the flattened input: key s of sequence n, batch-major.
        ends = torch.cumsum(lengths, 0)
        batch = torch.repeat_interleave(torch.arange(N, device=dev), lengths, output_size=T)
        within = torch.arange(T, device=dev) - (ends - lengths)[batch]
        rows = batch * S + within if plan.batch_first else within * N + batch
        key, value = plan.key, plan.value
        k_tokens = key.reshape(-1, key.shape[-1]).index_select(0, rows)
        v_tokens = k_tokens if value is key else value.reshape(-1, value.shape[-1]).index_select(0, rows)
        q, k, v = self._in_projection(plan.query, k_tokens, v_tokens)
        q = (q if plan.batch_first else q.transpose(0, 1)).reshape(N * L, H, E // H)
        k, v = (t.view(t.shape[0], H, E // H) for t in (k, v))
        q_offsets = Offsets(range(0, (N + 1) * L, L), torch.arange(0, (N + 1) * L, L, device=dev), L)
        k_offsets = Offsets(
            list(itertools.accumulate(lengths_host, initial=0)),
            torch.cat([ends.new_zeros(1), ends]),
            max(lengths_host, default=0),
        )
        result = packed_attention(
            q, k, v, q_offsets, k_offsets, plan.mask, dropout_p=plan.dropout_p, weights=plan.weights
        )
        out = self._out_projection(result.output.reshape(N, L, E))
        if sequence_major(plan.batch_first, self.training):
            out = out.transpose(0, 1).contiguous()
            if plan.batch_first:
                out = out.transpose(0, 1)
        weights = None
        if result.weights is not None:
            weights = out.new_zeros((N, L, S) if plan.weights == "mean" else (N, H, L, S))
            for n, w in enumerate(result.weights):
                weights[n, ..., : w.shape[-1]] = w
        return out, weights

    def _nested(self, plan: ForwardPlan) -> tuple[Tensor, Tensor | None]:
        """Nested (variable-length) batch: projections on the packed tokens, attention per
        sequence; nothing is spent on padding. Returns a nested output of the query's layout
        and, with weights, a strided nested tensor of per-sequence weights."""
        query, key, value = plan.query, plan.key, plan.value
        q_in, q_offsets = nested_packed(query)
        k_in, k_offsets = (q_in, q_offsets) if key is query else nested_packed(key)
        if value is key or value is query:
            v_in, v_offsets = (k_in, k_offsets) if value is key else (q_in, q_offsets)
        else:
            v_in, v_offsets = nested_packed(value)
        check_same_sequences(q_offsets, k_offsets, v_offsets)
        q, k, v = self._in_projection(q_in, k_in, v_in)
        H = self.num_heads
        q, k, v = (t.unflatten(-1, (H, t.shape[-1] // H)) for t in (q, k, v))
        if plan.extra_keys:
            k, v, k_offsets = with_appended_keys(k, v, k_offsets, *self._appended_tokens(k))
        result = packed_attention(
            q, k, v, q_offsets, k_offsets, plan.mask, dropout_p=plan.dropout_p, weights=plan.weights
        )
        out = self._out_projection(result.output.flatten(-2))
        weights = nested_weights(result.weights) if result.weights is not None else None
        return jagged_from_packed(out, q_offsets, query), weights

    def _appended_tokens(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values ``add_bias_kv`` and ``add_zero_attn`` append, in that order, as
        heads ``(A, H, E // H)`` in the dtype of the projected keys ``k``."""
        H, D = self.num_heads, self.embed_dim // self.num_heads
        keys, values = [], []
        if self.bias_k is not None and self.bias_v is not None:
            keys.append(self.bias_k.view(1, H, D))
            values.append(self.bias_v.view(1, H, D))
        if self.add_zero_attn:
            keys.append(k.new_zeros(1, H, D))
            values.append(k.new_zeros(1, H, D))
        return torch.cat(keys).to(k.dtype), torch.cat(values).to(k.dtype)

    def _context_parallel(self, plan: ForwardPlan) -> tuple[Tensor, None]:
        """Inputs are this rank's shards of the sequence: project here, attend by ring
        (:mod:`mha.distributed`); the output is this rank's shard. No weights."""
        sharded = cast(ShardedMasks, plan.sharded)  # set on this route
        q, k, v = (
            _split_heads(t, self.num_heads, plan.batch_first)
            for t in self._in_projection(plan.query, plan.key, plan.value)
        )
        out = context_parallel_attention(
            sharded.context, q, k, v, key_padding_mask=sharded.key_padding_mask,
            attn_mask=sharded.attn_mask, is_causal=sharded.is_causal, need_weights=plan.weights is not None,
            dropout_p=plan.dropout_p, appended_keys=plan.extra_keys > 0,
        )
        return self._merged_heads_out(out, plan.batch_first), None

    # The method that runs each route of a plan: a new route (a KV cache, context
    # parallelism) is a method taking the plan, and one entry here.
    _ROUTES: ClassVar[dict[str, str]] = {
        "dense": "_dense",
        "one_key": "_one_key",
        "key_lengths": "_key_lengths",
        "nested": "_nested",
        "context_parallel": "_context_parallel",
    }

    def _project_heads(
        self, query: Tensor, key: Tensor, value: Tensor, batch_first: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, N, E)``/``(S, N, kdim)``/``(S, N, vdim)`` (batch-first: N first) projected
        and split into heads ``(N, H, L|S, E // H)``, views of the projections: one matmul
        and one view for self-attention, two when key is value (no ``add_bias_kv`` keys)."""
        H = self.num_heads
        if self._qkv_same_embed_dim and query is key and key is value:
            qkv = F.linear(query, module_member(self, "in_proj_weight"), self._in_bias(query.dtype))
            q, k, v = _packed_heads(qkv, 3, H, batch_first)
            return q, k, v
        if self._qkv_same_embed_dim and key is value:
            w_q, b_q, w_kv, b_kv = self._query_and_key_value_weights(query.dtype)
            k, v = _packed_heads(F.linear(key, w_kv, b_kv), 2, H, batch_first)
            return _split_heads(F.linear(query, w_q, b_q), H, batch_first), k, v
        q, k, v = self._in_projection(query, key, value)
        return _split_heads(q, H, batch_first), _split_heads(k, H, batch_first), _split_heads(v, H, batch_first)

    def _packed_self(self, plan: ForwardPlan) -> bool:
        """Whether one ``in_proj_weight`` projects a query that is also the key and value."""
        return self._qkv_same_embed_dim and plan.query is plan.key and plan.key is plan.value

    def _feature_major_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention heads ``(1, H, L, E // H)`` of one sequence ``x`` (``(L, 1, E)`` or
        ``(1, L, E)``) from one GEMM that writes the projection transposed, ``(3E, L)``:
        each head's queries, keys and values are then dense ``(E // H, L)`` matrices (the
        heads are their transposes). The weights path on the CPU (the tiled backend)
        reads them without copying keys and values to contiguous heads, and writes its
        output in the same layout, which ``out_proj`` reads as it is: two or three copies
        fewer a call. At N=1, E=512, H=8 (weights averaged, 2 threads, malloc never
        trimming) mha went from 0.90-0.93x torch to 0.96-0.97x at L=256 and from
        1.06-1.09x to 1.11-1.12x at L=4096 with this projection alone. Several sequences
        keep the position-major projection: one GEMM over every position and the key and
        value copies ran 1.16-1.19x torch at N=8, L=512, a batch of GEMMs without the
        copies 1.15x."""
        H, E = self.num_heads, self.embed_dim
        xt = x.reshape(-1, E).t()  # (E, L): a view for both layouts of one sequence
        weight, bias = module_member(self, "in_proj_weight"), self._in_bias(x.dtype)
        projected = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
        q, k, v = projected.view(1, 3, H, E // H, xt.shape[1]).transpose(3, 4).unbind(1)
        return q, k, v

    def _query_heads(self, query: Tensor, batch_first: bool) -> Tensor:
        """The query alone projected and split into heads ``(N, H, L, E // H)``."""
        E, b = self.embed_dim, self._in_bias(query.dtype)
        weight = module_member(self, "in_proj_weight")[:E] if self._qkv_same_embed_dim else module_member(self, "q_proj_weight")
        return _split_heads(F.linear(query, weight, None if b is None else b[:E]), self.num_heads, batch_first)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project to ``E`` features each, in the inputs' own layout. One matmul for
        self-attention (query is key is value), two when key is value."""
        if self._qkv_same_embed_dim and key is value and query is not key:
            w_q, b_q, w_kv, b_kv = self._query_and_key_value_weights(query.dtype)
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
            return F.linear(query, w_q, b_q), k, v
        b = self._in_bias(query.dtype)
        w = module_member(self, "in_proj_weight")
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
            return q, k, v
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, module_member(self, "q_proj_weight"), bq),
                F.linear(key, module_member(self, "k_proj_weight"), bk),
                F.linear(value, module_member(self, "v_proj_weight"), bv),
            )
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _query_and_key_value_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``in_proj_weight`` and ``in_proj_bias`` split into the query's rows and the keys'
        and values' (``(E, E)`` and ``(2E, E)``), one call each (slicing each twice costs
        two indexing calls more, Tensor.split its Python wrapper): ``w_q, b_q, w_kv, b_kv``."""
        E, b = self.embed_dim, self._in_bias(dtype)
        w_q, w_kv = module_member(self, "in_proj_weight").split_with_sizes((E, 2 * E))
        if b is None:
            return w_q, None, w_kv, None
        b_q, b_kv = b.split_with_sizes((E, 2 * E))
        return w_q, b_q, w_kv, b_kv

    def _in_bias(self, dtype: torch.dtype) -> Tensor | None:
        """``in_proj_bias`` in the inputs' dtype: a bias of another dtype is cast to it, in every
        layout (torch casts it with ``batch_first=True``, where its fused path runs, and
        raises in ``F.linear`` otherwise)."""
        b: Tensor | None = module_member(self, "in_proj_bias")
        return b if b is None or b.dtype == dtype else b.to(dtype)

    def _merged_heads_out(self, heads: Tensor, batch_first: bool) -> Tensor:
        """Heads ``(N, H, L, E // H)`` merged and through ``out_proj``: ``(L, N, E)``, or
        ``(N, L, E)`` with ``batch_first``, in torch's memory layout (see
        :func:`mha._script.sequence_major`)."""
        if sequence_major(batch_first, self.training):
            out = heads.permute(2, 0, 1, 3)
            out = self._out_projection(out.reshape(*out.shape[:2], self.embed_dim))
            return out.transpose(0, 1) if batch_first else out
        out = heads.permute(0, 2, 1, 3)
        return self._out_projection(out.reshape(*out.shape[:2], self.embed_dim))

    def _out_projection(self, x: Tensor) -> Tensor:
        """``out_proj`` on ``(..., E)``, as torch applies it: ``F.linear`` on its weight and
        bias (its hooks do not run, as in torch; a module call costs microseconds). An
        ``out_proj`` that is no longer torch's linear class (FSDP's wrapper of its own unit,
        ``fully_shard``'s or a parametrization's subclass) is called as a module: FSDP
        gathers the sharded weight in its hooks (torch's attention reads the shard there
        and fails)."""
        out_proj = module_member(self, "out_proj")
        if type(out_proj) is not NonDynamicallyQuantizableLinear and type(out_proj) is not nn.Linear:
            return out_proj(x)
        return F.linear(x, module_member(out_proj, "weight"), module_member(out_proj, "bias"))


# Frames skipped to reach the line a warning names: torch.nn's (module calls, hooks, torch's
# transformer layers) and mha's own (its transformer layers).
_INTERNAL_FILES = (os.path.dirname(nn.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for a warning from :meth:`MultiheadAttention.forward` that names
    the first line outside torch.nn and mha: the user's call, not the ``Module`` call's
    frames, nor torch's transformer layer that called the attention (each of its layers
    would name one line of torch's, and warn once for the whole program)."""
    frame = sys._getframe(2)  # forward's caller
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame = frame.f_back
        level += 1
    return level


def _keep_whole_under_fsdp() -> None:
    """List :class:`MultiheadAttention` in FSDP's ``size_based_auto_wrap_policy``
    ``FORCE_LEAF_MODULES``, where torch lists its own attention, once FSDP's wrap module is
    imported, so that the policy wraps the two as torch's alone (a unit of ``out_proj``'s
    own runs too, through :meth:`MultiheadAttention._out_projection`, but costs a
    gather of its own). Checked at import and when a module is built; importing FSDP for
    it would cost about a second."""
    wrap = sys.modules.get("torch.distributed.fsdp.wrap")
    leaves = getattr(getattr(wrap, "size_based_auto_wrap_policy", None), "FORCE_LEAF_MODULES", None)
    if isinstance(leaves, set):
        leaves.add(MultiheadAttention)


_keep_whole_under_fsdp()


def built_like(attention: nn.MultiheadAttention) -> MultiheadAttention:
    """A new :class:`MultiheadAttention` with the configuration, device, dtype and parameter
    values of torch's ``attention`` (copies): how mha's transformer layers replace the
    attention that torch's constructors build (with a seed, torch's initialisation)."""
    weight = attention.out_proj.weight
    new = MultiheadAttention(
        attention.embed_dim, attention.num_heads, dropout=attention.dropout,
        bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
        add_zero_attn=attention.add_zero_attn, kdim=attention.kdim, vdim=attention.vdim,
        batch_first=attention.batch_first, device=weight.device, dtype=weight.dtype,
    )
    new.load_state_dict(attention.state_dict())
    return new


def _split_heads(x: Tensor, heads: int, batch_first: bool) -> Tensor:
    """``(L, N, E)`` or ``(N, L, E)`` -> ``(N, heads, L, E // heads)``, a view."""
    A, B, E = x.shape  # read once: each read builds a torch.Size
    x = x.view(A, B, heads, E // heads)  # Tensor.unflatten costs Python
    return x.permute((0, 2, 1, 3) if batch_first else (1, 2, 0, 3))


def _packed_heads(x: Tensor, count: int, heads: int, batch_first: bool) -> tuple[Tensor, ...]:
    """``(L, N, count * E)`` (or ``(N, L, count * E)``), ``count`` projections side by side,
    -> ``count`` views ``(N, heads, L, E // heads)``: one view, one permute."""
    A, B, width = x.shape
    x = x.view(A, B, count, heads, width // (count * heads))
    return x.permute((2, 0, 3, 1, 4) if batch_first else (2, 1, 3, 0, 4)).unbind(0)


def _batched_token(token: Tensor, N: int, batch_first: bool) -> Tensor:
    """A learned ``(1, 1, E)`` key or value repeated over the batch, in the inputs' layout."""
    return token.expand(N, 1, -1) if batch_first else token.expand(1, N, -1)
