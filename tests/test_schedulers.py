"""DDIM and DPM-Solver++ 2M against diffusers' schedulers, step by step, on the SD1.5 config."""
import numpy as np
import pytest
import torch

from composer.schedulers import DPMSolverPP2M, SchedulerConfig, make_sampler, timesteps

CFG = SchedulerConfig()


def fake_eps(x, i):
    return torch.tanh(x * 0.7 + 0.1 * i)  # deterministic, bounded stand-in for a model


def run_pair(ref, ours, steps, seed=0, **kw):
    torch.manual_seed(seed)
    x = torch.randn(1, 4, 8, 8)
    xr = x.clone()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(fake_eps(xr, i), t, xr, generator=g1, **kw).prev_sample
        x = ours.step(i, fake_eps(x, i), x, generator=g2)
        worst = max(worst, ((x - xr).abs().max() / xr.abs().max()).item())
    return worst


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler.from_config(CFG.to_diffusers()).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(CFG.alphas_cumprod(), ref, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 5, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim(steps, eta):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler.from_config(CFG.to_diffusers())
    ref.set_timesteps(steps)
    ours = make_sampler("ddim", CFG, steps, eta=eta)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert run_pair(ref, ours, steps, eta=eta) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 5, 14, 15, 25, 50])
def test_dpmpp_2m(steps):
    from diffusers import DPMSolverMultistepScheduler
    ref = DPMSolverMultistepScheduler.from_config(CFG.to_diffusers())
    ref.set_timesteps(steps)
    ours = make_sampler("dpm++2m", CFG, steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert run_pair(ref, ours, steps) < 1e-5


def test_spacing_follows_config():
    from diffusers import DPMSolverMultistepScheduler
    cfg = SchedulerConfig(timestep_spacing="leading")
    ref = DPMSolverMultistepScheduler.from_config(cfg.to_diffusers())
    ref.set_timesteps(20)
    assert make_sampler("dpm++2m", cfg, 20).timesteps.tolist() == ref.timesteps.tolist()
    assert run_pair(ref, make_sampler("dpm++2m", cfg, 20), 20) < 1e-5


def test_official_dpm_schedule():
    """diffusers 0.14 (method.md §10): 999, 979, ..., 20, last update to t = 0 (ᾱ_0), second order throughout."""
    s = DPMSolverPP2M(CFG, 50, final="official")
    assert s.timesteps[0] == 999 and s.timesteps[1] == 979 and s.timesteps[-1] == 20
    ac = CFG.alphas_cumprod()
    assert s.alpha[-1] == pytest.approx(np.sqrt(ac[0])) and s.sigma[-1] > 0
    # by hand: first-order first step in λ
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a0, s0, a1, s1 = (np.sqrt(ac[999]), np.sqrt(1 - ac[999]), np.sqrt(ac[979]), np.sqrt(1 - ac[979]))
    x0 = (x - s0 * eps) / a0
    h = np.log(a1 / s1) - np.log(a0 / s0)
    want = (s1 / s0) * x - a1 * (np.exp(-h) - 1) * x0
    torch.testing.assert_close(s.step(0, eps, x), want.float(), rtol=1e-5, atol=1e-5)


def test_bad_sampler_args():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", CFG, 10)
    with pytest.raises(ValueError, match="steps must be"):
        timesteps(CFG, 0, "leading")
    with pytest.raises(ValueError, match="epsilon"):
        SchedulerConfig.from_diffusers({"prediction_type": "v_prediction"})
