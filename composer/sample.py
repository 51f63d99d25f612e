r"""python -m composer.sample — text-to-image and LoRA-Composer composition from the command line.

    python -m composer.sample --model PATH --prompt "a cat" --out cat.png
    python -m composer.sample --model PATH --spec spec.json --out composed.png [--debug-dir DIR]
    python -m composer.sample --spec composed.png --out again.png          # re-run an image from its metadata
    python -m composer.sample --model PATH --spec spec.json --num-images 4 --out x.png   # x-0.png … x-3.png
    python -m composer.sample --model PATH --prompt "a cat and a dog" --lora cat.pth --lora dog.pth --regions \
        "[a <cat1> <cat2>]-*-[]-*-[0, 0, 512, 256]|[a <dog1> <dog2>]-*-[]-*-[0, 256, 512, 512]"

Every setting is resolved as: the model's defaults < the spec (--spec) < an explicit flag. With no --model (and
none in the spec) the embedded model is used; with it and no prompt, spec or regions, the embedded demo runs (a
two-concept composition with the full method). A spec or --regions makes it a composition, otherwise it is
plain text-to-image. The PNG carries A1111-style ``parameters`` (read by image browsers) and the whole resolved
spec as JSON (``composer`` chunk); it is written to a temporary file and renamed, so a failed or interrupted run
never leaves a half-written image.

Several images: ``--num-images N`` runs seeds s, s+1, …, s+N-1 (s: --seed, else the spec's), ``--seeds 1,5,9``
(or ranges, "0-3,7") exactly those. They run as one batch through the model (at most --batch-size images per
batch), each equal to its single run; ``--out x.png`` then becomes ``x-<seed>.png`` per image, each PNG recording
its own seed, so ``--spec x-5.png`` re-runs that one image.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time

import torch

from .batch import DEFAULT_BATCH_SIZE, dist_env, format_summary, merge_summaries, read_jobs, run_jobs, validate_jobs
from .cli import run
from .compose import compose, warn_if_no_concept
from .conditions import parse_condition_arg
from .runtime import prepack_convs, tune_cpu_allocator
from .io import save_png
from .loading import load
from .pipeline import Pipeline
from .schedulers import SAMPLERS, SchedulerConfig
from .spec import ComposeSpec, load_spec_data, parse_region_string, resolve_seeds
from .tiny import random_edlora, random_models
from .tokenizer import CLIPTokenizer

PROG = "python -m composer.sample"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# What a model is run with unless the spec or a flag says otherwise (SD1.5's usual settings).
MODEL_DEFAULTS = {"height": 512, "width": 512, "steps": 50, "guidance": 7.5, "seed": 0, "sampler": "dpm++2m"}
EMBEDDED_DEFAULTS = {"height": 64, "width": 64, "steps": 8, "guidance": 7.5, "seed": 0, "sampler": "dpm++2m"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder or SD1.x single file (.safetensors/.ckpt); default: the "
                                    "spec's model, else the embedded model")
    ap.add_argument("--tokenizer", help="tokenizer files to use instead of the model's (default: a diffusers "
                                        "folder's own tokenizer/, else SD1.x's CLIP vocabulary shipped with composer)")
    ap.add_argument("--prompt", help="the (global) prompt")
    ap.add_argument("--negative", help="negative prompt")
    ap.add_argument("--spec", help="a composition spec (JSON, YAML with PyYAML) or a composer PNG to re-run; flags "
                                   "override its fields")
    ap.add_argument("--regions", help="official region string [prompt]-*-[neg]-*-[t, l, b, r]|...; concepts come "
                                      "from --lora and are matched to regions by their pseudo-words")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="a LoRA (kohya, LyCORIS, PEFT/diffusers or ED-LoRA); repeatable; scale defaults to 1.0. "
                         "Merged into the model for text-to-image; in a composition bound to the region whose prompt "
                         "names its pseudo-words")
    ap.add_argument("--lora-strict", action=argparse.BooleanOptionalAction, default=True,
                    help="refuse a LoRA with keys that match no layer (default); --no-lora-strict loads the rest "
                         "and lists what was skipped")
    ap.add_argument("--condition", action="append", default=[], metavar="KIND:MODEL:IMAGE[:WEIGHT]",
                    help="an image condition, repeatable: KIND t2i-adapter or controlnet (KIND+canny: detect edges in "
                         "IMAGE first), MODEL a diffusers folder or an original .pth/.safetensors, IMAGE used as given "
                         "(resized to the output size with a warning), WEIGHT default 1.0. Replaces the spec's "
                         "'conditions'; per-region weights, start/end and guess mode are spec fields")
    ap.add_argument("--tokens", action="append", default=[], metavar="N:WORD[,WORD...]",
                    help="the concept tokens of region N (1-based): words or phrases of its prompt that the method's "
                         "losses and re-initialisation read (default: pseudo-words, a LoRA's trigger words, else its "
                         "content words); repeatable")
    ap.add_argument("--no-enhance", action="store_true", help="ablation: no concept enhancement (L_ce, L_fill)")
    ap.add_argument("--no-isolate", action="store_true", help="ablation: no concept isolation (mask, L_region)")
    ap.add_argument("--no-reinit", action="store_true", help="ablation: no latent re-initialisation")
    ap.add_argument("--official-schedule", action="store_true",
                    help="DPM-Solver++ timesteps and final step of diffusers 0.14, as in the paper's runs")
    ap.add_argument("--debug-dir", help="write the box layout, labelled attention heatmaps and the loss curve here")
    ap.add_argument("--jobs", help="a JSONL jobs file (one spec per line, + optional name and seeds); outputs go "
                                   "to --out-dir; resumable; works under torchrun")
    ap.add_argument("--out-dir", help="output folder for --jobs")
    ap.add_argument("--cache-mb", type=float, default=2048, help="memory budget for cached LoRAs and prompts (--jobs)")
    ap.add_argument("--steps", type=int, help=f"sampler steps (default {MODEL_DEFAULTS['steps']}; embedded model: "
                                              f"{EMBEDDED_DEFAULTS['steps']})")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    ap.add_argument("--seed", type=int, help="default 0; with --num-images N the first of N consecutive seeds")
    ap.add_argument("--num-images", type=int, metavar="N",
                    help="make N images, seeds s, s+1, …, s+N-1 (s: --seed, else the spec's), run as one batch; "
                         "--out x.png is then written as x-<seed>.png per image")
    ap.add_argument("--seeds", metavar="LIST",
                    help="make one image per seed, e.g. 1,5,9 or 0-3,7 (instead of --seed), run as one batch; "
                         "--out x.png is then written as x-<seed>.png per image")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                    help=f"at most B images per batch through the model (default {DEFAULT_BATCH_SIZE}; more seeds "
                         "run in consecutive batches, so memory stays that of B images); --jobs batches the seeds of "
                         "items that differ only in their seed the same way")
    ap.add_argument("--height", type=int, help=f"image height in pixels (default {MODEL_DEFAULTS['height']}; "
                                               f"embedded model: {EMBEDDED_DEFAULTS['height']}, the demo its own)")
    ap.add_argument("--width", type=int, help=f"image width in pixels (default {MODEL_DEFAULTS['width']}; "
                                              f"embedded model: {EMBEDDED_DEFAULTS['width']}, the demo its own)")
    ap.add_argument("--sampler", choices=list(SAMPLERS), help="default dpm++2m")
    ap.add_argument("--eta", type=float, help="DDIM eta (default 0) or TCD gamma (default 0.3)")
    ap.add_argument("--vae-tile", type=int, metavar="N",
                    help="decode the image in overlapping tiles of at most N×N latent cells (N·8 pixels, blended over "
                         "N/4 cells) so the VAE's memory is bounded by the tile; 0 never tiles. Default: automatic, "
                         "tiles of 64 (512 px) only above 768² pixels of area. Tiling changes the image slightly "
                         "(per-tile GroupNorm statistics)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="auto", choices=["auto", "triton", "flex", "sdpa", "math"],
                    help="masked-attention backend: auto = Triton on CUDA, region-segmented SDPA on CPU")
    ap.add_argument("--ema", action="store_true", help="use a single file's EMA UNet weights")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="on CPU, keep glibc's malloc defaults (by default freed activations stay in the heap for "
                         "reuse: ~11%% faster at SD1.5 sizes, same peak memory; see composer/runtime.py)")
    ap.add_argument("--no-prepack", action="store_true",
                    help="on CPU in fp32, do not keep the UNet's conv weights pre-packed for oneDNN (by default they "
                         "are: 1.06× (512²) to 1.25× (256²) faster UNet passes, for a second copy of the conv weights, "
                         "2.4 GB at SD1.5 size; see composer/layers.py Conv2d)")
    ap.add_argument("--out", default="out.png", help="the PNG to write (default out.png); for several images "
                                                     "(--num-images, --seeds) OUT-<seed>.png each, e.g. out-3.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def parse_seeds_arg(arg: str) -> list:
    """'1,5,9' or '0-3,7' (the --seeds flag) -> [1, 5, 9] / [0, 1, 2, 3, 7]."""
    seeds = []
    for part in arg.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            if sep and lo:  # a range A-B ("-5" alone is a negative seed)
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds += range(a, b + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds {arg!r}: {part!r} is not an integer seed or a range A-B (A <= B); expected "
                             "e.g. 1,5,9 or 0-3,7") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {arg!r}: a seed is listed twice")
    return seeds


def check_seed_flags(a):
    """--seed/--seeds/--num-images/--batch-size on their own (before any model is loaded) -> the --seeds list or
    None."""
    if a.batch_size is not None and a.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.num_images is not None and a.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {a.num_images}")
    if a.jobs and (a.seeds is not None or a.num_images is not None):
        raise ValueError("--seeds and --num-images do not apply to --jobs: each job line has its own 'seeds'")
    if a.seeds is None:
        return None
    if a.seed is not None:
        raise ValueError("give --seed or --seeds, not both")
    seeds = parse_seeds_arg(a.seeds)
    if a.num_images is not None and a.num_images != len(seeds):
        raise ValueError(f"--seeds lists {len(seeds)} seed(s) but --num-images is {a.num_images}: give one of them")
    return seeds


def run_seeds(a, spec) -> list:
    """The seeds of a single-spec run: --seeds, else --num-images consecutive seeds from the resolved seed (flag
    > spec > default), else that seed alone."""
    seeds = check_seed_flags(a)
    return seeds if seeds is not None else resolve_seeds(spec.seed, a.num_images)[0]


def output_paths(out: str, seeds: list) -> list:
    """--out for each seed: the path itself for one image, else ``<stem>-<seed><ext>`` (out.png -> out-3.png)."""
    if len(seeds) == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f"{root}-{s}{ext or '.png'}" for s in seeds]


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'path/to/x.safetensors:0.8' -> (path, 0.8); a suffix that is not a number is part of the path."""
    path, sep, tail = arg.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def embedded_pipeline(device="cpu", dtype=torch.float32, attention="sdpa"):
    """The embedded model: a tiny random-weight SD1.5-structured model built in memory, with SD1's real CLIP
    tokenizer (shipped in the package)."""
    unet, vae, te = random_models("tiny", seed=0, backend=attention)
    return Pipeline(unet.to(device, dtype), te.to(device, dtype), vae.to(device), CLIPTokenizer.default(),
                    SchedulerConfig(), dtype=dtype, device=device, attention=attention,
                    source={"name": "embedded-tiny"})



