"""Triton kernels of the triton backend: forward, averaged/per-head weights, backward.

Imported only when a Triton kernel runs (``import triton`` happens here). Every
kernel reads q ``(N, Hq, L, Dk)``, k ``(N, Hkv, S, Dk)`` and v ``(N, Hkv, S, Dv)``
through their strides; query head ``h`` reads key/value head ``h // GROUPS``.
Head dims are padded to a power of two (at least 16, what ``tl.dot`` needs)
with masked loads. Scores are kept in log2 units (``exp2`` is the fast
exponential).

The forward stores, per query row, the lse ``m + log2 l`` (log2 units) that the
caller sees, and apart from it the two numbers it is made of: the row maximum
``m`` and ``log2 l``, ``l = sum_j 2^(s_ij - m)``. The weights and backward
kernels recompute ``p = 2^((s - m) - log2 l)`` from those two: a row whose
scores are huge (a bias of ``-1e10`` on every key) keeps ``log2 l`` exactly,
where ``m + log2 l`` would round it away and give weights that sum to ``l``.

Variable-length batches (``VARLEN``) run through the same forward and backward
kernels: q is packed ``(Tq, Hq, Dk)``, k ``(Tk, Hkv, Dk)`` and v ``(Tk, Hkv, Dv)``,
and sequence ``n`` owns query rows ``QOff[n]:QOff[n + 1]`` and key rows
``KOff[n]:KOff[n + 1]`` (int32 offsets, cu_seqlens style). A packed tensor is read
as a batch of stride 0 whose base moves to the sequence's first row, so one
launch covers every sequence; programs past their sequence's length find an
empty range of rows or keys and store nothing. The lse is then packed ``(Hq, Tq)``.

Masks come as a :class:`~mha._plan.MaskPlan`'s primitives, passed to every
kernel as one :class:`MaskArgs` record whose field names are the kernels'
parameter names:

* a band ``i + lo <= j <= i + hi`` (either side optional), which also decides
  which key blocks (forward, dq) or query blocks (dk/dv) are visited at all;
* key lengths ``(N,)``, int32 within ``0..S``: keys at and past the length are
  neither loaded nor visited;
* one boolean ``allowed`` and one additive ``bias`` tensor, read through their
  broadcast strides (0 where a dimension is 1), never expanded. ``-inf`` in the
  bias blocks a key; finite biases beyond ``+-2.35e38`` (whose scores would leave
  fp32's range in log2 units) count as ``+-2.35e38``, so a row of
  ``torch.finfo(torch.float32).min`` averages its keys uniformly, as plain PyTorch
  does (its lse is then about ``-2.35e38`` where plain PyTorch gives ``-3.4e38``),
  and a row whose keys have a bias of ``3e38`` averages those keys.

Variable-length batches take the band only, aligned per sequence: ``lo``/``hi``
are a square sequence's offsets, and ``BOTTOM_RIGHT`` shifts both by
``S_n - L_n`` in sequence ``n``.

No atomics anywhere: dk/dv are summed over the query heads of a GQA group
inside one program, and dq has its own kernel, so every result is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_LOG2E = 1.4426950408889634


class MaskArgs(NamedTuple):
    """A mask plan as kernel arguments (pass as ``**masks._asdict()``).

    ``Lens`` int32 ``(N,)`` key lengths; ``Allowed`` (uint8 view of a bool) and
    ``Bias`` tensors broadcastable to ``(N, Hq, L, S)`` with their batch, head, row
    and key strides (0 where broadcast); the band ``i + lo <= j <= i + hi``; and the
    constexpr flags saying which pieces are present."""

    Lens: Tensor | None
    Allowed: Tensor | None
    san: int
    sah: int
    sal: int
    sas: int
    Bias: Tensor | None
    sbn: int
    sbh: int
    sbl: int
    sbs: int
    lo: int
    hi: int
    HAS_LENS: bool
    HAS_ALLOWED: bool
    HAS_BIAS: bool
    HAS_LO: bool
    HAS_HI: bool


class Layout(NamedTuple):
    """Padded (``VARLEN`` False) or packed batches with their int32 offsets ``(N + 1,)``."""

    QOff: Tensor | None
    KOff: Tensor | None
    VARLEN: bool
    BOTTOM_RIGHT: bool


class WeightsGrad(NamedTuple):
    """The gradient ``DW`` reaching the weights, with its batch, head, row and key strides
    (head stride 0 for averaged weights) and ``w_scale`` (``1 / Hq`` for averaged
    weights, 1 per head): it adds ``w_scale * DW`` to ``dp = dO v^T``."""

    DW: Tensor | None
    swn: int
    swh: int
    swl: int
    sws: int
    w_scale: float
    HAS_DW: bool


_DENSE = Layout(None, None, False, False)
_NO_DW = WeightsGrad(None, 0, 0, 0, 0, 0.0, False)


@triton.jit
def _tile(Ptr, n, h, offs_m, offs_n, s_n, s_h, s_l, s_s, mask, other):
    """The ``(rows, keys)`` tile of a 4-D tensor read through its strides."""
    return tl.load(Ptr + n * s_n + h * s_h + offs_m[:, None] * s_l + offs_n[None, :] * s_s, mask=mask, other=other)


@triton.jit
def _rows(Ptr, n, h, offs_m, L, offs_d, D, s_n, s_h, s_l, s_d):
    """The ``(rows, D)`` tile of a q-like tensor (q, dO): rows ``offs_m`` of batch ``n``, head ``h``."""
    mask = (offs_m < L)[:, None] & (offs_d < D)[None, :]
    return tl.load(Ptr + n * s_n + h * s_h + offs_m[:, None] * s_l + offs_d[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _keys(Ptr, offs_n, end, offs_d, D, s_s, s_d):
    """The ``(keys, D)`` tile of a k-like tensor whose base is already at its batch and head."""
    mask = (offs_n < end)[:, None] & (offs_d < D)[None, :]
    return tl.load(Ptr + offs_n[:, None] * s_s + offs_d[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _key_length(Lens, n, S, HAS_LENS: tl.constexpr):
    """The number of keys batch row ``n`` may attend: ``Lens[n]`` (within ``0..S``) or ``S``."""
    kv_len = S
    if HAS_LENS:
        kv_len = tl.load(Lens + n)
    return kv_len


@triton.jit
def _key_range(m0, L, BLOCK_M: tl.constexpr, kv_len, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Half-open range of keys that rows ``[m0, m0 + BLOCK_M)`` may attend: empty when
    the block starts at or past ``L`` (a packed sequence shorter than the grid)."""
    start = 0
    end = tl.where(m0 < L, kv_len, 0)
    if HAS_LO:
        start = tl.maximum(m0 + lo, 0)
    if HAS_HI:
        end = tl.minimum(end, tl.minimum(m0 + BLOCK_M, L) - 1 + hi + 1)
    return start, end


