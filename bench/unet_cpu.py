"""Our SD1.5-sized UNet against diffusers' on CPU: 512×512, batch 2 (CFG), fp32, same weights and threads,
against the machine's own roofline.

    python bench/unet_cpu.py [--runs 5] [--size 512] [--profile] [--compile]
    # -> bench/results/unet_cpu.json (other sizes: unet_cpu_<size>.json)

Each allocator setting runs in its own process (glibc's malloc options must be set before the first large
allocation; see composer/runtime.py): "default" (glibc as it comes) and "tuned" (what `python -m composer.sample`
applies on CPU). Inside a process the two models alternate run by run, so drift in machine load hits both alike.

Reported per process:
- roofline probes: a 2048² fp32 matmul and an SD 3×3 convolution (320 channels at 64², batch 2), GFLOP/s;
- FLOPs of one forward: convolutions and linears counted by torch's FlopCounterMode, attention (which the
  counter does not see inside the fused CPU kernel) counted analytically, 4·B·N·M·C per attention layer;
- median wall time of ours and diffusers' forward, their ratio, achieved GFLOP/s and the fraction of the matmul
  probe it reaches;
- with --profile, where each model's time goes by op kind (convolution, linear, attention, norm, elementwise,
  copy/alloc, other);
- "ours_prepacked": ours with its conv weights pre-packed for oneDNN (composer/runtime.py prepack_convs), as the
  CLI runs on CPU; the same tensors as "ours";
- with --compile, ours under torch.compile (inductor's CPU backend), with its compile time.
Targets (issue): ours ≤ 0.85× diffusers per step; ≥ 85 % of the measured roofline.
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_s(fn, runs=5):
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def roofline():
    """GFLOP/s of a 2048² fp32 matmul and of an SD1.5 3×3 conv (the two kinds of work a UNet step is made of)."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048 ** 3 / _median_s(lambda: a @ b) / 1e9
    x, conv = torch.randn(2, 320, 64, 64), torch.nn.Conv2d(320, 320, 3, padding=1)
    with torch.inference_mode():
        cv = 2 * 2 * 320 * 320 * 9 * 64 * 64 / _median_s(lambda: conv(x)) / 1e9
    return {"matmul_2048_gflops": mm, "conv3x3_320x64x64_gflops": cv}


