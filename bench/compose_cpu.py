"""Time and peak memory of 2- and 4-concept compositions against plain generate() on SD1.5-sized random
weights, CPU fp32, same size and steps. Each case runs in its own process (peak RSS is per process).

    python bench/compose_cpu.py [--size 512] [--steps 3]     # writes bench/results/compose_cpu.json

Concepts are ED-LoRA-shaped (rank 4 on every attn1/attn2 q/k/v/out and the text encoder attention, 2
pseudo-words × [16, 768]). With steps ≤ 25 every step runs the latent optimisation (loss forward + backward),
so this is the method's most expensive regime. Target: 4-concept peak ≤ 1.3× plain generation's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import peak_rss_mb, rss_mb  # noqa: E402




def build_pipe():
    import torch
    from composer.clip import CLIPTextConfig, CLIPTextModel
    from composer.pipeline import Pipeline
    from composer.schedulers import SchedulerConfig
    from composer.tiny import byte_tokenizer
    from composer.unet import UNet, UNetConfig
    from composer.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    with torch.device("meta"):
        models = [UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig()), AutoencoderKL(VAEConfig())]
    for m in models:
        m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return Pipeline(models[0].eval(), models[1].eval(), models[2].eval(), byte_tokenizer(), SchedulerConfig())


def child(case: str, n: int, size: int, steps: int, runs: int, tmp: str):
    import torch
    from composer.compose import ComposeSpec, compose_latents
    from composer.tiny import random_edlora
    pipe = build_pipe()
    paths = []
    for i in range(n):
        p = os.path.join(tmp, f"c{i}.pth")
        if not os.path.exists(p):
            torch.save(random_edlora(pipe, [f"<c{i}a>", f"<c{i}b>"], seed=i, emb_std=0.02), p)
        paths.append(p)
    base_rss = rss_mb()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        if case == "generate":
            lat = pipe.sample_latents("a photo of friends in a garden", height=size, width=size, steps=steps,
                                      sampler="dpm++2m")
        else:
            w = 1.0 / n
            regs = [{"prompt": f"a <c{i}a> <c{i}b>, smiling", "box": [0.1, i * w, 0.95, (i + 1) * w], "lora": paths[i]}
                    for i in range(n)]
            lat, info = compose_latents(pipe, ComposeSpec.from_dict(dict(
                prompt="a photo of friends in a garden", height=size, width=size, steps=steps, regions=regs)))
        pipe.decode(lat)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    print(json.dumps({"case": case, "concepts": n, "median_s": statistics.median(times), "all_s": times,
                      "rss_after_model_mb": base_rss, "peak_rss_mb": peak, "peak_over_model_mb": peak - base_rss}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--tmp")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.size, a.steps, a.runs, a.tmp)
    from _common import write_result
    tmp = tempfile.mkdtemp()
    rows = []
    for case, n in (("generate", 0), ("compose", 2), ("compose", 4)):
        out = subprocess.run([sys.executable, __file__, "--child", case, str(n), "--size", str(a.size), "--steps",
                              str(a.steps), "--runs", str(a.runs), "--tmp", tmp], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(out.returncode)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    g = rows[0]
    for r in rows[1:]:
        r["time_vs_generate"] = r["median_s"] / g["median_s"]
        r["peak_vs_generate"] = r["peak_rss_mb"] / g["peak_rss_mb"]
        r["peak_over_model_vs_generate"] = r["peak_over_model_mb"] / max(g["peak_over_model_mb"], 1e-9)
    write_result("compose_cpu.json", {"size": a.size, "steps": a.steps, "dtype": "fp32", "runs": a.runs,
                                      "weights": "random, SD1.5 sizes", "rows": rows,
                                      "target": "4-concept peak <= 1.3x plain generation",
                                      "ok": rows[2]["peak_vs_generate"] <= 1.3})


if __name__ == "__main__":
    main()
