"""python -m composer.sample — text-to-image from the command line.

    python -m composer.sample --model PATH [--tokenizer PATH] --prompt "a cat" --out cat.png

With no ``--model`` it runs on an embedded default: a tiny random-weight SD1.5-structured model built in
memory (its image is noise; the point is to see the whole path run in seconds). The generation
parameters are stored in the PNG's ``parameters`` text chunk. The PNG is written to a temporary file
and renamed, so a failed or interrupted run never leaves a half-written image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m composer.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder or SD1.x single file (.safetensors/.ckpt); "
                                    "default: the embedded tiny random model")
    ap.add_argument("--tokenizer", help="tokenizer files (needed with a single-file --model)")
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--steps", type=int, default=None, help="default 50 (8 on the embedded model)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=None, help="default 512 (64 on the embedded model)")
    ap.add_argument("--width", type=int, default=None, help="default 512 (64 on the embedded model)")
    ap.add_argument("--sampler", default="dpm++2m", choices=["ddim", "dpm++2m"])
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "math"])
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="a LoRA to merge (kohya, PEFT/diffusers or ED-LoRA); repeatable; scale defaults to 1.0")
    ap.add_argument("--out", default="out.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'path/to/x.safetensors:0.8' -> (path, 0.8); a suffix that is not a number is part of the path."""
    path, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def embedded_pipeline(device="cpu", dtype=torch.float32, attention="sdpa"):
    from .pipeline import Pipeline
    from .schedulers import SchedulerConfig
    from .tiny import byte_tokenizer, random_models
    unet, vae, te = random_models("tiny", seed=0, backend=attention)
    return Pipeline(unet.to(device, dtype), te.to(device, dtype), vae.to(device), byte_tokenizer(), SchedulerConfig(),
                    dtype=dtype, device=device)


def save_png(image, path: str, params: dict):
    """Atomic PNG write with the parameters as a text chunk."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def progress(total: int, quiet: bool, desc: str = "sampling"):
    if quiet:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
    return (lambda i, n, **post: (bar.set_postfix(post) if post else None, bar.update(1))), bar.close


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    dtype = DTYPES[a.dtype]
    from . import load
    from .pipeline import check_size
    if a.model is None:
        print("composer: no --model given: using the embedded tiny random-weight model "
              "(structure of SD1.5, noise for an image)", file=sys.stderr)
        pipe = embedded_pipeline(a.device, dtype, a.attention)
        a.steps, a.height, a.width = a.steps or 8, a.height or 64, a.width or 64
    else:
        pipe = load(a.model, dtype=dtype, device=a.device, tokenizer=a.tokenizer, attention=a.attention)
    for spec in a.lora:
        path, scale = parse_lora_arg(spec)
        print(f"composer: {pipe.load_lora(path, scale).report()} (scale {scale})", file=sys.stderr)
    steps, height, width = a.steps or 50, a.height or 512, a.width or 512
    check_size(height, width)
    params = dict(prompt=a.prompt, negative_prompt=a.negative, height=height, width=width, steps=steps,
                  guidance=a.guidance, seed=a.seed, sampler=a.sampler, eta=a.eta)
    pipe.check_pseudo_words([a.prompt, a.negative])
    cb, close = progress(steps, a.quiet)
    t0 = time.perf_counter()
    try:
        image = pipe.generate(callback=cb, **params)
    finally:
        close()
    params.update(model=a.model or "embedded-tiny", dtype=a.dtype, loras=a.lora, seconds=round(time.perf_counter() - t0, 3))
    save_png(image, a.out, params)
    print(f"wrote {a.out} ({width}x{height}, {steps} steps, {a.sampler}, seed {a.seed})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"composer.sample: error: {e}", file=sys.stderr)
        sys.exit(2)