def progress(total: int, quiet: bool, desc: str = "sampling"):
    if quiet:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
    return (lambda i, n, **post: (bar.set_postfix(post) if post else None, bar.update(1))), bar.close


def _demo_spec(folder: str, pipe) -> dict:
    """Two random ED-LoRA concepts for the embedded model (written to ``folder``), left and right halves."""
    paths = []
    for i, (a, b) in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        p = os.path.join(folder, f"concept{i}.pth")
        torch.save(random_edlora(pipe, [a, b], seed=i + 1), p)
        paths.append(p)
    return {"prompt": "a cat and a dog in a garden", "height": 128, "width": 128, "steps": 8,
            "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 128, 64], "lora": paths[0]},
                        {"prompt": "a <dog1> <dog2>", "box": [0, 64, 128, 128], "lora": paths[1]}]}


def flag_overrides(a) -> dict:
    """The spec fields set explicitly on the command line (they win over the spec)."""
    over = {k: v for k, v in dict(prompt=a.prompt, negative_prompt=a.negative, steps=a.steps, guidance=a.guidance,
                                  seed=a.seed, height=a.height, width=a.width, sampler=a.sampler,
                                  eta=a.eta, vae_tile=a.vae_tile).items() if v is not None}
    if a.no_enhance:
        over["enhance"] = False
    if a.no_isolate:
        over["isolate"] = False
    if a.no_reinit:
        over["reinit"] = False
    if a.official_schedule:
        over["schedule"] = "official"
    if a.regions is not None:
        over["regions"] = parse_region_string(a.regions)
    if a.lora:
        over["loras"] = [{"path": p, "scale": s} for p, s in map(parse_lora_arg, a.lora)]
    if a.condition:
        over["conditions"] = [parse_condition_arg(c) for c in a.condition]
    return over


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="composer: %(message)s")
    check_seed_flags(a)  # flag errors before any model is loaded
    if str(a.device).startswith("cpu") and not a.no_tune_allocator:
        tune_cpu_allocator()
    if a.jobs:
        return _run_jobs(a)
    data = load_spec_data(a.spec) if a.spec else {}
    model = a.model or data.get("model")
    over = flag_overrides(a)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            pipe = embedded_pipeline(a.device, DTYPES[a.dtype], a.attention)
            defaults = EMBEDDED_DEFAULTS
            if not data and not over.get("regions") and "prompt" not in over and not a.lora:
                print("composer: no --model given: embedded demo, composing 2 random concepts on a tiny "
                      "random-weight model (structure of SD1.5, noise for an image)", file=sys.stderr)
                data = _demo_spec(tmp, pipe)
            else:
                print("composer: no --model given: using the embedded tiny random-weight model "
                      "(structure of SD1.5, noise for an image)", file=sys.stderr)
        else:
            pipe = load(model, dtype=DTYPES[a.dtype], device=a.device, tokenizer=a.tokenizer or data.get("tokenizer"),
                        attention=a.attention, use_ema=a.ema)
            defaults = MODEL_DEFAULTS
        cpu_runtime(pipe, a)
        spec = ComposeSpec.from_dict({**defaults, **data, **over, "model": model}, where=a.spec or "command line")
        apply_token_flags(spec, a.tokens)
        return run_spec(pipe, spec, a)


