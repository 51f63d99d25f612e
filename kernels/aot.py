"""Compile the Triton kernels ahead of time for a GPU target without a GPU (ptxas ships with Triton), and report
shared memory per program against the target's limit.

    python -m kernels.aot [--arch 90] [--quick] [--out FILE.csv]

Catches compile errors and over-budget tiles on machines that have no GPU. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912, 86: 101376, 100: 232448}  # bytes per block (opt-in maximum)


def _signatures(ptr):
    """Argument names per kernel, and the types of the non-tensor-of-dtype arguments."""
    f, i = "fp32", "i32"
    return {
        "self_fwd": ["Q", "K", "V", "O", "LSE", "LAB", "TABLE", "N", "H", "D", "DV", "NQB", "NKB", "scale2"],
        "self_dkdv": ["Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV_", "LAB", "TABLE", "N", "H", "D", "DV", "NQB", "NKB",
                      "scale", "scale2"],
        "self_dq": ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "LAB", "TABLE", "N", "H", "D", "DV", "NQB", "NKB", "scale",
                    "scale2"],
        "cross_fwd": ["Q", "K", "V", "O", "LSE", "REG", "N", "H", "S", "L", "D", "DV", "scale2"],
        "cross_dq": ["Q", "K", "V", "DO", "LSE", "REG", "CNT", "DQ", "N", "H", "S", "L", "D", "DV", "scale", "scale2"],
        "cross_dkdv": ["Q", "K", "V", "DO", "LSE", "REG", "CNT", "DK", "DV_", "N", "H", "S", "L", "D", "DV", "NQB", "scale",
                       "scale2"],
    }, {"LSE": "*fp32", "DELTA": "*fp32", "CNT": "*fp32", "LAB": "*i64", "REG": "*i64", "TABLE": "*i8",
        "scale": f, "scale2": f, **{k: i for k in ("N", "H", "D", "DV", "NQB", "NKB", "S", "L")}}


def compile_all(dtypes=("fp16", "bf16", "fp32"), head_dims=(64, 128, 256), arch=90):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1 (the kernels must be real JIT functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from . import triton_attention as T
    fns = {"self_fwd": T._self_fwd_kernel, "self_dkdv": T._self_bwd_dkdv_kernel, "self_dq": T._self_bwd_dq_kernel,
           "cross_fwd": T._cross_fwd_kernel, "cross_dq": T._cross_bwd_dq_kernel, "cross_dkdv": T._cross_bwd_dkdv_kernel}
    rows = []
    for dt in dtypes:
        prec = "ieee" if dt == "fp32" else "tf32"
        for bd in head_dims:
            blk = 64 if bd <= 128 else 32
            for name, fn in fns.items():
                sigs, types = _signatures(f"*{dt}")
                sig = {a: types.get(a, f"*{dt}") for a in sigs[name]}
                consts = dict(BM=blk, BD=bd, BDV=bd, PREC=prec)
                consts.update(dict(BN=blk) if name.startswith("self") else dict(BL=128))
                t0 = time.time()
                row = dict(arch=f"sm_{arch}", triton=triton.__version__, dtype=dt, head_dim_padded=bd, block=blk, kernel=name)
                try:
                    k = triton.compile(ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in consts}},
                                                 constexprs=consts), target=GPUTarget("cuda", arch, 32))
                    smem = int(k.metadata.shared)
                    row.update(status="ok", shared_bytes=smem, fits=smem <= SMEM_LIMIT.get(arch, 101376))
                except Exception as e:  # report, keep going
                    row.update(status=f"error: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
                row["compile_s"] = round(time.time() - t0, 1)
                rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="fp16 only, head dims 64 and 256")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = compile_all(("fp16",), (64, 256), a.arch) if a.quick else compile_all(arch=a.arch)
    keys = list(rows[0])
    for k in ("shared_bytes", "fits"):
        if k not in keys:
            keys.append(k)
    w = csv.DictWriter(open(a.out, "w", newline="") if a.out else sys.stdout, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    bad = [r for r in rows if r["status"] != "ok" or not r.get("fits", False)]
    return 1 if any(r["status"] != "ok" for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
