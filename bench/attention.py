"""Attention benchmark: LoRA-Composer's masked attention at SD1.5 shapes, every provider, with a correctness
check before any timing. Rows go to a CSV with device, torch and triton versions.

    python bench/attention.py [--out bench/results/attention_gpu.csv] [--budget-s 240] [--smoke]

Shapes: 512² and 1024×768, self and cross at every level (N = 4096 … 64 and 12288 … 192), 2 and 5 regions
laid out as in the paper's scripts (upright boxes, overlapping neighbours for 5), fp16 and bf16, forward and
forward+backward. Providers: triton (ours), flex (FlexAttention + BlockMask from the same labels),
sdpa+dense (SDPA with the official dense additive mask, [B·H, N, N] as the official code builds it),
math (the dense PyTorch reference). "useful TFLOP/s" counts only allowed (query, key) pairs: 4·D FLOPs
per pair forward, 2.5× that for forward+backward. Peak memory is torch.cuda.max_memory_allocated above
the inputs. ``--smoke`` runs tiny shapes on CPU to check the script itself.
"""
import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

import kernels

LEVELS = {  # (h, w, head dim) per level, SD1.5
    "512": [(64, 64, 40), (32, 32, 80), (16, 16, 160), (8, 8, 160)],
    "1024x768": [(96, 128, 40), (48, 64, 80), (24, 32, 160), (12, 16, 160)],
}


def layout(h, w, n_regions):
    """Region bitmasks [h·w]: the '2real' boxes for 2 regions, 5 overlapping upright strips for 5."""
    if n_regions == 2:
        boxes = [(10 / 768, 10 / 1024, 767 / 768, 310 / 1024), (70 / 768, 350 / 1024, 767 / 768, 650 / 1024)]
    else:
        boxes = [(0.1, i * 0.18, 0.98, i * 0.18 + 0.24) for i in range(n_regions)]
    r = torch.zeros(h, w, dtype=torch.int64)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        r[math.ceil(y0 * h):math.floor(y1 * h), math.ceil(x0 * w):math.floor(x1 * w)] |= 1 << i
    return r.flatten()


def allowed_pairs(r, kind, L=77):
    lab = kernels.labels(r)
    n = len(r)
    if kind == "cross":
        return float((kernels.popcount(r).clamp(min=1)).sum()) * L
    nb = int((lab == 0).sum())
    tot = nb * n + int((lab < 0).sum()) * nb
    for a in lab[lab > 0].unique().tolist():
        na = int((lab == a).sum())
        tot += na * (nb + na)
    return float(tot)


def make_inputs(kind, n, d, slots, dtype, device, grad):
    b, h = 2, 8
    q = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=grad)
    if kind == "self":
        k = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=grad)
        v = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=grad)
    else:
        k = torch.randn(b, h, slots, 77, d, device=device, dtype=dtype, requires_grad=grad)
        v = torch.randn(b, h, slots, 77, d, device=device, dtype=dtype, requires_grad=grad)
    return q, k, v


def provider_fn(name, kind, r, q, k, v):
    if name in ("triton", "flex", "segmented", "math"):
        be = "torch" if name == "math" else name
        f = kernels.isolated_self_attention if kind == "self" else kernels.regional_cross_attention
        return lambda: f(q, k, v, r, backend=be)
    if name == "sdpa+dense":
        b, h, n, d = q.shape
        if kind == "self":  # the official construction: additive −1e6 bias, [B·H, N, N], activation dtype
            bias = (kernels.isolation_cost(r, r).to(q.dtype) * -1e6)[None].expand(b * h, n, n).contiguous()
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, h, n, n))
        # cross without a fused kernel: one SDPA per slot over all queries, then a masked mean
        bits = torch.arange(k.shape[2] - 1, device=r.device)
        act = torch.cat([(r == 0)[None], ((r[None] >> bits[:, None]) & 1).bool()]).to(q.dtype)  # [S, N]
        w = act / act.sum(0, keepdim=True)

        def run():
            o = 0
            for s in range(k.shape[2]):
                o = o + torch.nn.functional.scaled_dot_product_attention(q, k[:, :, s], v[:, :, s]) * w[s][:, None]
            return o
        return run
    raise ValueError(name)


