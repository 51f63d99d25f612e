"""Tiny random-weight models with SD1.5's structure (4 levels, 16 cross-attention layers), for tests, plus
writers for both checkpoint layouts and random concept LoRAs (ED-LoRA and kohya) shaped for a given model.

``byte_tokenizer()`` is a CLIP-framed byte-level BPE (no merges; BOS/EOS at SD1.5's ids 49406/49407) kept for
tests of tokenizer independence; models use SD1's real CLIP vocabulary (``CLIPTokenizer.default()``).
"""
from __future__ import annotations

import json
import os

import torch

from .layers import Conv2d
from .clip import CLIPTextConfig, CLIPTextModel
from .io import save_safetensors
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


def save_diffusers(folder: str, unet, vae, te, tokenizer: CLIPTokenizer, sched: SchedulerConfig = SchedulerConfig()):
    """Write a diffusers-layout folder (the layout `save_pretrained` produces)."""
    for sub, m, cfg, fname in (("unet", unet, unet.cfg.to_diffusers(), "diffusion_pytorch_model.safetensors"),
                               ("vae", vae, vae.cfg.to_diffusers(), "diffusion_pytorch_model.safetensors"),
                               ("text_encoder", te, te.cfg.to_transformers(), "model.safetensors")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_safetensors(m.state_dict(), os.path.join(folder, sub, fname))
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


def random_kohya(pipe, trigger: str, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> tuple[dict, dict]:
    """A random kohya LoRA for ``pipe`` (attn1/attn2 q/k/v/out, ff, the text encoder's attention and MLP) with
    ``trigger`` recorded the way kohya's trainer records it (``ss_tag_frequency``). -> (tensors, metadata)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    sd = {}
    for prefix, model, ends in (("lora_unet_", pipe.unet, (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.2")),
                                ("lora_te_", pipe.text_encoder, ("_proj", ".fc1", ".fc2"))):
        for path, layer in model.named_modules():
            if path.endswith(ends) and not isinstance(layer, Conv2d) and hasattr(layer, "weight"):
                base = prefix + path.replace(".", "_")
                sd[base + ".lora_down.weight"] = r(rank, layer.weight.shape[1])
                sd[base + ".lora_up.weight"] = r(layer.weight.shape[0], rank)
                sd[base + ".alpha"] = torch.tensor(alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_tag_frequency": json.dumps({"10_" + trigger: {trigger: 20, "shape": 7}})}
    return sd, meta
