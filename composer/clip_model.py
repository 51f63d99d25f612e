"""CLIP image and text towers with projections (OpenAI CLIP, e.g. ViT-B/32), for the paper's metrics
(method.md §14). Module names mirror ``transformers.CLIPModel`` (``vision_model.embeddings.patch_embedding``,
``visual_projection``...), so its folders load with a strict table-free load. The text tower reuses
composer/clip.py; the vision tower is the same pre-LN transformer without the causal mask.

Preprocessing is CLIP's: resize the short side to 224 (bicubic), centre crop 224, scale to [0, 1],
normalise with CLIP's mean and std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, read_json, strict_load
from .clip import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPVisionConfig":
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError("vision config: only OpenAI CLIP (quick_gelu) towers are supported")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, px):  # px [B, 3, 224, 224] -> [B, 1 + P, C]
        p = self.patch_embedding(px.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(p.shape[0], 1, -1)
        return torch.cat([cls, p], 1) + self.position_embedding.weight[None]


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig, backend: str):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic: the checkpoint's name)
        self.encoder = CLIPEncoder(cfg, backend, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, px):
        x = self.pre_layrnorm(self.embeddings(px))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])  # pooled: the class token


class CLIPModel(nn.Module):
    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, projection_dim: int = 512,
                 backend: str = "sdpa", eos_token_id: int = 49407):
        super().__init__()
        self.text_model = CLIPTextTransformer(text_cfg, backend)
        self.vision_model = CLIPVisionTransformer(vision_cfg, backend)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_cfg.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.eos = eos_token_id

    def image_features(self, px: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(px))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        tm = self.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        # pooled at the first end-of-text token (OpenAI CLIP's argmax over ids, which holds while EOS is the max id)
        pos = (ids == self.eos).int().argmax(-1)
        return self.text_projection(x[torch.arange(len(ids)), pos])

    @classmethod
    def load(cls, path: str, dtype=torch.float32, device="cpu") -> "CLIPModel":
        """A transformers ``CLIPModel`` folder (config.json + model.safetensors / pytorch_model.bin)."""
        from .loading import _read_component
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: not a CLIP model folder (config.json missing)")
        cfg = read_json(os.path.join(path, "config.json"))
        tcfg = CLIPTextConfig.from_transformers(cfg.get("text_config", {}))
        vcfg = CLIPVisionConfig.from_transformers(cfg.get("vision_config", {}))
        eos = cfg.get("text_config", {}).get("eos_token_id", 49407)
        eos = 49407 if eos == 2 else eos  # legacy configs say 2 and mean "the highest id", i.e. <|endoftext|>
        with torch.device("meta"):
            m = cls(tcfg, vcfg, cfg.get("projection_dim", 512), eos_token_id=eos)
        sd, f = _read_component(path)
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        return strict_load(m, sd, f, dtype=dtype, device=device).eval()


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL images -> [B, 3, size, size]: short side to size (bicubic), centre crop, CLIP normalisation."""
    from PIL import Image
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        l, t = (nw - size) // 2, (nh - size) // 2
        im = im.crop((l, t, l + size, t + size))
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = (a - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
        out.append(torch.from_numpy(a).permute(2, 0, 1))
    return torch.stack(out)