def timer(fn, device):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                                                  "attention_gpu.csv"))
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if device == "cpu" and not a.smoke:
        raise SystemExit("no CUDA device: run with --smoke to check the script on CPU")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "-"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    if a.smoke:
        levels = {"smoke": [(8, 8, 40), (4, 4, 80)]}
        providers, dtypes, regs = ["segmented", "math", "sdpa+dense"], [torch.float32], [2]
    else:
        levels = LEVELS
        providers, dtypes, regs = ["triton", "flex", "sdpa+dense", "math"], [torch.float16, torch.bfloat16], [2, 5]
    t_start = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    fields = ["device", "torch", "triton", "res", "kind", "h", "w", "N", "D", "regions", "dtype", "mode", "provider",
              "median_ms", "useful_tflops", "peak_mb", "max_err_vs_fp32", "status"]
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        # largest shapes first: the 12,288-token rows are the ones the targets speak of
        for res in sorted(levels, key=lambda x: x != "1024x768"):
            for (h, w, d) in levels[res]:
                n = h * w
                for nreg in regs:
                    r = layout(h, w, nreg).to(device)
                    for kind in ("self", "cross"):
                        pairs = allowed_pairs(r.cpu(), kind)
                        for dtype in dtypes:
                            for mode in ("fwd", "fwd+bwd"):
                                grad = mode == "fwd+bwd"
                                torch.manual_seed(0)
                                q, k, v = make_inputs(kind, n, d, nreg + 1, dtype, device, grad)
                                ref = None
                                for prov in providers:
                                    row = dict(device=dev_name, torch=torch.__version__, triton=tv, res=res, kind=kind,
                                               h=h, w=w, N=n, D=d, regions=nreg, dtype=str(dtype).split(".")[-1],
                                               mode=mode, provider=prov)
                                    if time.time() - t_start > a.budget_s:
                                        row["status"] = "skipped: time budget"
                                        wr.writerow(row)
                                        continue
                                    if prov in ("math", "sdpa+dense") and kind == "self" and n > 4096 and device == "cuda":
                                        # dense N×N: report its size instead of exhausting memory on the big levels
                                        need = 2 * 8 * n * n * (4 if prov == "math" else 2) / 2**20
                                        if need > 20000:
                                            row["status"] = f"skipped: dense [B·H,N,N] needs {need:.0f} MB"
                                            wr.writerow(row)
                                            continue
                                    out = None
                                    try:
                                        fn = provider_fn(prov, kind, r, q, k, v)
                                        with torch.no_grad():
                                            out = fn() if not grad else None
                                        if grad:
                                            out = fn()
                                        if ref is None:
                                            f32 = [t.detach().float() for t in (q, k, v)]
                                            with torch.no_grad():
                                                ref = (kernels.isolated_self_attention if kind == "self" else
                                                       kernels.regional_cross_attention)(*f32, r, backend="segmented")
                                        err = (out.detach().float() - ref).abs().max().item()
                                        row["max_err_vs_fp32"] = f"{err:.2e}"
                                        if not math.isfinite(err) or err > 5e-2:
                                            row["status"] = "FAILED correctness"
                                            wr.writerow(row)
                                            continue
                                        if grad:
                                            go = torch.randn_like(out)
                                            run = lambda: torch.autograd.grad(fn(), (q, k, v), go)
                                        else:
                                            def run():
                                                with torch.no_grad():
                                                    return fn()
                                        if device == "cuda":
                                            torch.cuda.synchronize()
                                            torch.cuda.reset_peak_memory_stats()
                                            base = torch.cuda.memory_allocated()
                                        ms = timer(run, device)
                                        if device == "cuda":
                                            row["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                                        flops = 4 * d * pairs * 2 * 8 * (2.5 if grad else 1.0)
                                        row.update(median_ms=round(ms, 4), useful_tflops=round(flops / ms / 1e9, 2),
                                                   status="ok")
                                    except Exception as e:  # a provider that cannot run this shape says why
                                        row["status"] = f"error: {type(e).__name__}: {str(e)[:80]}"
                                    wr.writerow(row)
                                    f.flush()
                                    del out
                                    if device == "cuda":
                                        torch.cuda.empty_cache()
                                print(f"{res} {kind} N={n} d={d} R={nreg} {str(dtype)[6:]} {mode} done "
                                      f"({time.time() - t_start:.0f}s)", flush=True)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
