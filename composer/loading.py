"""``composer.load``: a diffusers folder or an SD1.x single file -> Pipeline, strictly and without copies.

Format and variant detection follow formats.md §1.7 and §2: only SD1.x (768-wide CLIP context, conv
``proj_in``, 4 input channels) is accepted; SD2.x, SDXL and inpainting files are refused by name.
"""
from __future__ import annotations

import glob
import json
import logging
import os

import torch

from . import convert
from .checkpoint import CheckpointError, check_finite, read_json, read_weights, strict_load
from .clip import CLIPTextConfig, CLIPTextModel
from .pipeline import Pipeline
from .schedulers import SchedulerConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

# Keys of an LDM file that we deliberately do not read (formats.md §1.2).
_IGNORED = ("model_ema.", "cond_stage_model.transformer.text_model.embeddings.position_ids",
            "cond_stage_model.transformer.embeddings.position_ids")
_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
                     "model_ema.num_updates"}


def detect_variant(sd: dict) -> str:
    """'sd1', or raise naming the variant (formats.md §1.7)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError("SDXL checkpoint: not supported, SD1.x only")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise CheckpointError("SD2.x checkpoint (OpenCLIP text encoder): not supported, SD1.x only")
    pin = sd.get("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    if pin is not None and pin.ndim == 2:
        raise CheckpointError("SD2.x checkpoint (linear proj_in): not supported, SD1.x only")
    k2 = next((v for k, v in sd.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
    if k2 is not None and k2.shape[1] == 1024:
        raise CheckpointError("SD2.x checkpoint (1024-wide context): not supported, SD1.x only")
    c_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if c_in is not None and c_in.shape[1] != 4:
        kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(c_in.shape[1], f"{c_in.shape[1]}-channel")
        raise CheckpointError(f"{kind} checkpoint: not supported, SD1.x text-to-image only")
    if not any(k.startswith(convert.UNET_PREFIX) for k in sd):
        raise CheckpointError("no UNet weights (model.diffusion_model.*): not an SD1.x single-file checkpoint")
    return "sd1"


def infer_single_file_configs(sd: dict, meta: dict):
    """Sizes from tensor shapes; head and group counts (not visible in shapes) from the file's metadata
    (our exporter writes them) or SD1.5's values."""
    extra = json.loads(meta.get("composer_config", "{}")) if meta else {}
    P = convert.UNET_PREFIX
    n_down = 1 + sum(1 for k in sd if k.startswith(P + "input_blocks.") and k.endswith(".op.weight"))
    n_in = 1 + max(int(k[len(P):].split(".")[1]) for k in sd if k.startswith(P + "input_blocks."))
    lpb = n_in // n_down - 1  # input_blocks = conv_in + n·lpb resnets + (n-1) downsamplers = n·(lpb+1)
    chans, levels = [], []
    for b in range(n_down):
        i = 1 + b * (lpb + 1)
        chans.append(sd[f"{P}input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        levels.append(f"{P}input_blocks.{i}.1.proj_in.weight" in sd)
    k2 = next(v for k, v in sd.items() if k.startswith(P) and k.endswith("attn2.to_k.weight"))
    unet = UNetConfig(block_out_channels=tuple(chans), attention_levels=tuple(levels), layers_per_block=lpb,
                      cross_attention_dim=k2.shape[1], heads=extra.get("unet_heads", 8),
                      norm_num_groups=extra.get("unet_groups", 32))
    V = convert.VAE_PREFIX
    nv = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(V + "encoder.down."))
    vch = tuple(sd[f"{V}encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(nv))
    vlpb = 1 + max(int(k.split(".")[5]) for k in sd if k.startswith(V + "encoder.down.0.block."))
    vae = VAEConfig(block_out_channels=vch, layers_per_block=vlpb, norm_num_groups=extra.get("vae_groups", 32))
    C = convert.CLIP_PREFIX + "text_model."
    tok = sd[C + "embeddings.token_embedding.weight"]
    nl = 1 + max(int(k.split(".")[5]) for k in sd if k.startswith(C + "encoder.layers."))
    clip = CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=tok.shape[1], num_hidden_layers=nl,
                          intermediate_size=sd[C + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                          num_attention_heads=extra.get("clip_heads", tok.shape[1] // 64),
                          max_position_embeddings=sd[C + "embeddings.position_embedding.weight"].shape[0])
    return unet, vae, clip


def _normalize_clip_keys(sd: dict) -> dict:
    """transformers 5.x and some old LDM files omit ``text_model.`` (formats.md §1.5, §2); put it back."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def _build(cls, cfg, backend):
    with torch.device("meta"):
        return cls(cfg, backend)


def load_single_file(path: str, *, dtype, device, backend, use_ema=False):
    sd, meta = read_weights(path)
    # Some old files omit text_model. after the CLIP prefix.
    cp = convert.CLIP_PREFIX
    if any(k.startswith(cp + "encoder.") or k.startswith(cp + "embeddings.") for k in sd):
        sd = {(cp + "text_model." + k[len(cp):] if k.startswith(cp) else k): v for k, v in sd.items()}
    try:
        detect_variant(sd)
        ucfg, vcfg, ccfg = infer_single_file_configs(sd, meta)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, ValueError, StopIteration) as e:
        raise CheckpointError(f"{path}: not a complete SD1.x single-file checkpoint (could not read sizes: {e})") from None
    check_finite({k: v for k, v in sd.items() if not k.startswith("model_ema.")}, path)
    models = {}
    used = set()
    for comp, cls, cfg in (("unet", UNet, ucfg), ("vae", AutoencoderKL, vcfg), ("text_encoder", CLIPTextModel, ccfg)):
        m = _build(cls, cfg, backend)
        names = convert.ldm_name_table(comp, m.state_dict().keys(), cfg)
        if comp == "unet" and use_ema:
            if sum(k.startswith("model_ema.") for k in sd) <= 100:
                raise CheckpointError(f"{path}: use_ema=True but the file holds no EMA weights",
                                      hints={"use_ema=True": "--ema"})
            names = {k: convert.ema_key(v) for k, v in names.items()}
        sub = {v: sd[v] for v in names.values() if v in sd}
        prefix = {"unet": convert.UNET_PREFIX, "vae": convert.VAE_PREFIX, "text_encoder": convert.CLIP_PREFIX}[comp]
        # file keys under this component's prefix that no model key claims are unexpected
        rest = {k: v for k, v in sd.items() if k.startswith(prefix) and k not in sub and not k.startswith(_IGNORED)}
        if comp == "unet" and use_ema:  # the non-EMA copy is deliberately left unread
            used |= set(rest)
        else:
            sub.update(rest)
        used |= set(sub)
        models[comp] = strict_load(m, sub, path, dtype=dtype if comp != "vae" else None, device=device, names=names)
    left = [k for k in sd if k not in used and not k.startswith(_IGNORED) and k not in _SCHEDULE_BUFFERS]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) belong to no component: {left[:8]}")
    return models, SchedulerConfig()


def _component_file(folder: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    idx = glob.glob(os.path.join(folder, "*.safetensors.index.json"))
    if idx:
        return idx[0]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder}: no weights file (diffusion_pytorch_model.safetensors, model.safetensors, ...)")


def read_component(folder: str) -> tuple[dict, str]:
    f = _component_file(folder)
    if f.endswith(".index.json"):
        shards = sorted(set(read_json(f)["weight_map"].values()))
        sd = {}
        for s in shards:
            sd.update(read_weights(os.path.join(folder, s))[0])
        return sd, f
    return read_weights(f)[0], f


def load_diffusers_folder(path: str, *, dtype, device, backend):
    for sub in ("unet", "vae", "text_encoder"):
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise CheckpointError(f"{path}: not a diffusers folder ({sub}/config.json missing)")
    ucfg = UNetConfig.from_diffusers(read_json(os.path.join(path, "unet", "config.json")))
    vcfg = VAEConfig.from_diffusers(read_json(os.path.join(path, "vae", "config.json")))
    ccfg = CLIPTextConfig.from_transformers(read_json(os.path.join(path, "text_encoder", "config.json")))
    if ccfg.hidden_size != ucfg.cross_attention_dim:
        raise CheckpointError(f"{path}: text encoder width {ccfg.hidden_size} != UNet cross_attention_dim "
                              f"{ucfg.cross_attention_dim}")
    models = {}
    for comp, cls, cfg in (("unet", UNet, ucfg), ("vae", AutoencoderKL, vcfg), ("text_encoder", CLIPTextModel, ccfg)):
        sd, f = read_component(os.path.join(path, comp))
        if comp == "text_encoder":
            sd = {k: v for k, v in _normalize_clip_keys(sd).items() if not k.endswith("position_ids")}
        check_finite(sd, f)
        models[comp] = strict_load(_build(cls, cfg, backend), sd, f, dtype=dtype if comp != "vae" else None, device=device)
    sch = os.path.join(path, "scheduler", "scheduler_config.json")
    scfg = SchedulerConfig.from_diffusers(read_json(sch)) if os.path.exists(sch) else SchedulerConfig()
    return models, scfg


def load(path, *, dtype=torch.float32, device="cpu", tokenizer=None, attention: str = "sdpa", use_ema: bool = False,
         vae_dtype=torch.float32):
    """Load an SD1.x model: a diffusers folder or a single ``.safetensors``/``.ckpt`` file.

    ``dtype=None`` keeps each tensor's stored dtype (for conversions).
    ``tokenizer``: tokenizer files (a folder, tokenizer.json or the BPE .txt.gz) to override the default: a
    diffusers folder's own ``tokenizer/``, else SD1.x's CLIP vocabulary shipped with the package. ``vae_dtype`` defaults to fp32 (fp16 VAEs overflow, formats.md §7).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path not found: {path}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if os.path.isdir(path):
        models, scfg = load_diffusers_folder(path, dtype=dtype, device=device, backend=attention)
        tok_src = tokenizer or (os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else None)
    else:
        models, scfg = load_single_file(path, dtype=dtype, device=device, backend=attention, use_ema=use_ema)
        tok_src = tokenizer
    # a single file carries no tokenizer: SD1.x's own CLIP vocabulary ships with the package
    tok = CLIPTokenizer.from_file(tok_src) if tok_src is not None else CLIPTokenizer.default()
    vae = models["vae"] if vae_dtype is None else models["vae"].to(dtype=vae_dtype)
    source = {"name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
              "kind": "diffusers folder" if os.path.isdir(path) else "single file"}
    return Pipeline(models["unet"].eval(), models["text_encoder"].eval(), vae.eval(), tok, scfg,
                    dtype=dtype, device=torch.device(device), attention=attention, source=source)
