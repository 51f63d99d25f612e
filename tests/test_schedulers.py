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
    """diffusers 0.14 (method.md §10): 999, 979, ..., 20; second order at every step after the first, the last
    one included, and the last update going to t = 0 (ᾱ_0, σ small but not zero). Checked against a by-hand
    DPM-Solver++(2M) in (α, σ, λ) read off ᾱ_t, over all 50 steps."""
    s = DPMSolverPP2M(CFG, 50, final="official")
    ts = list(s.timesteps)
    assert ts[:2] == [999, 979] and ts[-1] == 20 and len(ts) == 50
    ac = CFG.alphas_cumprod()
    targets = ts[1:] + [0]  # the final update goes to t = 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g)
    ref, prev = x.clone().double(), None
    lam = lambda t: np.log(np.sqrt(ac[t]) / np.sqrt(1 - ac[t]))
    for i, (t_s, t_t) in enumerate(zip(ts, targets)):
        eps = torch.randn(1, 4, 4, 4, generator=g)
        x = s.step(i, eps, x)
        a_s, s_s, a_t, s_t = np.sqrt(ac[t_s]), np.sqrt(1 - ac[t_s]), np.sqrt(ac[t_t]), np.sqrt(1 - ac[t_t])
        d0 = (ref - s_s * eps.double()) / a_s
        h = lam(t_t) - lam(t_s)
        new = (s_t / s_s) * ref - a_t * np.expm1(-h) * d0
        if prev is not None:  # second order (midpoint) from the second step on, the last one too
            r = (lam(t_s) - lam(ts[i - 1])) / h
            new = new - 0.5 * a_t * np.expm1(-h) * (d0 - prev) / r
        ref, prev = new, d0
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    assert s.alpha[-1] == pytest.approx(np.sqrt(ac[0])) and s.sigma[-1] == pytest.approx(np.sqrt(1 - ac[0]))
    # below 15 steps the last step is first order (diffusers' lower_order_final)
    s10 = DPMSolverPP2M(CFG, 10, final="official")
    assert s10.first_order_last and not s.first_order_last


def test_bad_sampler_args():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", CFG, 10)
    with pytest.raises(ValueError, match="steps must be"):
        timesteps(CFG, 0, "leading")
    with pytest.raises(ValueError, match="epsilon"):
        SchedulerConfig.from_diffusers({"prediction_type": "v_prediction"})
