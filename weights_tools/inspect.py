"""python -m weights_tools.inspect FILE_OR_DIR — what is in a weights file or folder.

Detects the format (diffusers folder, LDM single file, standalone VAE, LoRA kinds when the LoRA module is
present) and prints the components with tensor counts, dtypes and sizes. Reads pickles only with
weights_only=True.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

from composer import convert
from composer.checkpoint import read_weights


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
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


def classify_file(sd: dict) -> str:
    try:
        from composer.lora import detect_lora_format
        kind = detect_lora_format(sd)
        if kind:
            return f"LoRA ({kind})"
    except ImportError:
        pass
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


def inspect_path(path: str) -> str:
    out = [f"{path}:"]
    if os.path.isdir(path):
        from composer.loading import _read_component
        out[0] += " diffusers folder"
        for sub in ("unet", "vae", "text_encoder"):
            if os.path.isdir(os.path.join(path, sub)):
                sd, f = _read_component(os.path.join(path, sub))
                out.append(f" {sub}: {os.path.relpath(f, path)}")
                out += summarize(sd, {"all": lambda k: True})
        for sub in ("tokenizer", "scheduler"):
            if os.path.isdir(os.path.join(path, sub)):
                out.append(f" {sub}: {', '.join(sorted(os.listdir(os.path.join(path, sub))))}")
        return "\n".join(out)
    sd, meta = read_weights(path)
    kind = classify_file(sd)
    out[0] += f" {kind}, {len(sd)} tensors"
    if kind.startswith("LoRA"):
        from composer.lora import describe_lora
        out.append(describe_lora(path))
    else:
        out += summarize(sd, {"unet": lambda k: k.startswith(convert.UNET_PREFIX),
                              "unet EMA": lambda k: k.startswith("model_ema."),
                              "vae": lambda k: k.startswith(convert.VAE_PREFIX),
                              "text encoder": lambda k: k.startswith("cond_stage_model."),
                              "schedule buffers": lambda k: "." not in k})
    if meta:
        out.append(f" metadata: {', '.join(sorted(meta))}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_tools.inspect", description=__doc__)
    ap.add_argument("path")
    a = ap.parse_args(argv)
    print(inspect_path(a.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
