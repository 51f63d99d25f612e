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
    """``prepack`` (off by default; composer/runtime.py ``prepack_convs`` turns it on): on CPU in fp32 and without
    autograd, run the base conv with its weight kept in oneDNN's blocked layout for the input's shape. Why: the plain
    path reorders the weight into that layout on every call, a fixed cost of reading and writing the whole weight;
    measured on a 2-core AMD EPYC (AVX2), SD1.5 UNet forward at batch 2 (bench/unet_cpu.py, tuned allocator): 256²
    4.87 -> 3.90 s, 512² 16.3 -> 15.4 s. The price is a second copy of the conv weights (2.4 GB for SD1.5's UNet in fp32). The
    packed copy is rebuilt when the weight changes (a merged LoRA) or the input shape does; the output is
    channels-last and equals the plain conv's to rounding (oneDNN, other blocking)."""
    prepack = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._init_adapters()
        self._packed = None  # (key, oneDNN weight) for the last input shape

    def _base(self, x):
        if (self.prepack and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and self.groups == 1 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and x.dim() == 4):
            w = self.weight
            key = (w.data_ptr(), w._version, tuple(x.shape))
            args = (list(self.padding), list(self.stride), list(self.dilation), 1)
            try:
                if self._packed is None or self._packed[0] != key:
                    self._packed = None  # free the old copy before building the new one
                    self._packed = (key, torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *args, list(x.shape)))
                return torch.ops.mkldnn._convolution_pointwise(x, self._packed[1], self.bias, *args, "none", [], "")
            except (RuntimeError, AttributeError, NotImplementedError):  # a build without oneDNN: the plain conv
                self.prepack, self._packed = False, None
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x, adapter=None, scope=None):
        y = self._base(x)
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
