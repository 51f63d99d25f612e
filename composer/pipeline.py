"""The Pipeline: UNet + text encoder + VAE + tokenizer + scheduler config, and plain text-to-image.

``generate`` reproduces diffusers' ``StableDiffusionPipeline`` for the same seed: the initial latent is
``torch.randn((1, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))``, CFG runs as one
batch [uncond, cond] with ``eps = u + g·(c − u)`` (Ho & Salimans 2022), latents stay fp32 between steps,
and every step's latent is checked for NaN/Inf (formats.md §7).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .schedulers import SchedulerConfig, make_sampler

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def check_size(height: int, width: int, multiple: int = 8):
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            near = max(multiple, int(round(v / multiple)) * multiple) if isinstance(v, (int, float)) and v > 0 else multiple
            raise ValueError(f"{name}={v} must be a positive multiple of {multiple} (nearest valid: {near})")


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> PIL images (diffusers' rounding: (x/2 + 0.5).clamp(0, 1) · 255, round)."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    sampler: str = "ddim"
    eta: float = 0.0


class Pipeline:
    def __init__(self, unet, text_encoder, vae, tokenizer, scheduler_config: SchedulerConfig, *,
                 dtype=torch.float32, device=torch.device("cpu")):
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        self.scheduler_config = scheduler_config
        self.dtype, self.device = dtype, torch.device(device)
        for m in (unet, text_encoder, vae):
            m.requires_grad_(False)

    # --- building blocks --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts) -> torch.Tensor:
        """list of prompts -> context [B, 77, C] in the model dtype."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids)

    def initial_latent(self, seed: int, height: int, width: int) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32).to(self.device), g

    def eps(self, x, t, context, guidance, **unet_kw):
        """One CFG evaluation: context is [uncond; cond] (2B) when guidance > 1, else cond only."""
        if context.shape[0] == 2 * x.shape[0]:
            e = self.unet(torch.cat([x, x]).to(self.dtype), t, context, **unet_kw).float()
            u, c = e.chunk(2)
            return u + guidance * (c - u)
        return self.unet(x.to(self.dtype), t, context, **unet_kw).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (VAE in its own dtype, fp32 by default)."""
        vdtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(latents.to(vdtype) / self.vae.scaling_factor)
        if not torch.isfinite(img).all():
            if vdtype != torch.float32:
                log.warning("VAE produced NaN/Inf in %s; retrying in fp32", vdtype)
                self.vae.float()
                img = self.vae.decode(latents.float() / self.vae.scaling_factor)
                self.vae.to(vdtype)
            if not torch.isfinite(img).all():
                raise NonFiniteError("VAE decode produced NaN/Inf (a bug or broken weights)")
        return img.float()

    # --- text to image ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, prompt: str, *, negative_prompt: str = "", height: int = 512, width: int = 512,
                       steps: int = 50, guidance: float = 7.5, seed: int = 0, sampler: str = "ddim",
                       eta: float = 0.0, callback=None) -> torch.Tensor:
        check_size(height, width)
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        sch = make_sampler(sampler, self.scheduler_config, steps, eta=eta)
        x, g = self.initial_latent(seed, height, width)
        cfg = guidance > 1.0
        ctx = self.encode_prompt([negative_prompt, prompt] if cfg else [prompt])
        for i, t in enumerate(sch.timesteps):
            e = self.eps(x, int(t), ctx, guidance)
            x = sch.step(i, e, x, generator=g)
            if not torch.isfinite(x).all():
                raise NonFiniteError(f"latent became NaN/Inf at step {i} (t={int(t)})")
            if callback is not None:
                callback(i, len(sch.timesteps))
        return x

    def generate(self, prompt: str, **kw) -> Image.Image:
        """Text to image; keywords as in :class:`GenerationParams`. Returns a PIL image."""
        return to_pil(self.decode(self.sample_latents(prompt, **kw)))[0]

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.unet.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        return self