def attention_flops(cfg, size: int, batch: int) -> float:
    """QKᵀ and PV of every attention layer: 4·B·N·M·C (N queries, M keys, C channels)."""
    n, total = (size // 8) ** 2, 0.0
    levels = len(cfg.block_out_channels)
    # down: 2 transformers per level with attention; up: 3; mid: 1 (at the lowest resolution)
    for lvl, (ch, attn) in enumerate(zip(cfg.block_out_channels, cfg.attention_levels)):
        if not attn:
            continue
        tok = n // 4 ** lvl
        per = 4 * batch * tok * tok * ch + 4 * batch * tok * 77 * ch
        total += per * (cfg.layers_per_block + cfg.layers_per_block + 1)
    tok, ch = n // 4 ** (levels - 1), cfg.block_out_channels[-1]
    total += 4 * batch * tok * tok * ch + 4 * batch * tok * 77 * ch
    return total


KINDS = (("attention", ("attention", "sdpa", "softmax", "bmm", "baddbmm")), ("convolution", ("conv",)),
         ("linear", ("addmm", "aten::mm", "aten::linear", "aten::matmul")), ("norm", ("norm",)),
         ("copy/alloc", ("copy_", "empty", "clone", "contiguous", "cat")),
         ("elementwise", ("add", "mul", "gelu", "silu", "div", "sub", "exp", "sigmoid", "upsample", "pad")))


def breakdown(fn) -> dict:
    """Self CPU seconds of one call by op kind."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    out = collections.Counter()
    for e in p.key_averages():
        k = next((kind for kind, keys in KINDS if any(s in e.key for s in keys)), "other")
        out[k] += e.self_cpu_time_total / 1e6
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def child(a) -> dict:
    if a.allocator == "tuned":
        from composer.runtime import tune_cpu_allocator
        assert tune_cpu_allocator()
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from composer.unet import UNet, UNetConfig
    torch.manual_seed(0)
    cfg = UNetConfig()
    ref = UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    packed = UNet(cfg).eval()  # the same tensors (assign), conv weights pre-packed as the CLI runs on CPU
    packed.load_state_dict(ours.state_dict(), strict=True, assign=True)
    from composer.runtime import prepack_convs
    prepack_convs(packed)
    x, ctx, t = torch.randn(2, 4, a.size // 8, a.size // 8), torch.randn(2, 77, 768), torch.tensor(500)
    res = {"allocator": a.allocator, "roofline": roofline()}
    with torch.inference_mode():
        fc = FlopCounterMode(display=False)
        with fc:
            ours(x, t, ctx)
        counted = fc.get_total_flops()
        flops = counted + attention_flops(cfg, a.size, 2)
        res["gflop_per_forward"] = {"conv+linear (counted)": counted / 1e9, "total": flops / 1e9}
        fns = {"diffusers": lambda: ref(x, t, ctx).sample, "ours": lambda: ours(x, t, ctx),
               "ours_prepacked": lambda: packed(x, t, ctx)}
        if a.compile:
            comp = torch.compile(ours)
            t0 = time.perf_counter()
            comp(x, t, ctx)
            res["compile_s"] = time.perf_counter() - t0
            fns["ours_compiled"] = lambda: comp(x, t, ctx)
        # the same result from both (a benchmark of different computations would mean nothing)
        want = fns["diffusers"]()
        res["max_abs_diff_ours_vs_diffusers"] = (fns["ours"]() - want).abs().max().item()
        res["max_abs_diff_prepacked_vs_diffusers"] = (fns["ours_prepacked"]() - want).abs().max().item()
        res["output_max_abs"] = want.abs().max().item()
        for fn in fns.values():  # warm-up
            fn()
        times = {k: [] for k in fns}
        for _ in range(a.runs):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        if a.profile:
            res["breakdown_s"] = {k: breakdown(fns[k]) for k in ("diffusers", "ours", "ours_prepacked")}
    med = {k: statistics.median(v) for k, v in times.items()}
    mm = res["roofline"]["matmul_2048_gflops"]
    res.update(median_s=med, all_s=times, ratio_ours_over_diffusers=med["ours"] / med["diffusers"],
               ratio_prepacked_over_diffusers=med["ours_prepacked"] / med["diffusers"],
               gflops={k: flops / v / 1e9 for k, v in med.items()},
               fraction_of_matmul_roofline={k: flops / v / 1e9 / mm for k, v in med.items()})
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile (slow to compile)")
    ap.add_argument("--allocator", choices=["default", "tuned", "both"], default="both")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    from _common import write_result
    out = {"shape": f"2x4x{a.size // 8}x{a.size // 8}", "dtype": "fp32", "runs": a.runs, "processes": []}
    for alloc in (("default", "tuned") if a.allocator == "both" else (a.allocator,)):
        cmd = [sys.executable, __file__, "--child", "--allocator", alloc, "--runs", str(a.runs), "--size", str(a.size)]
        cmd += ["--profile"] * a.profile + ["--compile"] * a.compile
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        out["processes"].append(r)
        m = r["median_s"]
        print(f"[{alloc}] roofline matmul {r['roofline']['matmul_2048_gflops']:.0f} GFLOP/s, conv "
              f"{r['roofline']['conv3x3_320x64x64_gflops']:.0f}; {r['gflop_per_forward']['total']:.0f} GFLOP/forward")
        for k, v in m.items():
            print(f"[{alloc}]   {k:14s} {v:6.2f} s  {r['gflops'][k]:5.1f} GFLOP/s  "
                  f"{100 * r['fraction_of_matmul_roofline'][k]:4.1f}% of matmul")
        print(f"[{alloc}]   ratio ours/diffusers {r['ratio_ours_over_diffusers']:.3f}, prepacked/diffusers "
              f"{r['ratio_prepacked_over_diffusers']:.3f}"
              + (f"; compile {r['compile_s']:.0f} s" if "compile_s" in r else ""))
        for k, b in r.get("breakdown_s", {}).items():
            print(f"[{alloc}]   {k} by op kind: " + ", ".join(f"{n} {s:.2f}" for n, s in b.items()))
    if len(out["processes"]) == 2:
        d, tnd = out["processes"]
        out["shipped_ratio"] = {
            "what": "ours as the CLI runs it on CPU (tuned allocator, pre-packed convs) over diffusers as users run "
                    "it (glibc defaults)",
            "ratio": tnd["median_s"]["ours_prepacked"] / d["median_s"]["diffusers"]}
        print(f"ours (tuned, as the CLI runs) / diffusers (defaults): {out['shipped_ratio']['ratio']:.3f}")
    write_result("unet_cpu.json" if a.size == 512 else f"unet_cpu_{a.size}.json", out)


if __name__ == "__main__":
    main()
