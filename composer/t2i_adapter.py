"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453): a small convolutional network that turns a condition image
(sketch, pose, canny edges, depth...) into one feature map per UNet level, added to the UNet's down path.

Module tree = diffusers' ``T2IAdapter`` (``adapter.conv_in``, ``adapter.body.{i}.in_conv``,
``adapter.body.{i}.resnets.{j}.block1/block2``; the light variant adds ``adapter.body.{i}.out_conv``), so diffusers
folders and safetensors load with a strict load and no table. The original TencentARC files
(``t2iadapter_*_sd14v1.pth``, ``*_sd15v2.pth``) use a flat ``body.{k}`` list; :func:`original_name` is the one table
between the two (both directions), read only through ``composer.checkpoint`` (safetensors, or pickles with
``weights_only=True``).

Full adapter, shapes for SD1.5 at 512² (image [B, c, 512, 512] in [0, 1], c = 1 for sketch/canny, 3 for pose/depth):
pixel-unshuffle by 8 -> [B, 64c, 64, 64]; conv_in 3×3 -> 320; then per level i an AdapterBlock: (level > 0) 2×2
average pool, (channels change) 1×1 in_conv, ``num_res_blocks`` × (3×3 conv, ReLU, 1×1 conv, + input) ->
features [B, 320, 64, 64], [B, 640, 32, 32], [B, 1280, 16, 16], [B, 1280, 8, 8], the UNet's four level widths and
sizes. The light adapter (the "color" adapter) has no conv_in; each block is 1×1 in (to C/4), residual blocks of
two 3×3 convs, 1×1 out; ``channels`` lists its first three widths and a fourth level repeats the last.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_finite, read_json, read_weights, strict_load

ADAPTER_TYPES = ("full_adapter", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3
    channels: tuple = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    @property
    def feature_channels(self) -> tuple:
        """The width of each output feature map (one per UNet level)."""
        if self.adapter_type == "light_adapter":
            return tuple(self.channels) + (self.channels[-1],)
        return tuple(self.channels)

    @classmethod
    def from_diffusers(cls, cfg: dict, where: str = "config") -> "T2IAdapterConfig":
        kind = cfg.get("adapter_type", "full_adapter")
        if kind == "full_adapter_xl":
            raise CheckpointError(f"{where}: T2I-Adapter for SDXL (adapter_type 'full_adapter_xl'): not supported, "
                                  "SD1.x adapters only")
        if kind not in ADAPTER_TYPES:
            raise CheckpointError(f"{where}: unknown T2I-Adapter type {kind!r}; expected one of {list(ADAPTER_TYPES)}")
        default_channels = (320, 640, 1280, 1280) if kind == "full_adapter" else (320, 640, 1280)
        return cls(in_channels=cfg.get("in_channels", 3), channels=tuple(cfg.get("channels", default_channels)),
                   num_res_blocks=cfg.get("num_res_blocks", 2 if kind == "full_adapter" else 4),
                   downscale_factor=cfg.get("downscale_factor", 8), adapter_type=kind)

    def to_diffusers(self) -> dict:
        return {"_class_name": "T2IAdapter", "in_channels": self.in_channels, "channels": list(self.channels),
                "num_res_blocks": self.num_res_blocks, "downscale_factor": self.downscale_factor,
                "adapter_type": self.adapter_type}


class AdapterResnetBlock(nn.Module):
    """x + conv_2(ReLU(conv_1(x))); conv_2 is 1×1 in the full adapter (the original ``ksize=1``), 3×3 in the light."""

    def __init__(self, ch: int, k2: int):
        super().__init__()
        self.block1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(ch, ch, k2, padding=k2 // 2)

    def forward(self, x):
        return self.block2(self.act(self.block1(x))) + x


def _pool():
    # ceil_mode keeps the map the size of the UNet's level (its stride-2 convs round up) for any multiple of 8
    return nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


class AdapterBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, down: bool):
        super().__init__()
        self.downsample = _pool() if down else None
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(cout, 1) for _ in range(n)])

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, down: bool):
        super().__init__()
        mid = cout // 4
        self.downsample = _pool() if down else None
        self.in_conv = nn.Conv2d(cin, mid, 1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(mid, 3) for _ in range(n)])
        self.out_conv = nn.Conv2d(mid, cout, 1)

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class FullAdapter(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        ch, n = cfg.channels, cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor ** 2, ch[0], 3, padding=1)
        self.body = nn.ModuleList([AdapterBlock(ch[0], ch[0], n, False)] +
                                  [AdapterBlock(ch[i - 1], ch[i], n, True) for i in range(1, len(ch))])

    def forward(self, x):
        x = self.conv_in(self.unshuffle(x))
        feats = []
        for b in self.body:
            x = b(x)
            feats.append(x)
        return feats


