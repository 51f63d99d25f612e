"""End-to-end GPU memory of a 2-concept 1024×768 composition with the latent optimisation on SD1.5-sized
random weights (fp16 UNet/text encoder, fp32 VAE), a few steps, kernels on ``auto`` (Triton).

    python bench/e2e_gpu.py [--steps 3] [--attention auto]     # writes $OUT or bench/results/e2e_gpu.json

Target: peak GPU memory ≤ 8 GB (the official code: 56 GB, 39 GB on its optimized branch).
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1024)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    from _common import write_result
    from composer.clip import CLIPTextConfig, CLIPTextModel
    from composer.compose import ComposeSpec, compose_latents
    from composer.pipeline import Pipeline
    from composer.schedulers import SchedulerConfig
    from composer.tiny import byte_tokenizer, random_edlora
    from composer.unet import UNet, UNetConfig
    from composer.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    dev = "cuda"
    with torch.device("meta"):
        unet, te, vae = UNet(UNetConfig(), a.attention), CLIPTextModel(CLIPTextConfig(), a.attention), AutoencoderKL(VAEConfig())
    for m, dt in ((unet, torch.float16), (te, torch.float16), (vae, torch.float32)):
        m.to_empty(device=dev)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
        m.to(dt)
    pipe = Pipeline(unet.eval(), te.eval(), vae.eval(), byte_tokenizer(), SchedulerConfig(), dtype=torch.float16, device=dev)
    tmp = tempfile.mkdtemp()
    paths = []
    for i in range(2):
        p = os.path.join(tmp, f"c{i}.pth")
        torch.save(random_edlora(pipe, [f"<c{i}a>", f"<c{i}b>"], seed=i, emb_std=0.02), p)
        paths.append(p)
    spec = ComposeSpec.from_dict(dict(
        prompt="a woman and a man, near the castle, 4K, high quality", height=a.height, width=a.width, steps=a.steps,
        seed=18067, regions=[
            {"prompt": "a <c0a> <c0b>, in hogwarts school uniform, near the castle", "box": [10, 10, 767, 310], "lora": paths[0]},
            {"prompt": "a <c1a> <c1b>, in hogwarts school uniform, near the castle", "box": [70, 350, 767, 650], "lora": paths[1]}]))
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lat, info = compose_latents(pipe, spec)
    img = pipe.decode(lat)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    res = {"device": torch.cuda.get_device_name(), "attention": a.attention, "size": f"{a.width}x{a.height}",
           "steps": a.steps, "optimised_steps": info["optimised_steps"], "finite": bool(torch.isfinite(img).all()),
           "weights_gb": weights / 2**30, "peak_gb": peak / 2**30, "seconds": dt, "seconds_per_step": dt / a.steps,
           "target_gb": 8.0, "ok": peak / 2**30 <= 8.0}
    print(json.dumps(res, indent=1))
    write_result("e2e_gpu.json", res)


if __name__ == "__main__":
    main()
