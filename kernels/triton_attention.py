"""Triton kernels for LoRA-Composer's two attention rules, forward and backward, no N×N tensor.

Algorithm: FlashAttention-2 style online softmax (Dao 2023) in the log2 domain, fp32 statistics.
- ``isolated self-attention`` (method.md §5): tokens are sorted region-major by the wrapper (exact: SD1.5
  attention has no positional term, kernels.md §3), a per-(q block, k block) status table (skip / full /
  partial, O((N/BLOCK)²) int8) lets the kernel skip fully masked tiles and compute the label rule only on
  partial tiles: allowed <=> lab_q = 0 or lab_k = 0 or (lab_q = lab_k > 0), with lab = 0 for background,
  the bitmask for single-box tokens and −1 for overlap tokens.
- ``regional cross-attention`` (method.md §4): per query tile, one softmax per active slot (slot 0 = global
  prompt for background queries, slot r+1 for queries in box r), averaged over active slots. L ≤ 128 fits in
  one key tile. Value and query head dims may differ (the per-region ``to_out`` LoRA rides along as extra
  value channels, see ``kernels.regional_cross_attention_lora``).
Shapes: head dims are padded to powers of two in registers (40→64, 80→128, 160→256) with masked lanes.
dtypes: fp32 (IEEE dots), fp16, bf16 (GPU). On CPU tensors the kernels run under TRITON_INTERPRET=1.
Caveat: fully blocked self-attention rows (overlap queries at a level with no background) are not handled
here; the public wrapper routes them to the reference formula.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def default_block(head_dim: int = 64) -> int:
    """32 under the interpreter (exercises several tiles on small tests); on GPU 64, or 32 when the padded head
    dim is 256 (d = 160), to keep the fp32 accumulators in registers."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 32
    return 64 if _pow2(head_dim) <= 128 else 32


# --- shared tile helpers --------------------------------------------------------------------------------------

