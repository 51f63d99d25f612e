"""Whole generate() against diffusers' StableDiffusionPipeline with the same seed, both samplers."""
import numpy as np
import pytest
import torch


def ref_image(ref_pipe, sampler, prompt, negative, steps, guidance, seed, h, w, eta=0.0):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    ref_pipe.scheduler = cls.from_config(ref_pipe.scheduler.config)
    kw = {"eta": eta} if sampler == "ddim" else {}
    out = ref_pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=h, width=w, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw)
    return out.images[0]


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.8), ("dpm++2m", 0.0)])
def test_generate_matches_diffusers(ref_pipe, our_pipe, sampler, eta):
    kw = dict(negative_prompt="blurry", steps=6, guidance=7.5, seed=1234, height=64, width=96)
    ref = ref_image(ref_pipe, sampler, "a photo of a cat", kw["negative_prompt"], kw["steps"], kw["guidance"],
                    kw["seed"], kw["height"], kw["width"], eta)
    lat = our_pipe.sample_latents("a photo of a cat", sampler=sampler, eta=eta, **kw)
    ours = (our_pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape == (64, 96, 3)
    assert ref.std() > 1e-3  # not a flat image
    assert np.abs(ours - ref).max() <= 1e-4
    img = np.asarray(our_pipe.generate("a photo of a cat", sampler=sampler, eta=eta, **kw))
    assert np.abs(img.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_no_cfg_when_guidance_is_one(ref_pipe, our_pipe):
    ref = ref_image(ref_pipe, "ddim", "a dog", "", 3, 1.0, 5, 64, 64)
    lat = our_pipe.sample_latents("a dog", steps=3, guidance=1.0, seed=5, height=64, width=64)
    ours = (our_pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_same_seed_same_image_other_seed_differs(our_pipe):
    a = np.asarray(our_pipe.generate("a", steps=2, seed=3, height=64, width=64))
    b = np.asarray(our_pipe.generate("a", steps=2, seed=3, height=64, width=64))
    c = np.asarray(our_pipe.generate("a", steps=2, seed=4, height=64, width=64))
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("h,w", [(60, 64), (64, 0), (-8, 64)])
def test_size_must_be_multiple_of_8(our_pipe, h, w):
    with pytest.raises(ValueError, match="multiple of 8"):
        our_pipe.generate("a", steps=1, height=h, width=w)


def test_nan_latent_is_reported_with_step(our_pipe, monkeypatch):
    from composer.pipeline import NonFiniteError
    real = our_pipe.unet.forward

    def broken(x, t, ctx, **kw):
        return real(x, t, ctx, **kw) * float("nan")
    monkeypatch.setattr(our_pipe.unet, "forward", broken)
    with pytest.raises(NonFiniteError, match="step 0"):
        our_pipe.sample_latents("a", steps=2, height=64, width=64)
