"""ControlNet conditions: residuals against diffusers' ControlNetModel, the original single-file layout read back
by diffusers' converter, whole generate() against StableDiffusionControlNetPipeline (scale, guess mode, start/end,
several ControlNets), per-region weights, composition (loss pass, both CFG halves) and refusals."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import composer
from composer.checkpoint import CheckpointError
from composer.compose import ComposeSpec, compose_latents
from composer.conditions import Condition, Conditions, load_condition_image
from composer.controlnet import ControlNetConfig, ldm_state_dict, load_controlnet
from composer.io import save_safetensors
from composer.losses import box_mask
from composer.tiny import random_edlora
from composer.unet import UNetConfig
from conftest import max_rel_err, perturb

TINY = UNetConfig.from_name("tiny")
HINT = (8, 16, 16, 32)


def _diffusers_controlnet(seed, **over):
    from diffusers import ControlNetModel
    cfg = {k: v for k, v in ControlNetConfig(unet=TINY).to_diffusers().items() if k != "_class_name"}
    cfg.update(conditioning_embedding_out_channels=HINT, **over)
    return perturb(ControlNetModel(**cfg), std=0.05, seed=seed).eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnets")
    out = {}
    for name, seed, over in (("a", 6, {}), ("b", 7, {}), ("bgr", 8, {"controlnet_conditioning_channel_order": "bgr"}),
                             ("pool", 9, {"global_pool_conditions": True})):
        m = _diffusers_controlnet(seed, **over)
        m.save_pretrained(str(d / name))
        out[name] = (str(d / name), m)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("cn_images") / "pose.png"
    Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype(np.uint8)).save(p)
    return str(p)


@pytest.fixture(scope="module")
def pipe(ref_pipe_dir):
    return composer.load(ref_pipe_dir)


@pytest.mark.parametrize("name,guess", [("a", False), ("a", True), ("bgr", False), ("pool", False)])
def test_residuals_match_diffusers(nets, name, guess):
    path, ref = nets[name]
    ours = load_controlnet(path, TINY)
    x, ctx, img = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32), torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        d0, m0 = ref(x, 500, ctx, img, conditioning_scale=0.7, guess_mode=guess, return_dict=False)
        d1, m1 = ours(x, 500, ctx, img, conditioning_scale=0.7, guess_mode=guess)
    assert len(d1) == 12 and [r.shape for r in d1] == [r.shape for r in d0]
    assert max(max_rel_err(a, b) for a, b in zip(d1 + [m1], d0 + [m0])) <= 1e-4
    assert m1.abs().max() > 1e-3


def test_original_layout_read_by_diffusers_converter_and_loaded(nets, tmp_path):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    path, ref = nets["a"]
    ours = load_controlnet(path, TINY)
    sd = ldm_state_dict(ours)
    assert all(k.startswith("control_model.") for k in sd)
    # the original numbering: conv_in 0, SiLU between every conv, 3 pairs of blocks, the zero conv_out at 14
    hint = sorted({int(k.split(".")[2]) for k in sd if k.startswith("control_model.input_hint_block.")})
    assert hint == list(range(0, 16, 2))
    back = convert_controlnet_checkpoint(sd, {"layers_per_block": TINY.layers_per_block})
    want = ref.state_dict()
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    st, pth = tmp_path / "control_v11p_sd15_test.safetensors", tmp_path / "control_test.pth"
    save_safetensors(sd, str(st))
    torch.save(ldm_state_dict(ours, prefix=""), str(pth))  # no prefix, as some distributed files
    x, ctx, img = torch.randn(1, 4, 8, 12), torch.randn(1, 77, 32), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        d0, m0 = ours(x, 10, ctx, img)
        for p in (st, pth):
            d1, m1 = load_controlnet(str(p), TINY)(x, 10, ctx, img)
            assert all(torch.equal(a, b) for a, b in zip(d0 + [m0], d1 + [m1]))


def test_v10_full_file_reads_only_the_controlnet(nets, tmp_path, caplog):
    sd = ldm_state_dict(load_controlnet(nets["a"][0], TINY))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    p = tmp_path / "control_sd15_full.safetensors"
    save_safetensors(sd, str(p))
    with caplog.at_level(logging.WARNING):
        load_controlnet(str(p), TINY)
    assert "1 base-model tensors are not read" in caplog.text
    sd["stray.weight"] = torch.zeros(1)
    save_safetensors(sd, str(p))
    with pytest.raises(CheckpointError, match="stray.weight"):
        load_controlnet(str(p), TINY)


def _cn_pipeline(ref_pipe, cn):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
    return StableDiffusionControlNetPipeline(
        vae=ref_pipe.vae, text_encoder=ref_pipe.text_encoder, tokenizer=ref_pipe.tokenizer, unet=ref_pipe.unet,
        controlnet=cn, scheduler=DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _img(pipe, lat):
    return (pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


KW = dict(negative_prompt="blurry", steps=4, guidance=7.5, seed=3, height=64, width=96, sampler="dpm++2m")


@pytest.mark.parametrize("scale,guess,start,end", [(0.7, False, 0.0, 1.0), (1.2, True, 0.0, 1.0),
                                                   (0.9, False, 0.25, 0.75)])
def test_generate_matches_controlnet_pipeline(ref_pipe, pipe, nets, image, scale, guess, start, end):
    path, ref = nets["a"]
    ref_img = _cn_pipeline(ref_pipe, ref)(
        "a cat", image=Image.open(image), negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
        height=64, width=96, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        controlnet_conditioning_scale=scale, guess_mode=guess, control_guidance_start=start,
        control_guidance_end=end).images[0]
    ours = _img(pipe, pipe.sample_latents("a cat", conditions=[
        {"kind": "controlnet", "model": path, "image": image, "weight": scale, "guess_mode": guess,
         "start": start, "end": end}], **KW))
    assert np.abs(_img(pipe, pipe.sample_latents("a cat", **KW)) - ref_img).max() > 1e-2
    assert np.abs(ours - ref_img).max() <= 1e-4


def test_two_controlnets_summed_match_multi_controlnet(ref_pipe, pipe, nets, image):
    (p1, a), (p2, b) = nets["a"], nets["b"]
    im = Image.open(image)
    ref_img = _cn_pipeline(ref_pipe, [a, b])(
        "a cat", image=[im, im.transpose(Image.FLIP_LEFT_RIGHT)], negative_prompt="blurry", num_inference_steps=4,
        guidance_scale=7.5, height=64, width=96, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        controlnet_conditioning_scale=[0.6, 0.9]).images[0]
    ours = _img(pipe, pipe.sample_latents("a cat", conditions=[
        {"kind": "controlnet", "model": p1, "image": im, "weight": 0.6},
        {"kind": "controlnet", "model": p2, "image": im.transpose(Image.FLIP_LEFT_RIGHT), "weight": 0.9}], **KW))
    assert np.abs(ours - ref_img).max() <= 1e-4


# --- per-region weights ----------------------------------------------------------------------------------------

BOXES = [(0.0, 0.0, 0.5, 0.625), (0.25, 0.5, 1.0, 1.0)]


def _conds(model, img, **kw):
    return Conditions([Condition("controlnet", model, img, **kw)], lambda r, h, w, d: box_mask(BOXES[r], h, w, d))


def test_region_weights_on_every_residual(pipe, nets, image):
    import math
    model = load_controlnet(nets["a"][0], TINY)
    img = load_condition_image(image, 3, 128, 128)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        raw_d, raw_m = model(x, 300, ctx, img)
        kw = _conds(model, img, weight=0.8, regions={0: 0.0}).at(0, 1).residuals(x, 300, ctx, cfg=True)
        glob = _conds(model, img, weight=1.0).at(0, 1).residuals(x, 300, ctx, cfg=True)
        ones = _conds(model, img, weight=1.0, regions={0: 1.0, 1: 1.0}).at(0, 1).residuals(x, 300, ctx, cfg=True)
    for r, g in zip(raw_d + [raw_m], kw["down_residuals"] + [kw["mid_residual"]]):
        h, w = r.shape[-2:]
        m = torch.full((h, w), 0.8)
        m[math.ceil(BOXES[0][0] * h):math.floor(BOXES[0][2] * h), math.ceil(BOXES[0][1] * w):math.floor(BOXES[0][3] * w)] = 0
        assert torch.allclose(g, r * m, atol=1e-6)
        assert (g[..., m == 0] == 0).all()  # a weight of 0: exactly nothing added in the box
    assert all(torch.equal(a, b) for a, b in zip(ones["down_residuals"] + [ones["mid_residual"]],
                                                 glob["down_residuals"] + [glob["mid_residual"]]))
    zero = pipe.sample_latents("a", conditions=[{"kind": "controlnet", "model": nets["a"][0], "image": image,
                                                 "weight": 0.0}], **dict(KW, steps=2))
    assert torch.equal(zero, pipe.sample_latents("a", **dict(KW, steps=2)))


# --- composition ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def concepts(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("concepts_cn")
    out = []
    for i, words in enumerate((["<cat1>", "<cat2>"], ["<dog1>", "<dog2>"])):
        p = d / f"c{i}.pth"
        torch.save(random_edlora(pipe, words, seed=30 + i), str(p))
        out.append(str(p))
    return out


def _spec(concepts, conditions=(), **kw):
    regions = [{"prompt": "a <cat1> <cat2>", "box": list(BOXES[0]), "lora": concepts[0]},
               {"prompt": "a <dog1> <dog2>", "box": list(BOXES[1]), "lora": concepts[1]}]
    return ComposeSpec.from_dict(dict(prompt="a photo", height=128, width=128, steps=3, seed=4, regions=regions,
                                      conditions=list(conditions), **kw))


@pytest.mark.parametrize("guess", [False, True])
def test_controlnet_in_loss_pass_and_cfg_halves(pipe, concepts, nets, image, guess, monkeypatch):
    cond = {"kind": "controlnet", "model": nets["a"][0], "image": image, "weight": 0.9, "guess_mode": guess,
            "regions": {"0": 0.5}}
    _, plain = compose_latents(pipe, _spec(concepts))
    calls, real = [], pipe.unet.forward

    def fwd(x, t, ctx, regions=None, **kw):
        calls.append({"x": x.detach(), "t": t, "ctx": ctx, "grad": torch.is_grad_enabled(),
                      "down": kw.get("down_residuals"), "mid": kw.get("mid_residual")})
        return real(x, t, ctx, regions=regions, **kw)
    monkeypatch.setattr(pipe.unet, "forward", fwd)
    _, info = compose_latents(pipe, _spec(concepts, [cond]))
    monkeypatch.undo()
    loss = [c for c in calls if c["grad"]]
    cfg = [c for c in calls if c["x"].shape[0] == 2]
    assert loss and len(cfg) == 3 and all(c["down"] is not None and len(c["down"]) == 12 for c in calls)
    assert all(r.requires_grad for c in loss for r in c["down"])  # the loss gradient flows through the ControlNet
    assert not np.allclose(info["loss"][0], plain["loss"][0])
    model = load_controlnet(nets["a"][0], TINY)
    img = load_condition_image(image, 3, 128, 128)
    conds = Conditions([Condition("controlnet", model, img, 0.9, {0: 0.5}, guess_mode=guess)],
                       lambda r, h, w, d: box_mask(BOXES[r], h, w, d))
    c = cfg[0]
    for half in (0, 1):  # each CFG half gets the ControlNet run on its own half (guess mode: the uncond half nothing)
        if guess and half == 0:
            assert all((r[0] == 0).all() for r in c["down"]) and (c["mid"][0] == 0).all()
            continue
        with torch.no_grad():
            want = conds.at(0, 3).residuals(c["x"][half:half + 1], c["t"], c["ctx"][half:half + 1], cfg=False)
        assert all(torch.allclose(a[half:half + 1], b, atol=1e-5) for a, b in zip(c["down"], want["down_residuals"]))
        assert (c["mid"][half] - c["mid"][1 - half]).abs().max() > 0 or guess


def test_ablation_all_off_still_applies_the_controlnet(pipe, concepts, nets, image):
    off = dict(enhance=False, isolate=False, reinit=False)
    cond = {"kind": "controlnet", "model": nets["b"][0], "image": image}
    a, ia = compose_latents(pipe, _spec(concepts, **off))
    b, ib = compose_latents(pipe, _spec(concepts, [cond], **off))
    assert ia["optimised_steps"] == ib["optimised_steps"] == 0 and not ib["reinit"]
    assert (a - b).abs().max() > 1e-3


# --- refusals and bad input -------------------------------------------------------------------------------------

def test_controlnets_for_other_bases_are_refused_by_name(nets, tmp_path):
    def folder(name, cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **cfg}))
        return str(d)
    with pytest.raises(CheckpointError, match=r"SD2\.x"):
        load_controlnet(folder("sd21", {"cross_attention_dim": 1024, "use_linear_projection": True}), TINY)
    with pytest.raises(CheckpointError, match="SDXL"):
        load_controlnet(folder("sdxl", {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}), TINY)
    sd = ldm_state_dict(load_controlnet(nets["a"][0], TINY))
    sd2 = {k: (torch.zeros(v.shape[0], 1024) if k.endswith("attn2.to_k.weight") else v) for k, v in sd.items()}
    p = tmp_path / "control_v11p_sd21_x.safetensors"
    save_safetensors(sd2, str(p))
    with pytest.raises(CheckpointError, match=r"control_v11p_sd21_x.safetensors: ControlNet for SD2\.x"):
        load_controlnet(str(p), TINY)
    # a ControlNet whose widths are not the UNet's
    from dataclasses import replace
    other = replace(TINY, block_out_channels=(16, 32, 32, 32))
    with pytest.raises(CheckpointError, match="another base model"):
        load_controlnet(nets["a"][0], other)


def test_bad_controlnet_inputs(pipe, nets, image, tmp_path):
    from composer.t2i_adapter import T2IAdapter, original_state_dict
    ok = {"kind": "controlnet", "model": nets["a"][0], "image": image}
    gen = lambda c: pipe.sample_latents("a", steps=1, height=64, width=96, conditions=[c])
    ad = tmp_path / "t2iadapter_x.pth"
    torch.save(original_state_dict(T2IAdapter()), str(ad))
    with pytest.raises(CheckpointError, match=r"t2iadapter_x.pth: a T2I-Adapter, not a ControlNet"):
        gen({**ok, "model": str(ad)})
    broken = tmp_path / "control_broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="control_broken.safetensors"):
        gen({**ok, "model": str(broken)})
    with pytest.raises(FileNotFoundError, match=r"conditions\[0\]\.model: controlnet not found"):
        gen({**ok, "model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"conditions\[0\]\.image: 4 channel\(s\), the model takes 3"):
        gen({**ok, "image": torch.rand(4, 64, 96)})
    with pytest.raises(ValueError, match="guess_mode applies to a ControlNet only"):
        gen({**ok, "kind": "t2i-adapter", "guess_mode": True})


def test_inspect_describes_controlnets(nets, tmp_path):
    from weights_tools.inspect import inspect_path
    s = inspect_path(nets["a"][0])
    assert "ControlNet folder" in s and "3-channel condition image" in s
    p = tmp_path / "control_v11p_sd15_x.safetensors"
    save_safetensors(ldm_state_dict(load_controlnet(nets["a"][0], TINY)), str(p))
    s = inspect_path(str(p))
    assert "ControlNet (original names, prefix control_model.)" in s and "12 zero convolutions" in s
