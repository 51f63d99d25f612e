"""Extra time and memory of image conditions: one CFG denoising step (batch 2) at 512² on SD1.5-sized random
weights, CPU fp32, with no condition, one and two T2I-Adapters (full, 320/640/1280/1280) and one and two
ControlNets (the SD1.5 encoder + hint encoder). Each case runs in its own process (peak RSS is per process); the
condition models are written in their original single-file layouts and read back by the real loaders.

    python bench/conditions_cpu.py [--size 512] [--runs 3]     # -> bench/results/conditions_cpu.json

What a step costs: a T2I-Adapter runs once per image (its features do not depend on the latent or the step, and
are cached), so it adds almost nothing per step; a ControlNet runs its encoder on the CFG batch every step.
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
from compose_cpu import build_pipe  # noqa: E402

CASES = (("none", 0), ("t2i-adapter", 1), ("t2i-adapter", 2), ("controlnet", 1), ("controlnet", 2))


def random_init(m, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return m


def write_models(tmp: str, kind: str, n: int) -> list:
    """SD1.5-sized random condition models in their original layouts (what users download)."""
    import torch
    from PIL import Image
    from composer.io import save_safetensors
    out = []
    for i in range(n):
        model = os.path.join(tmp, f"{kind}{i}.safetensors")
        image = os.path.join(tmp, f"cond{i}.png")
        if not os.path.exists(model):
            if kind == "t2i-adapter":
                from composer.t2i_adapter import T2IAdapter, original_state_dict
                save_safetensors(original_state_dict(random_init(T2IAdapter(), 10 + i)), model)
            else:
                from composer.controlnet import ControlNet, ldm_state_dict
                save_safetensors(ldm_state_dict(random_init(ControlNet(), 20 + i)), model)
        if not os.path.exists(image):
            g = torch.Generator().manual_seed(i)
            Image.fromarray((torch.rand(512, 512, 3, generator=g) * 255).byte().numpy()).save(image)
        out.append({"kind": kind, "model": model, "image": image, "weight": 1.0})
    return out


def child(kind: str, n: int, size: int, runs: int, tmp: str):
    import torch
    from composer.conditions import build_conditions
    pipe = build_pipe()
    entries = write_models(tmp, kind, n) if n else []
    base_rss = rss_mb()
    t_build = time.perf_counter()
    conds = build_conditions(pipe, entries, size, size, where="bench") if entries else None
    t_build = time.perf_counter() - t_build
    x = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    ctx = pipe.encode_prompt(["", "two friends in a garden"])
    times = []
    with torch.no_grad():
        for r in range(runs + 1):  # the first is warm-up (and, for adapters, computes their features)
            t0 = time.perf_counter()
            pipe.eps(x, torch.tensor(500), ctx, 7.5, conditions=conds.at(0, 20) if conds is not None else None)
            if r:
                times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    print(json.dumps({"kind": kind, "n": n, "median_step_s": statistics.median(times), "all_s": times,
                      "load_s": t_build, "rss_after_base_mb": base_rss, "peak_rss_mb": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--tmp")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.size, a.runs, a.tmp)
    from _common import write_result
    tmp = tempfile.mkdtemp()
    rows = []
    for kind, n in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), "--size", str(a.size), "--runs",
                              str(a.runs), "--tmp", tmp], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(out.returncode)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    base = rows[0]
    for r in rows[1:]:
        r["extra_step_s"] = r["median_step_s"] - base["median_step_s"]
        r["step_vs_none"] = r["median_step_s"] / base["median_step_s"]
        r["extra_peak_mb"] = r["peak_rss_mb"] - base["peak_rss_mb"]
    write_result("conditions_cpu.json", {"size": a.size, "batch": "2 (CFG)", "dtype": "fp32", "runs": a.runs,
                                         "weights": "random, SD1.5 sizes", "rows": rows})


if __name__ == "__main__":
    main()
