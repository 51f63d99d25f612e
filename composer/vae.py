"""The SD1.x autoencoder (LDM ``AutoencoderKL``), in the diffusers module tree.

Source: Rombach et al. 2022; diffusers ``autoencoders/autoencoder_kl.py``. Convention (diffusers'):
``decode(z)`` takes the latent already divided by the scaling factor (0.18215) and returns an image in
[-1, 1]; ``encode(img)`` returns the mean and log-variance of the posterior (before scaling).

Decoding has two paths. ``Decoder.forward`` is the reference, diffusers' decoder op for op (its results match
diffusers' to ~1e-5 of the output scale at SD1.5 sizes: the mid-block attention's GEMMs see other memory layouts).
``Decoder.forward_fast`` (the default of :meth:`AutoencoderKL.decode`) computes the same function faster on CPU:
- each upsampler's nearest ×2 + 3×3 conv runs as one 2×2 conv with four phase kernels on the small input
  (:func:`upsample_conv`), 16/36 of the multiply-adds and no upsampled tensor;
- SiLU runs in place on the GroupNorm output and the residual is added in place, so the large 256–512 px
  activations are allocated (and page-faulted) about half as often;
- on CPU, activations and conv weights are channels-last, so oneDNN's convolutions read and write them without a
  reorder on every call (the decoder's conv weights are converted once, in place, on the first fast decode; the
  reference path converts them back).
The result differs from the reference by rounding only (≤ 1e-5 of the output scale; tests/test_vae.py).

Large images can be decoded in overlapping latent tiles blended with linear ramps (:func:`decode_tiled`): memory
is bounded by the tile, but GroupNorm statistics and the mid-block attention become per tile, so the image
differs from the untiled one (measured in bench/results/vae_cpu.json). ``tile=None`` tiles automatically above
768² (:func:`auto_tile`).
"""
from __future__ import annotations

import math
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


