"""ControlNet (Zhang et al. 2023, arXiv 2302.05543): a trainable copy of the UNet's encoder that reads a condition
image and returns one residual per skip connection plus one for the mid block.

Built as a config of the UNet in composer/unet.py with ``decoder=False`` (conv_in, time embedding, down blocks, mid
block: the same classes, the same forward code, :meth:`UNet.encode`), plus what ControlNet adds, in diffusers'
``ControlNetModel`` names so a diffusers folder loads with a strict load and no table:

- ``controlnet_cond_embedding``: the hint encoder, image [B, 3, H, W] in [0, 1] -> [B, C0, H/8, W/8]
  (3×3 conv, SiLU; per step a 3×3 conv and a stride-2 3×3 conv, each + SiLU; a zero-initialised 3×3 conv out),
  added after ``conv_in``;
- ``controlnet_down_blocks.{i}``: a zero-initialised 1×1 conv on each of the 3n skips (12 for SD1.5);
- ``controlnet_mid_block``: the same on the mid block's output.

Original single files (``control_v11p_sd15_*.pth`` / ``.safetensors``, ``control_model.`` prefix or none) go
through the one name table in composer/convert.py. Scaling (diffusers ``ControlNetModel.forward``): every residual ×
``conditioning_scale``; in guess mode residual k of 13 × logspace(−1, 0, 13)[k] (0.1 for the first skip, 1 for the mid
block) × scale; ``global_pool_conditions`` (the shuffle model) averages each residual over space.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import convert
from .checkpoint import CheckpointError, check_finite, read_json, read_weights, strict_load
from .unet import UNet, UNetConfig

log = logging.getLogger(__name__)

# keys of an original "full" ControlNet file (v1.0: the base model saved with the control model) that are not
# the ControlNet; they are reported, not read
_BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=lambda: replace(UNetConfig(), decoder=False))
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    channel_order: str = "rgb"  # "bgr": the model was trained on BGR images (flipped before the hint encoder)

    @classmethod
    def from_diffusers(cls, cfg: dict, where: str = "config") -> "ControlNetConfig":
        """A diffusers ``ControlNetModel`` config.json; a ControlNet for another base is refused by name."""
        _refuse_other_base(cfg.get("cross_attention_dim", 1280), cfg.get("use_linear_projection", False),
                           cfg.get("addition_embed_type"), where)
        ucfg = {k: cfg[k] for k in ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                                    "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                                    "norm_num_groups", "class_embed_type", "transformer_layers_per_block")
                if k in cfg}
        ucfg["up_block_types"] = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                                  for t in reversed(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 +
                                                            ["DownBlock2D"]))]
        try:
            unet = UNetConfig.from_diffusers(ucfg)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise CheckpointError(f"{where}: mid_block_type {cfg['mid_block_type']!r}: not an SD1.x ControlNet")
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise CheckpointError(f"{where}: controlnet_conditioning_channel_order {order!r}")
        return cls(unet=replace(unet, decoder=False), conditioning_channels=cfg.get("conditioning_channels", 3),
                   conditioning_embedding_out_channels=tuple(cfg.get("conditioning_embedding_out_channels")
                                                             or (16, 32, 96, 256)),
                   global_pool_conditions=bool(cfg.get("global_pool_conditions", False)), channel_order=order)

    def to_diffusers(self) -> dict:
        u = self.unet.to_diffusers()
        keep = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim",
                "cross_attention_dim", "norm_num_groups", "act_fn", "downsample_padding", "flip_sin_to_cos",
                "freq_shift", "mid_block_scale_factor", "norm_eps", "use_linear_projection")
        return {"_class_name": "ControlNetModel", **{k: u[k] for k in keep},
                "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                "global_pool_conditions": self.global_pool_conditions,
                "controlnet_conditioning_channel_order": self.channel_order}

    @property
    def hint_convs(self) -> int:
        """Convolutions in the hint encoder: conv_in, two per step, conv_out (8 for (16, 32, 96, 256))."""
        return 2 * len(self.conditioning_embedding_out_channels)


def _refuse_other_base(context_dim, linear_proj, addition, where):
    if addition or context_dim == 2048:
        raise CheckpointError(f"{where}: ControlNet for SDXL ({'addition_embed_type ' + repr(addition) if addition else '2048-wide context'}): "
                              "not supported, SD1.x ControlNets only")
    if context_dim == 1024 or linear_proj:
        raise CheckpointError(f"{where}: ControlNet for SD2.x ({'1024-wide context' if context_dim == 1024 else 'linear proj_in'}): "
                              "not supported, SD1.x ControlNets only")


class ControlNetConditioningEmbedding(nn.Module):
    def __init__(self, out_channels: int, cin: int, chans: tuple):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        blocks = []
        for a, b in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, x):
        """image [B, c, H, W] -> [B, C0, H/2^(len-1), W/2^(len-1)] (8× smaller for the usual 4 widths)."""
        h = F.silu(self.conv_in(x))
        for b in self.blocks:
            h = F.silu(b(h))
        return self.conv_out(h)


class ControlNet(UNet):
    """The UNet encoder with a hint encoder and zero convolutions. ``self.cfg`` is its UNet config (decoder off);
    ``self.control`` the whole :class:`ControlNetConfig`."""

    def __init__(self, cfg: ControlNetConfig = ControlNetConfig(), backend: str = "sdpa"):
        super().__init__(replace(cfg.unet, decoder=False), backend)
        self.control = cfg
        ch, lpb = cfg.unet.block_out_channels, cfg.unet.layers_per_block
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(ch[0], cfg.conditioning_channels,
                                                                         cfg.conditioning_embedding_out_channels)
        skips = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(lpb + (i < len(ch) - 1))]
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in skips])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    @property
    def num_residuals(self) -> int:
        """Skips + mid (13 for SD1.5)."""
        return len(self.controlnet_down_blocks) + 1

    def embed_hint(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, c, H, W] in [0, 1] -> the hint added after conv_in. Constant for an image: callers cache it."""
        if self.control.channel_order == "bgr":
            image = image.flip(1)
        return self.controlnet_cond_embedding(image)

    def residual_scales(self, conditioning_scale: float = 1.0, guess_mode: bool = False) -> list:
        """One scale per residual (skips then mid)."""
        n = self.num_residuals
        if guess_mode and not self.control.global_pool_conditions:
            # diffusers: logspace(-1, 0, n) computed in fp32, times the scale
            return (torch.logspace(-1, 0, n) * conditioning_scale).tolist()
        return [conditioning_scale] * n

    def forward(self, x, t, context, image=None, *, hint=None, conditioning_scale=1.0, guess_mode: bool = False):
        """x [B, 4, h, w] (the UNet's input), t, context [B, 77, C] (or per layer [L, B, 77, C]), image [B, c, H, W] in
        [0, 1] or its precomputed ``hint`` -> (down residuals: list of 3n [B, C_k, h_k, w_k], mid residual).

        ``conditioning_scale``: a number, or one scale per residual (numbers or [1, 1, h_k, w_k] maps, for the
        per-region weights of composer/conditions.py); ``guess_mode`` as diffusers' (only with a number)."""
        if hint is None:
            hint = self.embed_hint(image.to(x.dtype))
        temb = self.embed_time(t, x)
        h, skips = self.encode(x, temb, context, hint=hint.expand(x.shape[0], -1, -1, -1))
        res = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(h)]
        if isinstance(conditioning_scale, (int, float)):
            scales = self.residual_scales(conditioning_scale, guess_mode)
        else:
            if guess_mode or len(conditioning_scale) != len(res):
                raise ValueError(f"per-residual scales: need {len(res)} (and no guess_mode), got {len(conditioning_scale)}")
            scales = conditioning_scale
        res = [r * s for r, s in zip(res, scales)]
        if self.control.global_pool_conditions:
            res = [r.mean(dim=(2, 3), keepdim=True) for r in res]
        return res[:-1], res[-1]


