"""Every sampler against its diffusers scheduler, step by step on the SD1.5 config (the same ε stand-in fed
through both, noise drawn from equally seeded generators), and whole generate() images against
StableDiffusionPipeline with that scheduler."""
import numpy as np
import pytest
import torch

from composer.schedulers import (SAMPLERS, DPMSolverPP2M, SchedulerConfig, make_sampler, sigma_to_t,
                                 timesteps)

CFG = SchedulerConfig()
STEPS = [1, 2, 4, 8, 25, 50]

# our name -> (diffusers class, extra config, extra step kwargs)
REFERENCE = {
    "ddim": ("DDIMScheduler", {}, {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, {}),
    "lcm": ("LCMScheduler", {}, {}),
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}),
}


def reference(name, steps, cfg=CFG, **set_kw):
    import diffusers
    cls, extra, _ = REFERENCE[name]
    ref = getattr(diffusers, cls).from_config({**cfg.to_diffusers(), **extra})
    ref.set_timesteps(steps, **set_kw)
    return ref


def fake_eps(x, i):
    return torch.tanh(x * 0.7 + 0.1 * i)  # deterministic, bounded stand-in for a model


def run_pair(ref, ours, seed=0, **kw):
    """Run both samplers side by side through the whole loop, each with its own init σ, input scaling and
    generator; -> worst per-step max |ours − ref| / max |ref| (the sample's scale)."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    xr, x = x0 * ref.init_noise_sigma, x0 * ours.init_noise_sigma
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        er = fake_eps(ref.scale_model_input(xr, t), i)
        e = fake_eps(ours.scale_model_input(i, x), i)
        xr = ref.step(er, t, xr, generator=g1, **kw).prev_sample
        x = ours.step(i, e, x, generator=g2)
        worst = max(worst, ((x - xr).abs().max() / xr.abs().max()).item())
    # the same number of noise draws: both generators end in the same state
    assert torch.equal(g1.get_state(), g2.get_state())
    return worst


def check_schedule(ref, ours):
    """Timesteps (what the UNet gets), init σ and, where diffusers has them, the σ's."""
    want = ref.timesteps.double().numpy()
    if ref.timesteps.dtype.is_floating_point:  # fractional σ-interpolated timesteps, fp32 like diffusers
        np.testing.assert_allclose(np.asarray(ours.timesteps, np.float64), want, rtol=0, atol=1e-3)
    else:
        assert np.asarray(ours.timesteps).tolist() == want.astype(np.int64).tolist()
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if getattr(ref, "sigmas", None) is not None and len(ref.sigmas) == len(ours.sigmas):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=1e-6)
    assert len(ours.sigmas) == len(ours.timesteps) + 1


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler.from_config(CFG.to_diffusers()).alphas_cumprod.double().numpy()
    np.testing.assert_array_equal(CFG.alphas_cumprod(), ref)  # same fp32 rounding


@pytest.mark.parametrize("steps", [1, 5, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim(steps, eta):
    ref = reference("ddim", steps)
    ours = make_sampler("ddim", CFG, steps, eta=eta)
    check_schedule(ref, ours)
    assert run_pair(ref, ours, eta=eta) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 5, 14, 15, 25, 50])
def test_dpmpp_2m(steps):
    ref = reference("dpm++2m", steps)
    ours = make_sampler("dpm++2m", CFG, steps)
    check_schedule(ref, ours)
    assert run_pair(ref, ours) < 1e-5


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["dpm++2m-karras", "euler", "euler-karras", "euler-a", "lcm", "tcd"])
def test_new_samplers_step_by_step(name, steps):
    ref = reference(name, steps)
    ours = make_sampler(name, CFG, steps)
    check_schedule(ref, ours)
    assert run_pair(ref, ours, **REFERENCE[name][2]) < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras", "euler-a"])
