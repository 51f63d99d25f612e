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


def random_edlora(pipe, words, seed: int = 0, rank: int = 4, key_style: str = "new", emb_std: float = 0.5) -> dict:
    """A random ED-LoRA params dict shaped for ``pipe``: rank-r LoRA on every attn1/attn2 q/k/v/out and the text
    encoder's attention, and one [16, C] layer-wise embedding per pseudo-word (for tests and the demo)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    dn, upn = (".lora_down.weight", ".lora_up.weight") if key_style == "new" else ("_lora.down.weight", "_lora.up.weight")
    te, unet = {}, {}
    for path, layer in pipe.text_encoder.named_modules():
        if path.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")):
            te[path + dn], te[path + upn] = r(rank, layer.weight.shape[1]), r(layer.weight.shape[0], rank)
    for path, layer in pipe.unet.named_modules():
        if path.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            unet[path + dn], unet[path + upn] = r(rank, layer.weight.shape[1]), r(layer.weight.shape[0], rank)
    L, C = len(pipe.unet.transformer_blocks()), pipe.text_encoder.cfg.hidden_size
    emb = {w: torch.randn(L, C, generator=g) * emb_std for w in words}
    return {"params": {"new_concept_embedding": emb, "text_encoder": te, "unet": unet}}
