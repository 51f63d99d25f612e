"""Triton kernels for LoRA-Composer's two attention rules, forward and backward; no N×N tensor, no gathered copy.

Algorithm: FlashAttention-2 (Dao 2023) online softmax in the log2 domain (1/ln 2 folded into the scale), fp32
statistics, on tokens in region-major order (``kernels.plan``): every load and store goes through ``perm``
(sorted position -> token), so q, k, v, o and the gradients stay in the caller's layout (any strides with a
unit last stride, e.g. the [B, N, H, D] memory of a head split).

- isolated self-attention (method.md §5): each query block walks two branch-free lists, its full key tiles
  (no mask) and its partial ones (label rule: allowed <=> id_q = 0 or id_k = 0 or id_q = id_k > 0). No
  ``if`` inside a tile loop, so Triton software-pipelines the loads (cp.async, ``num_stages`` buffers).
- regional cross-attention (method.md §4): each query block walks its list of active prompt slots (one key
  tile of L <= 128 keys per slot, so the softmax is exact in one pass and the backward recomputes it, no LSE),
  accumulating Σ_s (act_s / |S|)·softmax_s·V_s straight into one accumulator. dK/dV: grid (slot, B·H, split),
  each program one slice of that slot's own query blocks, partial sums reduced by a second kernel.

Specialisation: counts and strides are not specialised on (one binary per head dim, dtype and EVEN_N across
layouts and batch shapes, which keeps JIT compiles on a GPU few; the strides' alignment comes from VEC instead);
head dims are ``constexpr`` (40/80/160 give their own binaries: vectorised 16-byte loads of
the padded 64/128/256 lanes), strides are passed in units of ``VEC`` elements (the alignment the wrapper
checked) so the compiler can prove 16-byte alignment, and ``EVEN_N`` drops bounds checks when N is a multiple
of both tiles. dtypes: fp16, bf16 (GPU), fp32 (IEEE dots). CPU tensors run under TRITON_INTERPRET=1.
Fully blocked self-attention rows come out as 0 with LSE = +inf; the wrapper computes them densely.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import Layout, TileLists, cross_lists, empty_rows, self_lists

LOG2E = 1.4426950408889634


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


# --- device helpers (called once per program; the tile loops are written out, because every device-function
# call costs the interpreter milliseconds, and the GPU compiler inlines either way) -----------------------------

@triton.jit
def _ld(base, rows, stride, cols, NC: tl.constexpr, BC: tl.constexpr):
    """Rows `rows` (token indices, always in bounds), columns [0, BC) of which the first NC are real."""
    ptr = base + (rows * stride)[:, None] + cols[None, :]
    if NC == BC:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=cols[None, :] < NC, other=0.0)


@triton.jit
def _st(base, rows, stride, cols, x, rmask, NC: tl.constexpr, BC: tl.constexpr, MASK_ROWS: tl.constexpr):
    ptr = base + (rows * stride)[:, None] + cols[None, :]
    x = x.to(base.dtype.element_ty)
    if MASK_ROWS:
        tl.store(ptr, x, mask=rmask[:, None] & (cols[None, :] < NC))
    else:
        if NC == BC:
            tl.store(ptr, x)
        else:
            tl.store(ptr, x, mask=cols[None, :] < NC)


@triton.jit
def _vec_ld(ptr, offs, n, other, MASK: tl.constexpr):
    if MASK:
        return tl.load(ptr + offs, mask=offs < n, other=other)
    else:
        return tl.load(ptr + offs)


# The isolation rule on compact ids (0 background, r+1 single box r, -1 overlap), written out in the loops:
#     allowed(a, b) = (a == 0) | (b == 0) | ((a == b) & (a > 0))
# It is symmetric, so the dK/dV kernel applies it to (id_k, id_q) for its transposed [BN, BM] scores.


# --- isolated self-attention: forward --------------------------------------------------------------------------

@triton.jit
def _self_fwd_tiles(acc, m_i, l_i, q, lq, kbase, vbase, perm, ids, idx, j0, j1, skn, svn, N, scale2,
                    offs_n, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                    BDV: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
                    DOT: tl.constexpr):
    """One branch-free loop over a query block's key tiles idx[j0:j1]: the full ones, or (MASKED) the partial."""
    for j in range(j0, j1):
        pos = tl.load(idx + j) * BN + offs_n
        if MASKED and not EVEN_N:
            tk = tl.load(perm + pos, mask=pos < N, other=0)
        else:
            tk = tl.load(perm + pos)
        kp = kbase + (tk * skn)[:, None] + offs_d[None, :]
        if D == BD:
            k = tl.load(kp)
        else:
            k = tl.load(kp, mask=offs_d[None, :] < D, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale2
        if MASKED:
            if EVEN_N:
                lk = tl.load(ids + pos)
                ok = (lq[:, None] == 0) | (lk[None, :] == 0) | ((lq[:, None] == lk[None, :]) & (lq[:, None] > 0))
            else:
                lk = tl.load(ids + pos, mask=pos < N, other=-2)  # -2: matches nothing, not background
                ok = (lq[:, None] == 0) | (lk[None, :] == 0) | ((lq[:, None] == lk[None, :]) & (lq[:, None] > 0))
                ok = ok & (pos < N)[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vp = vbase + (tk * svn)[:, None] + offs_dv[None, :]
        if DV == BDV:
            v = tl.load(vp)
        else:
            v = tl.load(vp, mask=offs_dv[None, :] < DV, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=['H', 'NQB', 'MT', 'PB', 'sq_b', 'sq_h', 'sq_n', 'sk_b', 'sk_h', 'sk_n', 'sv_b', 'sv_h', 'sv_n', 'so_b', 'so_h', 'so_n'])
def _self_fwd_kernel(Q, K, V, O, LSE, PERM, IDS, IDX, CNT,
                     sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                     N, H, NQB, MT, PB, scale2,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, EVEN_N: tl.constexpr, VEC: tl.constexpr, DOT: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pl = b * PB  # plan row: 0 when the batch shares one layout
    b64 = b.to(tl.int64)  # head offsets in 64 bits; strides arrive in units of VEC elements, so the
    h64 = h.to(tl.int64)  # compiler sees their alignment (16 bytes when VEC·itemsize = 16)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    perm = PERM + pl * N
    ids = IDS + pl * N
    tq = _vec_ld(perm, offs_m, N, 0, not EVEN_N)
    lq = _vec_ld(ids, offs_m, N, 0, not EVEN_N)
    q = _ld(Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC), tq, sq_n * VEC, offs_d, D, BD)
    kbase = K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC)
    vbase = V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC)
    lst = pl * NQB + qb
    n_full = tl.load(CNT + lst * 2)
    n_all = tl.load(CNT + lst * 2 + 1)
    idx = IDX + lst.to(tl.int64) * MT
    m_i = tl.full([BM], -1.0e30, tl.float32)  # finite: a row masked so far must not give inf - inf
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    acc, m_i, l_i = _self_fwd_tiles(acc, m_i, l_i, q, lq, kbase, vbase, perm, ids, idx, 0, n_full, sk_n * VEC,
                                    sv_n * VEC, N, scale2, offs_n, offs_d, offs_dv, D, DV, BD, BDV, BN, False,
                                    EVEN_N, DOT)
    acc, m_i, l_i = _self_fwd_tiles(acc, m_i, l_i, q, lq, kbase, vbase, perm, ids, idx, n_full, n_all, sk_n * VEC,
                                    sv_n * VEC, N, scale2, offs_n, offs_d, offs_dv, D, DV, BD, BDV, BN, True,
                                    EVEN_N, DOT)
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    mrow = offs_m < N
    _st(O + b64 * (so_b * VEC) + h64 * (so_h * VEC), tq, so_n * VEC, offs_dv, acc / l_safe[:, None], mrow, DV, BDV, not EVEN_N)
    lse = tl.where(has, m_i + tl.log2(l_safe), float("inf"))
    if EVEN_N:
        tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse)
    else:
        tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=mrow)