def _resnet_inplace(r: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    """A timestep-free ResnetBlock2D with SiLU and the residual add in place on fresh outputs (the values are the
    reference's bit for bit: the same ops, only fewer allocations; h + shortcut == shortcut + h)."""
    h = r.conv1(F.silu(r.norm1(x), inplace=True))
    h = r.conv2(F.silu(r.norm2(h), inplace=True))
    return h.add_(x if r.conv_shortcut is None else r.conv_shortcut(x))


def _phase_taps(w: torch.Tensor, dim: int) -> tuple:
    """The 3 taps of ``w`` along ``dim`` folded for nearest ×2 upsampling -> (phase 0, phase 1), 2 taps each.
    An output at even position 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: taps [w0, w1 + w2];
    at odd 2i+1 it reads rows 2i, 2i+1, 2i+2 = i, i, i+1: taps [w0 + w1, w2]."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3×3, stride-1, padding-1 conv, without the
    upsampled tensor. x [B, C, H, W] -> [B, Co, 2H, 2W], in x's memory format.

    Output pixel (2i+a, 2j+b) sees input rows {i-1, i} (a = 0) or {i, i+1} (a = 1), columns likewise, so it is a
    2×2 conv of x with the phase kernel K_ab (:func:`_phase_taps`); the zero padding of the upsampled image is the
    zero padding of x. One conv with the four kernels stacked [4·Co, C, 2, 2] and padding 1 gives y
    [B, 4·Co, H+1, W+1], whose window at offset (a, b) is phase (a, b): 16 multiply-adds per output against 36.
    """
    w = conv.weight  # [Co, C, 3, 3]
    co = w.shape[0]
    rows = _phase_taps(w, 2)  # a = 0, 1: [Co, C, 2, 3]
    k = torch.cat([c for r in rows for c in _phase_taps(r, 3)])  # (a, b) = 00, 01, 10, 11: [4·Co, C, 2, 2]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format
    k = k.contiguous(memory_format=fmt)
    y = F.conv2d(x, k, None if conv.bias is None else conv.bias.repeat(4), padding=1)
    b, _, h, wd = x.shape
    out = torch.empty((b, co, 2 * h, 2 * wd), dtype=y.dtype, device=y.device, memory_format=fmt)
    y6 = y.unflatten(1, (2, 2, co))                      # [B, a, b, Co, H+1, W+1]
    o6 = out.unflatten(2, (h, 2)).unflatten(4, (wd, 2))  # [B, Co, H, a, W, b], views into out
    for pa in (0, 1):
        for pb in (0, 1):
            o6[:, :, :, pa, :, pb].copy_(y6[:, pa, pb, :, pa:pa + h, pb:pb + wd])
    return out


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
        """The reference path (diffusers' decoder op for op): z [B, 4, h, w] -> [B, 3, 8h, 8w]."""
        self._set_channels_last(False)
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward_fast(self, z):
        """The same function as :meth:`forward` up to rounding, faster (module docstring): sub-pixel upsampling
        convs, in-place SiLU and residuals, channels-last on CPU. z [B, 4, h, w] -> [B, 3, 8h, 8w]."""
        cl = z.device.type == "cpu"
        self._set_channels_last(cl)
        if cl:
            z = z.contiguous(memory_format=torch.channels_last)
        m = self.mid_block
        x = _resnet_inplace(m.resnets[1], m.attentions[0](_resnet_inplace(m.resnets[0], self.conv_in(z))))
        for b in self.up_blocks:
            for r in b.resnets:
                x = _resnet_inplace(r, x)
            if hasattr(b, "upsamplers"):
                x = upsample_conv(b.upsamplers[0].conv, x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True)).contiguous()

    def _set_channels_last(self, on: bool):
        """Put the 4-D conv weights in channels-last (on) or standard layout, in place, when they are not already
        (a check per call; the copy happens once per switch). Values, names and state_dict keys are unchanged."""
        fmt = torch.channels_last if on else torch.contiguous_format
        # ordinary tensors even when called under inference_mode, so that the weights stay usable (and loadable
        # in place) outside it
        with torch.inference_mode(False), torch.no_grad():
            for p in self.parameters():
                if p.ndim == 4 and p.shape[1] > 1 and not p.is_contiguous(memory_format=fmt):
                    p.data = p.data.contiguous(memory_format=fmt)


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

    @property
    def upscale(self) -> int:
        """Pixels per latent cell along each axis (8 for SD1.x)."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def decode(self, z: torch.Tensor, *, tile: int | None = 0, overlap: int | None = None,
               fast: bool = True) -> torch.Tensor:
        """z [B, 4, h, w] (already divided by the scaling factor) -> image [B, 3, 8h, 8w] in about [-1, 1].

        ``tile``: 0 (default) decodes the whole latent at once; N > 0 decodes overlapping tiles of at most N×N latent
        cells (:func:`decode_tiled`; a latent that fits in one tile is decoded untiled, bit-identically); None
        chooses with :func:`auto_tile`. ``overlap`` (latent cells, default N // 4) only applies to tiling.
        ``fast=False`` runs the reference path (diffusers' ops); the default path agrees with it to rounding.
        """
        if tile is None:
            tile = auto_tile(*z.shape[-2:])
        if tile:
            return decode_tiled(self, z, tile, overlap, fast=fast)
        if overlap is not None and overlap < 0:
            raise ValueError(f"VAE decode: overlap must be ≥ 0, got {overlap}")
        zq = self.post_quant_conv(z)
        return self.decoder.forward_fast(zq) if fast else self.decoder(zq)


# Automatic tiling: above this many latent cells (768² pixels) decode in tiles of at most AUTO_TILE cells (512 px)
# overlapping by a quarter (diffusers' enable_vae_tiling uses the same 512 px tiles and 25 % overlap).
AUTO_TILE_ABOVE = 96 * 96
AUTO_TILE = 64


def auto_tile(h: int, w: int) -> int:
    """The automatic tile size for an h×w latent: 0 (untiled) up to 768² pixels of area, else AUTO_TILE."""
    return AUTO_TILE if h * w > AUTO_TILE_ABOVE else 0


def tile_spans(n: int, tile: int, overlap: int) -> list:
    """[start, end) latent spans covering 0..n exactly: the fewest tiles of at most ``tile`` cells whose neighbours
    overlap by at least ``overlap``, all the same size and evenly spread (the first at 0, the last ending at n), so
    no thin last tile. n ≤ tile: one span."""
    if n <= tile:
        return [(0, n)]
    k = math.ceil((n - overlap) / (tile - overlap))    # tiles needed
    size = math.ceil((n + (k - 1) * overlap) / k)       # ≤ tile; k·size ≥ n + (k-1)·overlap
    starts = [round(i * (n - size) / (k - 1)) for i in range(k)]  # steps ≤ size - overlap
    return [(s, s + size) for s in starts]


def _ramp(length: int, left: int, right: int) -> torch.Tensor:
    """1-D blend weight of a tile of ``length`` pixels that overlaps its neighbours by ``left`` / ``right`` pixels
    (0 at the image border): (p + ½)/left rising over the left overlap, falling likewise over the right, 1 between.
    Two neighbours' ramps over a shared overlap of L pixels sum to 1 ((p + ½ + L - 1 - p + ½)/L), and every
    weight is > 0, so the normalised blend is defined everywhere."""
    p = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if left:
        w = torch.minimum(w, p / left)
    if right:
        w = torch.minimum(w, p.flip(0) / right)
    return w


def decode_tiled(vae: "AutoencoderKL", z: torch.Tensor, tile: int, overlap: int | None = None, *,
                 fast: bool = True) -> torch.Tensor:
    """Decode z [B, 4, h, w] in overlapping tiles of at most ``tile``×``tile`` latent cells -> [B, 3, 8h, 8w].

    Each tile is decoded on its own (memory: one tile's activations plus the [B, 3, 8h, 8w] output and a weight
    map); its image is weighted by the product of its row and column ramps (:func:`_ramp`, linear over each
    overlap with a neighbour) and the blend is normalised by the summed weights. The ramps keep seams continuous,
    but each tile has its own GroupNorm statistics and mid-block attention, so the result is not the untiled one
    (bench/vae_cpu.py measures how far). A latent that fits in one tile is decoded untiled (bit-identical).
    """
    h, w = z.shape[-2:]
    overlap = tile // 4 if overlap is None else overlap
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"VAE tiled decode: tile must be a positive number of latent cells, got {tile!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile:
        raise ValueError(f"VAE tiled decode: overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    if h <= tile and w <= tile:
        return vae.decode(z, tile=0, fast=fast)
    f = vae.upscale
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)

    def ramps(spans):
        return [_ramp(f * (e - s), f * (spans[i - 1][1] - s) if i else 0,
                      f * (e - spans[i + 1][0]) if i + 1 < len(spans) else 0).to(z.device)
                for i, (s, e) in enumerate(spans)]

    ry, rx = ramps(rows), ramps(cols)
    out = weight = dtype = None
    for (y0, y1), wy in zip(rows, ry):
        for (x0, x1), wx in zip(cols, rx):
            img = vae.decode(z[:, :, y0:y1, x0:x1], tile=0, fast=fast)  # [B, 3, f·th, f·tw]
            if out is None:  # accumulated in fp32 whatever the VAE's dtype, returned in it
                dtype = img.dtype
                out = torch.zeros((*img.shape[:2], f * h, f * w), dtype=torch.float32, device=img.device)
                weight = torch.zeros((f * h, f * w), dtype=torch.float32, device=img.device)
            wt = wy[:, None] * wx[None, :]
            out[:, :, f * y0:f * y1, f * x0:f * x1].addcmul_(img.float(), wt)
            weight[f * y0:f * y1, f * x0:f * x1].add_(wt)
            del img
    return out.div_(weight).to(dtype)
