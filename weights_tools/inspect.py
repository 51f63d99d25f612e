"""python -m weights_tools.inspect PATH — what is in a file or folder, for every format composer's loaders read.

- models: a diffusers folder (components, configs, tokenizer, scheduler), one component folder, an SD1.x single
  file (.safetensors / .ckpt, with EMA and schedule buffers), a standalone VAE;
- LoRAs: kohya / A1111 (LoCon, LoHa, LoKr), PEFT / diffusers (a file, or a folder with adapter_config.json),
  old diffusers attn-procs, Mix-of-Show ED-LoRA (.pth or converted .safetensors) — with ranks, scales, concept
  tokens and trigger words;
- tokenizers: a tokenizer/ folder, a tokenizer.json, the CLIP BPE .txt.gz; a scheduler config;
- conditions: T2I-Adapters (a diffusers folder, diffusers-named safetensors, original ``t2iadapter_*.pth``) and
  ControlNets (a diffusers ``ControlNetModel`` folder, original ``control_*.pth`` / ``.safetensors``), with their
  input channels, feature widths and the base model they are for.
Pickles are read only with ``torch.load(weights_only=True)``; nothing in them is executed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys


from composer import convert
from composer.checkpoint import CheckpointError, load_pickle, read_json, read_weights, unwrap
from composer.cli import run
from composer.loading import read_component
from composer.lora import describe_lora, detect_lora_format
from composer.tokenizer import CLIPTokenizer

PROG = "python -m weights_tools.inspect"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def summarize(sd: dict, groups: dict) -> list[str]:
    """groups: {label: predicate(key)} -> one line per non-empty group."""
    lines = []
    seen = set()
    for label, pred in groups.items():
        keys = [k for k in sd if k not in seen and pred(k)]
        if not keys:
            continue
        seen |= set(keys)
        dts = collections.Counter(str(sd[k].dtype).replace("torch.", "") for k in keys)
        nbytes = sum(sd[k].numel() * sd[k].element_size() for k in keys)
        params = sum(sd[k].numel() for k in keys)
        lines.append(f"  {label:<22} {len(keys):>6} tensors  {params / 1e6:>9.2f} M params  {_human(nbytes):>10}  "
                     + ", ".join(f"{d}×{c}" for d, c in dts.items()))
    rest = [k for k in sd if k not in seen]
    if rest:
        lines.append(f"  {'other':<22} {len(rest):>6} tensors  e.g. {rest[:3]}")
    return lines


def condition_kind(sd: dict) -> str | None:
    """'t2i-adapter' or 'controlnet' for a condition model's tensors (any layout), else None."""
    if any(k.startswith(("controlnet_cond_embedding.", "control_model.", "input_hint_block.", "zero_convs."))
           for k in sd):
        return "controlnet"
    if "adapter.conv_in.weight" in sd or "adapter.body.0.in_conv.weight" in sd or \
            ("conv_in.weight" in sd and any(k.startswith("body.") for k in sd)) or \
            any(k.startswith("body.0.body.") for k in sd):
        return "t2i-adapter"
    return None


def _base_of_context(dim) -> str:
    return {768: "SD1.x", 1024: "SD2.x (composer refuses it)", 2048: "SDXL (composer refuses it)"}.get(dim, f"{dim}-wide context")


def describe_t2i_adapter(sd: dict, cfg: dict | None = None) -> list[str]:
    from composer.t2i_adapter import T2IAdapterConfig, _from_original, _infer_config, is_original_layout
    layout = "original TencentARC names" if is_original_layout(sd) else "diffusers names"
    try:
        c = T2IAdapterConfig.from_diffusers(cfg) if cfg else \
            _infer_config(_from_original(sd, 4, "file") if is_original_layout(sd) else sd, "file")
    except CheckpointError as e:
        return [f" T2I-Adapter ({layout}): {str(e).split(': ', 1)[-1]}"]
    what = {1: "1-channel (grayscale: sketch, canny, ...)", 3: "3-channel (RGB: pose, depth, ...)"}.get(
        c.in_channels, f"{c.in_channels}-channel")
    return [f" T2I-Adapter, {c.adapter_type} ({layout}): {what} input, unshuffled by {c.downscale_factor}, "
            f"{c.num_res_blocks} residual blocks per level",
            f" features: {len(c.feature_channels)} levels of {list(c.feature_channels)} channels, added to the UNet's "
            "down blocks"]


