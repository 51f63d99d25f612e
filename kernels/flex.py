"""FlexAttention versions of the two rules (torch.nn.attention.flex_attention with a BlockMask built from the
region labels): the strongest existing alternative, used as a backend and as the benchmark baseline."""
from __future__ import annotations

import math

import torch

from .segmented import labels

_compiled = {}


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _compiled:
        # compiled on GPU (the fast path); eager elsewhere (a dense reference inside torch)
        _compiled["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled["fn"], create_block_mask


def isolated_self_attention_flex(q, k, v, token_regions, *, scale=None):
    fn, cbm = _flex()
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    lab = labels(r if r.ndim == 2 else r[None].expand(b, n)).contiguous()

    def mask_mod(bi, hi, qi, ki):
        lq, lk = lab[bi, qi], lab[bi, ki]
        return (lq == 0) | (lk == 0) | ((lq == lk) & (lq > 0))
    bm = cbm(mask_mod, b, None, n, n, device=q.device)
    return fn(q, k, v, block_mask=bm, scale=scale)


def regional_cross_attention_flex(q, k, v, token_regions, *, scale=None):
    """One flex call per slot (queries outside the slot fully masked, which flex returns as 0), averaged."""
    fn, cbm = _flex()
    b, h, n, d = q.shape
    slots, l = k.shape[2], k.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    r = (r if r.ndim == 2 else r[None].expand(b, n)).contiguous()
    bits = torch.arange(slots - 1, device=r.device)
    act = torch.cat([(r == 0)[..., None], ((r[..., None] >> bits) & 1).bool()], -1)  # [B, N, S]
    cnt = act.sum(-1).clamp(min=1).to(q.dtype)
    out = 0
    for s in range(slots):
        a = act[..., s].contiguous()
        if not bool(a.any()):
            continue
        bm = cbm(lambda bi, hi, qi, ki, a=a: a[bi, qi], b, None, n, l, device=q.device)
        o = fn(q, k[:, :, s].contiguous(), v[:, :, s].contiguous(), block_mask=bm, scale=scale)
        out = out + o * a[:, None, :, None].to(o.dtype)
    return out / cnt[:, None, :, None]