@triton.jit
def _sequence(QOff, KOff, n, lo, hi, BOTTOM_RIGHT: tl.constexpr):
    """Sequence ``n`` of a packed batch: its first query row, first key row,
    ``L_n``, ``S_n`` and the band offsets aligned to it."""
    q0 = tl.load(QOff + n)
    k0 = tl.load(KOff + n)
    L = tl.load(QOff + n + 1) - q0
    S = tl.load(KOff + n + 1) - k0
    if BOTTOM_RIGHT:
        lo += S - L
        hi += S - L
    return q0.to(tl.int64), k0.to(tl.int64), L, S, lo, hi


@triton.jit
def _row_stats(Stat, row, s_stat, offs_m, L):
    """The forward's row maximum ``m`` (0 for rows without keys) and ``log2 l``."""
    m = tl.load(Stat + row + offs_m, mask=offs_m < L, other=0.0)
    log2l = tl.load(Stat + s_stat + row + offs_m, mask=offs_m < L, other=0.0)
    return tl.where(m == float("-inf"), 0.0, m), log2l


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32. ``PRECISION="upcast"`` computes in fp32 from
    the start: Triton's interpreter multiplies the bit patterns of bfloat16
    operands as integers, so bf16 tiles are widened first (exact: bf16 products
    are exact in fp32, as on the GPU's tensor cores)."""
    if PRECISION == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _scores(
    q, k, qk_scale, n, h, offs_m, offs_n, L, kv_len, lo, hi,
    Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores ``q k^T * qk_scale`` (log2 units) of one tile with the bias added and ``-inf``
    where a key is blocked. A bias of ``-inf`` blocks; finite ones are clamped to
    ``[-2.35e38, 2.35e38]`` (just inside ``FLT_MAX ln 2``), so that in log2 units they
    stay finite instead of overflowing to ``-inf`` (or to ``+inf``, which made rows NaN)."""
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    keep = (offs_m < L)[:, None] & (offs_n < kv_len)[None, :]
    if HAS_LO:
        keep &= offs_n[None, :] >= offs_m[:, None] + lo
    if HAS_HI:
        keep &= offs_n[None, :] <= offs_m[:, None] + hi
    if HAS_ALLOWED:
        keep &= _tile(Allowed, n, h, offs_m, offs_n, san, sah, sal, sas, keep, 0) != 0
    if HAS_BIAS:
        b = _tile(Bias, n, h, offs_m, offs_n, sbn, sbh, sbl, sbs, keep, 0.0).to(tl.float32)
        keep &= b != float("-inf")
        s += tl.minimum(tl.maximum(b, -2.35e38), 2.35e38) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, Stat,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, son, soh, sol, sod, sln, slh, s_stat,
    Hq, L, S, Dk, Dv, GROUPS, qk_scale,
    Lens, Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs, lo, hi,
    QOff, KOff,
    HAS_LENS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Output, lse and the row statistics for one block of query rows of one query head."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // Hq).to(tl.int64)
    h = pid_nh % Hq
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    if VARLEN:
        q0, k0, L, S, lo, hi = _sequence(QOff, KOff, n, lo, hi, BOTTOM_RIGHT)
        Q += q0 * sql
        Out += q0 * sol
        LSE += q0
        Stat += q0
        K += k0 * sks
        V += k0 * svs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _rows(Q, n, h, offs_m, L, offs_dk, Dk, sqn, sqh, sql, sqd)
    kv_len = _key_length(Lens, n, S, HAS_LENS)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    start = (start // BLOCK_N) * BLOCK_N
    K += n * skn + hk * skh
    V += n * svn + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _keys(K, offs_n, end, offs_dk, Dk, sks, skd)
        s = _scores(
            q, k, qk_scale, n, h, offs_m, offs_n, L, end, lo, hi,
            Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
            HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _keys(V, offs_n, end, offs_dv, Dv, svs, svd)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    log2l = tl.log2(tl.where(empty, 1.0, l_i))
    tl.store(
        Out + n * son + h * soh + offs_m[:, None] * sol + offs_dv[None, :] * sod,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_dv < Dv)[None, :],
    )
    row = n * sln + h * slh + offs_m
    tl.store(LSE + row, tl.where(empty, float("-inf"), m_i + log2l), mask=offs_m < L)
    tl.store(Stat + row, tl.where(empty, float("-inf"), m_i), mask=offs_m < L)
    tl.store(Stat + s_stat + row, log2l, mask=offs_m < L)


@triton.jit
def _weights_kernel(
    Q, K, Stat, W,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, swn, swh, swl, sws, s_stat,
    Hq, L, S, Dk, GROUPS, qk_scale, key_tiles,
    Lens, Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs, lo, hi,
    HAS_LENS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``p = 2^((s - m) - log2 l)``: for one head
    (``PER_HEAD``) or summed over all ``Hq`` heads in registers and divided by ``Hq``.
    The tiles of one head run along the grid's first axis, ``key_tiles`` per row of
    tiles (the second axis would stop at 65535 tiles, about 4M keys)."""
    pid_m = tl.program_id(0) // key_tiles
    pid_n = tl.program_id(0) % key_tiles
    pid_z = tl.program_id(1)
    if PER_HEAD:
        n = (pid_z // Hq).to(tl.int64)
        h_first = pid_z % Hq
        heads = 1
    else:
        n = pid_z.to(tl.int64)
        h_first = 0
        heads = Hq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    kv_len = _key_length(Lens, n, S, HAS_LENS)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if (start < pid_n * BLOCK_N + BLOCK_N) & (end > pid_n * BLOCK_N):
        for h in range(h_first, h_first + heads):
            q = _rows(Q, n, h, offs_m, L, offs_dk, Dk, sqn, sqh, sql, sqd)
            k = tl.load(
                K + n * skn + (h // GROUPS) * skh + offs_n[:, None] * sks + offs_dk[None, :] * skd,
                mask=(offs_n < end)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
            )
            s = _scores(
                q, k, qk_scale, n, h, offs_m, offs_n, L, end, lo, hi,
                Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
                HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, PRECISION,
            )
            m, log2l = _row_stats(Stat, (n * Hq + h) * L, s_stat, offs_m, L)
            acc += tl.exp2((s - m[:, None]) - log2l[:, None])
    if not PER_HEAD:
        acc = acc / Hq
    tl.store(
        W + n * swn + h_first * swh + offs_m[:, None] * swl + offs_n[None, :] * sws,
        acc.to(W.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_n < S)[None, :],
    )


@triton.jit
def _bwd_weights_delta_kernel(
    Q, K, Stat, DeltaW,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, s_stat,
    Hq, L, S, Dk, GROUPS, qk_scale,
    Lens, Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs, lo, hi,
    DW, swn, swh, swl, sws, w_scale,
    HAS_LENS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr,
):
    """``w_scale * sum_j p_ij DW_ij`` for one block of query rows of one query head: what
    the gradient of the weights adds to the backward's ``delta = sum_j p_ij dp_ij``."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // Hq).to(tl.int64)
    h = pid_nh % Hq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    q = _rows(Q, n, h, offs_m, L, offs_dk, Dk, sqn, sqh, sql, sqd)
    row = (n * Hq + h) * L
    m, log2l = _row_stats(Stat, row, s_stat, offs_m, L)
    kv_len = _key_length(Lens, n, S, HAS_LENS)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    start = (start // BLOCK_N) * BLOCK_N
    K += n * skn + (h // GROUPS) * skh
    acc = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _keys(K, offs_n, end, offs_dk, Dk, sks, skd)
        s = _scores(
            q, k, qk_scale, n, h, offs_m, offs_n, L, end, lo, hi,
            Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
            HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, PRECISION,
        )
        p = tl.exp2((s - m[:, None]) - log2l[:, None])
        keys = (offs_m < L)[:, None] & (offs_n < end)[None, :]
        acc += tl.sum(p * _tile(DW, n, h, offs_m, offs_n, swn, swh, swl, sws, keys, 0.0).to(tl.float32), 1)
    tl.store(DeltaW + row + offs_m, acc * w_scale, mask=offs_m < L)


@triton.jit
def _probability_grads(
    q, k, v, do, m, log2l, delta, n, h, offs_m, offs_n, L, kv_len, qk_scale, lo, hi,
    Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
    DW, swn, swh, swl, sws, w_scale,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DW: tl.constexpr, PRECISION: tl.constexpr,
):
    """``p`` and ``ds = p * (dp - delta)`` of one tile, ``dp = dO v^T`` plus
    ``w_scale * DW`` where the weights receive a gradient."""
    s = _scores(
        q, k, qk_scale, n, h, offs_m, offs_n, L, kv_len, lo, hi,
        Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
        HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, PRECISION,
    )
    p = tl.exp2((s - m[:, None]) - log2l[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    if HAS_DW:
        keys = (offs_m < L)[:, None] & (offs_n < kv_len)[None, :]
        dp += _tile(DW, n, h, offs_m, offs_n, swn, swh, swl, sws, keys, 0.0).to(tl.float32) * w_scale
    return p, p * (dp - delta[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Stat, Delta, DK, DV,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, sdon, sdoh, sdol, sdod,
    sdkn, sdkh, sdks, sdkd, sdvn, sdvh, sdvs, sdvd, sln, slh, s_stat,
    Hq, Hkv, L, S, Dk, Dv, GROUPS, qk_scale, scale,
    Lens, Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs, lo, hi,
    QOff, KOff,
    DW, swn, swh, swl, sws, w_scale,
    HAS_LENS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv for one block of keys of one key/value head, summed over its query heads."""
    pid_n = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // Hkv).to(tl.int64)
    hk = pid_nh % Hkv
    n0 = pid_n * BLOCK_N
    if VARLEN:
        q0, k0, L, S, lo, hi = _sequence(QOff, KOff, n, lo, hi, BOTTOM_RIGHT)
        Q += q0 * sql
        DO += q0 * sdol
        Stat += q0
        Delta += q0
        K += k0 * sks
        V += k0 * svs
        DK += k0 * sdks
        DV += k0 * sdvs
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_len = _key_length(Lens, n, S, HAS_LENS)
    k = tl.load(
        K + n * skn + hk * skh + offs_n[:, None] * sks + offs_dk[None, :] * skd,
        mask=(offs_n < kv_len)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
    )
    v = tl.load(
        V + n * svn + hk * svh + offs_n[:, None] * svs + offs_dv[None, :] * svd,
        mask=(offs_n < kv_len)[:, None] & (offs_dv < Dv)[None, :], other=0.0,
    )
    # Query rows i that may attend keys [n0, n_last]: n0 - hi <= i <= n_last - lo.
    q_start = 0
    q_end = tl.where(n0 < kv_len, L, 0)
    if HAS_HI:
        q_start = tl.maximum(n0 - hi, 0)
    if HAS_LO:
        q_end = tl.minimum(q_end, tl.minimum(n0 + BLOCK_N, kv_len) - 1 - lo + 1)
    q_start = (q_start // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        row = n * sln + h * slh
        for m0 in range(q_start, q_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _rows(Q, n, h, offs_m, L, offs_dk, Dk, sqn, sqh, sql, sqd)
            do = _rows(DO, n, h, offs_m, L, offs_dv, Dv, sdon, sdoh, sdol, sdod)
            m, log2l = _row_stats(Stat, row, s_stat, offs_m, L)
            delta = tl.load(Delta + row + offs_m, mask=offs_m < L, other=0.0)
            p, ds = _probability_grads(
                q, k, v, do, m, log2l, delta, n, h, offs_m, offs_n, L, kv_len, qk_scale, lo, hi,
                Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
                DW, swn, swh, swl, sws, w_scale,
                HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, HAS_DW, PRECISION,
            )
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    dk = dk * scale
    tl.store(
        DK + n * sdkn + hk * sdkh + offs_n[:, None] * sdks + offs_dk[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=(offs_n < S)[:, None] & (offs_dk < Dk)[None, :],
    )
    tl.store(
        DV + n * sdvn + hk * sdvh + offs_n[:, None] * sdvs + offs_dv[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=(offs_n < S)[:, None] & (offs_dv < Dv)[None, :],
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Stat, Delta, DQ,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, sdon, sdoh, sdol, sdod,
    sdqn, sdqh, sdql, sdqd, sln, slh, s_stat,
    Hq, L, S, Dk, Dv, GROUPS, qk_scale, scale,
    Lens, Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs, lo, hi,
    QOff, KOff,
    DW, swn, swh, swl, sws, w_scale,
    HAS_LENS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq for one block of query rows of one query head."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // Hq).to(tl.int64)
    h = pid_nh % Hq
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    if VARLEN:
        q0, k0, L, S, lo, hi = _sequence(QOff, KOff, n, lo, hi, BOTTOM_RIGHT)
        Q += q0 * sql
        DO += q0 * sdol
        DQ += q0 * sdql
        Stat += q0
        Delta += q0
        K += k0 * sks
        V += k0 * svs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = n * sln + h * slh
    q = _rows(Q, n, h, offs_m, L, offs_dk, Dk, sqn, sqh, sql, sqd)
    do = _rows(DO, n, h, offs_m, L, offs_dv, Dv, sdon, sdoh, sdol, sdod)
    m, log2l = _row_stats(Stat, row, s_stat, offs_m, L)
    delta = tl.load(Delta + row + offs_m, mask=offs_m < L, other=0.0)
    kv_len = _key_length(Lens, n, S, HAS_LENS)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    start = (start // BLOCK_N) * BLOCK_N
    K += n * skn + hk * skh
    V += n * svn + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _keys(K, offs_n, end, offs_dk, Dk, sks, skd)
        v = _keys(V, offs_n, end, offs_dv, Dv, svs, svd)
        _, ds = _probability_grads(
            q, k, v, do, m, log2l, delta, n, h, offs_m, offs_n, L, end, qk_scale, lo, hi,
            Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
            DW, swn, swh, swl, sws, w_scale,
            HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS, HAS_DW, PRECISION,
        )
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    dq = dq * scale
    tl.store(
        DQ + n * sdqn + h * sdqh + offs_m[:, None] * sdql + offs_dk[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :],
    )


# --------------------------------------------------------------------------- launchers


def _interpreted() -> bool:
    """Whether the kernels were defined for Triton's interpreter (``triton.jit`` decides
    that once, when this module is imported)."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _blocks(dk: int, dv: int, dtype: torch.dtype, backward: bool) -> dict:
    """Tile sizes and launch options. The interpreter gets small tiles so that
    tests with a few dozen rows still cross block boundaries.

    The 16-bit tiles are the fastest of a sweep on one H100 (``python
    benchmarks/gpu.py --sections tune``, bf16, L = 8192): forward 398 TFLOP/s at
    head dim 64 with 128 x 64 tiles, 510 at 128 with 64 x 64 tiles (8 warps and
    128 x 64 gave 471); forward + backward 292 at 64 and 373 at 128 with 64 x 64
    tiles on 4 warps (8 warps gave 200 at 128)."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 16}
    d = max(dk, dv)
    if dtype == torch.float32 or d > 128:
        if backward:
            return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4 if d <= 64 else 8, "num_stages": 1}
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4 if d <= 64 else 8, "num_stages": 2}
    if backward:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3 if d <= 64 else 2}
    return {"BLOCK_M": 128 if d <= 64 else 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32 products, as torch's matmul does by default (no TF32)."""
    if _interpreted() and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _broadcast(t: Tensor | None) -> tuple[Tensor | None, int, int, int, int]:
    """A broadcast 4-D tensor and its 4 strides, 0 where a dimension is 1 (bool as uint8)."""
    if t is None:
        return (None, 0, 0, 0, 0)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    sn, sh, sl, ss = (0 if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t, sn, sh, sl, ss)


def mask_args(
    lengths: Tensor | None, allowed: Tensor | None, bias: Tensor | None, lo: int | None, hi: int | None
) -> MaskArgs:
    """The kernel arguments of key lengths (int32 ``(N,)`` within ``0..S``), an allowed
    and a bias tensor (4-D, broadcastable to ``(N, Hq, L, S)``) and a band."""
    return MaskArgs(
        lengths, *_broadcast(allowed), *_broadcast(bias),
        lo=0 if lo is None else lo, hi=0 if hi is None else hi,
        HAS_LENS=lengths is not None, HAS_ALLOWED=allowed is not None, HAS_BIAS=bias is not None,
        HAS_LO=lo is not None, HAS_HI=hi is not None,
    )


def _strides(t: Tensor) -> tuple[int, ...]:
    """Batch, head, row and feature strides of a ``(N, H, rows, D)`` tensor, or of a
    packed ``(T, H, D)`` one read as a batch of stride 0."""
    if t.dim() == 4:
        return t.stride()
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _row_strides(lse: Tensor) -> tuple[int, int]:
    """Batch and head strides of a contiguous ``(N, H, L)`` lse, or of a packed ``(H, T)`` one."""
    return (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))


def _new_stats(q: Tensor, rows: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """An fp32 lse of shape ``rows`` and the row statistics ``(2, *rows)``: ``m``, ``log2 l``."""
    return q.new_empty(rows, dtype=torch.float32), q.new_empty((2, *rows), dtype=torch.float32)


def _launch_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, stats: Tensor, N: int, L: int, S: int,
    masks: MaskArgs, scale: float, layout: Layout,
) -> None:
    """Fill ``out``, ``lse`` and ``stats``; ``L``/``S`` are the (longest) sequence lengths."""
    Hq, Dk, Hkv, Dv = q.shape[1], q.shape[-1], k.shape[1], v.shape[-1]
    cfg = _blocks(Dk, Dv, q.dtype, backward=False)
    _fwd_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), N * Hq)](
        q, k, v, out, lse, stats,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_row_strides(lse), stats.stride(0),
        Hq, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E,
        BLOCK_DK=_head_block(Dk), BLOCK_DV=_head_block(Dv), PRECISION=_precision(q.dtype),
        **masks._asdict(), **layout._asdict(), **cfg,
    )


def forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, masks: MaskArgs, scale: float, weights: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fill ``out`` ``(N, Hq, L, Dv)``; return the lse ``(N, Hq, L)`` (fp32, log2 units), the
    row statistics ``(2, N, Hq, L)`` and the weights: ``(N, L, S)`` averaged over heads
    (``weights="mean"``), ``(N, Hq, L, S)`` (``"per_head"``), or empty (``"none"``)."""
    N, Hq, L, _ = q.shape
    lse, stats = _new_stats(q, (N, Hq, L))
    if lse.numel() > 0:
        _launch_forward(q, k, v, out, lse, stats, N, L, k.shape[2], masks, scale, _DENSE)
    if weights == "none":
        return lse, stats, q.new_empty(0)
    return lse, stats, _weights(q, k, stats, masks, scale, weights == "per_head")


def varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, k_offsets: Tensor, max_q: int, max_k: int,
    scale: float, lo: int | None, hi: int | None, bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed output ``(Tq, Hq, Dv)`` in q's dtype, lse ``(Hq, Tq)`` in fp32, log2 units, and
    the row statistics ``(2, Hq, Tq)``, for packed q ``(Tq, Hq, Dk)``, k ``(Tk, Hkv, Dk)``,
    v ``(Tk, Hkv, Dv)`` and int32 offsets ``(N + 1,)`` within ``0..Tq``/``0..Tk`` (rows
    outside every sequence are left unwritten). ``max_q``/``max_k`` are the longest
    ``L_n``/``S_n``; the band is ``i + lo <= j <= i + hi``, both shifted by ``S_n - L_n``
    in sequence ``n`` when ``bottom_right``."""
    Tq, Hq, _ = q.shape
    out = q.new_empty(Tq, Hq, v.shape[2])
    lse, stats = _new_stats(q, (Hq, Tq))
    if lse.numel() > 0:
        layout = Layout(q_offsets, k_offsets, True, bottom_right)
        masks = mask_args(None, None, None, lo, hi)
        _launch_forward(q, k, v, out, lse, stats, q_offsets.shape[0] - 1, max_q, max_k, masks, scale, layout)
    return out, lse, stats


def _weights(q: Tensor, k: Tensor, stats: Tensor, masks: MaskArgs, scale: float, per_head: bool) -> Tensor:
    """``(N, L, S)`` averaged over heads, or ``(N, Hq, L, S)`` per head, in q's dtype."""
    N, Hq, L, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    w = q.new_empty((N, Hq, L, S) if per_head else (N, L, S))
    if w.numel() == 0:
        return w
    w_strides = w.stride() if per_head else (w.stride(0), 0, w.stride(1), w.stride(2))
    cfg = _blocks(Dk, 0, q.dtype, backward=False)
    if not _interpreted():
        cfg = {**cfg, "BLOCK_N": 64}
    key_tiles = triton.cdiv(S, cfg["BLOCK_N"])
    grid = (triton.cdiv(L, cfg["BLOCK_M"]) * key_tiles, N * Hq if per_head else N)
    _weights_kernel[grid](
        q, k, stats, w,
        *q.stride(), *k.stride(), *w_strides, stats.stride(0),
        Hq, L, S, Dk, Hq // Hkv, scale * _LOG2E, key_tiles,
        PER_HEAD=per_head, BLOCK_DK=_head_block(Dk), PRECISION=_precision(q.dtype),
        **masks._asdict(), **cfg,
    )
    return w


def weights_grad(dw: Tensor | None, Hq: int) -> WeightsGrad:
    """The kernel arguments of the gradient of the weights: ``(N, L, S)`` for averaged
    weights, ``(N, Hq, L, S)`` per head, None when the weights receive none."""
    if dw is None:
        return _NO_DW
    if dw.dim() == 3:
        return WeightsGrad(dw, dw.stride(0), 0, dw.stride(1), dw.stride(2), 1.0 / Hq, True)
    swn, swh, swl, sws = dw.stride()
    return WeightsGrad(dw, swn, swh, swl, sws, 1.0, True)


def _weights_delta(q: Tensor, k: Tensor, stats: Tensor, masks: MaskArgs, dw: WeightsGrad, scale: float) -> Tensor:
    """``w_scale * sum_j p_ij dW_ij`` per query row, ``(N, Hq, L)`` fp32."""
    N, Hq, L, Dk = q.shape
    delta = q.new_empty(N, Hq, L, dtype=torch.float32)
    cfg = _blocks(Dk, 0, q.dtype, backward=True)
    _bwd_weights_delta_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), N * Hq)](
        q, k, stats, delta,
        *q.stride(), *k.stride(), stats.stride(0),
        Hq, L, k.shape[2], Dk, Hq // k.shape[1], scale * _LOG2E,
        BLOCK_DK=_head_block(Dk), PRECISION=_precision(q.dtype),
        **masks._asdict(), **dw._asdict(), **cfg,
    )
    return delta


def _launch_backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
    N: int, L: int, S: int, masks: MaskArgs, scale: float, layout: Layout, dw: WeightsGrad,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv. ``dlse`` is the gradient reaching the (log2) lse output and ``dw`` that
    reaching the weights; both enter through ``delta = rowsum(dp * p)``:
    ``ds = p * (dp - delta)``, ``delta = rowsum(dO * O) - dlse * log2(e) + rowsum(p * w_scale dW)``."""
    Hq, Dk, Hkv, Dv = q.shape[1], q.shape[-1], k.shape[1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rowsum = (dout.float() * out.float()).sum(-1)
    if layout.VARLEN:
        rowsum = rowsum.transpose(0, 1)
    delta = rowsum - dlse.float() * _LOG2E
    if dw.HAS_DW and delta.numel() > 0:
        delta = delta + _weights_delta(q, k, stats, masks, dw, scale)
    delta = delta.contiguous()
    stats = stats.contiguous()
    cfg = _blocks(Dk, Dv, q.dtype, backward=True)
    common = {
        "BLOCK_DK": _head_block(Dk), "BLOCK_DV": _head_block(Dv), "PRECISION": _precision(q.dtype),
        **masks._asdict(), **layout._asdict(), **dw._asdict(), **cfg,
    }
    row_strides = (*_row_strides(stats[0]), stats.stride(0))
    if dk.numel() + dv.numel() > 0:
        _bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), N * Hkv)](
            q, k, v, dout, stats, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
            *row_strides, Hq, Hkv, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E, scale,
            **common,
        )
    if dq.numel() > 0:
        _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), N * Hq)](
            q, k, v, dout, stats, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            *row_strides, Hq, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E, scale,
            **common,
        )
    return dq, dk, dv


def backward(
    dout: Tensor, dlse: Tensor, dw: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
    masks: MaskArgs, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of :func:`forward`, shaped like q, k, v, given the gradients of its
    output, lse and weights (``dw`` None when the weights receive none)."""
    N, Hq, L, _ = q.shape
    return _launch_backward(
        dout, dlse, q, k, v, out, stats, N, L, k.shape[2], masks, scale, _DENSE, weights_grad(dw, Hq)
    )


def varlen_backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
    q_offsets: Tensor, k_offsets: Tensor, max_q: int, max_k: int,
    scale: float, lo: int | None, hi: int | None, bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq ``(Tq, Hq, Dk)``, dk ``(Tk, Hkv, Dk)``, dv ``(Tk, Hkv, Dv)`` of :func:`varlen_forward`;
    ``dout`` is packed like its output, ``dlse`` like its lse ``(Hq, Tq)``."""
    layout = Layout(q_offsets, k_offsets, True, bottom_right)
    masks = mask_args(None, None, None, lo, hi)
    N = q_offsets.shape[0] - 1
    return _launch_backward(dout, dlse, q, k, v, out, stats, N, max_q, max_k, masks, scale, layout, _NO_DW)
