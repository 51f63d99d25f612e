"""CPU runtime settings: the allocator tuning the CLI applies, and the in-place residual path of inference."""
import sys

import pytest
import torch

from composer.runtime import tune_cpu_allocator
from composer.unet import UNet, UNetConfig


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_cpu_allocator_applies_on_glibc():
    assert tune_cpu_allocator() is True
    x = torch.randn(4096, 4096)  # 64 MB: served from the heap now; must still work and be freed
    assert float(x.sum()) == float(x.sum())
    del x


def test_cli_tunes_only_cpu_runs(monkeypatch, tmp_path):
    import composer.sample as sample
    calls = []
    monkeypatch.setattr(sample, "tune_cpu_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(sample, "_run_jobs", lambda a: 0)  # stop right after the set-up
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("")
    assert sample.main(["--jobs", str(jobs), "--device", "cpu"]) == 0 and calls == [1]
    assert sample.main(["--jobs", str(jobs), "--device", "cpu", "--no-tune-allocator"]) == 0 and calls == [1]
    assert sample.main(["--jobs", str(jobs), "--device", "cuda"]) == 0 and calls == [1]


def test_inplace_inference_path_equals_graph_path():
    """Under no_grad the residual adds and GEGLU write into fresh outputs; with autograd on they allocate.
    Same operations on the same operands (a + b == b + a exactly), so the results are bit-identical, and the
    graph path still back-propagates."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_name("tiny")).eval()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor(500)
    with torch.no_grad():
        a = unet(x, t, ctx)
    z = x.clone().requires_grad_(True)
    b = unet(z, t, ctx)
    assert torch.equal(a, b.detach())
    b.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# --- pre-packed conv weights (composer/layers.py Conv2d.prepack) ----------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _conv_pair(cin, cout, k, stride, padding, bias):
    from composer.layers import Conv2d
    torch.manual_seed(cin * 7 + k)
    plain = Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    packed = Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    packed.load_state_dict(plain.state_dict())
    packed.prepack = True
    return plain, packed


@needs_onednn
@pytest.mark.parametrize("cin,cout,k,stride,padding,bias,hw", [
    (32, 64, 3, 1, 1, True, (8, 8)),      # resnet conv
    (64, 64, 3, 2, 1, True, (9, 7)),      # downsampler on an odd size
    (64, 32, 1, 1, 0, False, (5, 6)),     # shortcut / proj, no bias
    (4, 32, 3, 1, 1, True, (16, 16)),     # conv_in (4 channels)
    (32, 4, 3, 1, (1, 0), True, (6, 6)),  # conv_out-like, uneven padding
])
def test_prepacked_conv_equals_plain(cin, cout, k, stride, padding, bias, hw):
    plain, packed = _conv_pair(cin, cout, k, stride, padding, bias)
    for batch in (2, 1, 2):  # a new shape repacks; going back repacks again
        x = torch.randn(batch, cin, *hw)
        with torch.no_grad():
            want, got = plain(x), packed(x)
        assert packed._packed is not None and packed._packed[0][2] == tuple(x.shape)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@needs_onednn
def test_prepacked_conv_follows_weight_changes_and_leaves_gradients_alone():
    plain, packed = _conv_pair(16, 16, 3, 1, 1, True)
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        packed(x)
        first = packed._packed[1]
        for m in (plain, packed):  # a merged LoRA changes the weight in place
            m.weight.copy_(m.weight * 1.5 + 0.01)
        want, got = plain(x), packed(x)
    assert packed._packed[1] is not first
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    z = x.clone().requires_grad_(True)  # autograd on: the plain conv, bit for bit, with a graph
    y = packed(z)
    assert y.grad_fn is not None and torch.equal(y, plain(x))
    y.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@needs_onednn
def test_prepacked_unet_equals_plain_and_switches_off():
    from composer.runtime import prepack_convs
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_name("tiny")).eval()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor(500)
    with torch.no_grad():
        want = unet(x, t, ctx)
        n = prepack_convs(unet)
        got = unet(x, t, ctx)
        packed = [m for m in unet.modules() if getattr(m, "_packed", None) is not None]
    assert n > 10 and len(packed) == n  # every conv of the UNet ran packed
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert prepack_convs(unet, on=False) == n
    assert all(m._packed is None and not m.prepack for m in packed)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), want)  # back on the plain path: the same bits as before


def test_prepack_falls_back_to_the_plain_conv_when_onednn_refuses(monkeypatch):
    plain, packed = _conv_pair(8, 8, 3, 1, 1, True)

    def refuse(*a, **k):
        raise RuntimeError("no oneDNN here")
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", refuse)
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(packed(x), plain(x))
    assert packed.prepack is False and packed._packed is None


def test_cli_prepacks_only_cpu_runs_unless_told_not_to(monkeypatch, tmp_path):
    import composer.sample as sample
    seen = []
    monkeypatch.setattr(sample, "prepack_convs", lambda m, on=True: seen.append(m) or 1)
    monkeypatch.setattr(sample, "run_jobs", lambda *a, **k: {})
    monkeypatch.setattr(sample, "validate_jobs", lambda *a, **k: None)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"name": "a", "prompt": "a cat", "steps": 1, "height": 64, "width": 64}\n')
    sample.main(["--jobs", str(jobs), "--device", "cpu", "--out-dir", str(tmp_path / "o"), "--quiet"])
    assert len(seen) == 1 and isinstance(seen[0], UNet)
    sample.main(["--jobs", str(jobs), "--device", "cpu", "--no-prepack", "--out-dir", str(tmp_path / "o"), "--quiet"])
    assert len(seen) == 1
