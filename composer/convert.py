"""The one name table: diffusers/transformers module paths <-> original LDM single-file keys.

Our models use diffusers' tree (composer/unet.py), so diffusers folders and all LoRA formats load with
no map; LDM single files (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``) are renamed here, by rules generated from the config
(formats.md §1.3-1.5; facts from diffusers' ``convert_ldm_*`` and ComfyUI's ``unet_to_diffusers``).
Each function maps one of *our* keys to its LDM key, so a conversion is "for every key our model has,
look it up in the file" and the bookkeeping (nothing missing, nothing left over) is a set difference.
"""
from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_key_to_ldm(k: str, layers_per_block: int, attention_levels: tuple) -> str:
    """``down_blocks.0.resnets.1.conv1.weight`` -> ``input_blocks.2.0.in_layers.2.weight`` (without prefix)."""
    n = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    mod, _, param = k.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * n + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", k):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * n + j
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        b = int(m[1])
        has_attn = attention_levels[::-1][b]
        return f"output_blocks.{b * n + n - 1}.{2 if has_attn else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {k!r}")


def vae_key_to_ldm(k: str, num_levels: int) -> str:
    """``decoder.up_blocks.0.resnets.2.conv1.weight`` -> ``decoder.up.3.block.2.conv1.weight``."""
    k2 = k
    k2 = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k2)
    k2 = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k2)
    k2 = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
    k2 = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.", k2)
    k2 = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", k2)
    k2 = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k2)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(weight|bias)", k2):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[m[2]]
        k2 = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    k2 = k2.replace(".conv_shortcut.", ".nin_shortcut.")
    return k2


def vae_needs_conv_shape(k: str) -> bool:
    """LDM stores the VAE mid-attention q/k/v/proj_out as 1×1 convs [C, C, 1, 1]; ours are Linear [C, C]."""
    return bool(re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight", k))


def clip_key_to_ldm(k: str) -> str:
    return k  # after the prefix, LDM files already use transformers' names


CONTROLNET_PREFIX = "control_model."


def controlnet_key_to_ldm(k: str, layers_per_block: int, attention_levels: tuple, hint_convs: int) -> str:
    """A ControlNet key (diffusers ``ControlNetModel`` names) -> the original ``cldm`` key, without prefix. The
    encoder is the UNet's (same table); the additions are the hint encoder ``input_hint_block`` (a Sequential of
    convs and SiLUs: convs at even indices, ``hint_convs`` of them), the zero convolutions ``zero_convs.{i}.0`` on
    each skip and ``middle_block_out.0`` on the mid block (facts from diffusers ``convert_controlnet_checkpoint``)."""
    mod, _, param = k.rpartition(".")
    if mod == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", mod):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
    if mod == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * (hint_convs - 1)}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", mod):
        return f"zero_convs.{m[1]}.0.{param}"
    if mod == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return unet_key_to_ldm(k, layers_per_block, attention_levels)


def ldm_name_table(component: str, our_keys, cfg) -> dict:
    """{our key: full LDM key} for one component ('unet', 'vae', 'text_encoder')."""
    if component == "unet":
        return {k: UNET_PREFIX + unet_key_to_ldm(k, cfg.layers_per_block, cfg.attention_levels) for k in our_keys}
    if component == "vae":
        return {k: VAE_PREFIX + vae_key_to_ldm(k, len(cfg.block_out_channels)) for k in our_keys}
    if component == "text_encoder":
        return {k: CLIP_PREFIX + clip_key_to_ldm(k) for k in our_keys}
    raise ValueError(component)


def ema_key(ldm_unet_key: str) -> str:
    """LitEma's buffer name: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab`` (formats.md §1.6)."""
    return "model_ema." + ldm_unet_key[len("model."):].replace(".", "")
