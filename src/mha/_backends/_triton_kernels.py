"""Triton kernels of the triton backend: forward, averaged/per-head weights, backward.

Imported only when a Triton kernel runs (``import triton`` happens here). Every
kernel reads q ``(N, Hq, L, Dk)``, k ``(N, Hkv, S, Dk)`` and v ``(N, Hkv, S, Dv)``
through their strides; query head ``h`` reads key/value head ``h // GROUPS``.
Head dims are padded to a power of two (at least 16, what ``tl.dot`` needs)
with masked loads. Scores are kept in log2 units (``exp2`` is the fast
exponential), and so is the lse that the forward stores and the weights and
backward kernels read back: no conversion rounds it in between.

Variable-length batches (``VARLEN``) run through the same forward and backward
kernels: q is packed ``(Tq, Hq, Dk)``, k ``(Tk, Hkv, Dk)`` and v ``(Tk, Hkv, Dv)``,
and sequence ``n`` owns query rows ``QOff[n]:QOff[n + 1]`` and key rows
``KOff[n]:KOff[n + 1]`` (int32 offsets, cu_seqlens style). A packed tensor is read
as a batch of stride 0 whose base moves to the sequence's first row, so one
launch covers every sequence; programs past their sequence's length return at
once. The lse is then packed ``(Hq, Tq)``.

Masks come as a :class:`~mha._plan.MaskPlan`'s primitives:

* a band ``i + lo <= j <= i + hi`` (either side optional), which also decides
  which key blocks (forward, dq) or query blocks (dk/dv) are visited at all;
* key lengths ``(N,)``: keys at and past the length are neither loaded nor visited;
* one boolean ``allowed`` and one additive ``bias`` tensor, read through their
  broadcast strides (0 where a dimension is 1), never expanded.

Variable-length batches take the band only, aligned per sequence: ``lo``/``hi``
are a square sequence's offsets, and ``BOTTOM_RIGHT`` shifts both by
``S_n - L_n`` in sequence ``n``.

No atomics anywhere: dk/dv are summed over the query heads of a GQA group
inside one program, and dq has its own kernel, so every result is deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._layout import new_output

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _key_range(m0, L, BLOCK_M: tl.constexpr, kv_len, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Half-open range of keys that rows ``[m0, m0 + BLOCK_M)`` may attend."""
    start = 0
    end = kv_len
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
def _masked_scores(
    s, n, h, offs_m, offs_n, L, kv_len, lo, hi,
    Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Scores ``s`` (log2 units) with the bias added and ``-inf`` where a key is blocked."""
    keep = (offs_m < L)[:, None] & (offs_n < kv_len)[None, :]
    if HAS_LO:
        keep &= offs_n[None, :] >= offs_m[:, None] + lo
    if HAS_HI:
        keep &= offs_n[None, :] <= offs_m[:, None] + hi
    if HAS_ALLOWED:
        a_ptrs = Allowed + n * san + h * sah + offs_m[:, None] * sal + offs_n[None, :] * sas
        keep &= tl.load(a_ptrs, mask=keep, other=0) != 0
    if HAS_BIAS:
        b_ptrs = Bias + n * sbn + h * sbh + offs_m[:, None] * sbl + offs_n[None, :] * sbs
        s += tl.load(b_ptrs, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, Lens, Allowed, Bias, QOff, KOff,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, son, soh, sol, sod, sln, slh,
    san, sah, sal, sas, sbn, sbh, sbl, sbs,
    Hq, L, S, Dk, Dv, GROUPS, qk_scale, lo, hi,
    HAS_LENS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Output and lse for one block of query rows of one query head."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // Hq).to(tl.int64)
    h = pid_nh % Hq
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    if VARLEN:
        q0, k0, L, S, lo, hi = _sequence(QOff, KOff, n, lo, hi, BOTTOM_RIGHT)
        if m0 >= L:
            return
        Q += q0 * sql
        Out += q0 * sol
        LSE += q0
        K += k0 * sks
        V += k0 * svs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + n * sqn + h * sqh + offs_m[:, None] * sql + offs_dk[None, :] * sqd,
        mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
    )
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(Lens + n), 0), S)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    start = (start // BLOCK_N) * BLOCK_N
    K += n * skn + hk * skh
    V += n * svn + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + offs_n[:, None] * sks + offs_dk[None, :] * skd,
            mask=(offs_n < end)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
        )
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        s = _masked_scores(
            s, n, h, offs_m, offs_n, L, end, lo, hi,
            Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
            HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + offs_n[:, None] * svs + offs_dv[None, :] * svd,
            mask=(offs_n < end)[:, None] & (offs_dv < Dv)[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(
        Out + n * son + h * soh + offs_m[:, None] * sol + offs_dv[None, :] * sod,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_dv < Dv)[None, :],
    )
    tl.store(LSE + n * sln + h * slh + offs_m, lse, mask=offs_m < L)


@triton.jit
def _weights_kernel(
    Q, K, LSE, W, Lens, Allowed, Bias,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, swn, swh, swl, sws,
    san, sah, sal, sas, sbn, sbh, sbl, sbs,
    Hq, L, S, Dk, GROUPS, qk_scale, lo, hi,
    PER_HEAD: tl.constexpr, HAS_LENS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``p = exp(s - lse)``: for one head (``PER_HEAD``)
    or summed over all ``Hq`` heads in registers and divided by ``Hq``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
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
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(Lens + n), 0), S)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if (start < pid_n * BLOCK_N + BLOCK_N) & (end > pid_n * BLOCK_N):
        for h in range(h_first, h_first + heads):
            q = tl.load(
                Q + n * sqn + h * sqh + offs_m[:, None] * sql + offs_dk[None, :] * sqd,
                mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
            )
            k = tl.load(
                K + n * skn + (h // GROUPS) * skh + offs_n[:, None] * sks + offs_dk[None, :] * skd,
                mask=(offs_n < end)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
            )
            s = _dot(q, tl.trans(k), PRECISION) * qk_scale
            s = _masked_scores(
                s, n, h, offs_m, offs_n, L, end, lo, hi,
                Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
                HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS,
            )
            lse = tl.load(LSE + (n * Hq + h) * L + offs_m, mask=offs_m < L, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            acc += tl.exp2(s - lse[:, None])
    if not PER_HEAD:
        acc = acc / Hq
    tl.store(
        W + n * swn + h_first * swh + offs_m[:, None] * swl + offs_n[None, :] * sws,
        acc.to(W.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_n < S)[None, :],
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, Lens, Allowed, Bias, QOff, KOff,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, sdon, sdoh, sdol, sdod,
    sdkn, sdkh, sdks, sdkd, sdvn, sdvh, sdvs, sdvd, sln, slh,
    san, sah, sal, sas, sbn, sbh, sbl, sbs,
    Hq, Hkv, L, S, Dk, Dv, GROUPS, qk_scale, scale, lo, hi,
    HAS_LENS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
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
        if n0 >= S:
            return
        Q += q0 * sql
        DO += q0 * sdol
        LSE += q0
        Delta += q0
        K += k0 * sks
        V += k0 * svs
        DK += k0 * sdks
        DV += k0 * sdvs
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(Lens + n), 0), S)
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
            q = tl.load(
                Q + n * sqn + h * sqh + offs_m[:, None] * sql + offs_dk[None, :] * sqd,
                mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
            )
            do = tl.load(
                DO + n * sdon + h * sdoh + offs_m[:, None] * sdol + offs_dv[None, :] * sdod,
                mask=(offs_m < L)[:, None] & (offs_dv < Dv)[None, :], other=0.0,
            )
            lse = tl.load(LSE + row + offs_m, mask=offs_m < L, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + row + offs_m, mask=offs_m < L, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION) * qk_scale
            s = _masked_scores(
                s, n, h, offs_m, offs_n, L, kv_len, lo, hi,
                Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
                HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS,
            )
            p = tl.exp2(s - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
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
    Q, K, V, DO, LSE, Delta, DQ, Lens, Allowed, Bias, QOff, KOff,
    sqn, sqh, sql, sqd, skn, skh, sks, skd, svn, svh, svs, svd, sdon, sdoh, sdol, sdod,
    sdqn, sdqh, sdql, sdqd, sln, slh,
    san, sah, sal, sas, sbn, sbh, sbl, sbs,
    Hq, L, S, Dk, Dv, GROUPS, qk_scale, scale, lo, hi,
    HAS_LENS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
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
        if m0 >= L:
            return
        Q += q0 * sql
        DO += q0 * sdol
        DQ += q0 * sdql
        LSE += q0
        Delta += q0
        K += k0 * sks
        V += k0 * svs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = n * sln + h * slh
    q = tl.load(
        Q + n * sqn + h * sqh + offs_m[:, None] * sql + offs_dk[None, :] * sqd,
        mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
    )
    do = tl.load(
        DO + n * sdon + h * sdoh + offs_m[:, None] * sdol + offs_dv[None, :] * sdod,
        mask=(offs_m < L)[:, None] & (offs_dv < Dv)[None, :], other=0.0,
    )
    lse = tl.load(LSE + row + offs_m, mask=offs_m < L, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(Delta + row + offs_m, mask=offs_m < L, other=0.0)
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(Lens + n), 0), S)
    start, end = _key_range(m0, L, BLOCK_M, kv_len, lo, hi, HAS_LO, HAS_HI)
    start = (start // BLOCK_N) * BLOCK_N
    K += n * skn + hk * skh
    V += n * svn + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + offs_n[:, None] * sks + offs_dk[None, :] * skd,
            mask=(offs_n < end)[:, None] & (offs_dk < Dk)[None, :], other=0.0,
        )
        v = tl.load(
            V + offs_n[:, None] * svs + offs_dv[None, :] * svd,
            mask=(offs_n < end)[:, None] & (offs_dv < Dv)[None, :], other=0.0,
        )
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        s = _masked_scores(
            s, n, h, offs_m, offs_n, L, end, lo, hi,
            Allowed, san, sah, sal, sas, Bias, sbn, sbh, sbl, sbs,
            HAS_LO, HAS_HI, HAS_ALLOWED, HAS_BIAS,
        )
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    dq = dq * scale
    tl.store(
        DQ + n * sdqn + h * sdqh + offs_m[:, None] * sdql + offs_dk[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=(offs_m < L)[:, None] & (offs_dk < Dk)[None, :],
    )


# --------------------------------------------------------------------------- launchers


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
    if _INTERPRET:
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
    if _INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(t: Tensor | None) -> tuple:
    """Pointer and 4 strides of a broadcast mask tensor: stride 0 where a dimension is 1."""
    if t is None:
        return (None, 0, 0, 0, 0)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return (t, *(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True)))


def _band_args(lo: int | None, hi: int | None) -> dict:
    return {"lo": 0 if lo is None else lo, "hi": 0 if hi is None else hi, "HAS_LO": lo is not None, "HAS_HI": hi is not None}


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    """Batch, head, row and feature strides of a ``(N, H, rows, D)`` tensor, or of a
    packed ``(T, H, D)`` one read as a batch of stride 0."""
    if t.dim() == 4:
        return t.stride()
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _row_strides(lse: Tensor) -> tuple[int, int]:
    """Batch and head strides of a contiguous ``(N, H, L)`` lse, or of a packed ``(H, T)`` one."""
    return (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))


# A layout: the offset pointers (passed after the mask tensors) and the constexpr flags.
_DENSE = ((None, None), {"VARLEN": False, "BOTTOM_RIGHT": False})


def _packed(q_offsets: Tensor, k_offsets: Tensor, bottom_right: bool) -> tuple[tuple, dict]:
    """The layout of a packed batch (``_DENSE`` is that of a padded one)."""
    return (q_offsets, k_offsets), {"VARLEN": True, "BOTTOM_RIGHT": bottom_right}


def _common(lengths, allowed, bias, lo, hi) -> tuple[tuple, dict]:
    args = (lengths, *_mask_args(allowed), *_mask_args(bias))
    flags = {
        "HAS_LENS": lengths is not None,
        "HAS_ALLOWED": allowed is not None,
        "HAS_BIAS": bias is not None,
        **_band_args(lo, hi),
    }
    return args, flags


def _launch_forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, N: int, L: int, S: int,
    masks: tuple, flags: dict, scale: float, layout: tuple[tuple, dict],
) -> None:
    """Fill ``out`` and ``lse``; ``L``/``S`` are the (longest) sequence lengths."""
    Hq, Dk, Hkv, Dv = q.shape[1], q.shape[-1], k.shape[1], v.shape[-1]
    cfg = _blocks(Dk, Dv, q.dtype, backward=False)
    offsets, varlen = layout
    _fwd_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), N * Hq)](
        q, k, v, out, lse, masks[0], masks[1], masks[6], *offsets,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_row_strides(lse),
        *masks[2:6], *masks[7:11],
        Hq, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E,
        BLOCK_DK=_head_block(Dk), BLOCK_DV=_head_block(Dv), PRECISION=_precision(q.dtype),
        **flags, **varlen, **cfg,
    )


def forward(
    q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None, allowed: Tensor | None, bias: Tensor | None,
    scale: float, lo: int | None, hi: int | None,
) -> tuple[Tensor, Tensor]:
    """Output ``(N, Hq, L, Dv)`` in q's dtype (laid out as :func:`new_output` says) and
    lse ``(N, Hq, L)`` in fp32, log2 units."""
    N, Hq, L, _ = q.shape
    out = new_output(q, v.shape[3])
    lse = q.new_empty(N, Hq, L, dtype=torch.float32)
    if lse.numel() > 0:
        masks, flags = _common(lengths, allowed, bias, lo, hi)
        _launch_forward(q, k, v, out, lse, N, L, k.shape[2], masks, flags, scale, _DENSE)
    return out, lse


def varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, k_offsets: Tensor, max_q: int, max_k: int,
    scale: float, lo: int | None, hi: int | None, bottom_right: bool,
) -> tuple[Tensor, Tensor]:
    """Packed output ``(Tq, Hq, Dv)`` in q's dtype and lse ``(Hq, Tq)`` in fp32, log2 units,
    for packed q ``(Tq, Hq, Dk)``, k ``(Tk, Hkv, Dk)``, v ``(Tk, Hkv, Dv)`` and int32
    offsets ``(N + 1,)`` within ``0..Tq``/``0..Tk`` (rows outside every sequence are
    left unwritten). ``max_q``/``max_k``
    are the longest ``L_n``/``S_n``; the band is ``i + lo <= j <= i + hi``, both
    shifted by ``S_n - L_n`` in sequence ``n`` when ``bottom_right``."""
    Tq, Hq, _ = q.shape
    out = q.new_empty(Tq, Hq, v.shape[2])
    lse = q.new_empty(Hq, Tq, dtype=torch.float32)
    if lse.numel() > 0:
        masks, flags = _common(None, None, None, lo, hi)
        layout = _packed(q_offsets, k_offsets, bottom_right)
        _launch_forward(q, k, v, out, lse, q_offsets.shape[0] - 1, max_q, max_k, masks, flags, scale, layout)
    return out, lse


def weights(
    q: Tensor, k: Tensor, lse: Tensor, lengths: Tensor | None, allowed: Tensor | None, bias: Tensor | None,
    scale: float, lo: int | None, hi: int | None, per_head: bool,
) -> Tensor:
    """``(N, L, S)`` averaged over heads, or ``(N, Hq, L, S)`` per head, in q's dtype."""
    N, Hq, L, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    w = q.new_empty((N, Hq, L, S) if per_head else (N, L, S))
    if w.numel() == 0:
        return w
    w_strides = w.stride() if per_head else (w.stride(0), 0, w.stride(1), w.stride(2))
    masks, flags = _common(lengths, allowed, bias, lo, hi)
    cfg = _blocks(Dk, 0, q.dtype, backward=False)
    if not _INTERPRET:
        cfg = {**cfg, "BLOCK_N": 64}
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), triton.cdiv(S, cfg["BLOCK_N"]), N * Hq if per_head else N)
    _weights_kernel[grid](
        q, k, lse.contiguous(), w, masks[0], masks[1], masks[6],
        *q.stride(), *k.stride(), *w_strides,
        *masks[2:6], *masks[7:11],
        Hq, L, S, Dk, Hq // Hkv, scale * _LOG2E,
        PER_HEAD=per_head, BLOCK_DK=_head_block(Dk), PRECISION=_precision(q.dtype),
        **flags, **cfg,
    )
    return w