# --- isolated self-attention: backward -------------------------------------------------------------------------

@triton.jit
def _self_dq_tiles(dq, q, do, lse, delta, lq, kbase, vbase, perm, ids, idx, j0, j1, skn, svn, N, scale2,
                   offs_n, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   BN: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr, DOT: tl.constexpr):
    for j in range(j0, j1):
        pos = tl.load(idx + j) * BN + offs_n
        if MASKED and not EVEN_N:
            tk = tl.load(perm + pos, mask=pos < N, other=0)
        else:
            tk = tl.load(perm + pos)
        kp = kbase + (tk * skn)[:, None] + offs_d[None, :]
        vp = vbase + (tk * svn)[:, None] + offs_dv[None, :]
        if D == BD:
            k = tl.load(kp)
        else:
            k = tl.load(kp, mask=offs_d[None, :] < D, other=0.0)
        if DV == BDV:
            v = tl.load(vp)
        else:
            v = tl.load(vp, mask=offs_dv[None, :] < DV, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT) * scale2 - lse[:, None])
        if MASKED:
            if EVEN_N:
                lk = tl.load(ids + pos)
                ok = (lq[:, None] == 0) | (lk[None, :] == 0) | ((lq[:, None] == lk[None, :]) & (lq[:, None] > 0))
            else:
                lk = tl.load(ids + pos, mask=pos < N, other=-2)
                ok = (lq[:, None] == 0) | (lk[None, :] == 0) | ((lq[:, None] == lk[None, :]) & (lq[:, None] > 0))
                ok = ok & (pos < N)[None, :]
            p = tl.where(ok, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT)
    return dq


@triton.jit(do_not_specialize=['H', 'NQB', 'MT', 'PB', 'sq_b', 'sq_h', 'sq_n', 'sk_b', 'sk_h', 'sk_n', 'sv_b', 'sv_h', 'sv_n', 'so_b', 'so_h', 'so_n', 'sdo_b', 'sdo_h', 'sdo_n', 'sdq_b', 'sdq_h', 'sdq_n'])
def _self_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, PERM, IDS, IDX, CNT,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n,
                    sdq_b, sdq_h, sdq_n, N, H, NQB, MT, PB, scale, scale2,
                    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, EVEN_N: tl.constexpr, VEC: tl.constexpr, DOT: tl.constexpr):
    """dQ for one query block; also writes delta = rowsum(O·dO) for the dK/dV kernel (launched after it)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pl = b * PB
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    perm = PERM + pl * N
    ids = IDS + pl * N
    tq = _vec_ld(perm, offs_m, N, 0, not EVEN_N)
    lq = _vec_ld(ids, offs_m, N, 0, not EVEN_N)
    q = _ld(Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC), tq, sq_n * VEC, offs_d, D, BD)
    do = _ld(DO + b64 * (sdo_b * VEC) + h64 * (sdo_h * VEC), tq, sdo_n * VEC, offs_dv, DV, BDV)
    o = _ld(O + b64 * (so_b * VEC) + h64 * (so_h * VEC), tq, so_n * VEC, offs_dv, DV, BDV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = _vec_ld(LSE + bh.to(tl.int64) * N, offs_m, N, float("inf"), not EVEN_N)
    mrow = offs_m < N
    if EVEN_N:
        tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta)
    else:
        tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=mrow)
    kbase = K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC)
    vbase = V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC)
    lst = pl * NQB + qb
    n_full = tl.load(CNT + lst * 2)
    n_all = tl.load(CNT + lst * 2 + 1)
    idx = IDX + lst.to(tl.int64) * MT
    dq = tl.zeros([BM, BD], tl.float32)
    dq = _self_dq_tiles(dq, q, do, lse, delta, lq, kbase, vbase, perm, ids, idx, 0, n_full, sk_n * VEC, sv_n * VEC,
                        N, scale2, offs_n, offs_d, offs_dv, D, DV, BD, BDV, BN, False, EVEN_N, DOT)
    dq = _self_dq_tiles(dq, q, do, lse, delta, lq, kbase, vbase, perm, ids, idx, n_full, n_all, sk_n * VEC,
                        sv_n * VEC, N, scale2, offs_n, offs_d, offs_dv, D, DV, BD, BDV, BN, True, EVEN_N, DOT)
    _st(DQ + b64 * (sdq_b * VEC) + h64 * (sdq_h * VEC), tq, sdq_n * VEC, offs_d, dq * scale, mrow, D, BD, not EVEN_N)


@triton.jit
def _self_dkdv_tiles(dk, dv, k, v, lk, qbase, dobase, lse_row, delta_row, perm, ids, idx, j0, j1, sqn, sdon, N,
                     scale2, offs_m, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                     BDV: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
                     WHICH: tl.constexpr, DOT: tl.constexpr):
    for j in range(j0, j1):
        pos = tl.load(idx + j) * BM + offs_m
        if MASKED and not EVEN_N:
            inb = pos < N
            tq = tl.load(perm + pos, mask=inb, other=0)
            lse = tl.load(lse_row + pos, mask=inb, other=float("inf"))  # rows past N get p = 0
            delta = tl.load(delta_row + pos, mask=inb, other=0.0)
        else:
            tq = tl.load(perm + pos)
            lse = tl.load(lse_row + pos)
            delta = tl.load(delta_row + pos)
        qp = qbase + (tq * sqn)[:, None] + offs_d[None, :]
        dop = dobase + (tq * sdon)[:, None] + offs_dv[None, :]
        if D == BD:
            q = tl.load(qp)
        else:
            q = tl.load(qp, mask=offs_d[None, :] < D, other=0.0)
        if DV == BDV:
            do = tl.load(dop)
        else:
            do = tl.load(dop, mask=offs_dv[None, :] < DV, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT) * scale2 - lse[None, :])  # [BN, BM]
        if MASKED:
            if EVEN_N:
                lq = tl.load(ids + pos)
            else:
                lq = tl.load(ids + pos, mask=pos < N, other=-2)
            ok = (lk[:, None] == 0) | (lq[None, :] == 0) | ((lk[:, None] == lq[None, :]) & (lk[:, None] > 0))
            pt = tl.where(ok, pt, 0.0)
        if WHICH != 2:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT)
        if WHICH != 1:
            dst = pt * (tl.dot(v, tl.trans(do), input_precision=DOT) - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT)
    return dk, dv


@triton.jit(do_not_specialize=['H', 'NKB', 'MT', 'PB', 'sq_b', 'sq_h', 'sq_n', 'sk_b', 'sk_h', 'sk_n', 'sv_b', 'sv_h', 'sv_n', 'sdo_b', 'sdo_h', 'sdo_n', 'sdk_b', 'sdk_h', 'sdk_n', 'sdv_b', 'sdv_h', 'sdv_n'])
def _self_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, PERM, IDS, IDX, CNT,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
                      sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, N, H, NKB, MT, PB, scale, scale2,
                      D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, WHICH: tl.constexpr, EVEN_N: tl.constexpr, VEC: tl.constexpr,
                      DOT: tl.constexpr):
    """dK (WHICH != 1) and dV (WHICH != 2) for one key block, over the query blocks of its lists (transposed
    products, [BN, BM] scores). At 256 padded lanes both fp32 accumulators do not fit in registers: two launches."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pl = b * PB
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = kb * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    perm = PERM + pl * N
    ids = IDS + pl * N
    tk = _vec_ld(perm, offs_n, N, 0, not EVEN_N)
    lk = _vec_ld(ids, offs_n, N, 0, not EVEN_N)
    k = _ld(K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC), tk, sk_n * VEC, offs_d, D, BD)
    v = _ld(V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC), tk, sv_n * VEC, offs_dv, DV, BDV)
    lst = pl * NKB + kb
    n_full = tl.load(CNT + lst * 2)
    n_all = tl.load(CNT + lst * 2 + 1)
    idx = IDX + lst.to(tl.int64) * MT
    qbase = Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC)
    dobase = DO + b64 * (sdo_b * VEC) + h64 * (sdo_h * VEC)
    lse_row = LSE + bh.to(tl.int64) * N
    delta_row = DELTA + bh.to(tl.int64) * N
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    dk, dv = _self_dkdv_tiles(dk, dv, k, v, lk, qbase, dobase, lse_row, delta_row, perm, ids, idx, 0, n_full,
                              sq_n * VEC, sdo_n * VEC, N, scale2, offs_m, offs_d, offs_dv, D, DV, BD, BDV, BM, False,
                              EVEN_N, WHICH, DOT)
    dk, dv = _self_dkdv_tiles(dk, dv, k, v, lk, qbase, dobase, lse_row, delta_row, perm, ids, idx, n_full, n_all,
                              sq_n * VEC, sdo_n * VEC, N, scale2, offs_m, offs_d, offs_dv, D, DV, BD, BDV, BM, True,
                              EVEN_N, WHICH, DOT)
    kmask = offs_n < N
    if WHICH != 1:
        _st(DK + b64 * (sdk_b * VEC) + h64 * (sdk_h * VEC), tk, sdk_n * VEC, offs_d, dk * scale, kmask, D, BD,
            not EVEN_N)
    if WHICH != 2:
        _st(DV_ + b64 * (sdv_b * VEC) + h64 * (sdv_h * VEC), tk, sdv_n * VEC, offs_dv, dv, kmask, DV, BDV, not EVEN_N)


