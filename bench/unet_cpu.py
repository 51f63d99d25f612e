"""Our SD1.5-sized UNet against diffusers' on CPU: 512×512, batch 2 (CFG), fp32, same weights and threads.

    python bench/unet_cpu.py [--runs 5]     # writes bench/results/unet_cpu.json

Median wall time of one UNet forward each; runs alternate between the two models so that drift in
machine load hits both alike. Target: ratio ours/diffusers ≤ 1.0.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _common import write_result
from composer.unet import UNet, UNetConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(UNetConfig().to_diffusers()).eval()
    ours = UNet(UNetConfig()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 4, a.size // 8, a.size // 8), torch.randn(2, 77, 768)
    t = torch.tensor(500)
    times = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        ref(x, t, ctx), ours(x, t, ctx)  # warm-up
        for _ in range(a.runs):
            for name, fn in (("diffusers", lambda: ref(x, t, ctx).sample), ("ours", lambda: ours(x, t, ctx))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["diffusers"]
    print(f"threads={torch.get_num_threads()} ours {med['ours']:.2f}s diffusers {med['diffusers']:.2f}s ratio {ratio:.3f}")
    write_result("unet_cpu.json", {"shape": f"2x4x{a.size // 8}x{a.size // 8}", "dtype": "fp32", "runs": a.runs,
                                   "median_s": med, "all_s": times, "ratio_ours_over_diffusers": ratio})


if __name__ == "__main__":
    main()
