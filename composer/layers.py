"""Linear and Conv2d that can carry live LoRA adapters (composer/lora.py), keeping nn's parameter names.

A layer computes ``x Wᵀ + b + Σ_a s_a · (x downᵀ) upᵀ`` over the adapters selected for the call: the
globally active ones (``active``), or exactly the ones passed as ``adapter=`` (a name or a tuple of names),
which is how region-aware injection runs one concept's K/V/out projection per region (method.md §4).
With ``scope=`` (a region LoRA scope, composer/regions.py ``RegionLoRA``) each region's adapter is added only on
that region's tokens or pixels: ``y = base(x) + Σ_r m_r ⊙ Δ_r(x)`` (LoRA-Composer with ``lora_scope="all"``).
The base weight stays untouched and shared; an adapter costs only its low-rank factors. The scale is
folded into ``up`` when the adapter is added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Adapter:
    down: torch.Tensor         # [r, in] (conv: [r, in, kh, kw]; or [r, in, 1, 1] with mid)
    up: torch.Tensor           # [out, r] (conv: [out, r, 1, 1]), scale folded in
    mid: torch.Tensor | None = None   # LoCon Tucker core [r, r, kh, kw]
    dense: torch.Tensor | None = None  # a full ΔW (LoHa/LoKr), scale folded in

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.mid, self.dense) if t is not None)


class _AdapterMixin:
    def _init_adapters(self):
        self.adapters: dict[str, Adapter] = {}
        self.active: tuple = ()

    def _selected(self, adapter):
        if adapter is None:
            return self.active
        return (adapter,) if isinstance(adapter, str) else adapter


class Linear(nn.Linear, _AdapterMixin):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._init_adapters()

    def forward(self, x, adapter=None, scope=None):
        y = F.linear(x, self.weight, self.bias)
        for name in self._selected(adapter):
            a = self.adapters.get(name)
            if a is not None:
                y = y + self.delta(x, a)
        return y if scope is None else scope.add_linear(self, x, y)

    @staticmethod
    def delta(x, a: Adapter):
        """Δ(x) of one adapter: x·ΔWᵀ (LoHa/LoKr) or (x·downᵀ)·upᵀ."""
        return F.linear(x, a.dense) if a.dense is not None else F.linear(F.linear(x, a.down), a.up)


class Conv2d(nn.Conv2d, _AdapterMixin):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._init_adapters()

    def forward(self, x, adapter=None, scope=None):
        y = self._conv_forward(x, self.weight, self.bias)
        for name in self._selected(adapter):
            a = self.adapters.get(name)
            if a is not None:
                y = y + self.delta(x, a)
        return y if scope is None else scope.add_conv(self, x, y)

    def delta(self, x, a: Adapter):
        """Δ(x) of one adapter, at the output resolution (the low-rank conv carries stride and padding)."""
        if a.dense is not None:
            return self._conv_forward(x, a.dense, None)
        if a.mid is not None:  # 1×1 down, k×k core (carries stride/padding), 1×1 up
            return F.conv2d(self._conv_forward(F.conv2d(x, a.down), a.mid, None), a.up)
        return F.conv2d(self._conv_forward(x, a.down, None), a.up)  # k×k down, 1×1 up


def residual(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y + x, written into y when no autograd graph is being recorded. ``y`` must be a fresh result that nothing
    else holds (a layer's output). Why: on CPU every large temporary is a fresh mmap whose pages fault in on first
    touch; at SD1.5 sizes the residual adds alone allocate ~1 GB per UNet pass. Only when both have one layout
    (or x broadcasts): ``x + y`` takes x's memory layout, and a conv output may be channels-last where x is not;
    keeping y's would send the following ops down other kernels. So the result is bit-identical to ``x + y``.
    (A forward hook that keeps a layer's output under no_grad should clone it: the output may be added into.)"""
    if not torch.is_grad_enabled() and (x.shape != y.shape or x.stride() == y.stride()):
        return y.add_(x)
    return x + y


def lora_layers(model: nn.Module):
    """{module path: layer} for every adapter-capable layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (Linear, Conv2d))}