class LightAdapter(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        ch, n = cfg.channels, cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.body = nn.ModuleList([LightAdapterBlock(cfg.in_channels * cfg.downscale_factor ** 2, ch[0], n, False)] +
                                  [LightAdapterBlock(ch[i], ch[i + 1], n, True) for i in range(len(ch) - 1)] +
                                  [LightAdapterBlock(ch[-1], ch[-1], n, True)])

    def forward(self, x):
        x = self.unshuffle(x)
        feats = []
        for b in self.body:
            x = b(x)
            feats.append(x)
        return feats


class T2IAdapter(nn.Module):
    """image [B, in_channels, H, W] in [0, 1] -> list of features, one per UNet level ([B, C_i, H/8/2^i, W/8/2^i])."""

    def __init__(self, cfg: T2IAdapterConfig = T2IAdapterConfig()):
        super().__init__()
        self.cfg = cfg
        self.adapter = (FullAdapter if cfg.adapter_type == "full_adapter" else LightAdapter)(cfg)

    @property
    def in_channels(self) -> int:
        return self.cfg.in_channels

    def forward(self, image: torch.Tensor) -> list:
        return self.adapter(image)


# --- the original (TencentARC) layout ------------------------------------------------------------------------

def original_name(key: str, cfg: T2IAdapterConfig) -> str:
    """Our (diffusers) key -> the original file's key.

    full:  adapter.conv_in.*                  -> conv_in.*
           adapter.body.{i}.in_conv.*         -> body.{i·n}.in_conv.*        (n = num_res_blocks; the original keeps
           adapter.body.{i}.resnets.{j}.X     -> body.{i·n + j}.X             one flat list of resnet blocks, and the
                                                                              first block of a level carries in_conv)
    light: adapter.body.{i}.resnets.{j}.X     -> body.{i}.body.{j}.X
           adapter.body.{i}.{in,out}_conv.*   -> body.{i}.{in,out}_conv.*
    """
    if not key.startswith("adapter."):
        raise KeyError(key)
    k = key[len("adapter."):]
    if cfg.adapter_type == "light_adapter":
        return re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", k)
    n = cfg.num_res_blocks
    if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(\w+)", k):
        return f"body.{int(m[1]) * n}.in_conv.{m[2]}"
    if m := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", k):
        return f"body.{int(m[1]) * n + int(m[2])}.{m[3]}"
    return k


def original_state_dict(model: T2IAdapter) -> dict:
    """Our weights in the original file's names (the exporter; tests read it back)."""
    return {original_name(k, model.cfg): v for k, v in model.state_dict().items()}


def _refuse_unsupported(sd: dict, where: str):
    if any(k.startswith(("style_embedding", "transformer_layes", "ln_post", "proj")) for k in sd):
        raise CheckpointError(f"{where}: a T2I style adapter (CLIP-vision tokens, not a spatial adapter): not supported")
    odd = sorted({m[1] for k in sd if (m := re.match(r"(?:adapter\.)?body\.\d+\.(skep|down_opt)\.", k))})
    if odd:
        raise CheckpointError(f"{where}: T2I-Adapter with {'/'.join(odd)} convolutions (the original sk=False / "
                              "use_conv=True variant, which diffusers does not define either): not supported")


def _infer_config(sd: dict, where: str) -> T2IAdapterConfig:
    """From tensor shapes (diffusers names)."""
    def unshuffled(c_px):
        # the pixel-unshuffled input of an SD1 adapter has 64·c channels (factor 8); SDXL adapters unshuffle by 16
        for c in (1, 3):
            if c_px == 64 * c:
                return c
        if c_px in (256, 768):
            raise CheckpointError(f"{where}: T2I-Adapter for SDXL (input unshuffled by 16: {c_px} channels): not "
                                  "supported, SD1.x adapters only")
        raise CheckpointError(f"{where}: T2I-Adapter input of {c_px} channels after pixel-unshuffle: not an SD1 "
                              "adapter (expected 64 or 192)")
    body = sorted({int(k.split(".")[2]) for k in sd if k.startswith("adapter.body.")})
    nres = 1 + max((int(k.split(".")[4]) for k in sd if k.startswith("adapter.body.0.resnets.")), default=-1)
    if "adapter.conv_in.weight" in sd:
        cin = unshuffled(sd["adapter.conv_in.weight"].shape[1])
        ch = tuple(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in body)
        return T2IAdapterConfig(in_channels=cin, channels=ch, num_res_blocks=nres, adapter_type="full_adapter")
    if "adapter.body.0.out_conv.weight" in sd:
        cin = unshuffled(sd["adapter.body.0.in_conv.weight"].shape[1])
        ch = tuple(sd[f"adapter.body.{i}.out_conv.weight"].shape[0] for i in body[:-1])
        return T2IAdapterConfig(in_channels=cin, channels=ch, num_res_blocks=nres, adapter_type="light_adapter")
    raise CheckpointError(f"{where}: not a T2I-Adapter (no adapter.conv_in / body weights)")


def _from_original(sd: dict, levels: int, where: str) -> dict:
    """Original names -> ours. The flat full-adapter list is split into ``levels`` levels (not visible in the keys
    where a level keeps its width: 1280 -> 1280 has no in_conv)."""
    if any(k.startswith("body.0.body.") for k in sd):  # light: nested lists
        return {"adapter." + re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", k): v for k, v in sd.items()}
    nb = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("body.")), default=-1)
    if nb == 0 or nb % levels:
        raise CheckpointError(f"{where}: {nb} original adapter blocks do not split into {levels} levels")
    n = nb // levels
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(\w+)", k):
            i, j = divmod(int(m[1]), n)
            if j:
                raise CheckpointError(f"{where}: {k}: an in_conv inside a level (block {j} of {n})")
            out[f"adapter.body.{i}.in_conv.{m[2]}"] = v
        elif m := re.fullmatch(r"body\.(\d+)\.(block[12]\.\w+)", k):
            i, j = divmod(int(m[1]), n)
            out[f"adapter.body.{i}.resnets.{j}.{m[2]}"] = v
        else:
            out["adapter." + k] = v  # conv_in; anything else is reported by the strict load
    return out