# --- regional cross-attention ----------------------------------------------------------------------------------
# A slot's L keys (77 for SD prompts) sit in one or two key tiles: rows [0, BL) and, when BL2 > 0, the tail
# [BL, BL + BL2) (77 = 64 + 13 in 64 + 16: 80 computed rows, not 128). Rows past L re-read key L-1 (always in
# bounds, so the loads need no row mask) and their scores are masked. Per query row, its weight on slot s is
# w = 1/|S| if it attends s (slot 0: a background row; slot r+1: a row in box r), else 0; the rows' regions
# arrive as sorted bitmasks (REG) and 1/|S| as ICNT.

@triton.jit(do_not_specialize=['H', 'L', 'NQB', 'MS', 'PB', 'sq_b', 'sq_h', 'sq_n', 'sk_b', 'sk_h', 'sk_s', 'sk_l', 'sv_b', 'sv_h', 'sv_s', 'sv_l', 'so_b', 'so_h', 'so_n'])
def _cross_fwd_kernel(Q, K, V, O, PERM, REG, ICNT, IDX, CNT,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_s, sk_l, sv_b, sv_h, sv_s, sv_l, so_b, so_h, so_n,
                      N, H, L, NQB, MS, PB, scale2,
                      D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                      BL: tl.constexpr, BL2: tl.constexpr, DVC: tl.constexpr, EVEN_N: tl.constexpr,
                      VEC: tl.constexpr, DOT: tl.constexpr):
    """Output lanes [c·DVC, (c+1)·DVC) for one query block (c = program_id(2)): at 256 value lanes one program
    per half, so the fp32 accumulator fits in registers (the scores are recomputed per half)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pl = b * PB
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_l = tl.arange(0, BL)
    if BL2 > 0:  # the prompt tail tile
        offs_l2 = BL + tl.arange(0, BL2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.program_id(2) * DVC + tl.arange(0, DVC)
    tq = _vec_ld(PERM + pl * N, offs_m, N, 0, not EVEN_N)
    reg = _vec_ld(REG + pl * N, offs_m, N, 0, not EVEN_N)
    icnt = _vec_ld(ICNT + pl * N, offs_m, N, 0.0, not EVEN_N)
    q = _ld(Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC), tq, sq_n * VEC, offs_d, D, BD)
    kb0 = K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC)
    vb0 = V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC)
    lst = pl * NQB + qb
    n_all = tl.load(CNT + lst * 2 + 1)
    idx = IDX + lst.to(tl.int64) * MS
    acc = tl.zeros([BM, DVC], tl.float32)
    for j in range(0, n_all):
        s = tl.load(idx + j)
        ks = kb0 + s.to(tl.int64) * (sk_s * VEC)
        vs = vb0 + s.to(tl.int64) * (sv_s * VEC)
        kp = ks + (tl.minimum(offs_l, L - 1) * (sk_l * VEC))[:, None] + offs_d[None, :]
        vp = vs + (tl.minimum(offs_l, L - 1) * (sv_l * VEC))[:, None] + offs_dv[None, :]
        if D == BD:
            k = tl.load(kp)
        else:
            k = tl.load(kp, mask=offs_d[None, :] < D, other=0.0)
        sc = tl.where((offs_l < L)[None, :], tl.dot(q, tl.trans(k), input_precision=DOT) * scale2, float("-inf"))
        m = tl.max(sc, 1)
        if BL2 > 0:
            kp2 = ks + (tl.minimum(offs_l2, L - 1) * (sk_l * VEC))[:, None] + offs_d[None, :]
            if D == BD:
                k2 = tl.load(kp2)
            else:
                k2 = tl.load(kp2, mask=offs_d[None, :] < D, other=0.0)
            sc2 = tl.where((offs_l2 < L)[None, :], tl.dot(q, tl.trans(k2), input_precision=DOT) * scale2,
                           float("-inf"))
            m = tl.maximum(m, tl.max(sc2, 1))
        p = tl.exp2(sc - m[:, None])
        lsum = tl.sum(p, 1)
        if BL2 > 0:
            p2 = tl.exp2(sc2 - m[:, None])
            lsum += tl.sum(p2, 1)
        act = tl.where(s == 0, reg == 0, ((reg >> tl.maximum(s - 1, 0)) & 1) != 0)
        w = tl.where(act, icnt, 0.0) / lsum
        if DV == DVC:
            v = tl.load(vp)
        else:
            v = tl.load(vp, mask=offs_dv[None, :] < DV, other=0.0)
        acc = tl.dot((p * w[:, None]).to(v.dtype), v, acc, input_precision=DOT)
        if BL2 > 0:
            vp2 = vs + (tl.minimum(offs_l2, L - 1) * (sv_l * VEC))[:, None] + offs_dv[None, :]
            if DV == DVC:
                v2 = tl.load(vp2)
            else:
                v2 = tl.load(vp2, mask=offs_dv[None, :] < DV, other=0.0)
            acc = tl.dot((p2 * w[:, None]).to(v2.dtype), v2, acc, input_precision=DOT)
    _st(O + b64 * (so_b * VEC) + h64 * (so_h * VEC), tq, so_n * VEC, offs_dv, acc, offs_m < N, DV, DVC, not EVEN_N)


@triton.jit(do_not_specialize=['H', 'L', 'NQB', 'MS', 'PB', 'sq_b', 'sq_h', 'sq_n', 'sk_b', 'sk_h', 'sk_s', 'sk_l', 'sv_b', 'sv_h', 'sv_s', 'sv_l', 'sdo_b', 'sdo_h', 'sdo_n', 'sdq_b', 'sdq_h', 'sdq_n'])
def _cross_dq_kernel(Q, K, V, DO, DQ, PERM, REG, ICNT, IDX, CNT,
                     sq_b, sq_h, sq_n, sk_b, sk_h, sk_s, sk_l, sv_b, sv_h, sv_s, sv_l, sdo_b, sdo_h, sdo_n,
                     sdq_b, sdq_h, sdq_n, N, H, L, NQB, MS, PB, scale, scale2,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                     BL: tl.constexpr, BL2: tl.constexpr, DC: tl.constexpr, EVEN_N: tl.constexpr,
                     VEC: tl.constexpr, DOT: tl.constexpr):
    """dQ lanes [c·DC, (c+1)·DC) of one query block (c = program_id(2); at 256 lanes, halves)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pl = b * PB
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_l = tl.arange(0, BL)
    if BL2 > 0:  # the prompt tail tile
        offs_l2 = BL + tl.arange(0, BL2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_dc = tl.program_id(2) * DC + tl.arange(0, DC)
    tq = _vec_ld(PERM + pl * N, offs_m, N, 0, not EVEN_N)
    reg = _vec_ld(REG + pl * N, offs_m, N, 0, not EVEN_N)
    icnt = _vec_ld(ICNT + pl * N, offs_m, N, 0.0, not EVEN_N)
    q = _ld(Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC), tq, sq_n * VEC, offs_d, D, BD)
    do = _ld(DO + b64 * (sdo_b * VEC) + h64 * (sdo_h * VEC), tq, sdo_n * VEC, offs_dv, DV, BDV)
    kb0 = K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC)
    vb0 = V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC)
    lst = pl * NQB + qb
    n_all = tl.load(CNT + lst * 2 + 1)
    idx = IDX + lst.to(tl.int64) * MS
    dq = tl.zeros([BM, DC], tl.float32)
    for j in range(0, n_all):
        s = tl.load(idx + j)
        ks = kb0 + s.to(tl.int64) * (sk_s * VEC)
        vs = vb0 + s.to(tl.int64) * (sv_s * VEC)
        kp = ks + (tl.minimum(offs_l, L - 1) * (sk_l * VEC))[:, None] + offs_d[None, :]
        vp = vs + (tl.minimum(offs_l, L - 1) * (sv_l * VEC))[:, None] + offs_dv[None, :]
        if D == BD:
            k = tl.load(kp)
        else:
            k = tl.load(kp, mask=offs_d[None, :] < D, other=0.0)
        if DV == BDV:
            v = tl.load(vp)
        else:
            v = tl.load(vp, mask=offs_dv[None, :] < DV, other=0.0)
        sc = tl.where((offs_l < L)[None, :], tl.dot(q, tl.trans(k), input_precision=DOT) * scale2, float("-inf"))
        m = tl.max(sc, 1)
        if BL2 > 0:
            kp2 = ks + (tl.minimum(offs_l2, L - 1) * (sk_l * VEC))[:, None] + offs_d[None, :]
            vp2 = vs + (tl.minimum(offs_l2, L - 1) * (sv_l * VEC))[:, None] + offs_dv[None, :]
            if D == BD:
                k2 = tl.load(kp2)
            else:
                k2 = tl.load(kp2, mask=offs_d[None, :] < D, other=0.0)
            if DV == BDV:
                v2 = tl.load(vp2)
            else:
                v2 = tl.load(vp2, mask=offs_dv[None, :] < DV, other=0.0)
            sc2 = tl.where((offs_l2 < L)[None, :], tl.dot(q, tl.trans(k2), input_precision=DOT) * scale2,
                           float("-inf"))
            m = tl.maximum(m, tl.max(sc2, 1))
        p = tl.exp2(sc - m[:, None])
        lsum = tl.sum(p, 1)
        if BL2 > 0:
            p2 = tl.exp2(sc2 - m[:, None])
            lsum += tl.sum(p2, 1)
        act = tl.where(s == 0, reg == 0, ((reg >> tl.maximum(s - 1, 0)) & 1) != 0)
        w = tl.where(act, icnt, 0.0)
        p = p / lsum[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT) * w[:, None]
        rows = tl.sum(p * dp, 1)
        if BL2 > 0:
            p2 = p2 / lsum[:, None]
            dp2 = tl.dot(do, tl.trans(v2), input_precision=DOT) * w[:, None]
            rows += tl.sum(p2 * dp2, 1)
        if DC == BD:
            kc = k
        else:  # this program's lanes of k
            kc = tl.load(ks + (tl.minimum(offs_l, L - 1) * (sk_l * VEC))[:, None] + offs_dc[None, :],
                         mask=offs_dc[None, :] < D, other=0.0)
        dq = tl.dot((p * (dp - rows[:, None])).to(k.dtype), kc, dq, input_precision=DOT)
        if BL2 > 0:
            if DC == BD:
                kc2 = k2
            else:
                kc2 = tl.load(ks + (tl.minimum(offs_l2, L - 1) * (sk_l * VEC))[:, None] + offs_dc[None, :],
                              mask=offs_dc[None, :] < D, other=0.0)
            dq = tl.dot((p2 * (dp2 - rows[:, None])).to(k2.dtype), kc2, dq, input_precision=DOT)
    _st(DQ + b64 * (sdq_b * VEC) + h64 * (sdq_h * VEC), tq, sdq_n * VEC, offs_dc, dq * scale, offs_m < N, D, DC,
        not EVEN_N)


