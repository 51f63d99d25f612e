"""python -m weights_tools.convert KIND IN OUT — safe format conversions.

  ckpt2st IN.ckpt OUT.safetensors       pickle -> safetensors (weights_only read; state_dict unwrapped)
  ldm2diffusers IN.safetensors OUTDIR   LDM single file -> diffusers folder (tokenizer: --tokenizer, else the
                                        SD1.x CLIP vocabulary shipped with composer)
  diffusers2ldm INDIR OUT.safetensors   diffusers folder -> LDM single file
  edlora2st IN.pth OUT.safetensors      Mix-of-Show ED-LoRA pickle -> safetensors (embeddings and alpha kept)
  kohya2peft IN OUT.safetensors         kohya / A1111 LoRA -> diffusers/PEFT names (scale folded in, metadata kept)
  peft2kohya IN OUT.safetensors         diffusers/PEFT LoRA -> kohya names

Model conversions go through composer's strict loader, so every tensor is accounted for; dtypes are kept. A
conversion keeps everything or refuses, naming what the target format cannot carry. Outputs are written to a
temporary name and renamed, so nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys

import composer
from composer.checkpoint import check_finite, read_weights
from composer.cli import run
from composer.io import save_safetensors
from composer.lora import CONVERT_KINDS, convert_lora_cli
from composer.tiny import save_diffusers
from weights_tools.ldm import to_ldm

PROG = "python -m weights_tools.convert"


def ckpt_to_safetensors(src: str, dst: str):
    sd, _ = read_weights(src)
    check_finite(sd, src)
    seen = {}
    for k, v in sd.items():  # safetensors refuses shared storage: give each tensor its own
        sd[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen[v.untyped_storage().data_ptr()] = k
    save_safetensors(sd, dst, {"format": "pt", "converted_from": os.path.basename(src)})


def ldm_to_diffusers(src: str, dst: str, tokenizer: str | None):
    p = composer.load(src, dtype=None, tokenizer=tokenizer, vae_dtype=None)
    save_diffusers(dst, p.unet, p.vae, p.text_encoder, p.tokenizer, p.scheduler_config)


def diffusers_to_ldm(src: str, dst: str):
    p = composer.load(src, dtype=None, vae_dtype=None)
    sd, meta = to_ldm(p.unet, p.vae, p.text_encoder)
    save_safetensors(sd, dst, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["ckpt2st", "ldm2diffusers", "diffusers2ldm", *CONVERT_KINDS],
                    help="the conversion (see above)")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tokenizer", help="tokenizer files for ldm2diffusers (default: SD1.x's CLIP vocabulary)")
    a = ap.parse_args(argv)
    if os.path.abspath(a.src) == os.path.abspath(a.dst):
        ap.error("source and destination are the same path")
    if not os.path.exists(a.src):
        raise FileNotFoundError(f"{a.src}: no such file or folder")
    if a.kind == "ckpt2st":
        ckpt_to_safetensors(a.src, a.dst)
    elif a.kind == "ldm2diffusers":
        ldm_to_diffusers(a.src, a.dst, a.tokenizer)
    elif a.kind == "diffusers2ldm":
        diffusers_to_ldm(a.src, a.dst)
    else:
        convert_lora_cli(a.kind, a.src, a.dst)
    print(f"wrote {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
