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
