"""SD1.x UNet (the LDM ``UNetModel``), in the diffusers module tree.

Attribute names mirror diffusers' ``UNet2DConditionModel`` (``down_blocks.0.attentions.0.
transformer_blocks.0.attn2.to_k``...), so diffusers folders, kohya SD1 LoRAs, PEFT LoRAs and
ED-LoRAs map onto it without a table; LDM single files go through the one table in
``composer/convert.py``. Sources: Rombach et al. 2022 (LDM), diffusers ``unets/unet_2d_condition.py``.

Shapes: x [B, 4, h, w] latent, t [] or [B] timesteps, context [B, 77, 768] -> eps [B, 4, h, w].
Cross-attention layers are numbered l = 0..15 in forward order (method.md §1); each carries
``layer_index`` so that the per-layer ED-LoRA contexts and region masks can find it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .layers import Conv2d, Linear, residual
from .attention import attention, check_backend, merge_heads, split_heads


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    # which levels carry spatial transformers (SD1: all but the deepest)
    attention_levels: tuple = (True, True, True, False)
    layers_per_block: int = 2
    heads: int = 8  # diffusers' (misnamed) attention_head_dim for SD1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    sample_size: int = 64
    # False: the encoder only (conv_in, time embedding, down blocks, mid block), as a ControlNet
    # (composer/controlnet.py) builds it; no up blocks, no output layers
    decoder: bool = True

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_name(cls, name: str) -> "UNetConfig":
        return UNET_PRESETS[name]

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read a diffusers ``unet/config.json``; refuse what is not SD1.x-shaped."""
        def bad(msg):
            raise ValueError(f"UNet config: {msg}; only SD1.x UNets are supported")
        if cfg.get("use_linear_projection"):
            bad("use_linear_projection=true (an SD2.x UNet)")
        if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
            bad(f"addition/class embeddings ({cfg.get('addition_embed_type') or cfg.get('class_embed_type')}, e.g. SDXL)")
        if cfg.get("in_channels", 4) != 4:
            bad(f"in_channels={cfg['in_channels']} (inpainting or instruct-pix2pix)")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
        levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
                tuple(t == "CrossAttnUpBlock2D" for t in up) != levels[::-1]:
            bad(f"block types {down} / {up}")
        if cfg.get("transformer_layers_per_block", 1) not in (1, None):
            bad("transformer_layers_per_block != 1")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if not isinstance(heads, int):
            bad(f"per-block head counts {heads}")
        return cls(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                   block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
                   attention_levels=levels, layers_per_block=cfg.get("layers_per_block", 2), heads=heads,
                   cross_attention_dim=cfg.get("cross_attention_dim", 768),
                   norm_num_groups=cfg.get("norm_num_groups", 32), sample_size=cfg.get("sample_size", 64))

    def to_diffusers(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.attention_levels[::-1]],
                "layers_per_block": self.layers_per_block, "attention_head_dim": self.heads,
                "cross_attention_dim": self.cross_attention_dim, "norm_num_groups": self.norm_num_groups,
                "sample_size": self.sample_size, "act_fn": "silu", "center_input_sample": False,
                "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
                "norm_eps": 1e-5, "use_linear_projection": False}


