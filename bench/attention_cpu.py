"""CPU path of the isolated self-attention at 4,096 tokens (SD1.5's 64×64 level at 512²), 2 regions:
the region-segmented backend against SDPA with a dense mask, forward and forward+backward, and the forward
at 1,024 and 16,384 tokens to show how the extra memory scales (linear vs quadratic).

    python bench/attention_cpu.py        # writes bench/results/attention_cpu.json

Each case runs in its own process so that peak RSS is its own; "extra" = peak RSS minus RSS once the
inputs exist. The dense baseline is the cheapest dense form, one additive fp32 [N, N] mask broadcast
over batch and heads (the official code builds [B·H, N, N]: 8× more at B·H = 16).
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import peak_rss_mb, rss_mb  # noqa: E402
B, H, D = 2, 8, 40




def regions(side):
    """Two upright boxes on a side×side grid (the same fractions at every size)."""
    import torch
    r = torch.zeros(side, side, dtype=torch.int64)
    f = lambda x: int(x * side)
    r[f(0.125):f(0.94), f(0.03):f(0.47)] |= 1
    r[f(0.06):f(0.875), f(0.53):f(0.97)] |= 2
    return r.flatten()


def child(case, mode, side):
    import torch
    import kernels
    torch.manual_seed(0)
    N = side * side
    q, k, v = (torch.randn(B, H, N, D, requires_grad=(mode == "fwd+bwd")) for _ in range(3))
    r = regions(side)
    base = rss_mb()

    def run():
        if case == "segmented":
            o = kernels.isolated_self_attention(q, k, v, r, backend="segmented")
        else:
            bias = kernels.isolation_cost(r, r).float() * -1e6  # dense [N, N]
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if mode == "fwd+bwd":
            o.sum().backward()
        return o
    ts = []
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        run()
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
    peak = peak_rss_mb()  # before the check below allocates N×N
    err = None
    if mode == "fwd" and case == "segmented":  # correctness against the dense form (one batch element)
        with torch.no_grad():
            ref = kernels.isolated_self_attention(q[:1], k[:1], v[:1], r, backend="segmented")
            bias = kernels.isolation_cost(r, r).float() * -1e6
            dense = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=bias)
            err = (ref - dense).abs().max().item()
    print(json.dumps({"backend": case, "mode": mode, "N": N, "median_ms": 1000 * statistics.median(ts),
                      "extra_peak_mb": peak - base, "max_abs_diff_vs_dense": err}))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    from _common import write_result
    rows = []
    # 4,096 tokens forward and backward (the point), plus forward at 1,024 and 16,384 for the scaling
    for side, mode in ((64, "fwd"), (64, "fwd+bwd"), (32, "fwd"), (128, "fwd")):
        for case in ("segmented", "sdpa+dense-mask"):
            out = subprocess.run([sys.executable, __file__, "--child", case, mode, str(side)], capture_output=True,
                                 text=True)
            if out.returncode:
                print(out.stderr[-2000:])
                raise SystemExit(1)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    write_result("attention_cpu.json", {"shape": f"B={B} H={H} D={D}, N in 1024/4096/16384", "regions": 2,
                                        "dtype": "fp32", "rows": rows})


if __name__ == "__main__":
    main()
