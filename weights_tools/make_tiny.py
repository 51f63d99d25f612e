"""python -m weights_tools.make_tiny OUT [--seed N] [--preset tiny|sd15] [--tokenizer PATH]

Writes a random-weight SD1.5-structured model, two example concept LoRAs and a spec that composes them, so the
whole tool can be tried without real weights:

  OUT/diffusers/                 a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler)
  OUT/model.safetensors          the same weights as an LDM single file
  OUT/tokenizer/                 the tokenizer as files (SD1.x's CLIP vocabulary by default)
  OUT/concepts/cat.safetensors   an ED-LoRA concept (pseudo-words <cat1> <cat2>)
  OUT/concepts/dog.safetensors   a kohya LoRA concept (trigger word "sks dog" recorded in its metadata)
  OUT/spec.json                  a two-region composition of both (paths relative to the spec)

Then: python -m composer.sample --spec OUT/spec.json --out composed.png --debug-dir dbg
(the weights are random: the image is noise; the walkthrough is about the mechanics).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from composer.cli import run
from composer.io import save_json, save_safetensors
from composer.pipeline import Pipeline
from composer.schedulers import SchedulerConfig
from composer.tiny import random_edlora, random_kohya, random_models, save_diffusers
from composer.tokenizer import CLIPTokenizer
from weights_tools.ldm import to_ldm

PROG = "python -m weights_tools.make_tiny"


def make_tiny(out: str, *, tokenizer: str | None = None, seed: int = 0, preset: str = "tiny", std=None,
              concepts: bool = True):
    unet, vae, te = random_models(preset, seed, std=std)
    tok = CLIPTokenizer.from_file(tokenizer) if tokenizer else CLIPTokenizer.default()
    os.makedirs(out, exist_ok=True)
    save_diffusers(os.path.join(out, "diffusers"), unet, vae, te, tok)
    sd, meta = to_ldm(unet, vae, te)
    save_safetensors(sd, os.path.join(out, "model.safetensors"), meta)
    tok.save(os.path.join(out, "tokenizer"))
    if concepts:
        write_example_concepts(out, Pipeline(unet, te, vae, tok, SchedulerConfig()), seed)
    return out


def write_example_concepts(out: str, pipe, seed: int = 0):
    cdir = os.path.join(out, "concepts")
    os.makedirs(cdir, exist_ok=True)
    params = random_edlora(pipe, ["<cat1>", "<cat2>"], seed=seed + 1)["params"]
    flat = {f"params.{ns}.{k}": v for ns, d in params.items() for k, v in d.items()}
    save_safetensors(flat, os.path.join(cdir, "cat.safetensors"),
                     {"format": "pt", "edlora": "1", "alpha": "1.0", "tokens": json.dumps(["<cat1>", "<cat2>"])})
    sd, meta = random_kohya(pipe, "sks dog", seed=seed + 2)
    save_safetensors(sd, os.path.join(cdir, "dog.safetensors"), meta)
    size = 128
    save_json({"model": "diffusers", "prompt": "a cat and a dog in a garden", "negative_prompt": "blurry",
               "height": size, "width": size, "steps": 8, "seed": 1, "sampler": "dpm++2m",
               "regions": [{"prompt": "a <cat1> <cat2> sitting", "box": [0, 0, size, size // 2],
                            "lora": "concepts/cat.safetensors"},
                           {"prompt": "a sks dog running", "box": [0, size // 2, size, size],
                            "lora": "concepts/dog.safetensors"}]},
              os.path.join(out, "spec.json"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder")
    ap.add_argument("--tokenizer", help="tokenizer files to ship instead of SD1.x's CLIP vocabulary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    a = ap.parse_args(argv)
    make_tiny(a.out, tokenizer=a.tokenizer, seed=a.seed, preset=a.preset)
    print(f"wrote {a.out}/diffusers/, {a.out}/model.safetensors, {a.out}/tokenizer/, {a.out}/concepts/ and "
          f"{a.out}/spec.json ({a.preset}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
