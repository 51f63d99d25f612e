"""Kernels against the PyTorch reference, forward and gradients; the mask rule on hand-built cases; the tile
plans against the dense mask; torch.compile tracing; the sm_90 binaries' properties.

CPU: the Triton kernels run under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow; its tiles are small
and unequal so these shapes cross many tile boundaries). The real-GPU tests are marked ``cuda`` and run with
compiled kernels under ``pytest -m cuda`` (tests/conftest.py). Tolerances are paired with dtypes; fp16
results must be no worse than 2× PyTorch's own fp16 error against the fp32 reference (flash-attention's rule).
"""
import math
import os

import pytest
import torch

import kernels as K
from kernels.plan import layout, self_lists, self_tiles
from kernels.reference import allowed_mask, isolation_cost

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                         reason="needs CUDA and compiled kernels (pytest -m cuda)")
CPU_BACKENDS = ["segmented", "triton"]


def regions(n, case):
    """Bitmask layouts: 1-5 regions, overlaps, an empty region, full coverage (no background)."""
    r = torch.zeros(n, dtype=torch.int64)
    if case == "one":
        r[n // 4: n // 2] = 1
    elif case == "two-overlap":
        r[n // 8: n // 2] |= 1
        r[n // 3: 3 * n // 4] |= 2
    elif case == "three-empty":  # region 1 is empty at this level
        r[: n // 5] |= 1
        r[n // 2: n // 2 + 7] |= 4
        r[n // 2 + 3: n] |= 8  # bit 3 -> 4 regions, bit 1 unused
    elif case == "cover":  # boxes cover everything: overlap rows are fully blocked
        r[: 2 * n // 3] |= 1
        r[n // 3:] |= 2
    elif case == "five":  # R = 5 overlapping neighbours, scattered as in an image raster
        x = torch.arange(n) % 17
        for i in range(5):
            r[(x >= 3 * i) & (x < 3 * i + 5)] |= 1 << i
    return r


def nslots(r):
    return int(r.max().item()).bit_length() + 1


def check(fn, args, r, backend, dtype, atol):
    args = [a.to(dtype).detach().requires_grad_() for a in args]
    out = fn(*args, r, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, g)
    ref_in = [a.detach().float().requires_grad_() for a in args]
    ref = fn(*ref_in, r, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    assert torch.isfinite(out.float()).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.float(), b, atol=atol * 10, rtol=atol * 10)
    else:  # no worse than twice PyTorch's own low-precision error (plus a small floor)
        pt = fn(*[a.detach() for a in args], r, backend="torch").float()
        err, pt_err = (out.float() - ref).abs().max().item(), (pt - ref).abs().max().item()
        assert err <= 2 * pt_err + atol, (err, pt_err)
        for a, b in zip(grads, ref_grads):
            assert (a.float() - b).abs().max().item() <= atol * 20 * max(1.0, b.abs().max().item())


# N = 77, 90, 100: not multiples of any tile; d = 40/80/160 are padded to 64/128/256 lanes
LAYOUTS = [(77, "two-overlap", 40), (64, "one", 80), (77, "cover", 160), (100, "three-empty", 40), (90, "five", 40)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,case,d", LAYOUTS)
def test_self_fp32(backend, n, case, d):
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    check(K.isolated_self_attention, (q, k, v), regions(n, case), backend, torch.float32, 2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,case,d", [(77, "two-overlap", 40), (90, "five", 160)])
def test_self_fp16(backend, n, case, d):
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    check(K.isolated_self_attention, (q, k, v), regions(n, case), backend, torch.float16, 2e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,case,d", LAYOUTS)
def test_cross_fp32(backend, n, case, d):
    r = regions(n, case)
    s = nslots(r)
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, s, 77, d), torch.randn(1, 2, s, 77, d)
    check(K.regional_cross_attention, (q, k, v), r, backend, torch.float32, 2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,case,d", [(77, "two-overlap", 40), (90, "five", 80)])
def test_cross_fp16(backend, n, case, d):
    r = regions(n, case)
    s = nslots(r)
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, s, 77, d), torch.randn(1, 2, s, 77, d)
    check(K.regional_cross_attention, (q, k, v), r, backend, torch.float16, 2e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_batch_layouts_head_split_views_short_prompt(backend):
    """[B, N] bitmasks (a different layout per batch element, one fully covered), q/k/v as head-split views of
    [B, N, H·D] (the UNet's layout, read in place by the kernels) and L = 20 < 77 prompt keys."""
    n, h, d = 50, 2, 40
    r = torch.stack([regions(n, "one"), regions(n, "cover")])

    def split(x):
        return x.view(2, n, h, d).transpose(1, 2)
    q, k, v = (split(torch.randn(2, n, h * d)) for _ in range(3))
    check(K.isolated_self_attention, (q, k, v), r, backend, torch.float32, 2e-5)
    kk, vv = torch.randn(2, h, 3, 20, d), torch.randn(2, h, 3, 20, d)
    check(K.regional_cross_attention, (q, kk, vv), r, backend, torch.float32, 2e-5)
    out = K.isolated_self_attention(q, k, v, r, backend=backend)
    ref = torch.cat([K.isolated_self_attention_ref(q[i:i + 1], k[i:i + 1], v[i:i + 1], r[i]) for i in range(2)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # [B, N] layouts = per-element calls


def test_mask_rule_hand_built():
    # tokens: 0 background, 1 box a, 2 box b, 3 overlap a∩b
    r = torch.tensor([0, 1, 2, 3])
    want = torch.tensor([
        [1, 1, 1, 1],  # background query sees everything
        [1, 1, 0, 0],  # box a: background and a-only; not b, not the a∩b overlap
        [1, 0, 1, 0],
        [1, 0, 0, 0],  # overlap query: background only (not even itself)
    ]).bool()
    assert torch.equal(allowed_mask(r, r), want)
    assert isolation_cost(r, r)[3].tolist() == [0, 1, 1, 2]  # |A||K| − |A∩K|
    # the official construction: −1e6 for (query in a, key in b), a ≠ b, summed over box pairs
    boxes = [torch.tensor([0, 1, 0, 1]).bool(), torch.tensor([0, 0, 1, 1]).bool()]
    bias = torch.zeros(4, 4)
    for i, a in enumerate(boxes):
        for j, bb in enumerate(boxes):
            if i != j:
                bias[a[:, None] & bb[None, :]] -= 1e6
    assert torch.equal(bias, isolation_cost(r, r).float() * -1e6)


@pytest.mark.parametrize("case,n,bm,bn", [("two-overlap", 77, 32, 16), ("five", 90, 16, 32), ("cover", 77, 16, 16),
                                          ("three-empty", 100, 64, 64)])
def test_tile_plan_matches_dense_mask(case, n, bm, bn):
    """Every allowed pair lies in a listed tile; "full" tiles hold only allowed pairs; lists are exact."""
    r = regions(n, case)
    lay = layout(r)
    rs = r[lay.perm[0].long()]
    allowed = allowed_mask(rs, rs)
    st = self_tiles(lay, bm, bn)[0]
    qlist, klist = self_lists(lay, bm, bn)
    for i in range(st.shape[0]):
        for j in range(st.shape[1]):
            blk = allowed[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            if st[i, j] == 0:
                assert not blk.any()
            if st[i, j] == 2:
                assert blk.all() and blk.shape == (bm, bn)
        nf, na = qlist.cnt[0, i].tolist()
        assert sorted(qlist.idx[0, i, :nf].tolist()) == (st[i] == 2).nonzero().flatten().tolist()
        assert sorted(qlist.idx[0, i, nf:na].tolist()) == (st[i] == 1).nonzero().flatten().tolist()
    assert klist.cnt[0, :, 1].sum() == qlist.cnt[0, :, 1].sum()  # the transposed lists hold the same tiles


def test_fully_blocked_rows_are_finite_and_follow_min_cost():
    r = regions(12, "cover")  # no background: overlap rows blocked
    q, k, v = (torch.randn(1, 1, 12, 16) for _ in range(3))
    for be in ["torch", "segmented", "triton"]:
        out = K.isolated_self_attention(q, k, v, r, backend=be)
        assert torch.isfinite(out).all()
    ovl = (r == 3).nonzero().flatten()
    c = isolation_cost(r[ovl], r)
    keys = (c == c.min(1, keepdim=True).values)  # single-box keys of its own boxes (c = 1)
    s = (q[0, 0, ovl] @ k[0, 0].T) / 4.0
    want = torch.softmax(s.masked_fill(~keys, float("-inf")), -1) @ v[0, 0]
    torch.testing.assert_close(K.isolated_self_attention(q, k, v, r, backend="triton")[0, 0, ovl], want,
                               atol=1e-5, rtol=1e-5)


def test_isolation_property_other_box_keys_do_not_matter():
    n = 77
    r = regions(n, "two-overlap")
    q, k, v = (torch.randn(1, 2, n, 40) for _ in range(3))
    only_a = ((r == 1).nonzero().flatten())
    only_b = ((r == 2).nonzero().flatten())
    bg = (r == 0).nonzero().flatten()
    k2, v2 = k.clone(), v.clone()
    k2[:, :, only_b] += 3.0
    v2[:, :, only_b] -= 2.0
    for be in ["torch", "segmented", "triton"]:
        o1 = K.isolated_self_attention(q, k, v, r, backend=be)
        o2 = K.isolated_self_attention(q, k2, v2, r, backend=be)
        torch.testing.assert_close(o1[:, :, only_a], o2[:, :, only_a], atol=0, rtol=0)
        assert (o1[:, :, bg] - o2[:, :, bg]).abs().max() > 1e-3  # background still sees box b


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_cross_lora_fusion_equals_per_region_to_out(backend):
    """o, z from the fused call give exactly mean_{r∈S} (W + up_r down_r)(a_r) + bias (computed by hand)."""
    n, h, d, rank = 77, 2, 40, 4
    r = regions(n, "two-overlap")
    q, k, v = torch.randn(1, h, n, d), torch.randn(1, h, 3, 77, d), torch.randn(1, h, 3, 77, d)
    W, bias = torch.randn(h * d, h * d) * 0.1, torch.randn(h * d)
    down, up = torch.randn(2, rank, h * d) * 0.3, torch.randn(2, h * d, rank) * 0.3
    o, z = K.regional_cross_attention_lora(q, k, v, r, down, backend=backend)
    merged = o.transpose(1, 2).reshape(1, n, h * d) @ W.T + bias + torch.einsum("bnrk,rck->bnc", z, up)
    want = torch.zeros(1, n, h * d)
    cnt = K.popcount(r).clamp(min=1).float()
    for s in range(3):
        a = torch.softmax(q @ k[:, :, s].transpose(-1, -2) / math.sqrt(d), -1) @ v[:, :, s]
        a = a.transpose(1, 2).reshape(1, n, h * d)
        if s == 0:
            want += (a @ W.T + bias) * (r == 0)[None, :, None]
        else:
            Wr = W + up[s - 1] @ down[s - 1]
            want += (a @ Wr.T + bias) * (((r >> (s - 1)) & 1).bool()[None, :, None] / cnt[None, :, None])
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


def test_cross_dq_pytorch_path_for_256_lanes():
    """The GPU's d = 160 cross-attention dQ (PyTorch GEMMs, no Triton tiling fits) against the reference."""
    from kernels import ops
    from kernels.triton_attention import _cross_dq_torch
    n, d = 60, 160
    r = regions(n, "two-overlap")
    q = torch.randn(2, 2, n, d, requires_grad=True)
    k, v = torch.randn(2, 2, 3, 77, d), torch.randn(2, 2, 3, 77, d)
    ref = K.regional_cross_attention_ref(q, k, v, r)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, q, g)[0]
    got = _cross_dq_torch(g, q.detach(), k, v, ops.plans_for(r).lay, 1 / math.sqrt(d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_graph_has_no_break_and_matches_eager():
    """torch.compile(fullgraph=True) traces the registered operators (torch.ops.lora_composer.*) forward and
    backward; results equal the eager autograd.Function path."""
    n = 40
    r = regions(n, "two-overlap")

    def f(q, k, v, kk, vv):
        return (K.isolated_self_attention(q, k, v, r, backend="triton").sum()
                + K.regional_cross_attention(q, kk, vv, r, backend="triton").square().sum())
    x = [torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3)]
    x += [torch.randn(1, 2, 3, 20, 16, requires_grad=True) for _ in range(2)]
    torch._dynamo.reset()
    fc = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = fc(*x)
    want = f(*x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, x), torch.autograd.grad(want, x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    q = torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.isolated_self_attention(q, q, q, torch.zeros(10, dtype=torch.int64), backend="cuda")
    with pytest.raises(ValueError, match="token_regions has 9 tokens"):
        K.isolated_self_attention(q, q, q, torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[B=1, N\]"):
        K.isolated_self_attention(q, q, q, torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        K.isolated_self_attention(q, q, q, torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="region slots"):
        K.regional_cross_attention(q, torch.randn(1, 1, 2, 5, 16), torch.randn(1, 1, 2, 5, 16),
                                   torch.full((10,), 4, dtype=torch.int64), backend="torch")


def test_flex_backend_matches():
    """FlexAttention on region-sorted tokens with a cached BlockMask, forward (CPU Flex has no backward)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # the one capability that may be missing: an old torch without FlexAttention
        pytest.skip("no FlexAttention in this torch")
    n = 64
    q, k, v = (torch.randn(2, 2, n, 32) for _ in range(3))
    for r in (regions(n, "two-overlap"), regions(n, "cover"), torch.stack([regions(n, "one"), regions(n, "five")])):
        torch.testing.assert_close(K.isolated_self_attention(q, k, v, r, backend="flex"),
                                   K.isolated_self_attention_ref(q, k, v, r), atol=1e-5, rtol=1e-5)
    r = regions(n, "two-overlap")
    kk, vv = torch.randn(2, 2, 3, 77, 32), torch.randn(2, 2, 3, 77, 32)
    torch.testing.assert_close(K.regional_cross_attention(q, kk, vv, r, backend="flex"),
                               K.regional_cross_attention_ref(q, kk, vv, r), atol=1e-5, rtol=1e-5)


def test_kernels_compile_for_hopper_without_a_gpu():
    """python -m kernels.aot --quick --strict: a few kernels built for sm_90 exactly as the JIT would (no GPU
    needed: ptxas ships with Triton) have no spills, software-pipelined loads (cp.async) and wgmma."""
    import csv
    import io
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--quick", "--strict"], capture_output=True, text=True,
                       env=env, cwd=root, timeout=600)
    if r.returncode and "ptxas" in r.stderr and ("not found" in r.stderr or "No such file" in r.stderr):
        pytest.skip("no ptxas in this Triton install")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) >= 3 and {x["kernel"] for x in rows} >= {"self_fwd", "cross_fwd"}
    for x in rows:
        assert x["status"] == "ok" and x["fits"] == "True", x
        assert int(x["spill_bytes"]) == 0 and int(x["cp_async"]) > 0 and int(x["wgmma"]) > 0, x


# --- real GPU (compiled kernels): the same layouts as on CPU, fp16 / bf16 / fp32 -------------------------------

GPU_LAYOUTS = [(1024, "two-overlap"), (1024, "one"), (1024, "cover"), (1024, "three-empty"), (1024, "five")]


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("n,case", GPU_LAYOUTS + [(1000, "five")])
def test_gpu_kernels(dtype, d, n, case):
    if n % 128 and (dtype != torch.float16 or d == 80):
        pytest.skip("awkward N (EVEN_N = False binaries): fp16 at d = 40 and 160 only, to bound JIT compiles")
    r = regions(n, case).cuda()
    s = nslots(r)
    q, k, v = (torch.randn(2, n, 8 * d, device="cuda").view(2, n, 8, d).transpose(1, 2) for _ in range(3))
    check(K.isolated_self_attention, (q, k, v), r, "triton", dtype, 3e-3)
    kk, vv = torch.randn(2, 8, s, 77, d, device="cuda"), torch.randn(2, 8, s, 77, d, device="cuda")
    check(K.regional_cross_attention, (q, kk, vv), r, "triton", dtype, 3e-3)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_per_batch_layouts(dtype):
    """[B, N] layouts (one fully covered) and fp32 (which takes the exact segmented path on CUDA)."""
    n = 1024
    r = torch.stack([regions(n, "five"), regions(n, "cover")]).cuda()
    q, k, v = (torch.randn(2, 8, n, 40, device="cuda") for _ in range(3))
    check(K.isolated_self_attention, (q, k, v), r, "triton", dtype, 3e-3 if dtype != torch.float32 else 1e-4)
    kk, vv = torch.randn(2, 8, 6, 77, 40, device="cuda"), torch.randn(2, 8, 6, 77, 40, device="cuda")
    check(K.regional_cross_attention, (q, kk, vv), r, "triton", dtype, 3e-3 if dtype != torch.float32 else 1e-4)
