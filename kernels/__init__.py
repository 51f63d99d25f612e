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
SDPA on gathered region segments: the best CPU path), ``"triton"`` (the fused kernels, ``kernels.ops`` /
``kernels.triton_attention``: fp16 / bf16 on CUDA, fp32 CUDA calls take the segmented path; CPU tensors need
TRITON_INTERPRET=1; registered as ``torch.ops.lora_composer.*`` so torch.compile traces them), ``"flex"``
(FlexAttention on region-sorted tokens with a cached BlockMask), ``"auto"`` (triton on CUDA, segmented
otherwise). Triton is imported only when a Triton kernel runs.
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

from .reference import (allowed_mask, isolated_self_attention_ref, isolation_cost, popcount,
                        regional_cross_attention_ref)
from .segmented import (isolated_self_attention_segmented, labels, regional_cross_attention_segmented)
from . import ops as _ops  # registers torch.ops.lora_composer.* (no Triton import until a kernel runs)

BACKENDS = ("auto", "torch", "segmented", "triton", "flex")
MAX_REGIONS = 62


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_ok() else "segmented"
    return backend


def _triton_ok() -> bool:
    return importlib.util.find_spec("triton") is not None


def _require_triton_runtime(q):
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kernels are imported")


def _check(q, token_regions):
    b, n = q.shape[0], q.shape[2]
    if token_regions.shape[-1] != n:
        raise ValueError(f"token_regions has {token_regions.shape[-1]} tokens, q has {n}")
    if token_regions.ndim not in (1, 2) or token_regions.ndim == 2 and token_regions.shape[0] != b:
        raise ValueError(f"token_regions must be [N] or [B={b}, N], got {tuple(token_regions.shape)}")
    if token_regions.dtype != torch.int64:
        raise TypeError(f"token_regions must be int64 bitmasks, got {token_regions.dtype}")


def _gpu_fp32_to_segmented(be, q):
    """The Triton kernels are built for 16-bit tensor-core inputs on GPU (fp32 IEEE dots spill there, see
    python -m kernels.aot); fp32 CUDA calls take the exact segmented path. Under the interpreter (CPU tensors)
    the kernels run in fp32 too, which is how the tests check them exactly."""
    return "segmented" if be == "triton" and q.is_cuda and q.dtype == torch.float32 else be


def isolated_self_attention(q, k, v, token_regions, *, scale=None, backend="auto"):
    _check(q, token_regions)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    be = _gpu_fp32_to_segmented(resolve_backend(backend, q.device), q)
    if be == "torch":
        return isolated_self_attention_ref(q, k, v, token_regions, scale=scale)
    if be == "segmented":
        return isolated_self_attention_segmented(q, k, v, token_regions, scale=scale)
    if be == "triton":
        _require_triton_runtime(q)
        return _ops.isolated_self_attention(q, k, v, token_regions, scale)
    from .flex import isolated_self_attention_flex
    return isolated_self_attention_flex(q, k, v, token_regions, scale=scale)


def regional_cross_attention(q, k, v, token_regions, *, scale=None, backend="auto"):
    _check(q, token_regions)
    if k.ndim != 5 or v.ndim != 5 or k.shape[:4] != v.shape[:4]:
        raise ValueError(f"k, v must be [B, H, 1+R, L, D] with equal leading dims; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] - 1 > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS} regions are supported, got {k.shape[2] - 1}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    be = resolve_backend(backend, q.device)
    be = _gpu_fp32_to_segmented(be, q)
    if be == "torch":
        return regional_cross_attention_ref(q, k, v, token_regions, scale=scale)
    if be == "segmented":
        return regional_cross_attention_segmented(q, k, v, token_regions, scale=scale)
    if be == "triton":
        _require_triton_runtime(q)
        return _ops.regional_cross_attention(q, k, v, token_regions, scale)
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
