"""The forward that ``torch.jit.script`` compiles and ``torch.jit.trace`` records.

TorchScript compiles a subset of Python, and a trace keeps only the tensor
operations one call ran. Neither fits the eager forward, which reads mask values
to pick its route (causal recognition, right padding dropped before the
projections) and runs variable-length batches. Both get this dense forward
instead, with the module's semantics:

* ``key_padding_mask`` ``(N, S)`` and ``attn_mask`` ``(L, S)``, ``(N*h, L, S)`` or
  ``(N, h, L, S)``, boolean (True = blocked) or float (added), merged into one
  additive mask broadcast over ``(N, h, L, S)`` at the smallest shape the masks
  need, never expanded to ``(N*h, L, S)``;
* ``is_causal=True`` means top-left causal, with or without ``attn_mask`` (both apply);
* ``add_bias_kv`` and ``add_zero_attn`` append keys open to every query;
* a query row with every key blocked gets zero attention (``p = 0``, output
  ``out_proj.bias``), never NaN, and finite gradients.

Without weights, attention runs in
``torch.nn.functional.scaled_dot_product_attention`` (fully masked rows opened for the
kernel and zeroed after it); with weights, the ``(N, h, L, S)`` scores are materialised.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScriptableAttention(nn.Module):
    """Base class of :class:`mha.MultiheadAttention`: the attributes its forward reads and
    :meth:`_forward_scripted`, the forward for ``torch.jit.script`` and ``torch.jit.trace``.

    The attribute annotations are for type checkers only: TorchScript infers each
    attribute's type from its value, so a ``None`` parameter (``in_proj_weight``
    with ``kdim != embed_dim``, ``bias_k`` without ``add_bias_kv``) compiles away
    the branches that would use it.
    """

    if TYPE_CHECKING:
        embed_dim: int
        kdim: int
        vdim: int
        num_heads: int
        dropout: float
        batch_first: bool
        add_zero_attn: bool
        in_proj_weight: Tensor
        q_proj_weight: Tensor
        k_proj_weight: Tensor
        v_proj_weight: Tensor
        in_proj_bias: Tensor | None
        bias_k: Tensor | None
        bias_v: Tensor | None
        out_proj: nn.Linear

    def _forward_scripted(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``forward`` for dense inputs, in TorchScript's subset of Python; same arguments,
        shapes and results as ``mha.MultiheadAttention.forward``."""
        if torch.jit.is_scripting():
            self._check_call(query, key, value, key_padding_mask, attn_mask)
        else:
            # Under torch.jit.trace every size is a tensor, and each comparison would warn
            # that the trace may not generalise. These checks only raise: nothing they
            # decide enters the trace.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_call(query, key, value, key_padding_mask, attn_mask)
        batched = query.dim() == 3
        # One tensor for all three takes one matmul. torch.jit.trace hands each input in as
        # its own tensor, so a trace packs only what is one tensor in every call.
        packed = query is key and key is value
        # Work batch-first, (N, L, E).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, S, H = query.shape[0], query.shape[1], key.shape[1], self.num_heads

        q, k, v = self._project(query, key, value, packed)
        extra = 0
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.expand(N, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, bias_v.expand(N, 1, self.embed_dim)], dim=1)
            extra += 1
        q, k, v = _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, k.shape[-1])], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, v.shape[-1])], dim=2)
            extra += 1

        dropout_p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if not need_weights and is_causal and key_padding_mask is None and attn_mask is None and extra == 0:
            # Causality alone leaves every row a key: SDPA's own causal kernels.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = _additive_mask(key_padding_mask, attn_mask, is_causal, N, H, L, S, extra, q)
            if need_weights:
                out, probs = _attend(q, k, v, mask, dropout_p)
                weights = probs.mean(dim=1) if average_attn_weights else probs
                if not batched:
                    weights = weights.squeeze(0)
            elif mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                opened, empty = _open_empty_rows(mask)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=opened.to(q.dtype), dropout_p=dropout_p)
                out = out.masked_fill(empty, 0.0)
        # (N, H, L, Dh) -> (L, N, E) or (N, L, E), in torch's memory layout (see sequence_major)
        if batched and sequence_major(self.batch_first, self.training):
            out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim))
            if self.batch_first:
                out = out.transpose(0, 1)
        else:
            out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
            if not batched:
                out = out.squeeze(0)
        return out, weights

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, packed: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections to ``E`` features each: ``(N, L, E)``, ``(N, S, E)``, ``(N, S, E)``;
        ``packed``: query, key and value are one tensor, projected in one matmul."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq: Tensor | None = None
        bk: Tensor | None = None
        bv: Tensor | None = None
        if b is not None:
            bq, bk, bv = b[:E], b[E : 2 * E], b[2 * E :]
        w = self.in_proj_weight
        if w is not None:
            if packed:
                q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
                return q, k, v
            return F.linear(query, w[:E], bq), F.linear(key, w[E : 2 * E], bk), F.linear(value, w[2 * E :], bv)
        return (
            F.linear(query, self.q_proj_weight, bq),
            F.linear(key, self.k_proj_weight, bk),
            F.linear(value, self.v_proj_weight, bv),
        )

    def _check_call(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> None:
        """The module's checks on shapes, dtypes and devices, in TorchScript's subset."""
        for t in (query, key, value):
            if t.is_nested:
                raise NotImplementedError(
                    "nested (variable-length) query, key or value is not supported by a scripted or traced "
                    "mha.MultiheadAttention; run the module in eager mode, or pad the batch and pass "
                    "key_padding_mask (N, S)"
                )
            if t.layout != torch.strided:
                raise TypeError(
                    "query, key and value must be dense (strided) tensors, got a sparse one; pass "
                    "query.to_dense() (key, value likewise)"
                )
        batched = query.dim() == 3
        bf = self.batch_first and batched
        q_name = ("(N, L, E)" if bf else "(L, N, E)") if batched else "(L, E)"
        k_name = ("(N, S, E)" if bf else "(S, N, E)") if batched else "(S, E)"
        v_name = ("(N, S, D)" if bf else "(S, N, D)") if batched else "(S, D)"
        if query.dim() != 2 and query.dim() != 3:
            raise ValueError(
                f"query must be 3-D (L, N, E) or (N, L, E) with batch_first (batched), or 2-D (L, E) "
                f"(unbatched), got {query.dim()}-D {_shape(query)}"
            )
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key {k_name} and value {v_name} must have query's {query.dim()} dimensions, got query "
                f"{_shape(query)}, key {_shape(key)}, value {_shape(value)}; batch all three or none"
            )
        param = self.out_proj.weight
        if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
            raise TypeError(
                f"query, key and value must share one floating-point dtype, got query {query.dtype}, "
                f"key {key.dtype}, value {value.dtype}; cast them, e.g. key.to(query.dtype)"
            )
        if query.dtype != param.dtype:
            raise TypeError(
                f"query, key and value are {query.dtype} but the module's parameters are {param.dtype}; "
                f"cast the module with module.to({query.dtype}) or the inputs with .to({param.dtype})"
            )
        if key.device != query.device or value.device != query.device or param.device != query.device:
            raise ValueError(
                f"query, key, value and the module must be on one device, got query on {query.device}, "
                f"key on {key.device}, value on {value.device}, module on {param.device}; move them with .to(device)"
            )
        E, kdim, vdim = self.embed_dim, self.kdim, self.vdim
        if query.shape[-1] != E:
            raise ValueError(
                f"query {q_name} = {_shape(query)} has E = {query.shape[-1]}, but the module was built with "
                f"embed_dim={E}; build it with embed_dim={query.shape[-1]} or project query to {E} features"
            )
        if key.shape[-1] != kdim:
            raise ValueError(
                f"key {k_name} = {_shape(key)} has {key.shape[-1]} features, expected kdim = {kdim}; pass a "
                f"key with {kdim} features or build the module with kdim={key.shape[-1]}"
            )
        if value.shape[-1] != vdim:
            raise ValueError(
                f"value {v_name} = {_shape(value)} has D = {value.shape[-1]}, expected vdim = {vdim}; pass a "
                f"value with D = {vdim} or build the module with vdim={value.shape[-1]}"
            )
        seq = 1 if bf else 0
        L, S = query.shape[seq], key.shape[seq]
        if value.shape[seq] != S:
            raise ValueError(
                f"key {k_name} = {_shape(key)} and value {v_name} = {_shape(value)} must have the same S "
                f"(one value per key), got S = {S} and {value.shape[seq]}"
            )
        N = 1
        if batched:
            N = query.shape[1 - seq]
            if key.shape[1 - seq] != N or value.shape[1 - seq] != N:
                raise ValueError(
                    f"query {q_name} = {_shape(query)}, key {k_name} = {_shape(key)} and value {v_name} = "
                    f"{_shape(value)} need the same batch size N; check batch_first={self.batch_first}"
                )
        if key_padding_mask is not None:
            _check_mask_type("key_padding_mask", key_padding_mask, query)
            expected = [N, S] if batched else [S]
            if list(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must be {'(N, S)' if batched else '(S,)'} = {_tuple(expected)}, "
                    f"got {_shape(key_padding_mask)}; it needs one entry per key position"
                    + ("; if it is (S, N), pass key_padding_mask.T" if list(key_padding_mask.shape) == [S, N] else "")
                )
        if attn_mask is not None:
            _check_mask_type("attn_mask", attn_mask, query)
            _check_attn_mask(attn_mask, batched, N, self.num_heads, L, S)


