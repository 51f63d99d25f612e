"""The one attention seam of the project.

Every attention call of the UNet, the text encoder and the VAE goes through
:func:`attention`. The backend is a plain string chosen when a model is built
and passed down explicitly (no global switch), so the fused Triton kernels and
the region masks of LoRA-Composer plug in at this single place.

Backends
- ``"math"``: the reference, ``softmax(q kᵀ · scale + bias) v`` with the scores
  and the softmax statistics in fp32 (LDM upcasts q·kᵀ too; formats.md §7).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``.
- ``"auto"``, ``"triton"``, ``"flex"``: name the kernels used for LoRA-Composer's *masked* attention
  (composer/regions.py -> kernels/); unmasked attention under them runs on SDPA, which is already a fused
  flash kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

BACKENDS = ("math", "sdpa", "auto", "triton", "flex")

# the kernels/ backend that serves the region-masked attention for each model backend
REGION_BACKEND = {"math": "torch", "sdpa": "segmented", "auto": "auto", "triton": "triton", "flex": "flex"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return backend


def attention_math(q, k, v, *, bias=None, causal=False, scale=None):
    """Reference attention. q [B, H, N, D], k/v [B, H, L, D] -> [B, H, N, D].

    ``bias`` is additive and broadcast to [B, H, N, L]; ``causal`` masks j > i.
    Scores and softmax run in fp32 whatever the input dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, N, L]
    if bias is not None:
        s = s + bias.float()
    if causal:
        n, l = s.shape[-2:]
        blocked = torch.ones(n, l, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(blocked, float("-inf"))
    p = s.softmax(dim=-1)
    return torch.matmul(p.to(v.dtype), v)


def attention(q, k, v, *, backend: str, bias=None, causal=False, scale=None):
    """q [B, H, N, D], k/v [B, H, L, D] -> [B, H, N, D] with the given backend."""
    if backend != "math" and backend in BACKENDS and not (causal and bias is not None):
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    if backend in BACKENDS:
        return attention_math(q, k, v, bias=bias, causal=causal, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·D) -> (B, H, N, D), a view."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H·D)."""
    return rearrange(x, "b h n d -> b n (h d)")