@triton.jit(do_not_specialize=['H', 'S', 'L', 'NQB', 'MQ', 'PB', 'SPLIT', 'dv_offset', 'split_numel', 'sq_b', 'sq_h', 'sq_n', 'sdo_b', 'sdo_h', 'sdo_n', 'sk_b', 'sk_h', 'sk_s', 'sk_l', 'sv_b', 'sv_h', 'sv_s', 'sv_l'])
def _cross_dkdv_kernel(Q, DO, K, V, PART, PERM, REG, ICNT, IDX, CNT,
                       sq_b, sq_h, sq_n, sdo_b, sdo_h, sdo_n, sk_b, sk_h, sk_s, sk_l, sv_b, sv_h, sv_s, sv_l,
                       N, H, S, L, NQB, MQ, PB, SPLIT, dv_offset, split_numel, scale, scale2,
                       D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                       BL: tl.constexpr, BL2: tl.constexpr, DC: tl.constexpr, WHICH: tl.constexpr,
                       EVEN_N: tl.constexpr, VEC: tl.constexpr, DOT: tl.constexpr):
    """Partial dK (WHICH != 1) and dV (WHICH != 2) of slot s over slice z of the slot's query blocks, in fp32:
    PART[z] holds dK [B, H, S, L, D] then dV [B, H, S, L, DV] (flat, dV at ``dv_offset``). Transposed products:
    the scores are [keys, queries] and the softmax runs over axis 0. The dK pass writes lanes [c·DC, (c+1)·DC)
    (program_id(2) = z·(BD/DC) + c): at 256 lanes the fp32 accumulator is split in halves."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    z = tl.program_id(2) // (BD // DC)
    offs_dc = (tl.program_id(2) % (BD // DC)) * DC + tl.arange(0, DC)
    b = bh // H
    h = bh % H
    pl = b * PB
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_l = tl.arange(0, BL)
    if BL2 > 0:  # the prompt tail tile
        offs_l2 = BL + tl.arange(0, BL2)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    ks = K + b64 * (sk_b * VEC) + h64 * (sk_h * VEC) + s.to(tl.int64) * (sk_s * VEC)
    vs = V + b64 * (sv_b * VEC) + h64 * (sv_h * VEC) + s.to(tl.int64) * (sv_s * VEC)
    k = _ld(ks, tl.minimum(offs_l, L - 1), sk_l * VEC, offs_d, D, BD)
    v = _ld(vs, tl.minimum(offs_l, L - 1), sv_l * VEC, offs_dv, DV, BDV)
    dk = tl.zeros([BL, DC], tl.float32)
    dv = tl.zeros([BL, BDV], tl.float32)
    if BL2 > 0:
        k2 = _ld(ks, tl.minimum(offs_l2, L - 1), sk_l * VEC, offs_d, D, BD)
        v2 = _ld(vs, tl.minimum(offs_l2, L - 1), sv_l * VEC, offs_dv, DV, BDV)
        dk2 = tl.zeros([BL2, DC], tl.float32)
        dv2 = tl.zeros([BL2, BDV], tl.float32)
    qbase = Q + b64 * (sq_b * VEC) + h64 * (sq_h * VEC)
    dobase = DO + b64 * (sdo_b * VEC) + h64 * (sdo_h * VEC)
    sqn = sq_n * VEC
    sdon = sdo_n * VEC
    perm = PERM + pl * N
    regs = REG + pl * N
    icnts = ICNT + pl * N
    lst = pl * S + s
    n_all = tl.load(CNT + lst * 2 + 1)
    chunk = tl.cdiv(n_all, SPLIT)
    j0 = z * chunk
    j1 = tl.minimum(j0 + chunk, n_all)
    idx = IDX + lst.to(tl.int64) * MQ
    for j in range(j0, j1):
        pos = tl.load(idx + j) * BM + offs_m
        if EVEN_N:
            tq = tl.load(perm + pos)
            reg = tl.load(regs + pos)
            icnt = tl.load(icnts + pos)
        else:
            tq = tl.load(perm + pos, mask=pos < N, other=0)
            reg = tl.load(regs + pos, mask=pos < N, other=0)
            icnt = tl.load(icnts + pos, mask=pos < N, other=0.0)  # rows past N get weight 0
        qp = qbase + (tq * sqn)[:, None] + offs_d[None, :]
        dop = dobase + (tq * sdon)[:, None] + offs_dv[None, :]
        if D == BD:
            q = tl.load(qp)
        else:
            q = tl.load(qp, mask=offs_d[None, :] < D, other=0.0)
        if DV == BDV:
            do = tl.load(dop)
        else:
            do = tl.load(dop, mask=offs_dv[None, :] < DV, other=0.0)
        act = tl.where(s == 0, reg == 0, ((reg >> tl.maximum(s - 1, 0)) & 1) != 0)
        w = tl.where(act, icnt, 0.0)
        st = tl.where((offs_l < L)[:, None], tl.dot(k, tl.trans(q), input_precision=DOT) * scale2, float("-inf"))
        m = tl.max(st, 0)
        if BL2 > 0:
            st2 = tl.where((offs_l2 < L)[:, None], tl.dot(k2, tl.trans(q), input_precision=DOT) * scale2,
                           float("-inf"))
            m = tl.maximum(m, tl.max(st2, 0))
        pt = tl.exp2(st - m[None, :])
        lsum = tl.sum(pt, 0)
        if BL2 > 0:
            pt2 = tl.exp2(st2 - m[None, :])
            lsum += tl.sum(pt2, 0)
        pt = pt / lsum[None, :]
        if BL2 > 0:
            pt2 = pt2 / lsum[None, :]
        if WHICH != 2:
            dv = tl.dot((pt * w[None, :]).to(do.dtype), do, dv, input_precision=DOT)
            if BL2 > 0:
                dv2 = tl.dot((pt2 * w[None, :]).to(do.dtype), do, dv2, input_precision=DOT)
        if WHICH != 1:
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT) * w[None, :]
            cols = tl.sum(pt * dpt, 0)
            if BL2 > 0:
                dpt2 = tl.dot(v2, tl.trans(do), input_precision=DOT) * w[None, :]
                cols += tl.sum(pt2 * dpt2, 0)
            if DC == BD:
                qc = q
            else:  # this program's lanes of q
                qc = tl.load(qbase + (tq * sqn)[:, None] + offs_dc[None, :], mask=offs_dc[None, :] < D, other=0.0)
            dk = tl.dot((pt * (dpt - cols[None, :])).to(q.dtype), qc, dk, input_precision=DOT)
            if BL2 > 0:
                dk2 = tl.dot((pt2 * (dpt2 - cols[None, :])).to(q.dtype), qc, dk2, input_precision=DOT)
    base = PART + z.to(tl.int64) * split_numel
    slab = (bh.to(tl.int64) * S + s) * L
    if WHICH != 1:
        tl.store(base + (slab + offs_l)[:, None] * D + offs_dc[None, :], dk * scale,
                 mask=(offs_l < L)[:, None] & (offs_dc[None, :] < D))
        if BL2 > 0:
            tl.store(base + (slab + offs_l2)[:, None] * D + offs_dc[None, :], dk2 * scale,
                     mask=(offs_l2 < L)[:, None] & (offs_dc[None, :] < D))
    if WHICH != 2:
        tl.store(base + dv_offset + (slab + offs_l)[:, None] * DV + offs_dv[None, :], dv,
                 mask=(offs_l < L)[:, None] & (offs_dv[None, :] < DV))
        if BL2 > 0:
            tl.store(base + dv_offset + (slab + offs_l2)[:, None] * DV + offs_dv[None, :], dv2,
                     mask=(offs_l2 < L)[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _split_sum_kernel(PART, OUT_K, OUT_V, SPLIT, NK, NUMEL, BLOCK: tl.constexpr):
    """Σ_z PART[z, i] in fp32, cast to the output dtype: i < NK to OUT_K[i], the rest to OUT_V[i - NK]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    acc = tl.zeros([BLOCK], tl.float32)
    for z in range(0, SPLIT):
        acc += tl.load(PART + z * NUMEL + offs, mask=m, other=0.0)
    tl.store(OUT_K + offs, acc.to(OUT_K.dtype.element_ty), mask=m & (offs < NK))
    tl.store(OUT_V + (offs - NK), acc.to(OUT_V.dtype.element_ty), mask=m & (offs >= NK))