# --- the original (cldm) layout --------------------------------------------------------------------------------

def ldm_names(model: ControlNet, prefix: str = convert.CONTROLNET_PREFIX) -> dict:
    """{our key: original key} (the one table, composer/convert.py)."""
    c = model.control
    return {k: prefix + convert.controlnet_key_to_ldm(k, c.unet.layers_per_block, c.unet.attention_levels,
                                                      c.hint_convs) for k in model.state_dict()}


def ldm_state_dict(model: ControlNet, prefix: str = convert.CONTROLNET_PREFIX) -> dict:
    """Our weights in the original file's names (the exporter)."""
    names = ldm_names(model, prefix)
    return {names[k]: v for k, v in model.state_dict().items()}


def config_from_ldm(sd: dict, base: UNetConfig, where: str) -> ControlNetConfig:
    """An original file's config: what shapes show (hint encoder, widths, context width, projection kind) is read
    and checked against the base UNet; head and group counts, which shapes do not show, are the base UNet's."""
    k2 = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    pin = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    _refuse_other_base(k2.shape[1] if k2 is not None else base.cross_attention_dim,
                       pin is not None and pin.ndim == 2, "label_emb" if any(k.startswith("label_emb.") for k in sd)
                       else None, where)
    if "input_hint_block.0.weight" not in sd:
        raise CheckpointError(f"{where}: no input_hint_block: not a ControlNet (a diff/LoRA ControlNet, or a "
                              "T2I-Adapter?)")
    hints = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if hints != list(range(0, 2 * len(hints), 2)) or len(hints) % 2:
        raise CheckpointError(f"{where}: unexpected hint encoder layout (convs at {hints})")
    chans = [sd["input_hint_block.0.weight"].shape[0]] + \
        [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hints[2:-1:2]]
    c_in = sd["input_blocks.0.0.weight"].shape[1] if "input_blocks.0.0.weight" in sd else None
    if c_in is not None and c_in != base.in_channels:
        raise CheckpointError(f"{where}: ControlNet with {c_in} latent input channels; the UNet has {base.in_channels}")
    return ControlNetConfig(unet=replace(base, decoder=False),
                            conditioning_channels=sd["input_hint_block.0.weight"].shape[1],
                            conditioning_embedding_out_channels=tuple(chans))


