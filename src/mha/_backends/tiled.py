"""The tiled backend: attention in tiles of query rows, in plain PyTorch ops.

It serves every call, and is the path for what SDPA cannot give: attention
weights (averaged over heads without keeping per-head weights beyond one
block), the log-sum-exp, and any mask. Memory beyond the outputs is one block
of scores (at most ``_BLOCK_BYTES``), whatever N and L are, and without autograd
a contiguous copy of the keys and values whose heads are not dense matrices
already (queries are copied a block at a time where they must be). Masks are
read at their own broadcast shape, one block of rows at a time.

Traced by ``torch.compile`` or ``torch.export``, a call is one block of all its
``(N, Hq, L, S)`` scores, as torch's own weights path computes them: a Python
loop over blocks would fix symbolic sizes to the traced ones.

Half-precision inputs are computed in fp32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from .._plan import Band, MaskPlan
from .._types import AttentionOutput, Call, Capabilities, in_functorch_transform, zeros_in_graph
from ._grouped import by_groups
from ._ops import masked_logsumexp, masked_softmax

# One block of scores: rows of one sequence up to _BLOCK_BYTES (fp32: 2^22 scores),
# several whole sequences together up to _BATCH_BLOCK_BYTES. Memory beyond the outputs
# never grows with L. Taller blocks feed the products more query rows at once; several
# sequences in one block only add memory that falls out of the caches. Without autograd
# (E=512, H=8, fp32, 2 threads, malloc never trimming, torch/mha for one budget of rows
# and sequences alike): N=1, L=4096 1.15x at 8 MiB, 1.23x at 16, 1.20x at 32; N=1,
# L=1024 0.87x, 0.86x, 0.95x; N=8, L=512, sequences grouped, 1.17x, 1.13x, 1.08x. Not
# 32 MiB: glibc serves 32 MiB and more with a fresh mmap on every call, whose page
# faults then cost more than the taller block gains (N=1, L=1024 with the default
# allocator: 1.40x at 8 MiB, 1.02x at 32). A budget in bytes, so that fp64 blocks stay
# below that too.
_BLOCK_BYTES = 1 << 24
_BATCH_BLOCK_BYTES = 1 << 23


def _block_shape(N: int, H: int, L: int, S: int, itemsize: int) -> tuple[int, int]:
    """``(sequences, rows)`` of one block of scores of ``itemsize`` bytes each: the rows of
    one sequence up to :data:`_BLOCK_BYTES`; whole sequences together up to
    :data:`_BATCH_BLOCK_BYTES`."""
    per_row = max(1, H * S) * itemsize
    rows = max(1, min(L, _BLOCK_BYTES // per_row))
    sequences = max(1, min(N, _BATCH_BLOCK_BYTES // (per_row * L))) if rows == L else 1
    return sequences, rows


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    """``(N, Hkv, S, D)`` -> ``(N, Hkv * groups, S, D)`` for GQA, sharing storage when groups == 1."""
    if groups == 1:
        return t
    N, Hkv, S, D = t.shape
    return t[:, :, None].expand(N, Hkv, groups, S, D).reshape(N, Hkv * groups, S, D)


def _may_empty_rows(call: Call) -> bool:
    """Whether some query row may have no key (then the NaN-safe softmax is needed)."""
    plan = call.plan
    if plan.has_tensors:
        return True
    _, _, _, L, S, _, _ = call.shape
    if plan.lengths is not None and (S == 0 or bool((plan.lengths <= 0).any())):
        return True
    if plan.band is not None:
        first, last = plan.band.rows_with_keys(L, S)
        if first > 0 or last < L:
            return True
        if plan.lengths is not None and plan.band.lo is not None:
            return True
    return S == 0


class _Tiled:
    name = "tiled"
    caps = Capabilities(label="the tiled backend")

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        sequences, rows = _block_shape(N, H, L, S, score_bytes)
        block = sequences * H * rows * S
        return f"one block of ~{block} scores (x2)", 2 * block * score_bytes

    def forward(self, call: Call) -> AttentionOutput:
        return by_groups(call, self._dense) if call.is_varlen else self._dense(call)

    def _dense(self, call: Call) -> AttentionOutput:
        N, Hq, _, L, S, _, _ = call.shape
        in_dtype = call.query.dtype
        dtype = in_dtype if in_dtype in (torch.float32, torch.float64) else torch.float32
        device = call.query.device
        if N == 0 or L == 0:
            return _empty(call, device)
        if torch.compiler.is_compiling():
            # Traced by torch.compile or torch.export, the sizes may be symbolic (dynamo shows
            # them as ints, so that cannot be told here): a loop whose trip count depends on
            # them would specialise them to the traced ones.
            return _output(_one_block(call, dtype), in_dtype)
        may_empty = _may_empty_rows(call)
        batches, rows = _block_shape(N, Hq, L, S, dtype.itemsize)
        lengths = None if call.plan.lengths is None else call.plan.lengths.tolist()
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (call.query, call.key, call.value, *call.plan.bias)
        )
        # Inside a torch.func transform or under forward-mode AD, as for autograd, plain ops
        # without out= or writes into fresh buffers: vmap batches neither, and forward AD
        # differentiates neither.
        collect = grad or in_functorch_transform() or forward_ad._current_level >= 0
        sink = _Blocks(call, dtype) if collect else _Buffers(call, dtype, batches * Hq * rows * S, rows == L)
        for n0 in range(0, N, batches):
            n1 = min(N, n0 + batches)
            plan = call.plan if batches >= N else call.plan.batch_slice(n0, n1)
            key_limit = S if lengths is None else max(0, min(S, max(lengths[n0:n1])))
            for start in range(0, L, rows):
                stop = min(L, start + rows)
                # Keys that the band and the lengths leave open to some row of this block:
                # blocks wholly above a causal diagonal or past every length are skipped.
                k0, k1 = _key_range(call.plan.band, start, stop, key_limit)
                # No key open (k0 == k1): empty, and the output 0. Without autograd the
                # probabilities overwrite the scores: no second buffer of a block's size.
                _attend(call, plan, sink, (n0, n1, start, stop, k0, k1), dtype, may_empty, not (collect or may_empty))
            sink.end_batch()
        return _output(sink.result(), in_dtype)


def _attend(
    call: Call, plan: MaskPlan, sink: _Blocks | _Buffers, block: Block, dtype: torch.dtype, may_empty: bool,
    in_place: bool,
) -> None:
    """One block into ``sink``: its ``(n1 - n0, Hq, stop - start, k1 - k0)`` scores, masked
    by ``plan`` (the call's, or its slice of the block's sequences); their log-sum-exp and
    softmax, NaN-safe where some row ``may_empty``, the probabilities written over the
    scores where ``in_place``; dropout; the products."""
    scores = sink.scores(block)
    if not plan.is_empty:
        scores = _masked(scores, plan, block, call.key.shape[2], dtype, call.query.device)
    lse = (masked_logsumexp if may_empty else _logsumexp)(scores) if call.return_lse else None
    if in_place:
        probs = torch.softmax(scores, -1, out=scores)
    else:
        probs = masked_softmax(scores) if may_empty else _softmax(scores)
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)
    sink.put(block, probs, lse)


def _one_block(call: Call, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The dense call as one block of all its ``(N, Hq, L, S)`` scores: traced without
    specialising symbolic sizes (no Python loop over blocks, no key range read off the
    band), in as much memory as torch's own weights path. Through :class:`_Blocks`, plain
    ops without ``out=``; any row may be empty (the mask's values are not read here).
    Returns the output ``(N, Hq, L, Dv)``, the weights ``(N, L, S)`` or ``(N, Hq, L, S)``
    and the lse ``(N, Hq, L)`` (each where asked for) in ``dtype``."""
    N, _, _, L, S, _, _ = call.shape
    sink = _Blocks(call, dtype)
    _attend(call, call.plan, sink, (0, N, 0, L, 0, S), dtype, may_empty=True, in_place=False)
    sink.end_batch()
    return sink.result()