# --- tile configurations ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    bm: int  # query rows per block
    bn: int  # key rows per block (cross-attention: the padded prompt length)
    warps: int
    stages: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Per (kernel, padded head dim), fp16 / bf16: the candidates a GPU run may choose between (first = default).
# Every entry is compiled for sm_90 by ``python -m kernels.aot`` (bench/results/triton_aot_sm90.csv): no spills
# (cross_dq at 256 lanes has no entry, see below), cp.async in every tile loop, wgmma. M of the MMAs: BM for the
# forward and dQ kernels, BN (self) or the 64 + 16 prompt rows (cross) for dK/dV. Cross-attention's ``bn`` is
# the 80 key rows a 77-token prompt is computed as (``key_tiles``).
CONFIGS = {
    ("self_fwd", 64): [Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 2)],
    ("self_fwd", 128): [Tiles(128, 64, 8, 3)],
    ("self_fwd", 256): [Tiles(64, 64, 8, 2)],
    ("self_dq", 64): [Tiles(128, 64, 8, 3)],
    ("self_dq", 128): [Tiles(128, 64, 8, 2)],
    ("self_dq", 256): [Tiles(64, 32, 8, 2)],
    ("self_dkdv", 64): [Tiles(64, 128, 8, 3)],
    ("self_dkdv", 128): [Tiles(64, 64, 8, 2)],
    ("self_dkdv", 256): [Tiles(32, 64, 8, 2)],  # two passes (dV, dK)
    ("cross_fwd", 64): [Tiles(128, 80, 8, 2)],
    ("cross_fwd", 128): [Tiles(128, 80, 8, 2)],
    ("cross_fwd", 256): [Tiles(64, 80, 8, 2)],  # value lanes in halves
    ("cross_dq", 64): [Tiles(128, 80, 8, 2)],
    ("cross_dq", 128): [Tiles(128, 80, 8, 2)],
    # ("cross_dq", 256): none fits: with q and dO resident at 256 lanes every tiling spills or needs > 227 KB of
    # shared memory (python -m kernels.aot); cross_backward computes that dQ with PyTorch (N <= 768 there)
    ("cross_dkdv", 64): [Tiles(64, 80, 8, 2)],
    ("cross_dkdv", 128): [Tiles(32, 80, 4, 2)],  # two passes
    ("cross_dkdv_dv", 256): [Tiles(16, 80, 8, 2)],  # two passes with their own tiles; dK lanes in quarters
    ("cross_dkdv_dk", 256): [Tiles(16, 80, 4, 2)],
}
# Under the interpreter: small, unequal tiles so tiny test shapes still cross several tile boundaries.
INTERPRET_TILES = {"self_fwd": Tiles(32, 16, 1, 1), "self_dq": Tiles(16, 32, 1, 1), "self_dkdv": Tiles(32, 16, 1, 1),
                   "cross_fwd": Tiles(32, 128, 1, 1), "cross_dq": Tiles(16, 128, 1, 1),
                   "cross_dkdv": Tiles(16, 128, 1, 1)}

