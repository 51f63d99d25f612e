"""Plain PyTorch references for the two attention rules of LoRA-Composer (method.md §4, §5).

They are the contract the fused kernels are tested against: dense, obvious, fp32 scores and softmax.
They allocate N×N (self) and N×77×slots (cross) tensors, so use them on small shapes only.

``token_regions`` is int64 [N] (or [B, N]): bit r set <=> the token lies in region r's box at this level.
"""
from __future__ import annotations

import math

import torch


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each int64 (SWAR bit counting: four elementwise steps, no host sync). Region masks use bits
    0..61, so the sign bit is never set and the final arithmetic shift is exact."""
    x = x.to(torch.int64)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56  # the top byte holds the count (int64 multiply wraps)


def isolation_cost(rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
    """c(q, k) = |A|·|K| − |A ∩ K| (method.md §5, closed form of the official −1e6 bias), [.., Nq, Nk].

    0 <=> allowed: the query is in no box, or the key is in no box, or both are in exactly the same single box.
    """
    a, k = rq[..., :, None], rk[..., None, :]
    return popcount(a) * popcount(k) - popcount(a & k)


def allowed_mask(rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
    return isolation_cost(rq, rk) == 0


def _regions_bn(token_regions, b, n):
    r = token_regions.to(torch.int64)
    if r.ndim == 1:
        r = r[None].expand(b, n)
    if r.shape != (b, n):
        raise ValueError(f"token_regions must be [N] or [B, N] with N={n}, B={b}; got {tuple(token_regions.shape)}")
    return r


def isolated_self_attention_ref(q, k, v, token_regions, *, scale=None, return_probs=False):
    """q, k, v [B, H, N, D] -> [B, H, N, D]: softmax(q kᵀ·scale − 1e6·c) v in fp32 (the official bias, read in
    fp32: rows that are not fully blocked equal the −inf mask; fully blocked rows fall on the minimum-c keys
    instead of NaN, method.md §5; the exact limit is used, free of fp32 rounding at 1e6)."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = _regions_bn(token_regions, b, n)
    c = isolation_cost(r, r)  # [B, N, N]
    # Shifting each row by its minimum cost leaves the softmax unchanged but keeps −1e6 away from rows that are
    # not fully blocked (c_min = 0) and avoids fp32 rounding of s − 1e6 on rows that are (c_min > 0).
    bias = (c - c.min(-1, keepdim=True).values).to(torch.float32) * -1e6
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias[:, None]
    p = s.softmax(-1)
    out = torch.matmul(p, v.float()).to(q.dtype)
    return (out, p) if return_probs else out


def regional_cross_attention_ref(q, k, v, token_regions, *, scale=None, return_probs=False):
    """q [B, H, N, D], k/v [B, H, 1+R, L, D(v)] -> [B, H, N, Dv].

    Slot 0 is the global prompt, slot r+1 region r's prompt. A query in no box attends slot 0; a query in the
    boxes S gets mean_{r∈S} softmax(q k_{r+1}ᵀ·scale) v_{r+1} (separate softmaxes, method.md §4).
    ``return_probs`` also returns the per-slot probabilities [B, H, 1+R, N, L] (every query, every slot).
    """
    b, h, n, d = q.shape
    slots = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = _regions_bn(token_regions, b, n)
    if bool((r >> (slots - 1)).any()):
        raise ValueError(f"token_regions names a region >= {slots - 1}, but only {slots - 1} region slots were given")
    s = torch.einsum("bhnd,bhsld->bhsnl", q.float(), k.float()) * scale
    p = s.softmax(-1)
    o = torch.einsum("bhsnl,bhsld->bhsnd", p, v.float())  # [B, H, S, N, Dv]
    bits = torch.arange(slots - 1, device=q.device)
    act = torch.cat([(r == 0)[:, None], ((r[:, None] >> bits[None, :, None]) & 1).bool()], 1).float()  # [B, S, N]
    w = act / act.sum(1, keepdim=True)
    out = torch.einsum("bsn,bhsnd->bhnd", w, o).to(q.dtype)
    return (out, p) if return_probs else out
