"""Triton flash-decoding kernel: few queries against a long cache, keys split across programs.

A decode step has one (or a few) queries per sequence: one program per
``(sequence, key/value head)`` would leave most of a GPU idle when the batch is
small. The keys ``[0, lengths[n])`` are cut into ``SPLITS`` ranges; program
``(n * Hkv + kvh, split)`` runs the online softmax of the ``R = G * L`` query rows
of key/value head ``kvh`` (the ``G = Hq / Hkv`` query heads of a GQA group,
``L`` queries each, as the rows of one ``tl.dot``: K and V are read once) over
its range, and writes its normalised partial output ``o_s`` and its lse
``lse_s``. The partial results merge exactly::

    lse = log sum_s exp(lse_s)          o = sum_s exp(lse_s - lse) * o_s

A split with no key has ``lse_s = -inf`` and weight 0; a row with no key at all
gets output 0 and ``lse = -inf``. Scores are kept in log2 units inside the
kernel (``exp2``), fp32 accumulation, fp32 ``tl.dot`` in IEEE precision.

Imported only when the kernel runs (``import triton`` happens here). On CPU it
runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
first imported), which is how the tests run it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_TARGET_PROGRAMS = 264  # about two waves of programs on a 132-SM GPU


@triton.jit
def _decode_kernel(
    Q, K, V, Lengths, Opart, LSEpart,
    scale_log2,
    sqn, sqh, sql, sqd,
    skn, skh, sks, skd,
    svn, svh, svs, svd,
    Hkv, L, R, DK, DV, keys_per_split,
    GROUPS: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // Hkv
    kvh = pid % Hkv
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < R
    head = kvh * GROUPS + rows // L
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + n * sqn + head[:, None] * sqh + (rows % L)[:, None] * sql + dk[None, :] * sqd,
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )
    kv_len = tl.load(Lengths + n).to(tl.int32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, kv_len)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    K = K + n * skn + kvh * skh
    V = V + n * svn + kvh * svh
    for s0 in range(start, end, BLOCK_N):
        cols = s0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = tl.load(K + cols[None, :] * sks + dk[:, None] * skd, mask=col_ok[None, :] & (dk[:, None] < DK), other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # cols[0] = s0 < end: every block has a key, so m_new is finite.
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svs + dv[None, :] * svd, mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    has_keys = total > 0
    out = acc / tl.where(has_keys, total, 1.0)[:, None]
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, total, 1.0)), float("-inf"))
    base = pid * SPLITS + split
    tl.store(Opart + (base * BLOCK_R + rows[:, None]) * BLOCK_DV + dv[None, :], out)
    tl.store(LSEpart + base * BLOCK_R + rows, lse)


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


def decode(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output ``(N, Hq, L, Dv)`` (q's dtype) and natural lse ``(N, Hq, L)`` (fp32) of
    q ``(N, Hq, L, Dk)`` against keys ``j < lengths[n]`` of k ``(N, Hkv, S, Dk)`` and
    v ``(N, Hkv, S, Dv)``; all read through their strides."""
    N, Hq, L, Dk = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    R = G * L
    # Lengths past S (KeyPadding allows them) mean every key: clamped, the last split
    # reads no key past S, and int64 lengths of 2**31 or more do not wrap in int32.
    # In int64: a uint8 or int8 tensor cannot hold the bound S when S is past its range.
    lengths = lengths.to(torch.int64).clamp(0, S)
    BLOCK_R, BLOCK_DK, BLOCK_DV = _pow2(R), _pow2(Dk), _pow2(Dv)
    BLOCK_N = 64 if max(BLOCK_DK, BLOCK_DV) <= 128 else 32
    splits = max(1, min(triton.cdiv(S, BLOCK_N), triton.cdiv(_TARGET_PROGRAMS, max(N * Hkv, 1))))
    # At least one block per split: an empty cache (S = 0) gets one split without keys.
    keys_per_split = max(1, triton.cdiv(triton.cdiv(S, splits), BLOCK_N)) * BLOCK_N
    splits = max(1, triton.cdiv(S, keys_per_split))
    opart = q.new_empty(N * Hkv * splits * BLOCK_R * BLOCK_DV, dtype=torch.float32)
    lsepart = q.new_empty(N * Hkv * splits * BLOCK_R, dtype=torch.float32)
    if N * Hkv * R > 0:  # no program without query rows (the kernel divides by L)
        _decode_kernel[(N * Hkv, splits)](
            q, k, v, lengths, opart, lsepart,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(),
            Hkv, L, R, Dk, Dv, keys_per_split,
            GROUPS=G, SPLITS=splits, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
    lse_s = lsepart.view(N, Hkv, splits, BLOCK_R)[..., :R] * _LN2
    o_s = opart.view(N, Hkv, splits, BLOCK_R, BLOCK_DV)[..., :R, :Dv]
    lse = torch.logsumexp(lse_s, dim=2)
    weight = torch.exp(lse_s - torch.where(torch.isinf(lse), 0.0, lse)[:, :, None])
    out = (weight[..., None] * o_s).sum(dim=2)
    return out.view(N, Hq, L, Dv).to(q.dtype), lse.view(N, Hq, L)