def _launch_backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    N: int, L: int, S: int, masks: tuple, flags: dict, scale: float, layout: tuple[tuple, dict],
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv. ``dlse`` is the gradient reaching the (log2) lse output; it
    enters through ``delta``: ``ds = p * (dp - (rowsum(dO * O) - dlse * log2(e)))``."""
    Hq, Dk, Hkv, Dv = q.shape[1], q.shape[-1], k.shape[1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    offsets, varlen = layout
    rowsum = (dout.float() * out.float()).sum(-1)
    if varlen["VARLEN"]:
        rowsum = rowsum.transpose(0, 1)
    delta = (rowsum - dlse.float() * _LOG2E).contiguous()
    lse = lse.contiguous()
    cfg = _blocks(Dk, Dv, q.dtype, backward=True)
    common = {
        "BLOCK_DK": _head_block(Dk), "BLOCK_DV": _head_block(Dv), "PRECISION": _precision(q.dtype),
        **flags, **varlen, **cfg,
    }
    if dk.numel() + dv.numel() > 0:
        _bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), N * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, masks[0], masks[1], masks[6], *offsets,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
            *_row_strides(lse), *masks[2:6], *masks[7:11],
            Hq, Hkv, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E, scale,
            **common,
        )
    if dq.numel() > 0:
        _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), N * Hq)](
            q, k, v, dout, lse, delta, dq, masks[0], masks[1], masks[6], *offsets,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            *_row_strides(lse), *masks[2:6], *masks[7:11],
            Hq, L, S, Dk, Dv, Hq // Hkv, scale * _LOG2E, scale,
            **common,
        )
    return dq, dk, dv


def backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    lengths: Tensor | None, allowed: Tensor | None, bias: Tensor | None,
    scale: float, lo: int | None, hi: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of :func:`forward`, shaped like q, k, v."""
    N, _, L, _ = q.shape
    masks, flags = _common(lengths, allowed, bias, lo, hi)
    return _launch_backward(dout, dlse, q, k, v, out, lse, N, L, k.shape[2], masks, flags, scale, _DENSE)


def varlen_backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    q_offsets: Tensor, k_offsets: Tensor, max_q: int, max_k: int,
    scale: float, lo: int | None, hi: int | None, bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq ``(Tq, Hq, Dk)``, dk ``(Tk, Hkv, Dk)``, dv ``(Tk, Hkv, Dv)`` of :func:`varlen_forward`;
    ``dout`` is packed like its output, ``dlse`` like its lse ``(Hq, Tq)``."""
    masks, flags = _common(None, None, None, lo, hi)
    layout = _packed(q_offsets, k_offsets, bottom_right)
    return _launch_backward(
        dout, dlse, q, k, v, out, lse, q_offsets.shape[0] - 1, max_q, max_k, masks, flags, scale, layout
    )