_CHOSEN: dict = {}  # (kernel, D, DV, N, dtype) -> Tiles, filled by autotune on GPU


def candidates(kernel: str, d: int, dv: int, dtype) -> list:
    """kernel: a name of CONFIGS; a dK/dV pass (``*_dv``, ``*_dk``) falls back to its kernel's entry."""
    if interpreting():
        return [INTERPRET_TILES[kernel.removesuffix("_dv").removesuffix("_dk")]]
    if dtype == torch.float32:  # kernels.isolated_self_attention / regional_cross_attention route it elsewhere
        raise ValueError("the Triton kernels take fp16 / bf16 on GPU; fp32 runs on the segmented path there")
    lanes = _pow2(max(d, dv), 64)
    return CONFIGS.get((kernel, lanes)) or CONFIGS[(kernel.removesuffix("_dv").removesuffix("_dk"), lanes)]


def tiles_for(kernel: str, d: int, dv: int, n: int, dtype, bench=None) -> Tiles:
    """The configuration for one (kernel, head dims, N, dtype). With several candidates on a GPU, `bench(t)`
    (milliseconds for one launch with tiles t) picks the fastest once; the choice is cached (a small autotune
    keyed on (D, N), as the tile lists depend on the tiles and must be built for the chosen one)."""
    key = (kernel, d, dv, n, dtype)
    t = _CHOSEN.get(key)
    if t is None:
        cands = candidates(kernel, d, dv, dtype)
        t = cands[0] if len(cands) == 1 or bench is None else min(cands, key=bench)
        _CHOSEN[key] = t
    return t