def _shape(t: Tensor) -> str:
    return _tuple(list(t.shape))


def _tuple(sizes: list[int]) -> str:
    """Sizes written as a Python tuple, in TorchScript too: ``(3, 5)``, ``(5,)``."""
    if len(sizes) == 1:
        return f"({sizes[0]},)"
    return "(" + ", ".join([str(s) for s in sizes]) + ")"


def _check_mask_type(name: str, mask: Tensor, query: Tensor) -> None:
    if mask.layout != torch.strided:
        raise TypeError(
            f"{name} {_shape(mask)} is sparse, not a dense (strided) tensor; masks are read as dense tensors: "
            f"pass {name}.to_dense()"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} {_shape(mask)} has dtype {mask.dtype}; pass a bool tensor (True = masked out), e.g. "
            f"{name}.bool(), or a float tensor added to the scores (-inf = masked out)"
        )
    if mask.device != query.device:
        raise ValueError(f"{name} is on {mask.device} but query is on {query.device}; move it with {name}.to(query.device)")


def _check_attn_mask(mask: Tensor, batched: bool, N: int, H: int, L: int, S: int) -> None:
    """attn_mask ``(L, S)``, ``(N*num_heads, L, S)``, ``(N|1, num_heads|1, L, S)``; unbatched
    ``(L, S)`` or ``(num_heads, L, S)``."""
    shape = list(mask.shape)
    if mask.dim() == 2 and shape == [L, S]:
        return
    if mask.dim() == 3 and shape == [N * H if batched else H, L, S]:
        return
    if (
        mask.dim() == 4
        and batched
        and shape[2:] == [L, S]
        and (shape[0] == 1 or shape[0] == N)
        and (shape[1] == 1 or shape[1] == H)
    ):
        return
    if batched:
        expected = (
            f"(L, S) = ({L}, {S}), (N*num_heads, L, S) = ({N * H}, {L}, {S}) or (N, num_heads, L, S) = "
            f"({N}, {H}, {L}, {S}) (N and num_heads may be 1 to broadcast)"
        )
    else:
        expected = f"(L, S) = ({L}, {S}) or (num_heads, L, S) = ({H}, {L}, {S}) (the query is unbatched)"
    hint = "; if it is (S, L), pass attn_mask.transpose(-2, -1)" if shape[-2:] == [S, L] and L != S else ""
    raise ValueError(f"attn_mask must be {expected}, got {mask.dim()}-D {_shape(mask)}{hint}")


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(N, L, E)`` -> ``(N, heads, L, E // heads)``."""
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)