def _masked(scores: Tensor, plan: MaskPlan, block: Block, S: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A block's scores with the plan's bias added and its blocked positions at ``-inf``."""
    _, _, start, stop, k0, k1 = block
    bias = plan.bias_rows(start, stop, dtype, device)
    if bias is not None:
        scores = scores + _keys(bias, k0, k1)
    allowed = plan.allowed_rows(start, stop, S, device)
    if allowed is not None:
        scores = scores.masked_fill(~_keys(allowed, k0, k1), float("-inf"))
    return scores


Block = tuple[int, int, int, int, int, int]  # n0, n1, start, stop, k0, k1


class _Blocks:
    """Results collected block by block and concatenated at the end: what autograd needs."""

    def __init__(self, call: Call, dtype: torch.dtype) -> None:
        _, Hq, Hkv, _, self.S, _, _ = call.shape
        self.weights = call.weights
        self.q = call.query.to(dtype) * call.scale
        self.kt = _expand_kv(call.key.to(dtype), Hq // Hkv).transpose(-1, -2)
        self.v = _expand_kv(call.value.to(dtype), Hq // Hkv)
        self.outs: list[Tensor] = []
        self.ws: list[Tensor] = []
        self.lses: list[Tensor] = []
        self.row_outs: list[Tensor] = []
        self.row_ws: list[Tensor] = []
        self.row_lses: list[Tensor] = []

    def scores(self, block: Block) -> Tensor:
        """``(n1 - n0, Hq, stop - start, k1 - k0)`` scaled scores of the block."""
        n0, n1, start, stop, k0, k1 = block
        return torch.matmul(self.q[n0:n1, :, start:stop], self.kt[n0:n1, :, :, k0:k1])

    def put(self, block: Block, probs: Tensor, lse: Tensor | None) -> None:
        n0, n1, _, _, k0, k1 = block
        self.row_outs.append(torch.matmul(probs, self.v[n0:n1, :, k0:k1]))
        if lse is not None:
            self.row_lses.append(lse)
        if self.weights is not None and (k0 > 0 or k1 < self.S):
            probs = F.pad(probs, (k0, self.S - k1))
        if self.weights == "mean":
            self.row_ws.append(probs.mean(dim=1))
        elif self.weights == "per_head":
            self.row_ws.append(probs)

    def end_batch(self) -> None:
        self.outs.append(_cat(self.row_outs, 2))
        if self.row_ws:
            self.ws.append(_cat(self.row_ws, 1 if self.weights == "mean" else 2))
        if self.row_lses:
            self.lses.append(_cat(self.row_lses, 2))
        self.row_outs, self.row_ws, self.row_lses = [], [], []

    def result(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return _cat(self.outs, 0), _cat(self.ws, 0) if self.ws else None, _cat(self.lses, 0) if self.lses else None


class _Buffers:
    """Without autograd: every block's scores in one buffer allocated once (``scores``
    elements), its products and weights written straight into results allocated once.
    Memory beyond the results is that buffer; no fresh block-sized tensor a block, no
    copy of the weights, a copy of a block's output only where noted below.

    Keys and values whose heads are not dense matrices are copied once into contiguous
    ``(N, Hq, S, D)`` tensors, so that the products read rows of contiguous heads, not
    rows strided across the projection's ``(N, S, 3E)`` (P @ V ran 20-50% slower on
    strided V at L = 128-1024); heads stored transposed (the module's feature-major
    projection) are dense already and are read as they are, queries and keys always,
    values when a block holds every query row (P @ V on transposed values in blocks of
    rows ran 10% slower than on a copy). When a block holds every query row the output
    takes the query's layout: transposed heads get their output transposed, ``V^T P^T``,
    which the module's ``out_proj`` reads without a copy. With blocks of fewer rows the
    output is contiguous: a block's rows as columns of a transposed output, or as rows
    of a taller one, are slow through ``bmm``'s ``out=`` (5-25% at N=1, L=1024-4096), so
    a strided block of rows is computed and then copied. The scale multiplies the
    product (``baddbmm``'s alpha), not a copy of the queries."""

    def __init__(self, call: Call, dtype: torch.dtype, scores: int, all_rows: bool) -> None:
        N, Hq, Hkv, L, S, _, Dv = call.shape
        self.q, self.scale, self.Hq = _as(call.query, dtype), call.scale, Hq
        self.k = _dense_heads(_expand_kv(_as(call.key, dtype), Hq // Hkv))
        v = _expand_kv(_as(call.value, dtype), Hq // Hkv)
        self.v = _dense_heads(v) if all_rows else v.contiguous()
        self.buffer = self.v.new_empty(scores)
        self.weights = call.weights
        # (N, Hq, L, Dv), stored as (N, Hq, Dv, L) when the query's heads are transposed.
        self.transposed_out = all_rows and _transposed_heads(self.q)
        self.out = (
            self.v.new_empty(N, Hq, Dv, L).transpose(2, 3) if self.transposed_out else self.v.new_empty(N, Hq, L, Dv)
        )
        # Keys a band or the lengths close are never written: zeros there.
        closed = call.plan.band is not None or call.plan.lengths is not None
        self.w: Tensor | None = None
        if call.weights is not None:
            shape = (N, L, S) if call.weights == "mean" else (N, Hq, L, S)
            self.w = self.v.new_zeros(shape) if closed else self.v.new_empty(shape)
        self.lse = self.v.new_empty(N, Hq, L) if call.return_lse else None
        # Heads flattened once, (N * Hq, rows, features): a block is a slice of each. Queries
        # whose heads flatten only through a copy (position-major, several sequences) are
        # flattened a block at a time instead: a block of one sequence is then a view.
        self.q3 = self.q.flatten(0, 1) if _flattens(self.q) else None
        self.k3, self.v3, self.out3 = (t.flatten(0, 1) for t in (self.k, self.v, self.out))

    def scores(self, block: Block) -> Tensor:
        n0, n1, start, stop, k0, k1 = block
        heads = slice(n0 * self.Hq, n1 * self.Hq)
        q = self.q[n0:n1, :, start:stop].flatten(0, 1) if self.q3 is None else self.q3[heads, start:stop]
        kt = self.k3[heads, k0:k1].transpose(1, 2)
        B, rows, keys = q.shape[0], stop - start, k1 - k0
        scores = self.buffer[: B * rows * keys].view(B, rows, keys)
        return scores.baddbmm_(q, kt, beta=0, alpha=self.scale).view(n1 - n0, self.Hq, rows, keys)

    def put(self, block: Block, probs: Tensor, lse: Tensor | None) -> None:
        n0, n1, start, stop, k0, k1 = block
        heads = slice(n0 * self.Hq, n1 * self.Hq)
        probs_flat, v, rows = probs.flatten(0, 1), self.v3[heads, k0:k1], self.out3[heads, start:stop]
        if self.transposed_out:
            # out^T = V^T P^T, into the columns [start, stop) of each head's (Dv, L) matrix.
            torch.bmm(v.transpose(1, 2), probs_flat.transpose(1, 2), out=rows.transpose(1, 2))
        elif rows.is_contiguous():
            torch.bmm(probs_flat, v, out=rows)
        else:
            # Rows of a taller output: bmm into a strided out= runs a slow path (at N=1,
            # L=1024, H=8 in blocks of 512 rows, 3.7 ms against 3.0 for bmm and a copy).
            rows.copy_(torch.bmm(probs_flat, v))
        if self.lse is not None and lse is not None:
            self.lse[n0:n1, :, start:stop] = lse
        if self.w is not None and self.weights == "mean":
            # The sum here, the division by Hq once at the end (as torch's own path does).
            torch.sum(probs, dim=1, out=self.w[n0:n1, start:stop, k0:k1])
        elif self.w is not None:
            self.w[n0:n1, :, start:stop, k0:k1] = probs

    def end_batch(self) -> None:
        """Nothing to gather: every block is written in place."""

    def result(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.w is not None and self.weights == "mean":
            self.w.div_(self.Hq)
        return self.out, self.w, self.lse


def _output(result: tuple[Tensor, Tensor | None, Tensor | None], dtype: torch.dtype) -> AttentionOutput:
    """``(output, weights, lse)`` computed in another dtype, as :class:`AttentionOutput` in ``dtype``."""
    out, w, lse = result
    return AttentionOutput(_as(out, dtype), None if w is None else _as(w, dtype), None if lse is None else _as(lse, dtype))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a call when it already is (``Tensor.to`` costs a microsecond)."""
    return t if t.dtype == dtype else t.to(dtype)


def _transposed_heads(t: Tensor) -> bool:
    """Whether the heads of ``(N, H, X, D)`` are stored transposed: ``(N, H, D, X)`` contiguous."""
    return not t.is_contiguous() and t.transpose(2, 3).is_contiguous()


def _flattens(t: Tensor) -> bool:
    """Whether ``(N, H, X, D)`` flattens to ``(N * H, X, D)`` as a view, without a copy."""
    N, H = t.shape[:2]
    return N == 1 or H == 1 or t.stride(0) == H * t.stride(1)


def _dense_heads(t: Tensor) -> Tensor:
    """``t`` with each head a dense matrix, stored as is or transposed: copied only when not."""
    return t if _transposed_heads(t) else t.contiguous()


def _key_range(band: Band | None, start: int, stop: int, key_limit: int) -> tuple[int, int]:
    """Keys ``[k0, k1)`` open to at least one of the query rows ``[start, stop)``."""
    k0, k1 = 0, key_limit
    if band is not None:
        if band.lo is not None:
            k0 = max(0, start + band.lo)
        if band.hi is not None:
            k1 = min(k1, stop + band.hi)
    return min(k0, key_limit), max(min(k0, key_limit), k1)


def _keys(t: Tensor, k0: int, k1: int) -> Tensor:
    """Keys ``[k0, k1)`` of a mask tensor whose key dimension may be broadcast."""
    return t if t.shape[-1] == 1 else t[..., k0:k1]


def _softmax(scores: Tensor) -> Tensor:
    return torch.softmax(scores, dim=-1)


def _logsumexp(scores: Tensor) -> Tensor:
    return torch.logsumexp(scores, dim=-1)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _empty(call: Call, device: torch.device) -> AttentionOutput:
    """The result for N == 0 or L == 0: every output is empty. The output ``(N, Hq, L, Dv)``
    stays in the inputs' graph, so that ``backward()`` gives them zero gradients."""
    N, Hq, _, L, S, _, Dv = call.shape
    out = zeros_in_graph((N, Hq, L, Dv), call.query, call.key, call.value, *call.plan.bias)
    w = None
    if call.weights == "mean":
        w = torch.zeros(N, L, S, dtype=call.query.dtype, device=device)
    elif call.weights == "per_head":
        w = torch.zeros(N, Hq, L, S, dtype=call.query.dtype, device=device)
    lse = torch.full((N, Hq, L), float("-inf"), dtype=call.query.dtype, device=device) if call.return_lse else None
    return AttentionOutput(out, w, lse)


BACKEND = _Tiled()