# --- launches ---------------------------------------------------------------------------------------------------

def _vec(*tensors) -> int:
    """Largest element count v (up to 16 bytes) dividing every non-unit stride and every data pointer."""
    v = 16 // tensors[0].element_size()
    while v > 1 and any(t.data_ptr() % (v * t.element_size()) or any(s % v for s in t.stride()[:-1])
                        for t in tensors):
        v //= 2
    return v


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _s3(x, vec):
    return [x.stride(0) // vec, x.stride(1) // vec, x.stride(2) // vec]


def _s4(x, vec):
    return [x.stride(0) // vec, x.stride(1) // vec, x.stride(2) // vec, x.stride(3) // vec]


def _meta(d, dv, t: Tiles, even, vec, dtype):
    return dict(D=d, DV=dv, BD=_pow2(d), BDV=_pow2(dv), BM=t.bm, DOT="ieee" if dtype == torch.float32 else None,
                EVEN_N=even, VEC=vec,
                num_warps=t.warps, num_stages=t.stages)


def _pb(lay: Layout) -> int:
    return 1 if lay.perm.shape[0] > 1 else 0


def self_fwd_launch(q, k, v, o, lse, lay: Layout, lists: TileLists, t: Tiles, scale):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    vec = _vec(q, k, v, o)
    nqb = triton.cdiv(n, t.bm)
    args = [q, k, v, o, lse, lay.perm, lay.ids, lists.idx, lists.cnt, *_s3(q, vec), *_s3(k, vec), *_s3(v, vec),
            *_s3(o, vec), n, h, nqb, lists.idx.shape[-1], _pb(lay), scale * LOG2E]
    meta = _meta(d, dv, t, n % t.bm == 0 and n % t.bn == 0, vec, q.dtype)
    return _self_fwd_kernel, (nqb, b * h), args, dict(meta, BN=t.bn)


def self_dq_launch(q, k, v, o, do, lse, delta, dq, lay, lists, t, scale):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    vec = _vec(q, k, v, o, do, dq)
    nqb = triton.cdiv(n, t.bm)
    args = [q, k, v, o, do, lse, delta, dq, lay.perm, lay.ids, lists.idx, lists.cnt, *_s3(q, vec), *_s3(k, vec),
            *_s3(v, vec), *_s3(o, vec), *_s3(do, vec), *_s3(dq, vec), n, h, nqb, lists.idx.shape[-1], _pb(lay), scale,
            scale * LOG2E]
    return _self_dq_kernel, (nqb, b * h), args, dict(_meta(d, dv, t, n % t.bm == 0 and n % t.bn == 0, vec, q.dtype),
                                                      BN=t.bn)


PASS_NAMES = {0: "cross_dkdv", 1: "cross_dkdv_dv", 2: "cross_dkdv_dk"}


def two_pass(kernel, d, dv) -> tuple:
    """WHICH values of the dK/dV launches: both in one pass, or dV then dK when two fp32 accumulators do not fit
    in registers (self: 256 lanes; cross: from 128 lanes, its prompt tile is 64 + 16 rows)."""
    return (1, 2) if _pow2(max(d, dv)) > (128 if kernel == "self_dkdv" else 64) else (0,)


def self_dkdv_launch(q, k, v, do, lse, delta, dk, dv_, lay, lists, t, scale, which=0):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    vec = _vec(q, k, v, do, dk, dv_)
    nkb = triton.cdiv(n, t.bn)
    args = [q, k, v, do, lse, delta, dk, dv_, lay.perm, lay.ids, lists.idx, lists.cnt, *_s3(q, vec), *_s3(k, vec),
            *_s3(v, vec), *_s3(do, vec), *_s3(dk, vec), *_s3(dv_, vec), n, h, nkb, lists.idx.shape[-1], _pb(lay),
            scale, scale * LOG2E]
    return _self_dkdv_kernel, (nkb, b * h), args, dict(_meta(d, dv, t, n % t.bm == 0 and n % t.bn == 0, vec, q.dtype),
                                                        BN=t.bn, WHICH=which)


def key_tiles(l: int) -> tuple:
    """(BL, BL2): a slot's keys as one power-of-two tile, or 64 + a 16/32 tail (L = 77: 80 rows, not 128)."""
    if l <= 64:
        return _pow2(l), 0
    if l <= 96:
        return 64, _pow2(l - 64)
    return 128, 0


def cross_fwd_launch(q, k, v, o, lay, lists, t, scale):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    vec = _vec(q, k, v, o)
    nqb = triton.cdiv(n, t.bm)
    args = [q, k, v, o, lay.perm, lay.reg, lay.inv_cnt, lists.idx, lists.cnt, *_s3(q, vec), *_s4(k, vec),
            *_s4(v, vec), *_s3(o, vec), n, h, k.shape[3], nqb, lists.idx.shape[-1], _pb(lay), scale * LOG2E]
    bl, bl2 = key_tiles(k.shape[3])
    dvc = min(_pow2(dv), 128)
    return _cross_fwd_kernel, (nqb, b * h, _pow2(dv) // dvc), args, dict(_meta(d, dv, t, n % t.bm == 0, vec, q.dtype),
                                                                       BL=bl, BL2=bl2, DVC=dvc)


def cross_dq_launch(q, k, v, do, dq, lay, lists, t, scale):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    vec = _vec(q, k, v, do, dq)
    nqb = triton.cdiv(n, t.bm)
    args = [q, k, v, do, dq, lay.perm, lay.reg, lay.inv_cnt, lists.idx, lists.cnt, *_s3(q, vec), *_s4(k, vec),
            *_s4(v, vec), *_s3(do, vec), *_s3(dq, vec), n, h, k.shape[3], nqb, lists.idx.shape[-1], _pb(lay), scale,
            scale * LOG2E]
    bl, bl2 = key_tiles(k.shape[3])
    dc = min(_pow2(d), 128)
    return _cross_dq_kernel, (nqb, b * h, _pow2(d) // dc), args, dict(_meta(d, dv, t, n % t.bm == 0, vec, q.dtype),
                                                                    BL=bl, BL2=bl2, DC=dc)


def cross_split(lists: TileLists, slots: int, bh: int, sms: int = 132) -> int:
    """Query-range slices per (slot, b·h) for the dK/dV grid: about two programs per SM, each slice ≥ 2 query
    blocks (SD1.5 at N = 12,288 and B·H = 16: 48 (slot, b·h) pairs alone would leave most SMs idle)."""
    longest = lists.idx.shape[-1]
    return max(1, min(triton.cdiv(2 * sms, slots * bh), longest // 2))


def cross_dkdv_launch(q, do, k, v, part, lay, lists, t, split, which, scale):
    b, h, n, d = q.shape
    s, l, dv = k.shape[2], k.shape[3], v.shape[-1]
    vec = _vec(q, do, k, v)
    args = [q, do, k, v, part, lay.perm, lay.reg, lay.inv_cnt, lists.idx, lists.cnt, *_s3(q, vec), *_s3(do, vec),
            *_s4(k, vec), *_s4(v, vec), n, h, s, l, triton.cdiv(n, t.bm), lists.idx.shape[-1], _pb(lay), split,
            b * h * s * l * d, b * h * s * l * (d + dv), scale, scale * LOG2E]
    bl, bl2 = key_tiles(l)
    dc = min(_pow2(d), 64) if which == 2 else _pow2(d)  # the dK-only pass splits its lanes in 64s
    return _cross_dkdv_kernel, (s, b * h, split * (_pow2(d) // dc)), args, dict(
        _meta(d, dv, t, n % t.bm == 0, vec, q.dtype), BL=bl, BL2=bl2, DC=dc, WHICH=which)


def _run(launch):
    fn, grid, args, meta = launch
    fn[grid](*args, **meta)


def _cuda_bench(make):
    """Milliseconds of one launch built by make() (used to choose between tile candidates, once per shape)."""
    def ms(t):
        from triton.testing import do_bench
        return do_bench(lambda: _run(make(t)), warmup=5, rep=20)
    return ms


# --- forward / backward entry points (on region-sorted plans; the public wrappers handle layouts) -----------------

class Plans:
    """One layout and its tile / slot lists, built lazily per tile size (the kernels' configurations differ)."""

    def __init__(self, lay: Layout):
        self.lay = lay
        self._lists = {}

    def lists(self, bm, bn):
        key = (bm, bn)
        if key not in self._lists:
            self._lists[key] = self_lists(self.lay, bm, bn)
        return self._lists[key]

    def cross(self, slots, bm):
        key = ("cross", slots, bm)
        if key not in self._lists:
            self._lists[key] = cross_lists(self.lay, slots, bm)
        return self._lists[key]


def self_forward(q, k, v, plans: Plans, scale):
    """-> o [B, H, N, Dv] (q's memory order), lse [B, H, N] fp32 (log2 domain, sorted order; +inf where no key)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    o = empty_rows(q, v.shape[-1])
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)

    def make(t):
        return self_fwd_launch(q, k, v, o, lse, plans.lay, plans.lists(t.bm, t.bn)[0], t, scale)
    t = tiles_for("self_fwd", d, v.shape[-1], n, q.dtype, _cuda_bench(make) if q.is_cuda else None)
    _run(make(t))
    return o, lse


def self_backward(do, q, k, v, o, lse, plans: Plans, scale):
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    dv_ = v.shape[-1]
    dq, dk, dv = empty_rows(q, d), empty_rows(k, d), empty_rows(v, dv_)
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    tq = tiles_for("self_dq", d, dv_, n, q.dtype)
    _run(self_dq_launch(q, k, v, o, do, lse, delta, dq, plans.lay, plans.lists(tq.bm, tq.bn)[0], tq, scale))
    tk = tiles_for("self_dkdv", d, dv_, n, q.dtype)
    for which in two_pass("self_dkdv", d, dv_):
        _run(self_dkdv_launch(q, k, v, do, lse, delta, dk, dv, plans.lay, plans.lists(tk.bm, tk.bn)[1], tk, scale,
                              which))
    return dq, dk, dv


def cross_forward(q, k, v, plans: Plans, scale):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    if k.shape[3] > 128:
        raise ValueError(f"regional cross-attention supports L <= 128 keys per slot, got {k.shape[3]}")
    o = empty_rows(q, v.shape[-1])
    t = tiles_for("cross_fwd", d, v.shape[-1], n, q.dtype)
    _run(cross_fwd_launch(q, k, v, o, plans.lay, plans.cross(k.shape[2], t.bm)[0], t, scale))
    return o


def _cross_dq_torch(do, q, k, v, lay: Layout, scale):
    """dQ of regional cross-attention with PyTorch GEMMs ([B, H, N, L] per slot): the 256-lane case (d = 160,
    N <= 768 in SD1.5), where no Triton tiling of the kernel fits a Hopper SM's registers and shared memory."""
    reg = torch.empty_like(lay.reg).scatter_(1, lay.perm.long(), lay.reg)  # back to token order, [P, N]
    icnt = torch.empty_like(lay.inv_cnt).scatter_(1, lay.perm.long(), lay.inv_cnt)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    qf, dof = q.float(), do.float()
    for s in range(k.shape[2]):
        act = (reg == 0) if s == 0 else ((reg >> (s - 1)) & 1).bool()
        w = (act.float() * icnt)[:, None, :, None]  # [P, 1, N, 1]
        kf, vf = k[:, :, s].float(), v[:, :, s].float()
        p = (qf @ kf.transpose(-1, -2) * scale).softmax(-1)
        dp = (dof @ vf.transpose(-1, -2)) * w
        dq += (p * (dp - (p * dp).sum(-1, keepdim=True))) @ kf
    out = empty_rows(q, q.shape[-1])
    out.copy_(dq * scale)
    return out


def cross_backward(do, q, k, v, plans: Plans, scale):
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    s, l, dv_ = k.shape[2], k.shape[3], v.shape[-1]
    if _pow2(d) > 128 and not interpreting():
        dq = _cross_dq_torch(do, q, k, v, plans.lay, scale)
    else:
        dq = empty_rows(q, d)
        t = tiles_for("cross_dq", d, dv_, n, q.dtype)
        _run(cross_dq_launch(q, k, v, do, dq, plans.lay, plans.cross(s, t.bm)[0], t, scale))
    nk, nv = b * h * s * l * d, b * h * s * l * dv_
    passes = two_pass("cross_dkdv", d, dv_)
    split = 2  # query-range slices per slot (under the interpreter: 2, so the reduction is exercised)
    if q.is_cuda:
        split = min(cross_split(plans.cross(s, tiles_for(PASS_NAMES[w], d, dv_, n, q.dtype).bm)[1], s, b * h)
                    for w in passes)
    part = torch.empty(split, nk + nv, device=q.device, dtype=torch.float32)  # every program writes its whole slab
    for which in passes:
        t = tiles_for(PASS_NAMES[which], d, dv_, n, q.dtype)
        _run(cross_dkdv_launch(q, do, k, v, part, plans.lay, plans.cross(s, t.bm)[1], t, split, which, scale))
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)  # contiguous, as PART is laid out
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _split_sum_kernel[(triton.cdiv(nk + nv, 1024),)](part, dk, dv, split, nk, nk + nv, BLOCK=1024)
    return dq, dk, dv