def describe_controlnet(sd: dict, cfg: dict | None = None) -> list[str]:
    P = convert.CONTROLNET_PREFIX
    if cfg is not None:
        hint = cfg.get("conditioning_channels", 3)
        return [f" ControlNet (diffusers names): {hint}-channel condition image, blocks {cfg.get('block_out_channels')}, "
                f"context {cfg.get('cross_attention_dim')} ({_base_of_context(cfg.get('cross_attention_dim'))})"
                + (", SDXL additions" if cfg.get("addition_embed_type") else "")
                + (", global pooling (shuffle)" if cfg.get("global_pool_conditions") else "")]
    own = {k[len(P):]: v for k, v in sd.items() if k.startswith(P)} or sd
    base = sum(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd)
    k2 = next((v for k, v in own.items() if k.endswith("attn2.to_k.weight")), None)
    hint = own.get("input_hint_block.0.weight")
    zero = sum(k.startswith("zero_convs.") and k.endswith(".weight") for k in own)
    lines = [f" ControlNet (original names{', prefix ' + P if own is not sd else ''}): "
             f"{hint.shape[1] if hint is not None else '?'}-channel condition image, {zero} zero convolutions, "
             f"context {k2.shape[1] if k2 is not None else '?'} ({_base_of_context(k2.shape[1]) if k2 is not None else '?'})"]
    if base:
        lines.append(f" also {base} base-model tensors (a v1.0 full file; composer reads only the ControlNet)")
    return lines


def classify_file(sd: dict) -> str:
    kind = detect_lora_format(sd)
    if kind:
        return f"LoRA ({kind})"
    cond = condition_kind(sd)
    if cond:
        return {"t2i-adapter": "T2I-Adapter", "controlnet": "ControlNet"}[cond]
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return "SDXL single file (not supported)"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return "SD2.x single file (not supported)"
    if any(k.startswith(convert.UNET_PREFIX) for k in sd):
        return "LDM single file (SD1.x layout)"
    if any(k.startswith("decoder.up.") for k in sd):
        return "standalone VAE (LDM names)"
    if any(k.startswith("down_blocks.") for k in sd):
        return "diffusers UNet/VAE component"
    if any(k.startswith(("text_model.", "encoder.layers.")) for k in sd):
        return "CLIP text encoder (transformers names)"
    return "unknown"


# --- tokenizers and configs -----------------------------------------------------------------------------

def describe_tokenizer(path: str) -> list[str]:
    tok = CLIPTokenizer.from_file(path)
    data = json.loads(tok.tok.to_str())
    merges = len(data["model"]["merges"])
    added = [t["content"] for t in data.get("added_tokens", []) if t["content"] not in ("<|startoftext|>", "<|endoftext|>")]
    ids = tok(["a photo of a cat"])[0].tolist()
    lines = [f" CLIP BPE tokenizer: {len(tok)} ids, {merges} merges, BOS 49406 / EOS 49407, padded with EOS to 77",
             f" 'a photo of a cat' -> {ids[:ids.index(49407) + 1]}"]
    if added:
        lines.append(f" added tokens: {added[:10]}")
    return lines


def describe_config(path: str, cfg: dict) -> list[str]:
    name = cfg.get("_class_name") or ",".join(cfg.get("architectures", [])) or "?"
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim", "in_channels",
            "latent_channels", "scaling_factor", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type",
            "timestep_spacing", "steps_offset")
    shown = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
    return [f"  {os.path.basename(path)}: {name}" + (f" ({shown})" if shown else "")]


# --- folders ------------------------------------------------------------------------------------------------

