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

from PIL import Image
from .checkpoint import CheckpointError, read_json, read_weights, strict_load
from .clip import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer
from .loading import read_component

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
        """A transformers ``CLIPModel`` folder (config.json + model.safetensors / pytorch_model.bin), or open_clip
        weights (a file, or a folder holding open_clip_model.safetensors / open_clip_pytorch_model.bin)."""
        oc = _open_clip_file(path)
        if oc:
            return _load_open_clip(cls, oc, dtype, device)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: not a CLIP model folder (no config.json) nor open_clip weights")
        cfg = read_json(os.path.join(path, "config.json"))
        tcfg = CLIPTextConfig.from_transformers(cfg.get("text_config", {}))
        vcfg = CLIPVisionConfig.from_transformers(cfg.get("vision_config", {}))
        eos = cfg.get("text_config", {}).get("eos_token_id", 49407)
        eos = 49407 if eos == 2 else eos  # legacy configs say 2 and mean "the highest id", i.e. <|endoftext|>
        with torch.device("meta"):
            m = cls(tcfg, vcfg, cfg.get("projection_dim", 512), eos_token_id=eos)
        sd, f = read_component(path)
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        return strict_load(m, sd, f, dtype=dtype, device=device).eval()


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL images -> [B, 3, size, size]: short side to size (bicubic), centre crop, CLIP normalisation."""
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


# --- open_clip layout ----------------------------------------------------------------------------------------

def _open_clip_file(path: str):
    if os.path.isfile(path):
        return path
    for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, n)):
            return os.path.join(path, n)
    return None


def open_clip_to_ours(sd: dict) -> dict:
    """Rename open_clip / OpenAI CLIP tensors to our (transformers) names: fused in_proj split into q/k/v,
    projections transposed (open_clip multiplies x @ proj)."""
    out = {}

    def block(src, dst):
        for k, v in sd.items():
            if not k.startswith(src):
                continue
            i, rest = k[len(src):].split(".", 1)
            b = f"{dst}{i}."
            if rest.startswith("attn.in_proj_"):
                for n, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                    out[b + f"self_attn.{n}.{rest.rsplit('_', 1)[1]}"] = part
            else:
                rest = (rest.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
                        .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
                out[b + rest] = v
    block("transformer.resblocks.", "text_model.encoder.layers.")
    block("visual.transformer.resblocks.", "vision_model.encoder.layers.")
    table = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "visual.ln_post.weight": "vision_model.post_layernorm.weight",
             "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
    for k, v in sd.items():
        if k in table:
            out[table[k]] = v
    out["text_projection.weight"] = sd["text_projection"].T
    out["visual_projection.weight"] = sd["visual.proj"].T
    used = set(table) | {"text_projection", "visual.proj", "attn_mask"}
    left = [k for k in sd if k not in used and not k.startswith(("transformer.resblocks.", "visual.transformer.resblocks."))]
    if left:
        raise CheckpointError(f"open_clip weights: unexpected tensors {left[:5]} (not an OpenAI-style ViT CLIP?)")
    return out


def _load_open_clip(cls, path: str, dtype, device) -> "CLIPModel":
    sd, _ = read_weights(path)
    if "visual.conv1.weight" not in sd or "text_projection" not in sd:
        raise CheckpointError(f"{path}: not open_clip CLIP weights (visual.conv1.weight / text_projection missing)")
    n_text = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    n_vis = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    tw, vw = sd["token_embedding.weight"].shape[1], sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    tcfg = CLIPTextConfig(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=tw,
                          intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                          num_hidden_layers=n_text, num_attention_heads=max(1, tw // 64),
                          max_position_embeddings=sd["positional_embedding"].shape[0])
    vcfg = CLIPVisionConfig(hidden_size=vw, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            num_hidden_layers=n_vis, num_attention_heads=max(1, vw // 64), image_size=grid * patch,
                            patch_size=patch)
    with torch.device("meta"):
        m = cls(tcfg, vcfg, sd["text_projection"].shape[1])
    return strict_load(m, open_clip_to_ours(sd), path, dtype=dtype, device=device).eval()