UNET_PRESETS = {
    "sd15": UNetConfig(),
    # SD1.5's structure (4 levels, 16 cross-attention layers) at toy width, for tests and the demo.
    "tiny": UNetConfig(block_out_channels=(32, 64, 64, 64), heads=2, cross_attention_dim=32,
                       norm_num_groups=8, sample_size=16),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers flip_sin_to_cos=True, shift 0). t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(cin, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with the timestep added in between (LDM ``ResBlock``)."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None, scope=None):
        """``scope``: region-confined LoRAs (composer/regions.py RegionLoRA), or None."""
        h = self.conv1(F.silu(self.norm1(x)), scope=scope)
        if self.time_emb_proj is not None:
            t = F.silu(temb)
            h = residual(h, self.time_emb_proj(t)[:, :, None, None])
            if scope is not None:  # the timestep delta of each concept, on its own pixels only
                h = scope.add_spatial(self.time_emb_proj, t, h)
        h = self.conv2(F.silu(self.norm2(h)), scope=scope)
        return residual(h, x if self.conv_shortcut is None else self.conv_shortcut(x, scope=scope))


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q/to_k/to_v/to_out.0).

    x [B, N, C], context [B, L, Cc] (None for self-attention) -> [B, N, C].
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, backend: str = "sdpa"):
        super().__init__()
        self.heads = heads
        self.backend = check_backend(backend)
        self.layer_index = -1  # set by UNet for cross-/self-attention pairs (method.md §1)
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim or dim, dim, bias=False)
        self.to_v = Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim), nn.Dropout(0.0)])  # index kept for key names

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q, k, v = (split_heads(p, self.heads) for p in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        return self.to_out[0](merge_heads(attention(q, k, v, backend=self.backend)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x, scope=None):
        h, gate = self.proj(x, scope=scope).chunk(2, dim=-1)  # [B, N, 2·inner] -> 2 × [B, N, inner]
        g = F.gelu(gate)
        return g.mul_(h) if not torch.is_grad_enabled() else h * g  # in place: see layers.residual


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Dropout(0.0), Linear(dim * 4, dim)])

    def forward(self, x, scope=None):
        return self.net[2](self.net[0](x, scope), scope=scope)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, regions=None, hw=None):
        if regions is None:
            x = residual(self.attn1(self.norm1(x)), x)
            x = residual(self.attn2(self.norm2(x), context), x)
        else:  # LoRA-Composer: isolation in attn1, region-aware injection in attn2 (method.md §4, §5)
            x = residual(regions.self_attention(self.attn1, self.norm1(x), hw), x)
            x = residual(regions.cross_attention(self.attn2, self.norm2(x), context, hw), x)
        scope = regions.lora.at(hw) if regions is not None and regions.lora is not None else None
        return residual(self.ff(self.norm3(x), scope), x)


class Transformer2DModel(nn.Module):
    """GroupNorm, 1×1 conv in, one transformer block, 1×1 conv out, residual (SD1 ``SpatialTransformer``)."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, backend: str):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim, backend)])
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x, context, regions=None):
        h, w = x.shape[-2:]
        scope = regions.lora if regions is not None else None
        hs = rearrange(self.proj_in(self.norm(x), scope=scope), "b c h w -> b (h w) c")
        block = self.transformer_blocks[0]
        # per-layer contexts [L, B, 77, C] (ED-LoRA layer-wise embeddings) pick this layer's row
        ctx = context[block.attn2.layer_index] if isinstance(context, (list, tuple)) or context.ndim == 4 else context
        hs = block(hs, ctx, regions, (h, w))
        hs = rearrange(hs, "b (h w) c -> b c h w", h=h, w=w)
        return residual(self.proj_out(hs, scope=scope), x)


class Downsample2D(nn.Module):
    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x, scope=None):
        if self.padding == 0:  # the VAE pads right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x, scope=scope)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None, scope=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some torch builds
            x = x.float()
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x.to(dtype), scope=scope)


class Block(nn.Module):
    """A down or up level: resnets, optional transformers, optional resampler (diffusers' block classes)."""

    def __init__(self, resnets, attentions, sampler_name: str | None, sampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))

    @property
    def has_attention(self):
        return hasattr(self, "attentions")


