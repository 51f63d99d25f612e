"""Tiny random-weight models with SD1.5's structure (4 levels, 16 cross-attention layers), for tests and
the embedded demo, plus writers for both checkpoint layouts.

The demo needs a tokenizer without any download: ``byte_tokenizer()`` is a CLIP-framed byte-level BPE
(no merges; BOS/EOS at SD1.5's ids 49406/49407), honest about being a stand-in. Real use passes real
tokenizer files.
"""
from __future__ import annotations

import json
import os

import torch

from .clip import CLIPTextConfig, CLIPTextModel
from .schedulers import SchedulerConfig
from .tokenizer import CLIPTokenizer, _build, bytes_to_unicode
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig


def byte_tokenizer() -> CLIPTokenizer:
    syms = list(bytes_to_unicode().values())
    words = syms + [s + "</w>" for s in syms]
    words += [f"<|unused{i}|>" for i in range(49406 - len(words))] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(_build({w: i for i, w in enumerate(words)}, []), "byte-level stand-in")


def random_models(preset: str = "tiny", seed: int = 0, backend: str = "sdpa", std: float | None = None):
    """(unet, vae, text_encoder) with deterministic random weights. ``std`` rescales every weight matrix
    (default init otherwise) so that tiny outputs are neither vanishing nor exploding."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.from_name(preset), backend)
    vae = AutoencoderKL(VAEConfig.from_name(preset), backend)
    te = CLIPTextModel(CLIPTextConfig.from_name(preset), backend)
    if std is not None:
        with torch.no_grad():
            for m in (unet, vae, te):
                for name, p in m.named_parameters():
                    if p.ndim >= 2:
                        p.normal_(0, std)
    return unet.eval(), vae.eval(), te.eval()


def _atomic_save(sd: dict, path: str, metadata: dict | None = None):
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_diffusers(folder: str, unet, vae, te, tokenizer: CLIPTokenizer, sched: SchedulerConfig = SchedulerConfig()):
    """Write a diffusers-layout folder (the layout `save_pretrained` produces)."""
    for sub, m, cfg, fname in (("unet", unet, unet.cfg.to_diffusers(), "diffusion_pytorch_model.safetensors"),
                               ("vae", vae, vae.cfg.to_diffusers(), "diffusion_pytorch_model.safetensors"),
                               ("text_encoder", te, te.cfg.to_transformers(), "model.safetensors")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        _atomic_save(m.state_dict(), os.path.join(folder, sub, fname))
    tokenizer.save(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched.to_diffusers(), f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f, indent=2)
