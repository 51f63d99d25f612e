r"""python -m composer.sample — text-to-image and LoRA-Composer composition from the command line.

    python -m composer.sample --model PATH [--tokenizer PATH] --prompt "a cat" --out cat.png
    python -m composer.sample --model PATH --spec spec.json --out composed.png [--debug-dir DIR]
    python -m composer.sample --model PATH --prompt "a cat and a dog" --lora cat.pth --lora dog.pth --regions \
        "[a <cat1> <cat2>]-*-[]-*-[0, 0, 512, 256]|[a <dog1> <dog2>]-*-[]-*-[0, 256, 512, 512]"

With no ``--model`` (and no prompt or spec) it runs the embedded demo: two random concepts composed on a
tiny random-weight SD1.5-structured model built in memory — the whole method in seconds (the image is
noise: the weights are random). With ``--model`` but no ``--spec``/``--regions`` it is plain text-to-image.
Generation parameters are stored in the PNG's ``parameters`` text chunk; the PNG is written to a temporary
file and renamed, so a failed or interrupted run never leaves a half-written image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .schedulers import SAMPLERS

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m composer.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder or SD1.x single file (.safetensors/.ckpt); "
                                    "default: the embedded tiny random model")
    ap.add_argument("--tokenizer", help="tokenizer files (needed with a single-file --model)")
    ap.add_argument("--prompt", default=None, help="default: 'a photo of a cat'")
    ap.add_argument("--spec", help="composition spec (JSON, or YAML with PyYAML); flags override its fields")
    ap.add_argument("--regions", help="official region string [prompt]-*-[neg]-*-[t, l, b, r]|...; concepts come "
                                      "from --lora and are matched to regions by their pseudo-words")
    ap.add_argument("--no-enhance", action="store_true", help="ablation: no concept enhancement (L_ce, L_fill)")
    ap.add_argument("--no-isolate", action="store_true", help="ablation: no concept isolation (mask, L_region)")
    ap.add_argument("--no-reinit", action="store_true", help="ablation: no latent re-initialisation")
    ap.add_argument("--official-schedule", action="store_true",
                    help="DPM-Solver++ timesteps and final step of diffusers 0.14, as in the paper's runs")
    ap.add_argument("--debug-dir", help="write box layout, attention heatmaps and the loss curve here")
    ap.add_argument("--jobs", help="a JSONL jobs file (one spec per line, + optional name and seeds); "
                                   "outputs go to --out-dir; resumable; works under torchrun")
    ap.add_argument("--out-dir", help="output folder for --jobs")
    ap.add_argument("--cache-mb", type=float, default=2048, help="memory budget for cached LoRAs and prompts (--jobs)")
    ap.add_argument("--negative", default=None, help="negative prompt")
    ap.add_argument("--steps", type=int, default=None, help="default 50 (8 on the embedded model)")
    ap.add_argument("--guidance", type=float, default=None, help="default 7.5")
    ap.add_argument("--seed", type=int, default=None, help="default 0")
    ap.add_argument("--height", type=int, default=None, help="default 512 (64 on the embedded model)")
    ap.add_argument("--width", type=int, default=None, help="default 512 (64 on the embedded model)")
    ap.add_argument("--sampler", default=None, choices=SAMPLERS, help="default dpm++2m")
    ap.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0) or TCD gamma (default 0.3)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="auto", choices=["auto", "triton", "flex", "sdpa", "math"],
                    help="masked-attention backend: auto = Triton on CUDA, region-segmented SDPA on CPU")
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


def _demo_spec(tmp: str, pipe) -> dict:
    """Two random ED-LoRA concepts for the embedded model (written to tmp), left and right halves."""
    from .tiny import random_edlora
    paths = []
    for i, (a, b) in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        p = os.path.join(tmp, f"concept{i}.pth")
        torch.save(random_edlora(pipe, [a, b], seed=i + 1), p)
        paths.append(p)
    return {"prompt": "a cat and a dog in a garden", "height": 128, "width": 128, "steps": 8,
            "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 128, 64], "lora": paths[0]},
                        {"prompt": "a <dog1> <dog2>", "box": [0, 64, 128, 128], "lora": paths[1]}]}


def main(argv=None) -> int:
    import tempfile
    from .compose import ComposeSpec, parse_region_string
    a = build_parser().parse_args(argv)
    if a.jobs:
        return _run_jobs(a)
    dtype = DTYPES[a.dtype]
    from . import load
    from .pipeline import check_size
    spec = ComposeSpec.from_file(a.spec) if a.spec else None
    model = a.model or (spec.model if spec else None)
    tmp = tempfile.TemporaryDirectory()
    try:
        if model is None:
            pipe = embedded_pipeline(a.device, dtype, a.attention)
            if spec is None and a.regions is None and a.prompt is None and not a.lora:
                print("composer: no --model given: embedded demo, composing 2 random concepts on a tiny "
                      "random-weight model (structure of SD1.5, noise for an image)", file=sys.stderr)
                spec = ComposeSpec.from_dict(_demo_spec(tmp.name, pipe))
            else:
                print("composer: no --model given: using the embedded tiny random-weight model "
                      "(structure of SD1.5, noise for an image)", file=sys.stderr)
            a.steps, a.height, a.width = a.steps or 8, a.height or (spec.height if spec else 64), \
                a.width or (spec.width if spec else 64)
        else:
            pipe = load(model, dtype=dtype, device=a.device, tokenizer=a.tokenizer or (spec.tokenizer if spec else None),
                        attention=a.attention)
        composing = spec is not None or a.regions is not None
        for item in a.lora:
            path, scale = parse_lora_arg(item)
            mode = "region" if composing else "merge"
            print(f"composer: {pipe.load_lora(path, scale, mode=mode).report()} (scale {scale}, {mode})", file=sys.stderr)
        if composing:
            return _run_compose(a, pipe, spec or ComposeSpec(), parse_region_string(a.regions) if a.regions else None)
        steps, height, width = a.steps or 50, a.height or 512, a.width or 512
        check_size(height, width)
        prompt = a.prompt if a.prompt is not None else "a photo of a cat"
        params = dict(prompt=prompt, negative_prompt=a.negative or "", height=height, width=width, steps=steps,
                      guidance=7.5 if a.guidance is None else a.guidance, seed=a.seed or 0,
                      sampler=a.sampler or "dpm++2m", eta=a.eta)
        pipe.check_pseudo_words([params["prompt"], params["negative_prompt"]])
        cb, close = progress(steps, a.quiet)
        t0 = time.perf_counter()
        try:
            image = pipe.generate(callback=cb, **params)
        finally:
            close()
        params.update(model=model or "embedded-tiny", dtype=a.dtype, loras=a.lora,
                      seconds=round(time.perf_counter() - t0, 3))
        save_png(image, a.out, params)
        print(f"wrote {a.out} ({width}x{height}, {steps} steps, {params['sampler']}, seed {params['seed']})",
              file=sys.stderr)
        return 0
    finally:
        tmp.cleanup()


def _run_jobs(a) -> int:
    from . import load
    from .batch import dist_env, format_summary, merge_summaries, read_jobs, run_jobs
    if not a.out_dir:
        raise ValueError("--jobs needs --out-dir")
    read_jobs(a.jobs)  # validate the whole file before loading anything
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
        pipe = load(a.model, dtype=dtype, device=device, tokenizer=a.tokenizer, attention=a.attention)
    else:
        print("composer: no --model given: running the jobs on the embedded tiny random-weight model", file=sys.stderr)
        pipe = embedded_pipeline(device, dtype, a.attention)
    for item in a.lora:
        path, scale = parse_lora_arg(item)
        pipe.load_lora(path, scale, mode="region")
    try:
        summary = run_jobs(pipe, a.jobs, a.out_dir, rank=rank, world=world, quiet=a.quiet, cache_mb=a.cache_mb,
                           log=lambda m: print(m, file=sys.stderr))
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


def _run_compose(a, pipe, spec, regions) -> int:
    import dataclasses
    from .compose import compose
    over = {k: v for k, v in dict(prompt=a.prompt, negative_prompt=a.negative, steps=a.steps, guidance=a.guidance,
                                   seed=a.seed, height=a.height, width=a.width, sampler=a.sampler).items() if v is not None}
    if a.no_enhance:
        over["enhance"] = False
    if a.no_isolate:
        over["isolate"] = False
    if a.no_reinit:
        over["reinit"] = False
    if a.official_schedule:
        over["schedule"] = "official"
    if regions is not None:
        over["regions"] = regions
    spec = dataclasses.replace(spec, **over)
    cb, close = progress(spec.steps, a.quiet, desc="composing")
    t0 = time.perf_counter()
    try:
        image = compose(pipe, spec, callback=cb, debug_dir=a.debug_dir)
    finally:
        close()
    params = dataclasses.asdict(spec)
    params.update(model=a.model or spec.model or "embedded-tiny", dtype=a.dtype, loras=a.lora,
                  seconds=round(time.perf_counter() - t0, 3))
    params["regions"] = [{k: v for k, v in r.items() if v is not None} for r in params["regions"]]
    save_png(image, a.out, params)
    print(f"wrote {a.out} ({spec.width}x{spec.height}, {len(spec.regions)} regions, {spec.steps} steps, "
          f"seed {spec.seed})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
        print(f"composer.sample: error: {e}", file=sys.stderr)
        sys.exit(2)
