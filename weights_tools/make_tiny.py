"""python -m weights_tools.make_tiny OUT [--tokenizer PATH] [--seed N] [--preset tiny|sd15]

Writes a random-weight SD1.5-structured checkpoint in both layouts: OUT/diffusers/ (a diffusers folder)
and OUT/model.safetensors (an LDM single file, same weights), plus OUT/tokenizer/ for the single file.
"""
from __future__ import annotations

import argparse
import os
import sys

from composer.tiny import _atomic_save, byte_tokenizer, random_models, save_diffusers
from composer.tokenizer import CLIPTokenizer
from weights_tools.ldm import to_ldm


def make_tiny(out: str, *, tokenizer: str | None = None, seed: int = 0, preset: str = "tiny", std=None):
    unet, vae, te = random_models(preset, seed, std=std)
    tok = CLIPTokenizer.from_file(tokenizer) if tokenizer else byte_tokenizer()
    os.makedirs(out, exist_ok=True)
    save_diffusers(os.path.join(out, "diffusers"), unet, vae, te, tok)
    sd, meta = to_ldm(unet, vae, te)
    _atomic_save(sd, os.path.join(out, "model.safetensors"), meta)
    tok.save(os.path.join(out, "tokenizer"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m weights_tools.make_tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tokenizer", help="real tokenizer files to ship (default: a byte-level stand-in)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    a = ap.parse_args(argv)
    make_tiny(a.out, tokenizer=a.tokenizer, seed=a.seed, preset=a.preset)
    print(f"wrote {a.out}/diffusers/, {a.out}/model.safetensors and {a.out}/tokenizer/ ({a.preset}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