def _as_additive(mask: Tensor, dtype: torch.dtype, inputs_dtype: torch.dtype) -> Tensor:
    """Bool (True = blocked) as 0 / -inf; float rounded to ``inputs_dtype`` (as eager mha and
    SDPA add it: -1e9 in float32 is -inf in float16), then in ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(inputs_dtype).to(dtype)


def _additive_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    N: int,
    H: int,
    L: int,
    S: int,
    extra: int,
    q: Tensor,
) -> Tensor | None:
    """Every mask as one additive tensor (0 = may attend, -inf = blocked, plus float masks),
    broadcastable to ``(N, H, L, S + extra)``: ``(1, 1, L, S)`` for an ``(L, S)`` mask,
    ``(N, 1, L, S)`` with key padding as well, ``(N, H, L, S)`` only for a per-head mask.
    The ``extra`` keys appended at the end are open to every query. Batched masks."""
    dtype = torch.float32 if q.dtype == torch.float16 or q.dtype == torch.bfloat16 else q.dtype
    mask: Tensor | None = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0).unsqueeze(0)
        elif attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(N, H, L, S)
        mask = _as_additive(attn_mask, dtype, q.dtype)
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype, q.dtype).unsqueeze(1).unsqueeze(1)
        mask = padding if mask is None else mask + padding
    if is_causal:
        blocked = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        causal = torch.zeros(L, S, dtype=dtype, device=q.device).masked_fill(blocked, float("-inf"))
        mask = causal if mask is None else mask + causal
    if mask is not None and extra > 0:
        mask = F.pad(mask, [0, extra])
    return mask


def _open_empty_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(opened, empty)``: the rows of an additive mask that block every key (all ``-inf``),
    found at the mask's own broadcast shape, as ``empty`` (``(..., L, 1)``, True = no key),
    and the mask with those rows opened (0). Attention under ``opened`` stays finite, its
    gradient too, on every kernel; zeroing the ``empty`` rows after it gives them zero
    attention."""
    empty = (mask == float("-inf")).all(dim=-1, keepdim=True)
    return mask.masked_fill(empty, 0.0), empty


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T / sqrt(Dk) + mask) v`` on ``(N, H, L, D)`` heads; returns the output
    ``(N, H, L, Dv)`` and the probabilities ``(N, H, L, S)`` after dropout. Softmax runs in
    fp32 for half inputs.

    A row whose mask blocks every key gets probabilities 0 (:func:`_open_empty_rows`)."""
    # A power, not math.sqrt: under torch.jit.trace the head dim is a tensor and stays one.
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if scores.dtype == torch.float16 or scores.dtype == torch.bfloat16:
        scores = scores.float()
    empty: Tensor | None = None
    if mask is not None:
        opened, empty = _open_empty_rows(mask)
        scores = scores + opened
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v), probs


def sequence_major(batch_first: bool, training: bool) -> bool:
    """Whether the output is laid out as torch lays it out outside its fused inference path:
    ``(L, N, E)`` contiguous, and its transpose with ``batch_first``. Always without
    ``batch_first`` (code after the module may ``view`` it), and in training with it,
    where torch's fused path never runs: the random numbers that a dropout after the
    attention draws follow the memory order, so a batch-first ``(N, L, E)`` contiguous
    output would drop other elements than torch's for the same random state. In eval
    with ``batch_first`` the output is ``(N, L, E)`` contiguous, as torch's fused path
    returns it (where torch's forward does not take that path, with autograd on, say,
    torch's is the transposed ``(L, N, E)``)."""
    return training or not batch_first
