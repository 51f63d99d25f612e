"""The fused Triton kernels as differentiable operators, registered with ``torch.library`` so that a compiled
UNet traces through them without a graph break (``torch.ops.lora_composer.*``; fake implementations give the
output shapes and strides, ``register_autograd`` the backward operators).

Eager calls take a plain ``autograd.Function`` with the same implementations (no dispatcher round trip on
the small levels, where launches dominate); under ``torch.compile`` the registered operators are used.

Layout plans (``kernels.plan``) are cached per ``token_regions`` tensor: a level's layout is static for all steps
and layers, so the sort and the tile lists are built once. Triton is imported only when a kernel runs.
"""
from __future__ import annotations

import torch

from .plan import blocked_rows, empty_rows, layout
from .segmented import blocked_rows_attention

_PLANS: dict = {}


def plans_for(token_regions: torch.Tensor):
    """The cached Plans of one layout ([N]: shared by the batch, or [B, N])."""
    r = token_regions
    key = (r.data_ptr(), r._version, tuple(r.shape), tuple(r.stride()), str(r.device))
    hit = _PLANS.get(key)
    if hit is None:
        from .triton_attention import Plans
        hit = (r, Plans(layout(r)))  # holds r, so its storage (and data_ptr) cannot be reused while cached
        if len(_PLANS) >= 32:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = hit
    return hit[1]


def _blocked_batches(lay, b):
    """(batch indices, token rows, plan row) of the fully blocked rows."""
    for p, rows in lay.blocked:
        yield (range(b) if lay.perm.shape[0] == 1 else [p]), rows, p


def _regions_row(r, p):
    return r if r.ndim == 1 else r[p]


# --- isolated self-attention ----------------------------------------------------------------------------------

def _self_fwd(q, k, v, token_regions, scale):
    from .triton_attention import self_forward
    plans = plans_for(token_regions)
    o, lse = self_forward(q, k, v, plans, scale)
    for bs, rows, p in _blocked_batches(plans.lay, q.shape[0]):  # rare: only these rows, densely
        bs = list(bs)
        o[bs[0]:bs[-1] + 1, :, rows] = blocked_rows_attention(q[bs[0]:bs[-1] + 1], k[bs[0]:bs[-1] + 1],
                                                              v[bs[0]:bs[-1] + 1], _regions_row(token_regions, p),
                                                              rows, scale)
    return o, lse


def _self_bwd(do, q, k, v, o, lse, token_regions, scale):
    from .triton_attention import self_backward
    plans = plans_for(token_regions)
    dq, dk, dv = self_backward(do, q, k, v, o, lse, plans, scale)
    for bs, rows, p in _blocked_batches(plans.lay, q.shape[0]):  # the kernels gave these rows no gradient
        sl = slice(list(bs)[0], list(bs)[-1] + 1)
        with torch.enable_grad():
            x = [t[sl].detach().requires_grad_() for t in (q, k, v)]
            out = blocked_rows_attention(*x, _regions_row(token_regions, p), rows, scale)
            g = torch.autograd.grad(out, x, do[sl][:, :, rows])
        dq[sl] += g[0]
        dk[sl] += g[1]
        dv[sl] += g[2]
    return dq, dk, dv


class _SelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, token_regions, scale):
        o, lse = _self_fwd(q, k, v, token_regions, scale)
        ctx.save_for_backward(q, k, v, o, lse, token_regions)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, r = ctx.saved_tensors
        return (*_self_bwd(do, q, k, v, o, lse, r, ctx.scale), None, None)


@torch.library.custom_op("lora_composer::isolated_self_attention", mutates_args=())
def self_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_regions: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _self_fwd(q, k, v, token_regions, scale)


@self_attention_op.register_fake
def _(q, k, v, token_regions, scale):
    return empty_rows(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("lora_composer::isolated_self_attention_backward", mutates_args=())
def self_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                               lse: torch.Tensor, token_regions: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _self_bwd(do, q, k, v, o, lse, token_regions, scale)


@self_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, token_regions, scale):
    return empty_rows(q, q.shape[-1]), empty_rows(k, k.shape[-1]), empty_rows(v, v.shape[-1])


def _self_setup(ctx, inputs, output):
    q, k, v, r, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], r)
    ctx.scale = scale


def _self_op_bwd(ctx, do, _dlse):
    q, k, v, o, lse, r = ctx.saved_tensors
    return (*self_attention_backward_op(do, q, k, v, o, lse, r, ctx.scale), None, None)


self_attention_op.register_autograd(_self_op_bwd, setup_context=_self_setup)


def isolated_self_attention(q, k, v, token_regions, scale):
    if torch.compiler.is_compiling():
        return self_attention_op(q, k, v, token_regions, scale)[0]
    return _SelfAttention.apply(q, k, v, token_regions, scale)


# --- regional cross-attention ----------------------------------------------------------------------------------

def _cross_fwd(q, k, v, token_regions, scale):
    from .triton_attention import cross_forward
    return cross_forward(q, k, v, plans_for(token_regions), scale)


def _cross_bwd(do, q, k, v, token_regions, scale):
    from .triton_attention import cross_backward
    return cross_backward(do, q, k, v, plans_for(token_regions), scale)


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, token_regions, scale):
        ctx.save_for_backward(q, k, v, token_regions)
        ctx.scale = scale
        return _cross_fwd(q, k, v, token_regions, scale)

    @staticmethod
    def backward(ctx, do):
        q, k, v, r = ctx.saved_tensors
        return (*_cross_bwd(do, q, k, v, r, ctx.scale), None, None)


@torch.library.custom_op("lora_composer::regional_cross_attention", mutates_args=())
def cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_regions: torch.Tensor,
                       scale: float) -> torch.Tensor:
    return _cross_fwd(q, k, v, token_regions, scale)


@cross_attention_op.register_fake
def _(q, k, v, token_regions, scale):
    return empty_rows(q, v.shape[-1])


@torch.library.custom_op("lora_composer::regional_cross_attention_backward", mutates_args=())
def cross_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                token_regions: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cross_bwd(do, q, k, v, token_regions, scale)


@cross_attention_backward_op.register_fake
def _(do, q, k, v, token_regions, scale):
    return empty_rows(q, q.shape[-1]), k.new_empty(k.shape), v.new_empty(v.shape)


def _cross_setup(ctx, inputs, output):
    q, k, v, r, scale = inputs
    ctx.save_for_backward(q, k, v, r)
    ctx.scale = scale


def _cross_op_bwd(ctx, do):
    q, k, v, r = ctx.saved_tensors
    return (*cross_attention_backward_op(do, q, k, v, r, ctx.scale), None, None)


cross_attention_op.register_autograd(_cross_op_bwd, setup_context=_cross_setup)


def regional_cross_attention(q, k, v, token_regions, scale):
    if torch.compiler.is_compiling():
        return cross_attention_op(q, k, v, token_regions, scale)
    return _CrossAttention.apply(q, k, v, token_regions, scale)


__all__ = ["isolated_self_attention", "regional_cross_attention", "plans_for", "blocked_rows"]
