"""Compile every Triton kernel ahead of time for a GPU target, without a GPU, and read what the compiler made.

    python -m kernels.aot [--arch 90] [--quick] [--jobs 2] [--out bench/results/triton_aot_sm90.csv] [--strict]

Each kernel is compiled with exactly the specialisation a JIT launch would get: the argument list comes from
the same ``*_launch`` builders the runtime uses (CPU tensors at SD1.5 shapes, so strides, alignment, ``VEC``,
``EVEN_N`` and the constexpr head dims are the real ones) and goes through Triton's own argument binder, which
sets the divisibility-by-16 attributes. For each binary: registers, spill and stack bytes (ptxas -v and
cuobjdump on the cubin), shared memory, and counts read from the PTX: ``cp.async`` copies (software-pipelined
loads) and ``wgmma`` instructions (Hopper tensor cores).

The CSV keeps rows of other Triton versions and replaces the rows of this one (column ``triton``), so one file
holds the figures of each Triton that was run. Exit code 1 when a kernel fails to compile or exceeds shared
memory; with ``--strict`` also when one spills, has no cp.async, or no wgmma. fp16 and bf16 only: on CUDA, fp32
calls take the exact segmented path (the kernels are built for 16-bit tensor-core inputs; fp32 runs them only
under the interpreter, where the CPU tests check them).
Must run without TRITON_INTERPRET (the kernels must be real JIT functions).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912, 86: 101376, 100: 232448}  # bytes per block (opt-in maximum)
SHAPES = {40: 4096, 80: 1024, 160: 256}  # head dim -> N of its 512² level (B = 2, H = 8, 2 regions, L = 77)
KERNELS = ("self_fwd", "self_dq", "self_dkdv", "cross_fwd", "cross_dq", "cross_dkdv")
COLUMNS = ["kernel", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages", "registers", "spill_bytes",
           "shared_bytes", "cp_async", "wgmma", "triton", "arch", "n", "even_n", "stack_bytes", "fits", "status",
           "compile_s"]
DTYPES = ("fp16", "bf16")  # the GPU dtypes; fp32 on CUDA takes the segmented path


def _inputs(kernel, dtype, d, n):
    """CPU tensors in the runtime's layouts: q, k, v as head-split views of [B, N, H·D] (as the UNet makes them),
    cross K/V stacked [B, H, S, L, D]; the layout: two boxes."""
    import torch
    from .plan import empty_rows, layout
    from .triton_attention import Plans
    b, h, slots, l = 2, 8, 3, 77
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]

    def rows(d_):
        return torch.zeros(b, n, h * d_, dtype=dt).view(b, n, h, d_).transpose(1, 2)
    r = torch.zeros(n, dtype=torch.int64)
    r[n // 8: n // 2] |= 1
    r[n // 3: 3 * n // 4] |= 2
    plans = Plans(layout(r))
    q = rows(d)
    if kernel.startswith("self"):
        k, v = rows(d), rows(d)
    else:
        k, v = torch.zeros(b, h, slots, l, d, dtype=dt), torch.zeros(b, h, slots, l, d, dtype=dt)
    return q, k, v, plans, empty_rows, torch


def launch_for(kernel, dtype, d, n, tiles, which=0):
    """(jit function, grid, args, meta) exactly as the runtime would launch it."""
    from . import triton_attention as T
    q, k, v, plans, empty_rows, torch = _inputs(kernel, dtype, d, n)
    b, h = q.shape[:2]
    f32 = dict(dtype=torch.float32)
    lse, delta = torch.zeros(b, h, n, **f32), torch.zeros(b, h, n, **f32)
    o = empty_rows(q, d)
    if kernel == "self_fwd":
        return T.self_fwd_launch(q, k, v, o, lse, plans.lay, plans.lists(tiles.bm, tiles.bn)[0], tiles, 1.0)
    if kernel == "self_dq":
        return T.self_dq_launch(q, k, v, o, empty_rows(q, d), lse, delta, empty_rows(q, d), plans.lay,
                                plans.lists(tiles.bm, tiles.bn)[0], tiles, 1.0)
    if kernel == "self_dkdv":
        return T.self_dkdv_launch(q, k, v, empty_rows(q, d), lse, delta, empty_rows(k, d), empty_rows(v, d), plans.lay,
                                  plans.lists(tiles.bm, tiles.bn)[1], tiles, 1.0, which)
    if kernel == "cross_fwd":
        return T.cross_fwd_launch(q, k, v, o, plans.lay, plans.cross(k.shape[2], tiles.bm)[0], tiles, 1.0)
    if kernel == "cross_dq":
        return T.cross_dq_launch(q, k, v, empty_rows(q, d), empty_rows(q, d), plans.lay,
                                 plans.cross(k.shape[2], tiles.bm)[0], tiles, 1.0)
    lists = plans.cross(k.shape[2], tiles.bm)[1]
    part = torch.zeros(4, 1, **f32)
    return T.cross_dkdv_launch(q, empty_rows(q, d), k, v, part, plans.lay, lists, tiles, 4, which, 1.0)


def _compile(fn, args, meta, arch):
    """triton.compile on Triton's own binding of (args, meta): the JIT's signature, constexprs and attrs."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(meta)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run does
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    old, knobs.nvidia.dump_ptxas_log = knobs.nvidia.dump_ptxas_log, True  # Triton prints its ptxas -v log
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    return k, buf.getvalue()