@triton.jit
def _tile(ptr, rows, nrows, cols, ncols, stride):
    """Load a [len(rows), len(cols)] tile of a row-major matrix, zero outside [nrows, ncols]."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=(rows[:, None] < nrows) & (cols[None, :] < ncols),
                   other=0.0)


@triton.jit
def _allowed(lq, lk):
    """The isolation rule on labels (0 background, bitmask single box, −1 overlap): [BM] × [BN] -> [BM, BN]."""
    return (lq[:, None] == 0) | (lk[None, :] == 0) | ((lq[:, None] == lk[None, :]) & (lq[:, None] > 0))


# --- isolated self-attention ----------------------------------------------------------------------------------

@triton.jit
def _self_fwd_kernel(Q, K, V, O, LSE, LAB, TABLE, N, H, D, DV, NQB, NKB, scale2,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < N
    q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
    lq = tl.load(LAB + b * N + offs_m, mask=mrow, other=0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for j in range(0, NKB):
        st = tl.load(TABLE + (b * NQB + pid_m) * NKB + j)
        if st != 0:
            offs_k = j * BN + offs_n
            mk = offs_k < N
            k = _tile(K + bh * N * D, offs_k, N, offs_d, D, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            valid = mrow[:, None] & mk[None, :]
            if st == 1:
                lk = tl.load(LAB + b * N + offs_k, mask=mk, other=0)
                ok = _allowed(lq, lk)
                valid = valid & ok
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(V + bh * N * DV, offs_k, N, offs_dv, DV, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty), mask=mrow[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * N + offs_m, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf")), mask=mrow)


@triton.jit
def _self_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, LAB, TABLE, N, H, D, DV, NQB, NKB, scale, scale2,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_k = pid_n * BN + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mk = offs_k < N
    k = _tile(K + bh * N * D, offs_k, N, offs_d, D, D)
    v = _tile(V + bh * N * DV, offs_k, N, offs_dv, DV, DV)
    lk = tl.load(LAB + b * N + offs_k, mask=mk, other=0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for i in range(0, NQB):
        st = tl.load(TABLE + (b * NQB + i) * NKB + pid_n)
        if st != 0:
            offs_m = i * BM + offs_m0
            mrow = offs_m < N
            q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
            do = _tile(DO + bh * N * DV, offs_m, N, offs_dv, DV, DV)
            lse = tl.load(LSE + bh * N + offs_m, mask=mrow, other=float("inf"))
            dl = tl.load(DELTA + bh * N + offs_m, mask=mrow, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            valid = mrow[:, None] & mk[None, :]
            if st == 1:
                lq = tl.load(LAB + b * N + offs_m, mask=mrow, other=0)
                ok = _allowed(lq, lk)
                valid = valid & ok
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - dl[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    tl.store(DK + bh * N * D + offs_k[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mk[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + bh * N * DV + offs_k[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=mk[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _self_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LAB, TABLE, N, H, D, DV, NQB, NKB, scale, scale2,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < N
    q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
    do = _tile(DO + bh * N * DV, offs_m, N, offs_dv, DV, DV)
    lse = tl.load(LSE + bh * N + offs_m, mask=mrow, other=float("inf"))
    dl = tl.load(DELTA + bh * N + offs_m, mask=mrow, other=0.0)
    lq = tl.load(LAB + b * N + offs_m, mask=mrow, other=0)
    dq = tl.zeros([BM, BD], tl.float32)
    for j in range(0, NKB):
        st = tl.load(TABLE + (b * NQB + pid_m) * NKB + j)
        if st != 0:
            offs_k = j * BN + offs_n
            mk = offs_k < N
            k = _tile(K + bh * N * D, offs_k, N, offs_d, D, D)
            v = _tile(V + bh * N * DV, offs_k, N, offs_dv, DV, DV)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            valid = mrow[:, None] & mk[None, :]
            if st == 1:
                lk = tl.load(LAB + b * N + offs_k, mask=mk, other=0)
                ok = _allowed(lq, lk)
                valid = valid & ok
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - dl[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * N * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mrow[:, None] & (offs_d[None, :] < D))


def block_table(lab: torch.Tensor, block: int) -> torch.Tensor:
    """Tile status from sorted labels [B, N]: 0 skip, 1 partial (apply the rule), 2 full. [B, nblk, nblk] int8."""
    b, n = lab.shape
    nb = triton.cdiv(n, block)
    pad = nb * block - n
    lp = torch.cat([lab, lab[:, -1:].expand(b, pad)], 1) if pad else lab
    blk = lp.view(b, nb, block)
    lo, hi = blk.min(-1).values, blk.max(-1).values
    uniform = lo == hi
    has_bg = (blk == 0).any(-1)
    bits = torch.where(blk > 0, blk, torch.zeros_like(blk))
    orbits = bits[..., 0].clone()
    for i in range(1, block):  # OR-reduce single-box bits per block
        orbits |= bits[..., i]
    qu, ku = uniform[:, :, None], uniform[:, None, :]
    ql, kl = lo[:, :, None], lo[:, None, :]
    full = (qu & (ql == 0)) | (ku & (kl == 0)) | (qu & ku & (ql == kl) & (ql > 0))
    part = has_bg[:, :, None] | has_bg[:, None, :] | ((orbits[:, :, None] & orbits[:, None, :]) != 0)
    return torch.where(full, 2, torch.where(part, 1, 0)).to(torch.int8).contiguous()


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


class _SelfAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lab, table, scale, block):
        b, h, n, d = q.shape
        dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        nb = triton.cdiv(n, block)
        _self_fwd_kernel[(nb, b * h)](q, k, v, o, lse, lab, table, n, h, d, dv, nb, nb, scale * LOG2E,
                                      BM=block, BN=block, BD=_pow2(d), BDV=_pow2(dv), PREC=_prec(q.dtype))
        ctx.save_for_backward(q, k, v, o, lse, lab, table)
        ctx.scale, ctx.block = scale, block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lab, table = ctx.saved_tensors
        b, h, n, d = q.shape
        dv_ = v.shape[-1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        nb = triton.cdiv(n, ctx.block)
        args = dict(BM=ctx.block, BN=ctx.block, BD=_pow2(d), BDV=_pow2(dv_), PREC=_prec(q.dtype))
        _self_bwd_dkdv_kernel[(nb, b * h)](q, k, v, do, lse, delta, dk, dv, lab, table, n, h, d, dv_, nb, nb,
                                           ctx.scale, ctx.scale * LOG2E, **args)
        _self_bwd_dq_kernel[(nb, b * h)](q, k, v, do, lse, delta, dq, lab, table, n, h, d, dv_, nb, nb,
                                         ctx.scale, ctx.scale * LOG2E, **args)
        return dq, dk, dv, None, None, None, None


def isolated_self_attention_sorted(q, k, v, lab_sorted, *, scale, block=None):
    """Kernel entry on region-sorted tokens. lab_sorted [B, N] int64 labels (0 / single bitmask / −1).
    (kernels.isolated_self_attention sorts, caches the tile table per layout and handles blocked rows.)"""
    block = block or default_block(max(q.shape[-1], v.shape[-1]))
    table = block_table(lab_sorted, block)
    return _SelfAttn.apply(q, k, v, lab_sorted.contiguous(), table, scale, block)


# --- regional cross-attention ---------------------------------------------------------------------------------

@triton.jit
def _cross_fwd_kernel(Q, K, V, O, LSE, REG, N, H, S, L, D, DV, scale2,
                      BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_l = tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < N
    ml = offs_l < L
    q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
    reg = tl.load(REG + b * N + offs_m, mask=mrow, other=0)
    acc = tl.zeros([BM, BDV], tl.float32)
    cnt = tl.zeros([BM], tl.float32)
    for s in range(0, S):
        sh = tl.maximum(s - 1, 0)
        act = tl.where(s == 0, reg == 0, ((reg >> sh) & 1) != 0) & mrow
        if tl.max(act.to(tl.int32), 0) > 0:
            base = (bh * S + s) * L
            k = _tile(K + base * D, offs_l, L, offs_d, D, D)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            sc = tl.where(ml[None, :], sc, float("-inf"))
            m = tl.max(sc, 1)
            p = tl.exp2(sc - m[:, None])
            l = tl.sum(p, 1)
            v = _tile(V + base * DV, offs_l, L, offs_dv, DV, DV)
            o_s = tl.dot(p.to(v.dtype), v, input_precision=PREC) / l[:, None]
            acc += tl.where(act[:, None], o_s, 0.0)
            cnt += act.to(tl.float32)
            tl.store(LSE + (bh * S + s) * N + offs_m, tl.where(act, m + tl.log2(l), float("inf")), mask=mrow)
        else:
            tl.store(LSE + (bh * S + s) * N + offs_m, tl.full([BM], float("inf"), tl.float32), mask=mrow)
    o = acc / tl.maximum(cnt, 1.0)[:, None]
    tl.store(O + bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty), mask=mrow[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _cross_bwd_dq_kernel(Q, K, V, DO, LSE, REG, CNT, DQ, N, H, S, L, D, DV, scale, scale2,
                         BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_l = tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < N
    ml = offs_l < L
    q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
    do = _tile(DO + bh * N * DV, offs_m, N, offs_dv, DV, DV).to(tl.float32)
    reg = tl.load(REG + b * N + offs_m, mask=mrow, other=0)
    cnt = tl.load(CNT + b * N + offs_m, mask=mrow, other=1.0)
    dq = tl.zeros([BM, BD], tl.float32)
    for s in range(0, S):
        sh = tl.maximum(s - 1, 0)
        act = tl.where(s == 0, reg == 0, ((reg >> sh) & 1) != 0) & mrow
        if tl.max(act.to(tl.int32), 0) > 0:
            base = (bh * S + s) * L
            k = _tile(K + base * D, offs_l, L, offs_d, D, D)
            v = _tile(V + base * DV, offs_l, L, offs_dv, DV, DV)
            lse = tl.load(LSE + (bh * S + s) * N + offs_m, mask=mrow, other=float("inf"))
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            p = tl.where(act[:, None] & ml[None, :], tl.exp2(sc - lse[:, None]), 0.0)
            do_s = tl.where(act[:, None], do / cnt[:, None], 0.0)
            dp = tl.dot(do_s.to(v.dtype), tl.trans(v), input_precision=PREC)
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * N * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mrow[:, None] & (offs_d[None, :] < D))


@triton.jit
def _cross_bwd_dkdv_kernel(Q, K, V, DO, LSE, REG, CNT, DK, DV_, N, H, S, L, D, DV, NQB, scale, scale2,
                           BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_l = tl.arange(0, BL)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    ml = offs_l < L
    base = (bh * S + s) * L
    k = _tile(K + base * D, offs_l, L, offs_d, D, D)
    v = _tile(V + base * DV, offs_l, L, offs_dv, DV, DV)
    dk = tl.zeros([BL, BD], tl.float32)
    dv = tl.zeros([BL, BDV], tl.float32)
    sh = tl.maximum(s - 1, 0)
    for i in range(0, NQB):
        offs_m = i * BM + offs_m0
        mrow = offs_m < N
        reg = tl.load(REG + b * N + offs_m, mask=mrow, other=0)
        act = tl.where(s == 0, reg == 0, ((reg >> sh) & 1) != 0) & mrow
        if tl.max(act.to(tl.int32), 0) > 0:
            q = _tile(Q + bh * N * D, offs_m, N, offs_d, D, D)
            do = _tile(DO + bh * N * DV, offs_m, N, offs_dv, DV, DV).to(tl.float32)
            cnt = tl.load(CNT + b * N + offs_m, mask=mrow, other=1.0)
            lse = tl.load(LSE + (bh * S + s) * N + offs_m, mask=mrow, other=float("inf"))
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            p = tl.where(act[:, None] & ml[None, :], tl.exp2(sc - lse[:, None]), 0.0)
            do_s = tl.where(act[:, None], do / cnt[:, None], 0.0)
            dv += tl.dot(tl.trans(p).to(v.dtype), do_s.to(v.dtype), input_precision=PREC)
            dp = tl.dot(do_s.to(v.dtype), tl.trans(v), input_precision=PREC)
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    tl.store(DK + (base + offs_l[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=ml[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + (base + offs_l[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=ml[:, None] & (offs_dv[None, :] < DV))


class _CrossAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, reg, scale, block):
        b, h, n, d = q.shape
        s, l, dv = k.shape[2], k.shape[3], v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, s, n, device=q.device, dtype=torch.float32)
        nb = triton.cdiv(n, block)
        _cross_fwd_kernel[(nb, b * h)](q, k, v, o, lse, reg, n, h, s, l, d, dv, scale * LOG2E,
                                       BM=block, BL=_pow2(l), BD=_pow2(d), BDV=_pow2(dv), PREC=_prec(q.dtype))
        ctx.save_for_backward(q, k, v, lse, reg)
        ctx.scale, ctx.block = scale, block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lse, reg = ctx.saved_tensors
        b, h, n, d = q.shape
        s, l, dv_ = k.shape[2], k.shape[3], v.shape[-1]
        do = do.contiguous()
        bits = torch.arange(s - 1, device=reg.device)
        cnt = (((reg[..., None] >> bits) & 1).sum(-1) + (reg == 0).long()).float().contiguous()  # active slots
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        nb = triton.cdiv(n, ctx.block)
        args = dict(BM=ctx.block, BL=_pow2(l), BD=_pow2(d), BDV=_pow2(dv_), PREC=_prec(q.dtype))
        _cross_bwd_dq_kernel[(nb, b * h)](q, k, v, do, lse, reg, cnt, dq, n, h, s, l, d, dv_, ctx.scale,
                                          ctx.scale * LOG2E, **args)
        _cross_bwd_dkdv_kernel[(s, b * h)](q, k, v, do, lse, reg, cnt, dk, dv, n, h, s, l, d, dv_, nb, ctx.scale,
                                           ctx.scale * LOG2E, **args)
        return dq, dk, dv, None, None, None


def regional_cross_attention_triton(q, k, v, reg_bn, *, scale, block=None):
    """Kernel entry. reg_bn [B, N] int64 region bitmasks; k/v [B, H, S, L, D]."""
    if k.shape[3] > 128:
        raise ValueError(f"regional cross-attention supports L <= 128 keys per slot, got {k.shape[3]}")
    return _CrossAttn.apply(q, k, v, reg_bn.contiguous(), scale, block or default_block(max(q.shape[-1], v.shape[-1])))