class MidBlock(nn.Module):
    def __init__(self, ch, temb, heads, context_dim, groups, backend):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, groups, 1e-5) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, context_dim, groups, backend)])

    def forward(self, x, temb, context, regions=None):
        scope = regions.lora if regions is not None else None
        x = self.resnets[0](x, temb, scope)
        x = self.attentions[0](x, context, regions)
        return self.resnets[1](x, temb, scope)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig(), backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        ch, g, temb, heads, cdim = cfg.block_out_channels, cfg.norm_num_groups, cfg.time_embed_dim, cfg.heads, cfg.cross_attention_dim
        n = len(ch)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        def tf(c):
            return Transformer2DModel(c, heads, cdim, g, backend)

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i in range(n):
            cin, cout = cout, ch[i]
            res = [ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, 1e-5) for j in range(cfg.layers_per_block)]
            att = [tf(cout) for _ in range(cfg.layers_per_block)] if cfg.attention_levels[i] else None
            down = Downsample2D(cout) if i < n - 1 else None
            self.down_blocks.append(Block(res, att, "downsamplers", down))
        self.mid_block = MidBlock(ch[-1], temb, heads, cdim, g, backend)

        if cfg.decoder:
            self.up_blocks = nn.ModuleList()
            rch, rattn = ch[::-1], cfg.attention_levels[::-1]
            cout = rch[0]
            for i in range(n):
                prev, cout, skip_in = cout, rch[i], rch[min(i + 1, n - 1)]
                m = cfg.layers_per_block + 1
                res = [ResnetBlock2D((prev if j == 0 else cout) + (skip_in if j == m - 1 else cout), cout, temb, g,
                                     1e-5) for j in range(m)]
                att = [tf(cout) for _ in range(m)] if rattn[i] else None
                up = Upsample2D(cout) if i < n - 1 else None
                self.up_blocks.append(Block(res, att, "upsamplers", up))
            self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-5)
            self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        for l, blk in enumerate(self.transformer_blocks()):
            blk.attn1.layer_index = blk.attn2.layer_index = l

    def transformer_blocks(self):
        """The BasicTransformerBlocks in forward order: index = cross-attention layer l (method.md §1)."""
        tfs = [a for b in self.down_blocks if b.has_attention for a in b.attentions]
        tfs += list(self.mid_block.attentions)
        tfs += [a for b in getattr(self, "up_blocks", ()) if b.has_attention for a in b.attentions]
        return [t.transformer_blocks[0] for t in tfs]

    def set_attention_backend(self, backend: str):
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = check_backend(backend)

    def embed_time(self, t, x) -> torch.Tensor:
        """t scalar or [B] -> the timestep embedding [B, 4·C0] in x's dtype."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype))

    def encode(self, x, temb, context, regions=None, stop_after_layer=None, *, hint=None, intrablock_residuals=None):
        """The down path and the mid block -> (h [B, C_last, h/2^(n-1), w/2^(n-1)], skips), or None when the pass
        stopped at ``stop_after_layer``. ``skips`` are the 3n outputs the up path reads (conv_in, every resnet/
        transformer pair, every downsampler: 12 for SD1.5).

        ``hint`` [B, C0, h, w] is added after conv_in (a ControlNet's encoded condition image).
        ``intrablock_residuals`` (T2I-Adapter, one [B, C_i, ...] per level) are added to the output of each level's
        last resnet/transformer pair, before that skip is saved and before the downsampler, as diffusers'
        ``down_intrablock_additional_residuals`` (so the skip and the rest of the down path both carry them).
        """
        scope = regions.lora if regions is not None else None  # region-confined LoRAs (lora_scope="all")
        if intrablock_residuals is not None and len(intrablock_residuals) != len(self.down_blocks):
            raise ValueError(f"{len(intrablock_residuals)} intrablock residuals for {len(self.down_blocks)} levels")
        h = self.conv_in(x, scope=scope)
        if hint is not None:
            h = h + hint
        skips = [h]
        for i, b in enumerate(self.down_blocks):
            for j, r in enumerate(b.resnets):
                h = r(h, temb, scope)
                if b.has_attention:
                    h = b.attentions[j](h, context, regions)
                    if stop_after_layer is not None and b.attentions[j].transformer_blocks[0].attn2.layer_index >= stop_after_layer:
                        return None
                if intrablock_residuals is not None and j == len(b.resnets) - 1:
                    h = h + intrablock_residuals[i]
                skips.append(h)
            if hasattr(b, "downsamplers"):
                h = b.downsamplers[0](h, scope)
                skips.append(h)
        return self.mid_block(h, temb, context, regions), skips

    def forward(self, x, t, context, regions=None, stop_after_layer: int | None = None, *,
                intrablock_residuals=None, down_residuals=None, mid_residual=None):
        """x [B, 4, h, w], t scalar or [B], context [B, 77, C] or per layer [16, B, 77, C] (one per layer l).

        ``regions`` carries the LoRA-Composer attention state (composer/regions.py); ``stop_after_layer``
        ends the pass once that transformer layer has run (the loss pass needs nothing later, method.md §15).
        Conditions (composer/conditions.py) come in explicitly: ``intrablock_residuals`` (T2I-Adapter features, one
        per level, see :meth:`encode`); ``down_residuals`` (ControlNet, one per skip, added to the skips after the
        down path) and ``mid_residual`` (added to the mid block's output), as diffusers'
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
        """
        temb = self.embed_time(t, x)
        scope = regions.lora if regions is not None else None
        enc = self.encode(x, temb, context, regions, stop_after_layer, intrablock_residuals=intrablock_residuals)
        if enc is None:
            return None
        h, skips = enc
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for {len(skips)} skip connections")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        for b in self.up_blocks:
            for j, r in enumerate(b.resnets):
                h = r(torch.cat([h, skips.pop()], dim=1), temb, scope)
                if b.has_attention:
                    h = b.attentions[j](h, context, regions)
                    if stop_after_layer is not None and b.attentions[j].transformer_blocks[0].attn2.layer_index >= stop_after_layer:
                        return None
            if hasattr(b, "upsamplers"):
                h = b.upsamplers[0](h, size=skips[-1].shape[-2:], scope=scope)
        return self.conv_out(F.silu(self.conv_norm_out(h)), scope=scope)