def _resources(k, arch, log):
    """(registers, spill bytes, stack bytes) of the binary: registers and stack from cuobjdump on the cubin that
    Triton produced, spill stores + loads from Triton's own ptxas -v log (ptxas is re-run on the same PTX with
    Triton's flags when the kernel came from Triton's cache and no log was printed)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        if "bytes spill" not in log:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm}", ptx, "-o",
                                  os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(tmp, "triton.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return int(re.search(r"REG:(\d+)", res).group(1)), spill, int(re.search(r"STACK:(\d+)", res).group(1))


def compile_one(job):
    kernel, dtype, d, tiles, arch, which = job
    import triton
    n = SHAPES[d]
    name = kernel if not which else f"{kernel}_{'dv' if which == 1 else 'dk'}"
    row = dict(kernel=name, dtype=dtype, head_dim=d, block_m=tiles.bm, block_n=tiles.bn, num_warps=tiles.warps,
               num_stages=tiles.stages, triton=triton.__version__, arch=f"sm_{arch}", n=n)
    t0 = time.time()
    try:
        fn, _, args, meta = launch_for(kernel, dtype, d, n, tiles, which)
        row["even_n"] = meta["EVEN_N"]
        k, log = _compile(fn, args, meta, arch)
        ptx = k.asm["ptx"]
        regs, spill, stack = _resources(k, arch, log)
        smem = int(k.metadata.shared)
        row.update(registers=regs, spill_bytes=spill, stack_bytes=stack, shared_bytes=smem,
                   cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
                   wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), fits=smem <= SMEM_LIMIT.get(arch, 101376),
                   status="ok")
    except Exception as e:  # report, keep going (the exit code says it failed)
        msg = str(e).strip().splitlines()
        row["status"] = f"error: {type(e).__name__}: {msg[0][:160] if msg else ''}"
    row["compile_s"] = round(time.time() - t0, 1)
    return row


def jobs_for(dtypes, head_dims, arch, kernels=KERNELS):
    import torch
    from .triton_attention import candidates, two_pass
    out = []
    for dt in dtypes:
        for d in head_dims:
            for kernel in kernels:
                for w in (two_pass(kernel, d, d) if kernel.endswith("dkdv") else (0,)):
                    name = kernel + ("", "_dv", "_dk")[w]
                    try:
                        cands = candidates(name, d, d, torch.float16)
                    except KeyError:  # no Triton tiling at this head dim (cross_dq at 256 lanes: PyTorch)
                        continue
                    out += [(kernel, dt, d, t, arch, w) for t in cands]
    return out


def check(rows):
    """The properties the kernels are built for: (name, problem) per violation."""
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} d={r['head_dim']} {r['block_m']}x{r['block_n']}/{r['num_warps']}w"
        if r["status"] != "ok":
            bad.append((name, r["status"]))
            continue
        if not r["fits"]:
            bad.append((name, f"shared memory {r['shared_bytes']} B over the limit"))
        if r["spill_bytes"]:
            bad.append((name, f"spills {r['spill_bytes']} B"))
        if not r["cp_async"]:
            bad.append((name, "no cp.async: the tile loop is not software-pipelined"))
        if not r["wgmma"]:
            bad.append((name, "no wgmma"))
    return bad


def _merge_write(path, rows):
    """Replace this Triton version's rows in `path`, keep the others; atomic."""
    keep = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            keep = [r for r in csv.DictReader(f) if r.get("triton") != rows[0]["triton"] and set(COLUMNS) <= set(r)]
    out = sorted(keep + [{k: r.get(k, "") for k in COLUMNS} for r in rows], key=lambda r: (
        str(r["triton"]), DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else 9, int(r["head_dim"]), r["kernel"]))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(out)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="three fp16 kernels (a CI check)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--out", help="CSV to update (default: print CSV to stdout)")
    ap.add_argument("--strict", action="store_true", help="also fail on spills, missing cp.async or wgmma")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1 (the kernels must be real JIT functions)")
    if a.quick:  # three binaries (a CI check in seconds): the two forward loops and a 256-lane backward pass
        jobs = [j for j in jobs_for(("fp16",), (40,), a.arch, ("self_fwd", "cross_fwd"))][::1]
        jobs = [jobs[0], jobs[-1]] + jobs_for(("fp16",), (160,), a.arch, ("self_dkdv",))[-1:]
    else:
        jobs = jobs_for(DTYPES, (40, 80, 160), a.arch)
    if a.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.jobs) as pool:
            rows = pool.map(compile_one, jobs, chunksize=1)
    else:
        rows = [compile_one(j) for j in jobs]
    if a.out:
        _merge_write(a.out, rows)
        print(f"wrote {len(rows)} rows (triton {rows[0]['triton']}) to {a.out}")
    else:
        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in COLUMNS} for r in rows])
    bad = check(rows)
    for name, why in bad:
        print(f"AOT: {name}: {why}", file=sys.stderr)
    hard = [b for b in bad if b[1].startswith(("error", "shared memory"))]
    return 1 if hard or (a.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