def test_spacing_follows_config(name, spacing):
    """The checkpoint config's timestep_spacing (and steps_offset) drive every sampler as they drive diffusers;
    for the Euler family "leading" also changes init_noise_sigma to sqrt(σ_max² + 1)."""
    cfg = SchedulerConfig(timestep_spacing=spacing)
    for steps in (4, 20):
        ref = reference(name, steps, cfg)
        ours = make_sampler(name, cfg, steps)
        check_schedule(ref, ours)
        assert run_pair(ref, ours) < 1e-5


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_tcd_gamma(gamma):
    for steps in (4, 8):
        ref = reference("tcd", steps)
        ours = make_sampler("tcd", CFG, steps, eta=gamma)
        assert run_pair(ref, ours, eta=gamma) < 1e-5


def test_tcd_intermediate_timestep_rounds_like_diffusers():
    """s = floor((1 − γ)·t) decides an index: fp32 arithmetic as in diffusers (0.7·700 is 490 there)."""
    from composer.schedulers import TCD
    t = torch.arange(1000)
    for gamma in (0.3, 0.9):
        want = torch.floor((1 - gamma) * t).long().numpy()
        s = TCD(CFG, 50, gamma).s  # one value per step; check the rule itself on every t
        got = np.floor(np.float32(1 - gamma) * np.arange(1000, dtype=np.float32)).astype(np.int64)
        assert (got == want).all() and s[-1] == 0
        assert (s[:-1] == want[TCD(CFG, 50, gamma).timesteps[1:]]).all()


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_lcm_original_steps(name):
    ref = reference(name, 4, original_inference_steps=100)
    ours = make_sampler(name, CFG, 4, original_steps=100)
    check_schedule(ref, ours)
    assert run_pair(ref, ours, **REFERENCE[name][2]) < 1e-5


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras"])
def test_sigmas_are_the_noise_level(name):
    """With an oracle model (ε is the true noise of a fixed x0), a deterministic sampler moves the latent exactly
    along x0 + σ·n: the latent entering step i is (x0 + σ_i·n)·c_i with c = 1 for the Euler family (σ form)
    and 1/sqrt(1 + σ²) for the ᾱ-parameterised samplers, and scale_model_input brings both to the UNet's ᾱ form."""
    g = torch.Generator().manual_seed(3)
    x0, n = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sch = make_sampler(name, CFG, 8)
    ve = name.startswith("euler")

    def latent(s):
        return (x0 + s * n) * (1.0 if ve else 1.0 / (1 + s * s) ** 0.5)
    # the level at step 0 is what randn × init_noise_sigma carries
    assert sch.init_noise_sigma == pytest.approx(sch.sigmas[0] if ve else 1.0, rel=1e-6)
    x = latent(sch.sigmas[0])
    for i in range(len(sch)):
        torch.testing.assert_close(sch.scale_model_input(i, x), (x0 + sch.sigmas[i] * n) / (1 + sch.sigmas[i] ** 2) ** 0.5,
                                   rtol=1e-5, atol=1e-5)
        x = sch.step(i, n, x)
        torch.testing.assert_close(x, latent(sch.sigmas[i + 1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sch.alpha_bars, 1 / (1 + sch.sigmas ** 2))
    assert (np.diff(sch.sigmas) <= 0).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_noise_timesteps(name):
    """τ_i is the UNet's timestep wherever that is an integer of the table; the Euler family interpolates σ
    linearly in t (τ inverts log σ), so there it is close, not equal."""
    for steps in (4, 25):
        sch = make_sampler(name, CFG, steps)
        tau = sch.noise_timesteps()
        assert tau.shape == (steps + 1,) and (np.diff(tau) <= 1e-9).all()
        atol = 0.5 if name.startswith("euler") or name.endswith("karras") else 1e-3  # fp32 table; karras: rounded t
        np.testing.assert_allclose(tau[:-1], np.asarray(sch.timesteps, np.float64), rtol=0, atol=atol)


def test_sigma_to_t_inverts_the_table():
    train = CFG.train_sigmas()
    t = np.array([0.0, 0.25, 1.5, 500.0, 977.3, 999.0])
    s = np.exp(np.interp(t, np.arange(1000), np.log(train).astype(np.float64)))
    np.testing.assert_allclose(sigma_to_t(s, np.log(train)), t, atol=1e-6)
    assert sigma_to_t(np.array([1e-3, 1e3]), np.log(train)).tolist() == [0.0, 999.0]  # clamped


def test_ddim_linspace_and_trailing_spacing():
    for spacing in ("linspace", "trailing"):
        cfg = SchedulerConfig(timestep_spacing=spacing)
        for steps in (7, 50):
            ref, ours = reference("ddim", steps, cfg), make_sampler("ddim", cfg, steps)
            check_schedule(ref, ours)
            assert run_pair(ref, ours) < 1e-5


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
    assert s.sigmas[-1] == pytest.approx(np.sqrt((1 - ac[0]) / ac[0]))


def test_bad_sampler_args():
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        make_sampler("heun", CFG, 10)
    with pytest.raises(ValueError, match="steps must be"):
        timesteps(CFG, 0, "leading")
    with pytest.raises(ValueError, match="steps must be in 1..50"):
        make_sampler("lcm", CFG, 51)
    with pytest.raises(ValueError, match="eta applies to DDIM"):
        make_sampler("euler-a", CFG, 10, eta=0.5)
    with pytest.raises(ValueError, match="gamma"):
        make_sampler("tcd", CFG, 4, eta=1.5)
    with pytest.raises(ValueError, match="final"):
        make_sampler("euler", CFG, 10, final="official")
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_sampler("euler", SchedulerConfig(timestep_spacing="bogus"), 10)
    with pytest.raises(ValueError, match="epsilon"):
        SchedulerConfig.from_diffusers({"prediction_type": "v_prediction"})
    assert make_sampler("dpmpp2m", CFG, 5).timesteps.tolist() == make_sampler("dpm++2m", CFG, 5).timesteps.tolist()


def test_cli_offers_every_sampler():
    from composer.sample import build_parser
    choices = next(a for a in build_parser()._actions if a.dest == "sampler").choices
    assert tuple(choices) == SAMPLERS


# --- whole images ------------------------------------------------------------------------------------------

def ref_image(ref_pipe, name, steps, guidance, seed, h, w, eta=None):
    """diffusers' image with that scheduler built from the folder's own scheduler config; the shared pipeline's
    scheduler is restored afterwards (other tests build theirs from its config)."""
    import diffusers
    cls, extra, step_kw = REFERENCE[name]
    saved = ref_pipe.scheduler
    folder = diffusers.PNDMScheduler.from_pretrained(ref_pipe.config._name_or_path, subfolder="scheduler").config
    ref_pipe.scheduler = getattr(diffusers, cls).from_config({**folder, **extra})
    kw = {"eta": eta if eta is not None else step_kw.get("eta", 0.0)}
    try:
        out = ref_pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=steps,
                       guidance_scale=guidance, height=h, width=w,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw)
    finally:
        ref_pipe.scheduler = saved
    return out.images[0]


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpm++2m-karras"])
def test_generate_matches_diffusers(ref_pipe, our_pipe, name):
    """init_noise_sigma, scale_model_input, fractional timesteps and the ancestral noise all reach the image."""
    kw = dict(negative_prompt="blurry", steps=4, guidance=7.5, seed=1234, height=64, width=64)
    ref = ref_image(ref_pipe, name, 4, 7.5, 1234, 64, 64)
    lat = our_pipe.sample_latents("a photo of a cat", sampler=name, **kw)
    ours = (our_pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape == (64, 64, 3)
    assert ref.std() > 1e-3  # not a flat image
    assert np.abs(ours - ref).max() <= 1e-4
