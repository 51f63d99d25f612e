"""Images/s of N seeds run as one batch against the same N seeds one at a time, for plain generation and a
2-concept composition with the full method, on the tiny model and on SD1.5-sized random weights (CPU fp32).

    python bench/batch_seeds.py [--n 4] [--runs 3] [--tiny-size 256] [--tiny-steps 4] [--sd15-size 256]
                                [--sd15-steps 1]                   # writes bench/results/batch_seeds.json

Sampling (the initial latents, re-initialisation and latent optimisation for compose, every UNet pass) is timed
in every run; the two modes alternate run by run (batched first on even runs, singles first on odd ones), so drift
in the machine's speed falls on both; medians over ``--runs``. The VAE decode is the same work in both modes (it
gains nothing from a batch on CPU), so it is timed once, in the first run, both ways, and the end-to-end figures
add it: images/s = N / (sampling + decode). Every run also checks that the batched latents equal the singles'
(max relative error, recorded), so the speed is not bought with a different result. Peak memory is not compared
(both modes run in one process); a batch holds B images' activations at once. Results are rewritten after every
row, so a run cut short keeps what it measured (``complete``: false). For compose, ``prepare_s`` is the per-call
preparation (validation, region prompts encoded per layer), paid once per batch but once per image one at a time;
``sampling_speedup_without_prepare`` leaves it out, i.e. the gain of the batched UNet passes alone.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import write_result  # noqa: E402


def cpu_description() -> dict:
    """The CPU model and its vector extensions (from /proc/cpuinfo on Linux)."""
    d = {"machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                d["model"] = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        d["vector"] = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    except OSError:
        pass
    return d


def tiny_pipe():
    from composer.sample import embedded_pipeline
    return embedded_pipeline()


def sd15_pipe():
    from compose_cpu import build_pipe
    return build_pipe()


def concepts(pipe, tmp):
    import torch
    from composer.tiny import random_edlora
    paths = []
    for i in range(2):
        p = os.path.join(tmp, f"{id(pipe)}-c{i}.pth")
        torch.save(random_edlora(pipe, [f"<c{i}a>", f"<c{i}b>"], seed=i, emb_std=0.02), p)
        paths.append(p)
    return paths


def runner(pipe, task, size, steps, paths):
    """-> fn(seeds) that samples one latent per seed in one batch."""
    from composer.compose import ComposeSpec, compose_latents
    if task == "generate":
        return lambda seeds: pipe.sample_latents("a photo of friends in a garden", height=size, width=size,
                                                 steps=steps, sampler="dpm++2m", seed=seeds)
    regs = [{"prompt": f"a <c{i}a> <c{i}b>, smiling", "box": [0.1, i / 2, 0.95, (i + 1) / 2], "lora": paths[i]}
            for i in range(2)]
    spec = ComposeSpec.from_dict(dict(prompt="a photo of friends in a garden", height=size, width=size,
                                      steps=steps, regions=regs))
    return lambda seeds: compose_latents(pipe, spec, seed=seeds)[0]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(name, pipe, task, size, steps, n, runs, paths):
    import torch
    fn = runner(pipe, task, size, steps, paths)
    seeds = list(range(n))
    fn(seeds[:1])  # warm-up: first-call allocations, prompt encodings, LoRA attachment
    t = {"batched": [], "singles": []}
    err, decode = 0.0, {}
    for r in range(runs):
        order = ("batched", "singles") if r % 2 == 0 else ("singles", "batched")
        out = {}
        for mode in order:
            if mode == "batched":
                out[mode], dt = timed(lambda: fn(seeds))
            else:
                out[mode], dt = timed(lambda: torch.cat([fn([s]) for s in seeds]))
            t[mode].append(dt)
        a, b = out["batched"], out["singles"]
        err = max(err, ((a - b).abs().amax((1, 2, 3)) / b.abs().amax((1, 2, 3))).max().item())
        if r == 0:
            _, decode["batched"] = timed(lambda: pipe.decode_images(a))
            _, decode["singles"] = timed(lambda: [pipe.decode_images(a[k:k + 1]) for k in range(n)])
    med = {m: statistics.median(v) for m, v in t.items()}
    extra = {}
    if task == "compose":  # preparing the spec (region prompts, per layer for pseudo-words) is once per call
        from composer.compose import ComposeSpec, prepare
        spec = ComposeSpec.from_dict(dict(prompt="a photo of friends in a garden", height=size, width=size,
                                          steps=steps, regions=[{"prompt": f"a <c{i}a> <c{i}b>, smiling", "box": [
                                              0.1, i / 2, 0.95, (i + 1) / 2], "lora": paths[i]} for i in range(2)]))
        p = statistics.median(timed(lambda: prepare(pipe, spec))[1] for _ in range(3))
        extra = {"prepare_s": p, "sampling_speedup_without_prepare": (med["singles"] - n * p) / (med["batched"] - p)}
    row = {"model": name, "task": task, "size": size, "steps": steps, "images": n, "runs": runs,
           "sampling_batched_s": med["batched"], "sampling_singles_s": med["singles"],
           "sampling_batched_images_per_s": n / med["batched"], "sampling_singles_images_per_s": n / med["singles"],
           "sampling_speedup": med["singles"] / med["batched"],
           "decode_batched_s": decode["batched"], "decode_singles_s": decode["singles"],
           "e2e_batched_images_per_s": n / (med["batched"] + decode["batched"]),
           "e2e_singles_images_per_s": n / (med["singles"] + decode["singles"]),
           "e2e_speedup": (med["singles"] + decode["singles"]) / (med["batched"] + decode["batched"]),
           **extra, "all_sampling_s": t, "max_rel_err_batched_vs_singles": err}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "all_sampling_s"},
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="images (seeds) per measurement")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiny-size", type=int, default=256)
    ap.add_argument("--tiny-steps", type=int, default=4)
    ap.add_argument("--sd15-size", type=int, default=256)
    ap.add_argument("--sd15-steps", type=int, default=1)
    ap.add_argument("--models", default="tiny,sd15")
    a = ap.parse_args()
    rows, tmp = [], tempfile.mkdtemp()
    t_start = time.perf_counter()
    names = a.models.split(",")

    def write(complete):
        write_result("batch_seeds.json", {
            "what": f"{a.n} seeds batched vs one at a time: sampling images/s (medians over {a.runs} alternating "
                    "runs) and end-to-end with the VAE decode (timed once)", "dtype": "fp32", "sampler": "dpm++2m",
            "compose": "2 concepts, full method (re-init, latent optimisation, isolation)",
            "weights": "random (tiny: the embedded model; sd15: SD1.5 sizes, bench/compose_cpu.py build_pipe)",
            "cpu": cpu_description(), "total_s": time.perf_counter() - t_start, "complete": complete, "rows": rows})

    for name in names:
        pipe = tiny_pipe() if name == "tiny" else sd15_pipe()
        size, steps = (a.tiny_size, a.tiny_steps) if name == "tiny" else (a.sd15_size, a.sd15_steps)
        paths = concepts(pipe, tmp)
        for task in ("generate", "compose"):
            rows.append(measure(name, pipe, task, size, steps, a.n, a.runs, paths))
            write(complete=(name == names[-1] and task == "compose"))
        del pipe


if __name__ == "__main__":
    main()