def _split_ldm(sd: dict, where: str) -> dict:
    """The ControlNet's own keys of an original file, without prefix."""
    P = convert.CONTROLNET_PREFIX
    if any(k.startswith(P) for k in sd):
        base = [k for k in sd if k.startswith(_BASE_PREFIXES)]
        other = [k for k in sd if not k.startswith(P) and not k.startswith(_BASE_PREFIXES)]
        if other:
            raise CheckpointError(f"{where}: {len(other)} tensor(s) belong neither to the ControlNet nor to a base "
                                  f"model: {other[:8]}")
        if base:
            log.warning("%s: a ControlNet saved with its base model: %d base-model tensors are not read (composer "
                        "uses the loaded model's)", where, len(base))
        return {k[len(P):]: v for k, v in sd.items() if k.startswith(P)}
    if any(k.startswith(("input_hint_block.", "zero_convs.")) for k in sd):
        return sd
    if any(k.startswith(("down_intrablock", "adapter.")) or k in ("conv_in.weight",) for k in sd):
        raise CheckpointError(f"{where}: a T2I-Adapter, not a ControlNet (use kind 't2i-adapter')")
    raise CheckpointError(f"{where}: not a ControlNet (no control_model.* / input_hint_block / zero_convs keys)")


def check_fits(cfg: ControlNetConfig, base: UNetConfig, where: str):
    """A ControlNet adds to this UNet's skips: its widths, levels and context must be the UNet's."""
    a, b = cfg.unet, base
    for name in ("block_out_channels", "attention_levels", "layers_per_block", "cross_attention_dim"):
        if getattr(a, name) != getattr(b, name):
            raise CheckpointError(f"{where}: ControlNet {name} {getattr(a, name)} does not fit the UNet's "
                                  f"{getattr(b, name)} (a ControlNet for another base model?)")


def load_controlnet(path: str, base: UNetConfig, *, dtype=torch.float32, device="cpu", backend="sdpa") -> ControlNet:
    """A diffusers ``ControlNetModel`` folder or an original single file (``.safetensors``, or ``.pth``/``.ckpt`` read
    with weights_only), for the UNet configured by ``base``; strictly."""
    from .loading import read_component  # the diffusers component reader (loading imports the pipeline)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"ControlNet not found: {path}")
    names = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{path}: not a ControlNet folder (config.json missing)")
        raw = read_json(cfg_path)
        if raw.get("_class_name") not in (None, "ControlNetModel"):
            raise CheckpointError(f"{cfg_path}: a {raw.get('_class_name')}, not a ControlNetModel")
        cfg = ControlNetConfig.from_diffusers(raw, cfg_path)
        sd, source = read_component(path)
    else:
        sd, _ = read_weights(path)
        source = path
        if "controlnet_cond_embedding.conv_in.weight" in sd:  # diffusers names in a bare file: read the shapes
            raise CheckpointError(f"{path}: a ControlNet in diffusers names without its config.json; put it in a "
                                  "folder with its config.json")
        sd = _split_ldm(sd, path)
        cfg = config_from_ldm(sd, base, path)
    check_fits(cfg, base, source)
    check_finite(sd, source)
    with torch.device("meta"):
        model = ControlNet(cfg, backend)
    if not os.path.isdir(path):
        names = ldm_names(model, prefix="")
    model = strict_load(model, sd, source, dtype=dtype, device=device, names=names)
    return model.eval().requires_grad_(False)
