"""The SD1.x autoencoder (LDM ``AutoencoderKL``), in the diffusers module tree.

Source: Rombach et al. 2022; diffusers ``autoencoders/autoencoder_kl.py``. Convention (diffusers'):
``decode(z)`` takes the latent already divided by the scaling factor (0.18215) and returns an image in
[-1, 1]; ``encode(img)`` returns the mean and log-variance of the posterior (before scaling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import attention, check_backend
from .unet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        return VAE_PRESETS[name]

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        if cfg.get("latent_channels", 4) != 4:
            raise ValueError(f"VAE config: latent_channels={cfg['latent_channels']}; only SD1.x VAEs (4) are supported")
        kw = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **self.__dict__, "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "act_fn": "silu", "sample_size": 512}


VAE_PRESETS = {
    "sd15": VAEConfig(),
    "tiny": VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
}


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block, with its GroupNorm and residual."""

    def __init__(self, ch: int, groups: int, backend: str):
        super().__init__()
        self.backend = check_backend(backend)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])

    def forward(self, x):
        h, w = x.shape[-2:]
        hs = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (p(hs)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # one head: (B, 1, hw, C)
        o = self.to_out[0](attention(q, k, v, backend=self.backend)[:, 0])
        return rearrange(o, "b (h w) c -> b c h w", h=h, w=w) + x


class VAEMidBlock(nn.Module):
    def __init__(self, ch, groups, backend):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups, backend)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, down):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class DecoderBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, up):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, backend: str):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1) for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], g, backend)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, backend: str):
        super().__init__()
        rch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rch[0], g, backend)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, g, i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig(), backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, backend)
        self.decoder = Decoder(cfg, backend)
        c = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, img: torch.Tensor):
        """img [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8], unscaled."""
        mean, logvar = self.quant_conv(self.encoder(img)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 4, h, w] (already divided by the scaling factor) -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
