"""Attention benchmark: LoRA-Composer's masked attention at SD1.5 shapes, every provider, correctness first.

    python bench/attention.py [--out bench/results/attention_gpu.csv] [--budget-s 240] [--smoke]

Rows come in the order the targets need them (a time limit keeps what was measured: rows go to
``<out>.partial`` as they are measured, renamed at the end): isolated self-attention fp16 at N = 12,288 and
4,096 (R = 2 and R = 5, forward, then forward+backward), then bf16, then cross-attention, then the small levels.

Providers: ``triton`` (ours), ``flex`` (the fair baseline: FlexAttention on the same region-sorted tokens,
sorted outside the timed region, with a compiled BlockMask cached per layout), ``sdpa+dense`` (the official
construction: a [B·H, N, N] additive −1e6 bias; SDPA pinned to EFFICIENT), ``sdpa+cached`` (N <= 1,024: a
boolean [1, 1, N, N] mask built once, EFFICIENT), ``sdpa-flash`` (no mask at all, FLASH: the floor any masked
kernel is measured against), ``math`` (the dense reference, N <= 4,096). Cross-attention: ``sdpa+dense`` is
one SDPA per slot over all queries plus a masked mean.

Correctness gate (before timing): relative error max|x − ref| / max|ref| against the fp32 segmented result must
be <= 2× the same-precision PyTorch error (the segmented path run in fp16/bf16) + 1e-3, for the output and, in
forward+backward rows, for dq, dk, dv. A kernel that ignores the mask fails it (checked in --smoke).
"useful TFLOP/s" counts allowed (query, key) pairs only: 4·D FLOPs per pair forward, 3.5× for forward+backward;
"tile TFLOP/s" (triton) counts the tiles the kernel computes. Peak memory is measured on one separate call
(torch.cuda.max_memory_allocated above the inputs), so do_bench's L2-flush buffer is not in it.
``--smoke`` runs tiny shapes on CPU to check the script and the gate.
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch

import kernels
from _common import RowWriter

LEVELS = {  # (h, w, head dim) per level, SD1.5
    "1024x768": [(96, 128, 40), (48, 64, 80), (24, 32, 160), (12, 16, 160)],
    "512": [(64, 64, 40), (32, 32, 80), (16, 16, 160), (8, 8, 160)],
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16 tensor-core peak (kernels.md §9)
FIELDS = ["device", "torch", "triton", "time", "res", "kind", "h", "w", "N", "D", "regions", "dtype", "mode",
          "provider", "sdpa_backend", "median_ms", "p20_ms", "p80_ms", "useful_tflops", "tile_tflops", "pct_peak",
          "peak_mb", "rel_err", "grad_rel_err", "gate", "status"]


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


def cases(levels, dtypes, regs):
    """(res, (h, w, d), kind, regions, dtype, mode) in the order the targets need them."""
    top = [(res, lv[0]) for res, lv in levels.items()]  # N = 12,288 and 4,096 (d = 40)
    small = [(res, x) for res, lv in levels.items() for x in lv[1:]]
    out = []
    for kind in ("self", "cross"):
        for dt in dtypes:
            out += [(res, s, kind, nr, dt, m) for res, s in top for nr in regs for m in ("fwd", "fwd+bwd")]
    for dt in dtypes:
        out += [(res, s, kind, nr, dt, m) for res, s in small for kind in ("self", "cross") for nr in regs
                for m in ("fwd", "fwd+bwd")]
    return out


def make_inputs(kind, n, d, slots, dtype, device, b=2, h=8):
    """q, k, v as the UNet makes them: head-split views of [B, N, H·D]; cross K/V stacked [B, H, S, L, D]."""
    def rows():
        return torch.randn(b, n, h * d, device=device, dtype=dtype).view(b, n, h, d).transpose(1, 2)
    q = rows()
    if kind == "self":
        return q, rows(), rows()
    return q, torch.randn(b, h, slots, 77, d, device=device, dtype=dtype), torch.randn(b, h, slots, 77, d, device=device,
                                                                                       dtype=dtype)


def _pin(backend):
    """SDPA pinned to one backend (recorded in the row); unpinned on CPU."""
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend is None:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, backend)])


def provider(name, kind, r, q, k, v, device):
    """-> (fn() -> output in token order, inputs to differentiate, sdpa backend or '', ok to gate)."""
    F = torch.nn.functional
    cuda = device == "cuda"
    f = kernels.isolated_self_attention if kind == "self" else kernels.regional_cross_attention
    if name in ("triton", "segmented", "math"):
        be = "torch" if name == "math" else name
        return (lambda: f(q, k, v, r, backend=be)), (q, k, v), "", True
    if name == "flex":  # the fair Flex: sorted outside the timed region, BlockMask compiled and cached
        from kernels import flex as FX
        lay = FX.plan(r)
        qs = FX.sort_tokens(q.detach(), lay.perm).requires_grad_(q.requires_grad)
        if kind == "self":
            ks = FX.sort_tokens(k.detach(), lay.perm).requires_grad_(k.requires_grad)
            vs = FX.sort_tokens(v.detach(), lay.perm).requires_grad_(v.requires_grad)
            bm = FX.self_block_mask(r, q.shape[2], q.device)
            return (lambda: FX.flex_sorted(qs, ks, vs, bm, q.shape[-1] ** -0.5)), (qs, ks, vs), "", "sorted"
        masks = FX.cross_block_masks(r, q.shape[2], k.shape[2], k.shape[3], q.device)
        kk = [k[:, :, s].detach().contiguous().requires_grad_(k.requires_grad) for s in range(k.shape[2])]
        vv = [v[:, :, s].detach().contiguous().requires_grad_(v.requires_grad) for s in range(k.shape[2])]
        w = lay.inv_cnt[:, None, :, None].to(q.dtype)

        def run():
            o = 0
            for s, bm in enumerate(masks):
                if bm is not None:
                    o = o + FX.flex_sorted(qs, kk[s], vv[s], bm, q.shape[-1] ** -0.5)
            return o * w
        return run, (qs, *kk, *vv), "", "sorted"
    if name == "sdpa-flash":  # the floor: no mask at all (a different function: not gated)
        if kind != "self":
            return None
        return (lambda: F.scaled_dot_product_attention(q, k, v)), (q, k, v), "FLASH_ATTENTION" if cuda else "", False
    if name == "sdpa+dense":
        b, h, n, d = q.shape
        be = "EFFICIENT_ATTENTION" if cuda else None
        if kind == "self":  # the official construction: additive −1e6 bias, [B·H, N, N], activation dtype
            bias = (kernels.isolation_cost(r, r).to(q.dtype) * -1e6)[None].expand(b * h, n, n).contiguous()

            def run():
                with _pin(be):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, h, n, n))
            return run, (q, k, v), be or "", True
        bits = torch.arange(k.shape[2] - 1, device=r.device)
        act = torch.cat([(r == 0)[None], ((r[None] >> bits[:, None]) & 1).bool()]).to(q.dtype)  # [S, N]
        wt = act / act.sum(0, keepdim=True)

        def run():
            o = 0
            with _pin(be):
                for s in range(k.shape[2]):
                    o = o + F.scaled_dot_product_attention(q, k[:, :, s], v[:, :, s]) * wt[s][:, None]
            return o
        return run, (q, k, v), be or "", True
    if name == "sdpa+cached":  # a boolean mask built once per layout (exact, blocked rows included)
        if kind != "self":
            return None
        c = kernels.isolation_cost(r, r)
        mask = (c == c.min(-1, keepdim=True).values)[None, None]
        be = "EFFICIENT_ATTENTION" if cuda else None

        def run():
            with _pin(be):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return run, (q, k, v), be or "", True
    if name == "ignore-mask":  # smoke only: must fail the gate
        return (lambda: F.scaled_dot_product_attention(q, k, v) if kind == "self" else
                F.scaled_dot_product_attention(q, k[:, :, 0], v[:, :, 0])), (q, k, v), "", True
    raise ValueError(name)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def timer(fn, device):
    """(median, p20, p80) ms."""
    if device == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts), min(ts), max(ts)


def tile_flops(r, n, d, b, h, kind):
    """FLOPs over the tiles our forward kernel computes (its tile lists), 4·BM·BN·D per tile."""
    from kernels import ops
    from kernels import triton_attention as T
    plans = ops.plans_for(r)
    if kind == "self":
        t = T.tiles_for("self_fwd", d, d, n, torch.float16)
        tiles = int(plans.lists(t.bm, t.bn)[0].cnt[..., 1].sum())
        return tiles * t.bm * t.bn * 4 * d * h * (b if plans.lay.perm.shape[0] == 1 else 1)
    t = T.tiles_for("cross_fwd", d, d, n, torch.float16)
    blocks = int(plans.cross(r.max().item().bit_length() + 1, t.bm)[0].cnt[..., 1].sum())
    return blocks * t.bm * sum(T.key_tiles(77)) * 4 * d * h * b


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
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in dev_name), None)
    if a.smoke:
        levels = {"smoke": [(8, 8, 40), (4, 4, 80)]}
        dtypes, regs = [torch.float32], [2]
        self_prov = ["segmented", "math", "sdpa+dense", "sdpa+cached", "ignore-mask"]
        cross_prov = ["segmented", "math", "sdpa+dense", "ignore-mask"]
        if os.environ.get("TRITON_INTERPRET") == "1":
            self_prov.insert(0, "triton")
            cross_prov.insert(0, "triton")
    else:
        levels, dtypes, regs = LEVELS, [torch.float16, torch.bfloat16], [2, 5]
        self_prov = ["triton", "flex", "sdpa+dense", "sdpa-flash", "math", "sdpa+cached"]
        cross_prov = ["triton", "flex", "sdpa+dense", "math"]
    bsz, heads = (1, 2) if a.smoke else (2, 8)
    t_start = time.time()
    out = RowWriter(a.out, FIELDS)
    failed_gate = []
    for res, (h, w, d), kind, nreg, dtype, mode in cases(levels, dtypes, regs):
        n = h * w
        grad = mode == "fwd+bwd"
        r = layout(h, w, nreg).to(device)
        pairs = allowed_pairs(r.cpu(), kind)
        torch.manual_seed(0)
        q, k, v = make_inputs(kind, n, d, nreg + 1, dtype, device, bsz, heads)
        fn_ref = kernels.isolated_self_attention if kind == "self" else kernels.regional_cross_attention
        # references: fp32 segmented, and the same-precision PyTorch result (segmented in dtype)
        x32 = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
        xlo = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            ref = fn_ref(*x32, r, backend="segmented")
            lo = fn_ref(*xlo, r, backend="segmented")
        go = torch.randn_like(ref)
        ref_g = torch.autograd.grad(ref, x32, go) if grad else None
        lo_g = torch.autograd.grad(lo, xlo, go.to(dtype)) if grad else None
        err_pt = rel(lo.detach(), ref.detach())
        gerr_pt = max(rel(x, y) for x, y in zip(lo_g, ref_g)) if grad else 0.0
        for prov in (self_prov if kind == "self" else cross_prov):
            row = dict(device=dev_name, torch=torch.__version__, triton=tv, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       res=res, kind=kind, h=h, w=w, N=n, D=d, regions=nreg, dtype=str(dtype).split(".")[-1],
                       mode=mode, provider=prov)
            if time.time() - t_start > a.budget_s:
                out.write(dict(row, status="skipped: time budget"))
                continue
            if prov == "math" and n > 4096 or prov == "sdpa+cached" and n > 1024:
                continue
            if prov == "flex" and grad and device == "cpu":
                continue  # FlexAttention has no CPU backward
            try:
                got = provider(prov, kind, r, q.detach().requires_grad_(grad), k.detach().requires_grad_(grad),
                               v.detach().requires_grad_(grad), device)
                if got is None:
                    continue
                fn, inputs, sdpa_be, gated = got
                row["sdpa_backend"] = sdpa_be
                with torch.set_grad_enabled(grad):
                    o = fn()
                if gated:
                    from kernels import flex as FX
                    o_tok = FX.unsort_tokens(o.detach(), FX.plan(r).perm) if gated == "sorted" else o.detach()
                    e = rel(o_tok, ref.detach())
                    row["rel_err"] = f"{e:.2e}"
                    ok = math.isfinite(e) and e <= 2 * err_pt + 1e-3
                    if grad:
                        g = torch.autograd.grad(o, inputs, go.to(o.dtype) if gated is True else
                                                FX.sort_tokens(go, FX.plan(r).perm).to(o.dtype))
                        if gated == "sorted":  # back to token order; cross K/V grads per slot
                            g = [FX.unsort_tokens(g[0], FX.plan(r).perm)] + (
                                [FX.unsort_tokens(x, FX.plan(r).perm) for x in g[1:]] if kind == "self" else
                                [torch.stack(g[1:1 + k.shape[2]], 2), torch.stack(g[1 + k.shape[2]:], 2)])
                        ge = max(rel(x, y) for x, y in zip(g, ref_g))
                        row["grad_rel_err"] = f"{ge:.2e}"
                        ok = ok and math.isfinite(ge) and ge <= 2 * gerr_pt + 1e-3
                    row["gate"] = f"<= {2 * err_pt + 1e-3:.1e}" + (f" / {2 * gerr_pt + 1e-3:.1e}" if grad else "")
                    if not ok:
                        failed_gate.append(prov)
                        out.write(dict(row, status="FAILED correctness"))
                        continue
                del o
                if grad:
                    gy = go.to(dtype)  # same shape in token or sorted order; only the timing depends on it

                    def run(fn=fn, inputs=inputs):
                        return torch.autograd.grad(fn(), inputs, gy)
                else:
                    def run(fn=fn):
                        with torch.no_grad():
                            return fn()
                ms, p20, p80 = timer(run, device)
                if device == "cuda":  # one separate call: do_bench's 256 MB L2-flush buffer stays out
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    run()
                    torch.cuda.synchronize()
                    row["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                mult = 3.5 if grad else 1.0
                flops = (4 * d * n * n if prov == "sdpa-flash" else 4 * d * pairs) * bsz * heads * mult
                row.update(median_ms=round(ms, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                           useful_tflops=round(flops / ms / 1e9, 2), status="ok" if gated else "ok (unmasked floor)")
                if prov == "triton":
                    tf = tile_flops(r, n, d, bsz, heads, kind) * mult / ms / 1e9
                    row["tile_tflops"] = round(tf, 2)
                    if peak:
                        row["pct_peak"] = round(100 * tf / peak, 1)
            except Exception as e:  # a provider that cannot run this shape says why
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            out.write(row)
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{res} {kind} N={n} d={d} R={nreg} {str(dtype)[6:]} {mode} done ({time.time() - t_start:.0f}s)",
              flush=True)
    out.close()
    print(f"wrote {a.out}")
    if a.smoke:
        assert set(failed_gate) == {"ignore-mask"}, f"correctness gate: failed {failed_gate}, expected only ignore-mask"
        print("smoke: the gate passes every masked provider and fails the one that ignores the mask")


if __name__ == "__main__":
    main()
