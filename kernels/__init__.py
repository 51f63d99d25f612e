"""Fused masked attention for LoRA-Composer: region and isolation masks and per-region LoRA deltas.

Public functions (all differentiable in q, k and v on every backend):

- ``isolated_self_attention(q, k, v, token_regions, *, scale=None, backend="auto") -> [B, H, N, Dv]``
  q, k, v [B, H, N, D]. Query i may attend key j unless both lie in some box and they are not in exactly the
  same single box (method.md §5). Fully blocked rows follow the fp32 reading of the official −1e6 bias
  (never NaN).
- ``regional_cross_attention(q, k, v, token_regions, *, scale=None, backend="auto") -> [B, H, N, Dv]``
  q [B, H, N, D], k/v [B, H, 1+R, L, D]: slot 0 the global prompt, slot r+1 region r's prompt through that
  concept's K/V. A query in no box attends slot 0; a query in boxes S gets the mean over r ∈ S of the softmax
  attention over slot r+1 alone (method.md §4).
- ``regional_cross_attention_lora(q, k, v, token_regions, out_down, *, ...) -> (o, z)``: the same, plus the
  per-region ``to_out`` LoRA delta fused in (see its docstring).

``token_regions``: int64 [N] or [B, N] bitmasks, bit r set <=> the token is in region r's box at this level.
Backends: ``"torch"`` (dense reference, ``kernels.reference``), ``"segmented"`` (exact, O(N) extra memory,
SDPA on gathered region segments: the best CPU path), ``"triton"`` (the fused kernels; CPU tensors need
TRITON_INTERPRET=1), ``"flex"`` (FlexAttention with a BlockMask), ``"auto"`` (triton on CUDA, segmented
otherwise).
"""
from __future__ import annotations

import math

import torch

from .reference import (allowed_mask, isolated_self_attention_ref, isolation_cost, popcount,
                        regional_cross_attention_ref)
from .segmented import (isolated_self_attention_segmented, labels, regional_cross_attention_segmented)

BACKENDS = ("auto", "torch", "segmented", "triton", "flex")
MAX_REGIONS = 62


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_ok() else "segmented"
    return backend


def _triton_ok() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _require_triton_runtime(q):
    import os
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kernels are imported")


def _check(q, token_regions):
    n = q.shape[2]
    if token_regions.shape[-1] != n:
        raise ValueError(f"token_regions has {token_regions.shape[-1]} tokens, q has {n}")
    if token_regions.dtype != torch.int64:
        raise TypeError(f"token_regions must be int64 bitmasks, got {token_regions.dtype}")


_PLANS: dict = {}


def _self_plan(r: torch.Tensor, b: int, n: int, block: int):
    """Region-major permutation, sorted labels, tile table and fully blocked rows for one layout. Static per
    (level, boxes), so cached: the sort and the table are built once, not in each of the 16 layers' calls."""
    key = (r.data_ptr(), r._version, tuple(r.shape), str(r.device), b, block)
    plan = _PLANS.get(key)
    if plan is None:
        from .triton_attention import block_table
        rb = (r if r.ndim == 2 else r[None].expand(b, n)).to(torch.int64)
        lab = labels(rb)
        keyv = torch.where(lab < 0, torch.full_like(lab, 2 ** 62), lab)
        perm = keyv.argsort(dim=1, stable=True)
        lab_s = lab.gather(1, perm).contiguous()
        blocked = (lab < 0) & ~(lab == 0).any(1, keepdim=True)  # overlap rows at a level with no background
        plan = (r, perm, perm.argsort(dim=1), lab_s, block_table(lab_s, block), blocked, bool(blocked.any()))
        if len(_PLANS) >= 32:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan  # holds r, so its storage (and data_ptr) cannot be reused while cached
    return plan[1:]


def _self_triton(q, k, v, r, scale):
    from .triton_attention import _SelfAttn, default_block
    _require_triton_runtime(q)
    b, h, n, d = q.shape
    block = default_block(max(d, v.shape[-1]))
    perm, inv, lab_s, table, blocked, any_blocked = _self_plan(r, b, n, block)

    def gather(x, idx):
        return x.gather(2, idx[:, None, :, None].expand(x.shape[0], x.shape[1], n, x.shape[3]))
    o = _SelfAttn.apply(gather(q, perm), gather(k, perm), gather(v, perm), lab_s, table, scale, block)
    o = gather(o, inv)
    if any_blocked:
        from .segmented import _self_one
        rb = r if r.ndim == 2 else r[None].expand(b, n)
        fixed = torch.stack([_self_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], rb[i], scale)[0] for i in range(b)])
        o = torch.where(blocked[:, None, :, None], fixed, o)
    return o


