"""CLIP ViT-L/14 text encoder (SD1.x conditioning), in the transformers module tree.

Names mirror ``transformers.CLIPTextModel`` (``text_model.encoder.layers.{i}.self_attn.q_proj``...), which
is also what kohya (``lora_te_text_model_...``), PEFT and ED-LoRA text-encoder LoRAs address.
Source: Radford et al. 2021; formats.md §5. ids [B, 77] -> hidden states [B, 77, 768] after the final
LayerNorm. Position ids are always arange(77) (a stored ``position_ids`` buffer is never read).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import Linear
from .attention import attention, check_backend, merge_heads, split_heads


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_name(cls, name: str) -> "CLIPTextConfig":
        return CLIP_PRESETS[name]

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        act = cfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"text encoder config: hidden_act={act!r} (an SD2.x/OpenCLIP encoder?); "
                             "only SD1.x's CLIP ViT-L/14 (quick_gelu) is supported")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

    def to_transformers(self) -> dict:
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 768,
                **self.__dict__}


CLIP_PRESETS = {
    "sd15": CLIPTextConfig(),
    # the real vocabulary (so the real tokenizer applies) at toy width
    "tiny": CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str, causal: bool = True):
        super().__init__()
        self.heads, self.backend, self.causal = heads, check_backend(backend), causal
        self.q_proj, self.k_proj = Linear(dim, dim), Linear(dim, dim)
        self.v_proj, self.out_proj = Linear(dim, dim), Linear(dim, dim)

    def forward(self, x, adapter=None):  # x [B, 77, C], causal self-attention
        q, k, v = (split_heads(p(x, adapter), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, backend=self.backend, causal=self.causal)), adapter)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, inner), Linear(inner, dim)

    def forward(self, x, adapter=None):
        h = self.fc1(x, adapter)
        return self.fc2(h * torch.sigmoid(1.702 * h), adapter)  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, backend, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, adapter=None):
        x = x + self.self_attn(self.layer_norm1(x), adapter)
        return x + self.mlp(self.layer_norm2(x), adapter)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg, backend, causal) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, backend)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig(), backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg, backend)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, 77, C] (before positions): the place where ED-LoRA rows are substituted."""
        return self.text_model.embeddings.token_embedding(ids)

    def forward(self, ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                clip_skip: int = 0, adapter=None) -> torch.Tensor:
        """ids [B, 77] (or token embeddings [B, 77, C]) -> [B, 77, C] after the final LayerNorm.

        ``clip_skip=k`` takes the hidden state k layers before the last (diffusers' convention; A1111's
        "clip skip 2" is k = 1), then applies the final LayerNorm as diffusers does.
        """
        tm = self.text_model
        x = self.embed(ids) if inputs_embeds is None else inputs_embeds
        n = x.shape[1]
        x = x + tm.embeddings.position_embedding.weight[:n].to(x.dtype)
        layers = tm.encoder.layers
        for layer in layers[: len(layers) - clip_skip]:
            x = layer(x, adapter)
        return tm.final_layer_norm(x)
