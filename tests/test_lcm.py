"""LCM-LoRA: a file shaped like the public SD1.5 LCM-LoRA (latent-consistency/lcm-lora-sdv1-5: UNet only,
attention q/k/v/out, proj_in/proj_out, feed-forward, resnet conv1/conv2/conv_shortcut, time_emb_proj and the
down/up-sampler convs), written by diffusers+peft in the PEFT form and, with the same deltas, in kohya naming.
Both load strictly as a merged (background) LoRA, give diffusers' load_lora_weights UNet, and a few-step
LCM / TCD generate() gives StableDiffusionPipeline's image with LCMScheduler / TCDScheduler and that LoRA."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import composer
from composer.checkpoint import CheckpointError
from conftest import max_rel_err

LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
RANK, ALPHA = 8, 4  # scale alpha / r = 0.5 (not 1, so a lost scale shows)


@pytest.fixture(scope="module")
def lcm_peft(ref_pipe_dir, tmp_path_factory):
    """PEFT form, as diffusers' save_lora_weights writes it (unet.<path>.lora_A/B.weight + adapter metadata)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = UNet2DConditionModel.from_pretrained(ref_pipe_dir, subfolder="unet")
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LCM_TARGETS, init_lora_weights=False)
    unet.add_adapter(cfg)
    sd = get_peft_model_state_dict(unet)
    g = torch.Generator().manual_seed(21)
    for k in sd:  # sizeable deltas: the LoRA must visibly change every output
        sd[k] = torch.randn(sd[k].shape, generator=g) * 0.15
    d = tmp_path_factory.mktemp("lcm_peft")
    StableDiffusionPipeline.save_lora_weights(str(d), unet_lora_layers=sd, unet_lora_adapter_metadata=cfg.to_dict())
    return str(d / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def lcm_kohya(lcm_peft, tmp_path_factory):
    """The same deltas in kohya naming: lora_unet_<diffusers path with _>.lora_down/lora_up/alpha."""
    out = {}
    for k, v in load_file(lcm_peft).items():
        mod, role = k.rsplit(".lora_", 1)
        name = "lora_unet_" + mod[len("unet."):].replace(".", "_")
        out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(float(ALPHA))
    p = tmp_path_factory.mktemp("lcm_kohya") / "lcm_kohya.safetensors"
    save_file(out, str(p))
    return str(p)


@pytest.fixture(scope="module")
def ref_lcm(ref_pipe_dir, lcm_peft):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(ref_pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lcm_peft)
    return pipe


@pytest.fixture(scope="module")
def ours_lcm(ref_pipe_dir, lcm_kohya):
    pipe = composer.load(ref_pipe_dir)
    pipe.load_lora(lcm_kohya, mode="merge", name="lcm")
    return pipe


def test_file_is_lcm_lora_shaped(lcm_peft, lcm_kohya):
    """Every target kind of the public file is present, conv LoRAs included; the kohya names are the ones
    diffusers' own PEFT -> kohya converter produces."""
    from diffusers.utils import convert_state_dict_to_kohya
    peft = load_file(lcm_peft)
    mods = {k.rsplit(".lora_", 1)[0] for k in peft}
    for t in LCM_TARGETS:
        assert any(m.endswith("." + t) for m in mods), t
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in peft.values())  # 3×3 conv LoRAs
    theirs = {k.split(".")[0] for k in convert_state_dict_to_kohya({k[len("unet."):]: v for k, v in peft.items()})}
    ours = {k.split(".")[0] for k in load_file(lcm_kohya)}
    assert {k.replace("lora_unet_", "") for k in ours} == theirs


@pytest.mark.parametrize("which", ["peft", "kohya"])
@pytest.mark.parametrize("mode", ["merge", "live"])
def test_unet_matches_diffusers_load_lora_weights(ref_pipe_dir, ref_pipe, ref_lcm, lcm_peft, lcm_kohya, which, mode):
    pipe = composer.load(ref_pipe_dir)
    path = lcm_peft if which == "peft" else lcm_kohya
    lora = pipe.load_lora(path, mode=mode, strict=True)
    assert not lora.unmatched and {m.model for m in lora.modules} == {"unet"}
    assert len(lora.modules) == len({k.rsplit(".lora_", 1)[0] for k in load_file(lcm_peft)})
    assert all(m.scale == pytest.approx(ALPHA / RANK) for m in lora.modules)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = ref_lcm.unet(x, 759, ctx).sample
        base = ref_pipe.unet(x, 759, ctx).sample
        got = pipe.unet(x, 759, ctx)
    assert max_rel_err(base, want) > 1e-2  # the LoRA changes the output...
    assert max_rel_err(got, want) <= 1e-5  # ...exactly as diffusers applies it


def test_strict_load_refuses_an_unknown_module(ref_pipe_dir, lcm_kohya, tmp_path):
    sd = load_file(lcm_kohya)
    sd["lora_unet_down_blocks_0_norm9.lora_down.weight"] = torch.zeros(RANK, 32)
    sd["lora_unet_down_blocks_0_norm9.lora_up.weight"] = torch.zeros(32, RANK)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError, match="down_blocks_0_norm9"):
        composer.load(ref_pipe_dir).load_lora(str(bad))


def _ref_image(ref_pipe, cls_name, steps, guidance, seed, eta=0.0):
    import diffusers
    folder = diffusers.PNDMScheduler.from_pretrained(ref_pipe.config._name_or_path, subfolder="scheduler").config
    ref_pipe.scheduler = getattr(diffusers, cls_name).from_config(folder)
    out = ref_pipe("a photo of a cat", negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                   height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", eta=eta)
    return out.images[0]


def _img(pipe, lat):
    return (pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("sampler,cls_name,eta", [("lcm", "LCMScheduler", None), ("tcd", "TCDScheduler", 0.3)])
def test_few_step_generate_matches_diffusers(ref_lcm, ours_lcm, sampler, cls_name, eta):
    """4 steps at guidance 1.5 (LCM-LoRA's range 1-2: CFG still runs as a batch of two)."""
    ref = _ref_image(ref_lcm, cls_name, 4, 1.5, 77, eta=eta or 0.0)
    lat = ours_lcm.sample_latents("a photo of a cat", steps=4, guidance=1.5, seed=77, height=64, width=64,
                                  sampler=sampler, eta=eta)
    assert ref.std() > 1e-3
    assert np.abs(_img(ours_lcm, lat) - ref).max() <= 1e-4


def test_background_lora_in_compose(ours_lcm, our_pipe, lcm_peft):
    """As a composition's background LoRA (merged for the call, unmerged after), the PEFT file gives the same
    LCM latents as the kohya file merged by hand."""
    from composer.compose import compose_latents
    pipe = our_pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    spec = {"prompt": "a photo of a cat", "height": 64, "width": 64, "steps": 4, "guidance": 1.5, "seed": 9,
            "sampler": "lcm", "background_lora": lcm_peft}
    lat, _ = compose_latents(pipe, spec)
    want = ours_lcm.sample_latents("a photo of a cat", steps=4, guidance=1.5, seed=9, height=64, width=64,
                                   sampler="lcm")
    assert max_rel_err(lat, want) <= 1e-5
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
