"""The issue's whole-path target: a 2-concept SD1.5-size 512² composition with the full method (re-initialisation,
latent optimisation, injection, isolation) on CPU in ≤ 3 minutes wall, few-step. Random weights at SD1.5 sizes
(the time does not depend on what the weights are); LCM sampler, 4 steps, guidance 1.5 (LCM-LoRA settings; the
LoRA itself would be merged into the base and cost nothing per step), the CLI's allocator setting.

    python bench/fewstep_cpu.py [--steps 4] [--size 512] [--runs 1]     # -> bench/results/fewstep_cpu.json

Reports the wall time from spec to decoded image, split into the re-initialisation forward, the optimisation
passes, the CFG passes and the decode, and the peak RSS.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--sampler", default="lcm")
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--no-prepack", action="store_true", help="plain conv path (as before pre-packing)")
    a = ap.parse_args()
    from composer.runtime import prepack_convs, tune_cpu_allocator
    tune_cpu_allocator()  # as `python -m composer.sample` runs on CPU (with prepack_convs below)
    import torch
    from _common import peak_rss_mb, write_result
    from compose_cpu import build_pipe
    from composer.compose import ComposeSpec, compose_latents
    from composer.tiny import random_edlora
    pipe = build_pipe()
    if not a.no_prepack:
        prepack_convs(pipe.unet)
    tmp = tempfile.mkdtemp()
    paths = []
    for i in range(2):
        p = os.path.join(tmp, f"c{i}.pth")
        torch.save(random_edlora(pipe, [f"<c{i}a>", f"<c{i}b>"], seed=i, emb_std=0.02), p)
        paths.append(p)
    regs = [{"prompt": f"a <c{i}a> <c{i}b>, smiling", "box": [0.1, i * 0.5, 0.95, (i + 1) * 0.5], "lora": paths[i]}
            for i in range(2)]
    spec = dict(prompt="two friends in a garden", height=a.size, width=a.size, steps=a.steps, sampler=a.sampler,
                guidance=a.guidance, regions=regs)
    rows = []
    for _ in range(a.runs):
        parts = {"reinit": 0.0, "optimise": 0.0}  # "reinit" includes the preparation before it (prompts, LoRAs)
        marks = {"t": time.perf_counter()}

        def observer(event, **kw):  # called after each part: the time since the last mark is that part's
            now = time.perf_counter()
            parts[event] = parts.get(event, 0.0) + now - marks["t"]
            marks["t"] = now

        def callback(i, n, **kw):  # after each step's CFG pass and sampler step
            now = time.perf_counter()
            parts["cfg"] = parts.get("cfg", 0.0) + now - marks["t"]
            marks["t"] = now

        t0 = time.perf_counter()
        lat, info = compose_latents(pipe, ComposeSpec.from_dict(spec), observer=observer, callback=callback)
        t1 = time.perf_counter()
        pipe.decode(lat)
        t2 = time.perf_counter()
        rows.append({"total_s": t2 - t0, "loop_s": t1 - t0, "decode_s": t2 - t1, **{f"{k}_s": v for k, v in parts.items()},
                     "optimised_steps": info["optimised_steps"], "reinit": info["reinit"]})
        print(rows[-1])
    total = statistics.median(r["total_s"] for r in rows)
    write_result("fewstep_cpu.json", {"size": a.size, "steps": a.steps, "sampler": a.sampler, "guidance": a.guidance,
                                      "concepts": 2, "weights": "random, SD1.5 sizes", "dtype": "fp32",
                                      "prepacked_convs": not a.no_prepack, "allocator": "tuned",
                                      "runs": rows, "median_total_s": total, "peak_rss_mb": peak_rss_mb(),
                                      "target": "<= 180 s", "ok": total <= 180})


if __name__ == "__main__":
    main()
