"""The SD1.5 VAE decoder on CPU (fp32, random weights at SD1.5 sizes): our fast path against our reference path
(the decoder as it was: diffusers' ops) and diffusers' AutoencoderKL.decode on the same weights; then tiled
against untiled decoding (difference and peak memory).

    python bench/vae_cpu.py [--runs 9] [--runs-512 3]      # writes bench/results/vae_cpu.json (≈ 15 min, 2 cores)
    python bench/vae_cpu.py --sections speed               # re-measure one section, keep the others' figures

Speed: the three decoders alternate within each round (so that drift in machine load hits all alike); medians over
``--runs`` rounds at 256² and ``--runs-512`` at 512², after one warm-up round. Tiling: each setting decodes the
same latent in its own process (peak RSS is per process; reported above the process's RSS after building the
model), saves the image, and the parent compares tiled with untiled images: max / mean |Δ| in [-1, 1] pixel units
and in 8-bit levels after to_pil's rounding. ``--malloc-case`` adds one fast 256² decode with glibc's mmap
threshold raised (``MALLOC_MMAP_THRESHOLD_``), to show how much of the time is page-faulting fresh allocations.
Each section records when it ran and the 1-minute load average before and after it (other work on a shared
machine inflates times; the interleaving keeps the ratios fair, not the absolute figures).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _common import peak_rss_mb, rss_mb  # noqa: E402


def build():
    """Ours and diffusers' SD1.5 VAE, diffusers' default initialisation (seed 0), the same weights."""
    from diffusers import AutoencoderKL as DVAE

    from composer.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    ref = DVAE.from_config(VAEConfig().to_diffusers()).eval()
    ours = AutoencoderKL(VAEConfig()).eval()
    ours.load_state_dict(ref.state_dict())
    ours.requires_grad_(False)
    return ours, ref


def latent(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, size // 8, size // 8, generator=g)


def speed(size: int, runs: int) -> dict:
    import copy
    ours, theirs = build()
    ref = copy.deepcopy(ours)  # its own copy: the reference path keeps its weights in the standard layout
    z = latent(size)
    fns = {"ours_before": lambda: ref.decode(z, fast=False), "ours_after": lambda: ours.decode(z),
           "diffusers": lambda: theirs.decode(z).sample}
    times = {k: [] for k in fns}
    with torch.inference_mode():
        outs = {k: f() for k, f in fns.items()}  # warm-up round (and the layout conversion of the fast path)
        for _ in range(runs):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {"size": size, "runs": runs, "median_s": med, "all_s": times,
            "speedup_after_vs_before": med["ours_before"] / med["ours_after"],
            "after_vs_diffusers": med["ours_after"] / med["diffusers"],
            # the same ratios taken within each round, then the median: less sensitive to load drifting
            "paired_speedup_after_vs_before": paired("ours_before", "ours_after"),
            "paired_after_vs_diffusers": paired("ours_after", "diffusers"),
            "max_rel_err": {"after_vs_before": rel(outs["ours_after"], outs["ours_before"]),
                            "before_vs_diffusers": rel(outs["ours_before"], outs["diffusers"]),
                            "after_vs_diffusers": rel(outs["ours_after"], outs["diffusers"])}}


def child(size: int, tile: str, overlap: str, runs: int, out: str):
    from composer.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)  # our model alone (the same weights in every child), so the peak is the decode's
    ours = AutoencoderKL(VAEConfig()).eval().requires_grad_(False)
    z = latent(size)
    kw = {"tile": None if tile == "auto" else int(tile), "overlap": None if overlap == "default" else int(overlap)}
    base = rss_mb()
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            t0 = time.perf_counter()
            img = ours.decode(z, **kw)
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    if out:
        torch.save(img.clone(), out)
    from composer.vae import auto_tile, tile_spans
    t = auto_tile(*z.shape[-2:]) if kw["tile"] is None else kw["tile"]
    ov = t // 4 if kw["overlap"] is None else kw["overlap"]
    spans = [tile_spans(n, t, ov) for n in z.shape[-2:]] if t else None
    print(json.dumps({"size": size, "tile": t, "overlap": ov if t else None,
                      "tiles": None if spans is None else f"{len(spans[0])}x{len(spans[1])} of "
                                                          f"{spans[0][0][1] - spans[0][0][0]}x{spans[1][0][1] - spans[1][0][0]} latent",
                      "median_s": statistics.median(times), "all_s": times, "rss_after_model_mb": base,
                      "peak_rss_mb": peak, "peak_over_model_mb": peak - base}))


def run_child(args, env=None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max / mean |a - b| in [-1, 1] units and in 8-bit levels (to_pil's rounding)."""
    d = (a - b).abs()
    q = lambda x: ((x / 2 + 0.5).clamp(0, 1) * 255).round()
    d8 = (q(a) - q(b)).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "max_8bit": int(d8.max().item()),
            "mean_8bit": d8.mean().item(), "image_max_abs": b.abs().max().item()}