def is_original_layout(sd: dict) -> bool:
    return "conv_in.weight" in sd or any(k.startswith("body.") for k in sd)


def load_t2i_adapter(path: str, *, levels: int = 4, dtype=torch.float32, device="cpu") -> T2IAdapter:
    """A diffusers ``T2IAdapter`` folder (config.json + weights), a diffusers-named safetensors, or an original
    ``.pth`` / ``.safetensors``; strictly (every key used, every weight filled)."""
    from .loading import read_component  # the diffusers component reader (loading imports the pipeline)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"T2I-Adapter not found: {path}")
    cfg = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{path}: not a T2I-Adapter folder (config.json missing)")
        raw = read_json(cfg_path)
        if raw.get("_class_name") not in (None, "T2IAdapter"):
            raise CheckpointError(f"{cfg_path}: a {raw.get('_class_name')}, not a T2IAdapter")
        cfg = T2IAdapterConfig.from_diffusers(raw, cfg_path)
        sd, source = read_component(path)
    else:
        sd, meta = read_weights(path)
        source = path
        if meta.get("composer_t2i_adapter"):
            cfg = T2IAdapterConfig.from_diffusers(json.loads(meta["composer_t2i_adapter"]), path)
    _refuse_unsupported(sd, source)
    if is_original_layout(sd):
        sd = _from_original(sd, levels, source)
    cfg = cfg or _infer_config(sd, source)
    if len(cfg.feature_channels) != levels:
        raise CheckpointError(f"{source}: the adapter gives {len(cfg.feature_channels)} feature maps, the UNet has "
                              f"{levels} levels")
    check_finite(sd, source)
    with torch.device("meta"):
        model = T2IAdapter(cfg)
    model = strict_load(model, sd, source, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)
