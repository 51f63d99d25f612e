"""Region-segmented attention: the exact masked attention as a few unmasked SDPA calls on gathered tokens.

The best path where Triton is not available (CPU). SD1.5 attention has no positional term, so grouping
tokens by region is exact (kernels.md §3): background queries see every key; queries whose only box is a
see [background ∪ tokens whose only box is a]; overlap queries see the background. Extra memory is O(N·D)
for the gathers — never an N×N mask — and each call is smaller than the dense one. Differentiable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import isolation_cost, popcount


def labels(token_regions: torch.Tensor) -> torch.Tensor:
    """int64 labels: 0 background, the bitmask for single-box tokens, -1 for overlap tokens."""
    r = token_regions.to(torch.int64)
    pc = popcount(r)
    return torch.where(pc == 1, r, torch.where(pc == 0, torch.zeros_like(r), torch.full_like(r, -1)))


def _sdpa(q, k, v, scale):
    if q.shape[-1] != v.shape[-1] or q.dtype == torch.float16 and q.device.type == "cpu":
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        return torch.matmul(s.softmax(-1), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def blocked_rows_attention(q, k, v, r, rows, scale):
    """Only the fully blocked rows (overlap queries at a level with no background; ``plan.blocked_rows``):
    q, k, v [1, H, N, D], r [N], rows [n] token indices -> [1, H, n, Dv]. The official −1e6 bias read in fp32
    puts the softmax on the keys of minimum isolation cost (method.md §5); O(n·N), differentiable."""
    c = isolation_cost(r[rows], r)  # [n, N]
    keep = c == c.min(-1, keepdim=True).values
    s = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(s.masked_fill(~keep, float("-inf")).softmax(-1), v.float()).to(q.dtype)


def _self_one(q, k, v, r, scale):
    """q, k, v [1, H, N, D], r [N]."""
    lab = labels(r)
    out = torch.zeros_like(q)
    bg = (lab == 0).nonzero().flatten()
    if len(bg):
        out = out.index_copy(2, bg, _sdpa(q[:, :, bg], k, v, scale))
    for a in lab[lab > 0].unique().tolist():
        rows = (lab == a).nonzero().flatten()
        keys = ((lab == a) | (lab == 0)).nonzero().flatten()
        out = out.index_copy(2, rows, _sdpa(q[:, :, rows], k[:, :, keys], v[:, :, keys], scale))
    multi = (lab < 0).nonzero().flatten()
    if len(multi):
        if len(bg):
            out = out.index_copy(2, multi, _sdpa(q[:, :, multi], k[:, :, bg], v[:, :, bg], scale))
        else:  # fully blocked rows (no background at this level)
            out = out.index_copy(2, multi, blocked_rows_attention(q, k, v, r, multi, scale))
    return out


def isolated_self_attention_segmented(q, k, v, token_regions, *, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    if r.ndim == 1:
        return torch.cat([_self_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], r, scale) for i in range(b)]) if b > 1 \
            else _self_one(q, k, v, r, scale)
    return torch.cat([_self_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], r[i], scale) for i in range(b)])


def _cross_one(q, k, v, r, scale):
    """q [1, H, N, D], k/v [1, H, S, L, D]."""
    slots = k.shape[2]
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    bg = (r == 0).nonzero().flatten()
    if len(bg):
        out = out.index_copy(2, bg, _sdpa(q[:, :, bg], k[:, :, 0], v[:, :, 0], scale))
    cnt = popcount(r).clamp(min=1).to(q.dtype)
    for s in range(1, slots):
        rows = ((r >> (s - 1)) & 1).nonzero().flatten()
        if len(rows):
            o = _sdpa(q[:, :, rows], k[:, :, s], v[:, :, s], scale)
            out = out.index_add(2, rows, o / cnt[rows][None, None, :, None])
    return out


def regional_cross_attention_segmented(q, k, v, token_regions, *, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    rs = [r if r.ndim == 1 else r[i] for i in range(b)]
    outs = [_cross_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], rs[i], scale) for i in range(b)]
    return outs[0] if b == 1 else torch.cat(outs)