def tiny_tiled() -> dict:
    """The tiny preset (tests' structure), default init, seed 0: tiled against untiled on a 13×10 and a 64×64
    latent."""
    from composer.tiny import random_models
    _, vae, _ = random_models("tiny", seed=0)
    res = {}
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for hw, tile, ov in (((13, 10), 8, 2), ((64, 64), 32, 8)):
            z = torch.randn(1, 4, *hw, generator=g)
            res[f"latent {hw[0]}x{hw[1]}, tile {tile}, overlap {ov}"] = diff(vae.decode(z, tile=tile, overlap=ov),
                                                                            vae.decode(z))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--runs-512", type=int, default=3)
    ap.add_argument("--sections", default="speed,malloc,tiled",
                    help="which sections to measure; the others are kept from the existing results file")
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        size, tile, overlap, runs, out = a.child
        return child(int(size), tile, overlap, int(runs), out if out != "-" else "")
    from _common import RESULTS, write_result
    sections = a.sections.split(",")
    bad = sorted(set(sections) - {"speed", "malloc", "tiled"})
    if bad:
        raise SystemExit(f"unknown section(s) {bad}")
    res = {}
    prev = os.path.join(os.environ.get("OUT") or RESULTS, "vae_cpu.json")
    if set(sections) != {"speed", "malloc", "tiled"} and os.path.exists(prev):
        with open(prev) as f:
            res = {k: v for k, v in json.load(f).items() if k not in ("machine", "date")}
    res.update({"dtype": "fp32", "threads": torch.get_num_threads(),
                "weights": "random, SD1.5 VAE sizes (speed: diffusers' default init, seed 0, loaded into ours; "
                           "tiling: ours, torch default init, seed 0)"})

    def stamp(name, fn):
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        out = fn()
        res[name] = out
        res.setdefault("measured", {})[name] = {"date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0,
                                                "load1_before": load0, "load1_after": os.getloadavg()[0]}

    if "speed" in sections:
        def speeds():
            out = []
            for size, runs in ((256, a.runs), (512, a.runs_512)):
                if runs > 0:
                    out.append(speed(size, runs))
                    print(json.dumps(out[-1]["median_s"]), flush=True)
            return out
        stamp("speed", speeds)
    if "malloc" in sections:
        stamp("malloc_mmap_threshold_case", lambda: {
            "what": "fast path, 256², glibc MALLOC_MMAP_THRESHOLD_=4e9 MALLOC_TRIM_THRESHOLD_=4e9 (large tensors "
                    "from the heap, no page faults on reuse) against the default, each in its own process",
            "default": run_child([256, 0, "default", 3, "-"]),
            "heap": run_child([256, 0, "default", 3, "-"], env={"MALLOC_MMAP_THRESHOLD_": "4000000000",
                                                                 "MALLOC_TRIM_THRESHOLD_": "4000000000"})})
    if "tiled" in sections:
        stamp("tiled", tiled)
        res["tiny_tiled"] = tiny_tiled()
    write_result("vae_cpu.json", res)


def tiled() -> list:
    tmp = tempfile.mkdtemp()
    rows = []
    for size, tile, ov in ((512, 0, "default"), (512, 32, 8), (1024, 0, "default"), (1024, "auto", "default")):
        path = os.path.join(tmp, f"{size}_{tile}.pt")
        rows.append(run_child([size, tile, ov, 1, path]))
        rows[-1]["image"] = path
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        if r["tile"]:
            untiled = next(u for u in rows if u["size"] == r["size"] and not u["tile"])
            r["vs_untiled"] = diff(torch.load(r["image"]), torch.load(untiled["image"]))
            r["peak_over_model_vs_untiled"] = r["peak_over_model_mb"] / untiled["peak_over_model_mb"]
            r["time_vs_untiled"] = r["median_s"] / untiled["median_s"]
    for r in rows:
        os.remove(r.pop("image"))
    return rows

if __name__ == "__main__":
    main()