def _is_tokenizer_dir(path: str) -> bool:
    return (os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt"))) \
        or os.path.exists(os.path.join(path, "tokenizer.json"))


def inspect_dir(path: str) -> list[str]:
    out = []
    if any(os.path.isdir(os.path.join(path, s)) for s in ("unet", "vae", "text_encoder")):
        out.append(f"{path}: diffusers folder"
                   + (" (model_index.json)" if os.path.exists(os.path.join(path, "model_index.json")) else ""))
        for sub in ("unet", "vae", "text_encoder"):
            d = os.path.join(path, sub)
            if not os.path.isdir(d):
                out.append(f" {sub}: missing")
                continue
            sd, f = read_component(d)
            out.append(f" {sub}: {os.path.relpath(f, path)}")
            if os.path.exists(os.path.join(d, "config.json")):
                out += describe_config(os.path.join(d, "config.json"), read_json(os.path.join(d, "config.json")))
            out += summarize(sd, {"weights": lambda k: True})
        tok = os.path.join(path, "tokenizer")
        if os.path.isdir(tok):
            out.append(" tokenizer:")
            out += [" " + l for l in describe_tokenizer(tok)]
        else:
            out.append(" tokenizer: none (composer uses SD1.x's CLIP vocabulary shipped with the package)")
        sch = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.exists(sch):
            out.append(" scheduler:")
            out += describe_config(sch, read_json(sch))
        return out
    if _is_tokenizer_dir(path):
        return [f"{path}: tokenizer folder"] + describe_tokenizer(path)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return inspect_file(os.path.join(path, name))
    if os.path.exists(os.path.join(path, "config.json")):
        sd, f = read_component(path)
        cfg = read_json(os.path.join(path, "config.json"))
        if cfg.get("_class_name") in ("T2IAdapter", "ControlNetModel"):
            what = "T2I-Adapter" if cfg["_class_name"] == "T2IAdapter" else "ControlNet"
            describe = describe_t2i_adapter if what == "T2I-Adapter" else describe_controlnet
            return [f"{path}: {what} folder ({os.path.basename(f)})"] + describe(sd, cfg) + \
                summarize(sd, {"weights": lambda k: True})
        return [f"{path}: model component folder ({os.path.basename(f)})"] + \
            describe_config(os.path.join(path, "config.json"), read_json(os.path.join(path, "config.json"))) + \
            summarize(sd, {"weights": lambda k: True})
    raise CheckpointError(f"{path}: not a folder composer reads (no unet/vae/text_encoder, tokenizer files, "
                          "adapter_model.* or config.json)")


# --- files -----------------------------------------------------------------------------------------------------

def inspect_file(path: str) -> list[str]:
    low = path.lower()
    if low.endswith(".gz") or os.path.basename(low) == "tokenizer.json":
        return [f"{path}: tokenizer file"] + describe_tokenizer(path)
    if low.endswith(".json"):
        cfg = read_json(path)
        return [f"{path}: JSON config"] + describe_config(path, cfg)
    meta = {}
    if low.endswith((".ckpt", ".pt", ".pth", ".bin")):
        obj = load_pickle(path)
        if isinstance(obj, dict) and isinstance(obj.get("params"), dict):  # Mix-of-Show ED-LoRA
            return [f"{path}: LoRA (edlora), pickle read with weights_only=True"] + describe_lora(path).split("\n")
        sd = unwrap(obj, path)
    else:
        sd, meta = read_weights(path)
    kind = classify_file(sd)
    out = [f"{path}: {kind}, {len(sd)} tensors, {_human(os.path.getsize(path))}"]
    if kind.startswith("LoRA"):
        out += describe_lora(path).split("\n")
    elif kind in ("T2I-Adapter", "ControlNet"):
        out += (describe_t2i_adapter if kind == "T2I-Adapter" else describe_controlnet)(sd)
        out += summarize(sd, {"weights": lambda k: True})
    else:
        ema = sum(k.startswith("model_ema.") for k in sd)
        out += summarize(sd, {"unet": lambda k: k.startswith(convert.UNET_PREFIX),
                              "unet EMA": lambda k: k.startswith("model_ema."),
                              "vae": lambda k: k.startswith(convert.VAE_PREFIX) or k.startswith(("encoder.", "decoder.",
                                                                                               "quant_conv.", "post_quant_conv.")),
                              "text encoder": lambda k: k.startswith("cond_stage_model."),
                              "schedule buffers": lambda k: "." not in k})
        if ema:
            out.append(f" EMA weights present ({ema} tensors; load them with --ema)")
    if meta:
        shown = {k: (v if len(v) <= 80 else v[:77] + "...") for k, v in sorted(meta.items())}
        out.append(" metadata: " + ", ".join(f"{k}={v}" for k, v in list(shown.items())[:12]))
    return out


def inspect_path(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return "\n".join(inspect_dir(path) if os.path.isdir(path) else inspect_file(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="+", help="files or folders to describe")
    a = ap.parse_args(argv)
    print("\n\n".join(inspect_path(p) for p in a.path))
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