def isolated_self_attention(q, k, v, token_regions, *, scale=None, backend="auto"):
    _check(q, token_regions)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    be = resolve_backend(backend, q.device)
    if be == "torch":
        return isolated_self_attention_ref(q, k, v, token_regions, scale=scale)
    if be == "segmented":
        return isolated_self_attention_segmented(q, k, v, token_regions, scale=scale)
    if be == "triton":
        return _self_triton(q, k, v, token_regions, scale)
    from .flex import isolated_self_attention_flex
    o = isolated_self_attention_flex(q, k, v, token_regions, scale=scale)
    r = token_regions if token_regions.ndim == 2 else token_regions[None].expand(q.shape[0], -1)
    lab = labels(r)
    blocked = (lab < 0) & ~(lab == 0).any(1, keepdim=True)
    if bool(blocked.any()):
        o = torch.where(blocked[:, None, :, None], isolated_self_attention_segmented(q, k, v, token_regions, scale=scale), o)
    return o


def regional_cross_attention(q, k, v, token_regions, *, scale=None, backend="auto"):
    _check(q, token_regions)
    if k.ndim != 5 or v.ndim != 5 or k.shape[:4] != v.shape[:4]:
        raise ValueError(f"k, v must be [B, H, 1+R, L, D] with equal leading dims; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] - 1 > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS} regions are supported, got {k.shape[2] - 1}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    be = resolve_backend(backend, q.device)
    if be == "triton" and q.is_cuda and q.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 64:
        # fp32 K/V tiles of 128 keys × ≥ 128 padded lanes exceed a GPU's shared memory (python -m kernels.aot):
        # take the exact segmented path there; fp16/bf16, the GPU dtypes, always take the kernel
        be = "segmented"
    if be == "torch":
        return regional_cross_attention_ref(q, k, v, token_regions, scale=scale)
    if be == "segmented":
        return regional_cross_attention_segmented(q, k, v, token_regions, scale=scale)
    if be == "triton":
        from .triton_attention import regional_cross_attention_triton
        _require_triton_runtime(q)
        b, _, n, _ = q.shape
        r = (token_regions if token_regions.ndim == 2 else token_regions[None].expand(b, n)).to(torch.int64)
        return regional_cross_attention_triton(q, k, v, r, scale=scale)
    from .flex import regional_cross_attention_flex
    return regional_cross_attention_flex(q, k, v, token_regions, scale=scale)


def regional_cross_attention_lora(q, k, v, token_regions, out_down, *, scale=None, backend="auto"):
    """Regional cross-attention with each region's ``to_out`` LoRA delta fused into the same kernel.

    out_down [R, rank, H·Dv]: region r's ``to_out`` down factor (zeros for a region without one).
    Returns (o [B, H, N, Dv], z [B, N, R, rank]) with z[p, r] = (1/|S(p)|)·down_r·a_r(p) for r ∈ S(p), else 0,
    where a_r(p) is region r's attention output (heads merged). The caller finishes with
    ``to_out(merge(o)) + Σ_r up_r z_r`` — exactly mean_{r∈S} to_out_r(a_r), since to_out_r = to_out + up_r·down_r.

    How: down_r·a_r = Σ_h down_r[:, h]·Σ_j p_hj v_hj = Σ_h Σ_j p_hj (down_r[:, h] v_hj), so slot r+1's values
    carry ``rank`` extra channels u = down_r[:, h]·v in their own block r (other blocks zero), and the kernel's
    per-pixel mean over active slots yields z after a sum over heads. Dv grows by R·rank, which at SD1.5's
    head dims fits in the padding (40+20 ≤ 64, 80+20 ≤ 128, 160+20 ≤ 256). Gradients flow through u.
    """
    b, h, slots, l, dv = v.shape
    nreg, rank = out_down.shape[0], out_down.shape[1]
    if nreg != slots - 1 or out_down.shape[2] != h * dv:
        raise ValueError(f"out_down must be [R={slots - 1}, rank, H·Dv={h * dv}], got {tuple(out_down.shape)}")
    dn = out_down.to(v.dtype).view(nreg, rank, h, dv)
    u = torch.einsum("bhrld,rkhd->bhrlk", v[:, :, 1:], dn)  # [B, H, R, L, rank]
    eye = torch.eye(nreg, device=v.device, dtype=v.dtype)
    u = (u[:, :, :, :, None, :] * eye[None, None, :, None, :, None]).flatten(-2)  # block r of R·rank channels
    u = torch.cat([torch.zeros_like(u[:, :, :1]), u], 2)  # slot 0 (global) has no concept delta
    o = regional_cross_attention(q, k, torch.cat([v, u], -1), token_regions, scale=scale, backend=backend)
    return o[..., :dv], o[..., dv:].sum(1).unflatten(-1, (nreg, rank))


__all__ = ["isolated_self_attention", "regional_cross_attention", "regional_cross_attention_lora",
           "isolated_self_attention_ref", "regional_cross_attention_ref", "allowed_mask", "isolation_cost",
           "popcount", "labels", "BACKENDS", "resolve_backend"]
