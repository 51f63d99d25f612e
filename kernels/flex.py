"""FlexAttention versions of the two rules (torch.nn.attention.flex_attention): a backend, and the benchmark's
strongest baseline, so it gets what our kernels get (issue 12 A.1):

- the same region-major token order (``kernels.plan.layout``): with sorted tokens Flex skips the same empty
  128-tiles and evaluates ``mask_mod`` only on boundary tiles ("full" blocks skip it);
- a BlockMask built once per layout with a compiled ``create_block_mask`` (``_compile=True``) and cached,
  never materialised per call;
- ``torch.compile(flex_attention, dynamic=False)`` on GPU with a recompile budget for SD1.5's shapes, and a loud
  error instead of dynamo's silent eager fallback when that budget is used up.

``flex_sorted`` is the bare Flex call on already-sorted tensors (what the benchmark times against our kernels,
whose permutation is fused into their loads and stores).
"""
from __future__ import annotations

import math

import torch

from .plan import blocked_rows, layout
from .segmented import blocked_rows_attention

RECOMPILE_LIMIT = 64  # SD1.5: ~8 attention shapes × self/cross × batch sizes; dynamo's default is 8
_compiled = {}
_masks: dict = {}


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _compiled:
        # compiled on GPU (the fast path); eager elsewhere (CPU: inference-only compile, a dense reference)
        _compiled["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled["fn"]


def _budget():
    """dynamo config for each compiled Flex call: a recompile limit that fits SD1.5, and failing loudly past it."""
    cfg = torch._dynamo.config
    patch = {"recompile_limit": max(RECOMPILE_LIMIT, getattr(cfg, "recompile_limit", 8))}
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return cfg.patch(**patch)


def flex_sorted(q, k, v, block_mask, scale):
    """flex_attention on region-sorted tensors."""
    fn = _flex_fn()
    if fn is _compiled.get("fn") and torch.cuda.is_available():
        with _budget():
            return fn(q, k, v, block_mask=block_mask, scale=scale)
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def _key(r, *extra):
    return (r.data_ptr(), r._version, tuple(r.shape), str(r.device), *extra)


def plan(token_regions):
    """Layout (sort) of one token_regions tensor, cached with the masks built from it."""
    key = _key(token_regions, "layout")
    if key not in _masks:
        if len(_masks) >= 64:
            _masks.clear()
        _masks[key] = (token_regions, layout(token_regions))  # holds r: its data_ptr is not reused while cached
    return _masks[key][1]


def self_block_mask(token_regions, n, device):
    """BlockMask of the isolation rule on sorted tokens (compiled create_block_mask, cached per layout)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = _key(token_regions, "self", n)
    if key not in _masks:
        lay = plan(token_regions)
        ids = lay.ids

        def mask_mod(b, h, qi, ki):
            lq, lk = ids[b if ids.shape[0] > 1 else 0, qi], ids[b if ids.shape[0] > 1 else 0, ki]
            return (lq == 0) | (lk == 0) | ((lq == lk) & (lq > 0))
        bsz = ids.shape[0] if ids.shape[0] > 1 else None
        _masks[key] = (token_regions, create_block_mask(mask_mod, bsz, None, n, n, device=device,
                                                        _compile=torch.device(device).type == "cuda"))
    return _masks[key][1]


def cross_block_masks(token_regions, n, slots, l, device):
    """Per slot, the BlockMask "query attends slot s" on sorted queries (None for a slot nobody attends)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = _key(token_regions, "cross", n, slots, l)
    if key not in _masks:
        lay = plan(token_regions)
        reg = lay.reg
        out = []
        for s in range(slots):
            act = (reg == 0) if s == 0 else ((reg >> (s - 1)) & 1).bool()
            if not bool(act.any()):
                out.append(None)
                continue
            act = act.contiguous()

            def mask_mod(b, h, qi, ki, act=act):
                return act[b if act.shape[0] > 1 else 0, qi]
            bsz = act.shape[0] if act.shape[0] > 1 else None
            out.append(create_block_mask(mask_mod, bsz, None, n, l, device=device,
                                         _compile=torch.device(device).type == "cuda"))
        _masks[key] = (token_regions, out)
    return _masks[key][1]


def sort_tokens(x, perm):
    """x [B, H, N, D] -> region-sorted rows (perm [P, N], P = 1 shared by the batch)."""
    idx = perm.long()[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[3])
    return x.gather(2, idx)


def unsort_tokens(x, perm):
    idx = perm.long()[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[3])
    return torch.empty_like(x).scatter(2, idx, x)


def _with_blocked_rows(o, q, k, v, r, scale):
    """Flex gives fully blocked rows 0; put the rule's value there (only those rows are computed)."""
    rb = r if r.ndim == 2 else r[None]
    blk = blocked_rows(rb)
    if not bool(blk.any()):
        return o
    ot = o.transpose(1, 2)  # [B, N, H, Dv]
    for p in range(rb.shape[0]):
        rows = blk[p].nonzero().flatten()
        if len(rows) == 0:
            continue
        for b in (range(o.shape[0]) if rb.shape[0] == 1 else [p]):
            fix = blocked_rows_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], rb[p], rows, scale)[0].transpose(0, 1)
            ot = ot.index_put((torch.full_like(rows, b), rows), fix)
    return ot.transpose(1, 2)


def isolated_self_attention_flex(q, k, v, token_regions, *, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    perm = plan(r).perm
    bm = self_block_mask(r, n, q.device)
    o = flex_sorted(sort_tokens(q, perm), sort_tokens(k, perm), sort_tokens(v, perm), bm, scale)
    return _with_blocked_rows(unsort_tokens(o, perm), q, k, v, r, scale)


def regional_cross_attention_flex(q, k, v, token_regions, *, scale=None):
    """One flex call per slot on sorted queries (queries outside the slot fully masked: flex returns 0 there),
    weighted by 1/|S|."""
    b, h, n, d = q.shape
    slots, l = k.shape[2], k.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    r = token_regions.to(torch.int64)
    lay = plan(r)
    qs = sort_tokens(q, lay.perm)
    out = 0
    for s, bm in enumerate(cross_block_masks(r, n, slots, l, q.device)):
        if bm is not None:
            out = out + flex_sorted(qs, k[:, :, s].contiguous(), v[:, :, s].contiguous(), bm, scale)
    out = out * lay.inv_cnt[:, None, :, None].to(q.dtype)  # rows outside a slot got 0 from it
    return unsort_tokens(out, lay.perm)