def cpu_runtime(pipe, a):
    """The UNet's conv weights pre-packed for CPU fp32 inference unless --no-prepack (composer/runtime.py)."""
    if pipe.device.type == "cpu" and not a.no_prepack:
        prepack_convs(pipe.unet)


def apply_token_flags(spec, flags):
    """--tokens N:word,word sets region N's concept tokens (overriding the spec's)."""
    for f in flags:
        n, sep, words = f.partition(":")
        if not sep or not n.strip().isdigit() or not words.strip():
            raise ValueError(f"--tokens {f!r}: expected N:WORD[,WORD...] with N a region number (1-based)")
        i = int(n) - 1
        if not 0 <= i < len(spec.regions):
            raise ValueError(f"--tokens {f!r}: there are {len(spec.regions)} regions")
        spec.regions[i].tokens = [w.strip() for w in words.split(",") if w.strip()]
    spec.check()


def run_spec(pipe, spec, a) -> int:
    """Run one resolved spec for its seed(s) and write one PNG per seed (with metadata: the spec with that seed)."""
    seeds = run_seeds(a, spec)
    spec.check_files()
    if spec.regions:
        warn_if_no_concept(pipe, spec)
    groups = -(-len(seeds) // (a.batch_size or len(seeds)))
    cb, close = progress(spec.steps * groups, a.quiet, desc="composing" if spec.regions else "sampling")
    t0 = time.perf_counter()
    try:
        # one seed: the single-image call (its debug folder is --debug-dir itself, not DIR/<seed>/)
        images, infos = compose(pipe, spec, seed=seeds if len(seeds) > 1 else seeds[0], batch_size=a.batch_size,
                                callback=cb, debug_dir=a.debug_dir if spec.regions else None, strict=a.lora_strict,
                                return_info=True)
    finally:
        close()
    if len(seeds) == 1:
        images, infos = [images], [infos]
    seconds = (time.perf_counter() - t0) / len(seeds)  # each image's share of the batch
    model = pipe.model_record()
    what = f"{len(spec.regions)} regions, " if spec.regions else ""
    for path, s, image, info in zip(output_paths(a.out, seeds), seeds, images, infos):
        one = dataclasses.replace(spec, seed=s)
        rec = one.record(model=model)
        rec["seconds"] = round(seconds, 3)
        if spec.regions:  # what the method did: each region's concept tokens and where they came from
            rec["info"] = {k: info[k] for k in ("regions", "optimised_steps", "reinit")}
        save_png(image, path, rec)
        print(f"wrote {path} ({spec.width}x{spec.height}, {what}{spec.steps} steps, {spec.sampler}, seed {s})",
              file=sys.stderr)
    return 0


def _run_jobs(a) -> int:
    if not a.out_dir:
        raise ValueError("--jobs needs --out-dir")
    jobs = read_jobs(a.jobs)  # the whole file is checked before loading anything
    rank, world, local = dist_env()
    device = a.device
    if world > 1:
        import torch.distributed as dist
        cuda = torch.cuda.is_available() and a.device.startswith("cuda")
        if cuda:
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    dtype = DTYPES[a.dtype]
    if a.model:
        pipe = load(a.model, dtype=dtype, device=device, tokenizer=a.tokenizer, attention=a.attention, use_ema=a.ema)
    else:
        print("composer: no --model given: running the jobs on the embedded tiny random-weight model", file=sys.stderr)
        pipe = embedded_pipeline(device, dtype, a.attention)
    cpu_runtime(pipe, a)
    extra = [{"path": p, "scale": s} for p, s in map(parse_lora_arg, a.lora)]
    validate_jobs(pipe, jobs, extra_loras=extra)  # sizes, samplers, seeds, files, pseudo-words: before any image
    try:
        summary = run_jobs(pipe, a.jobs, a.out_dir, rank=rank, world=world, quiet=a.quiet, cache_mb=a.cache_mb,
                           extra_loras=extra, log=lambda m: print(m, file=sys.stderr), jobs=jobs,
                           batch_size=a.batch_size)
    finally:
        if world > 1:
            import torch.distributed as dist
            parts = [None] * world
            dist.all_gather_object(parts, locals().get("summary") or {})
            dist.barrier()
            dist.destroy_process_group()
    if world > 1:
        summary = merge_summaries(parts)
    if rank == 0:
        print(format_summary(summary), file=sys.stderr)
    failed = sum(s["failed"] for s in summary.values())
    if failed and rank == 0:
        print(f"composer: {failed} item(s) failed; see {os.path.join(a.out_dir, 'failures.jsonl')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
