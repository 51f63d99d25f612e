"""python -m weights_tools.convert KIND IN OUT — safe format conversions.

  ckpt2st IN.ckpt OUT.safetensors      pickle -> safetensors (weights_only read; state_dict unwrapped)
  ldm2diffusers IN.safetensors OUTDIR  LDM single file -> diffusers folder (needs --tokenizer)
  diffusers2ldm INDIR OUT.safetensors  diffusers folder -> LDM single file

Model conversions go through composer's strict loader, so every tensor is accounted for; dtypes are kept.
Outputs are written to a temporary name and renamed, so nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys

from composer.checkpoint import check_finite, read_weights
from composer.tiny import _atomic_save, save_diffusers


def ckpt_to_safetensors(src: str, dst: str):
    sd, _ = read_weights(src)
    check_finite(sd, src)
    seen = {}
    for k, v in sd.items():  # safetensors refuses shared storage: give each tensor its own
        sd[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen[v.untyped_storage().data_ptr()] = k
    _atomic_save(sd, dst, {"format": "pt", "converted_from": os.path.basename(src)})


def ldm_to_diffusers(src: str, dst: str, tokenizer: str):
    import composer
    p = composer.load(src, dtype=None, tokenizer=tokenizer, vae_dtype=None)
    save_diffusers(dst, p.unet, p.vae, p.text_encoder, p.tokenizer, p.scheduler_config)


def diffusers_to_ldm(src: str, dst: str):
    import composer
    from weights_tools.ldm import to_ldm
    p = composer.load(src, dtype=None, vae_dtype=None)
    sd, meta = to_ldm(p.unet, p.vae, p.text_encoder)
    _atomic_save(sd, dst, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_tools.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["ckpt2st", "ldm2diffusers", "diffusers2ldm"] + _lora_kinds())
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tokenizer", help="tokenizer files for ldm2diffusers")
    a = ap.parse_args(argv)
    if os.path.abspath(a.src) == os.path.abspath(a.dst):
        ap.error("source and destination are the same path")
    if a.kind == "ckpt2st":
        ckpt_to_safetensors(a.src, a.dst)
    elif a.kind == "ldm2diffusers":
        if not a.tokenizer:
            ap.error("ldm2diffusers needs --tokenizer (single files carry none)")
        ldm_to_diffusers(a.src, a.dst, a.tokenizer)
    elif a.kind == "diffusers2ldm":
        diffusers_to_ldm(a.src, a.dst)
    else:
        from composer.lora import convert_lora_cli
        convert_lora_cli(a.kind, a.src, a.dst)
    print(f"wrote {a.dst}")
    return 0


def _lora_kinds():
    try:
        from composer.lora import CONVERT_KINDS
        return list(CONVERT_KINDS)
    except ImportError:
        return []


if __name__ == "__main__":
    sys.exit(main())
