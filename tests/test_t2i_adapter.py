"""T2I-Adapter conditions: the network against diffusers' T2IAdapter, the original (TencentARC) layout, whole
generate() against StableDiffusionAdapterPipeline, the per-region weight maps, composition (loss pass, re-init,
both CFG halves, ablation switches), the command line and bad input."""
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import composer
from composer.checkpoint import CheckpointError
from composer.compose import ComposeSpec, compose_latents
from composer.conditions import Conditions, Condition, build_conditions, canny, load_condition_image
from composer.losses import box_mask
from composer.t2i_adapter import load_t2i_adapter, original_state_dict
from composer.tiny import random_edlora
from conftest import max_rel_err, perturb

CH = [32, 64, 64, 64]  # the tiny UNet's level widths


def _diffusers_adapter(cin, kind="full_adapter", seed=5):
    from diffusers import T2IAdapter
    ch, nrb = (CH, 2) if kind == "full_adapter" else (CH[:3], 4)
    return perturb(T2IAdapter(in_channels=cin, channels=ch, num_res_blocks=nrb, adapter_type=kind), std=0.2,
                   seed=seed).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, cin, kind, seed in (("rgb", 3, "full_adapter", 5), ("gray", 1, "full_adapter", 6),
                                  ("light", 3, "light_adapter", 7)):
        m = _diffusers_adapter(cin, kind, seed)
        m.save_pretrained(str(d / name))
        out[name] = (str(d / name), m)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond_images")
    rs = np.random.RandomState(0)
    out = {}
    for name, (h, w) in (("a", (64, 96)), ("b", (128, 128)), ("c", (64, 64))):
        p = d / f"{name}.png"
        Image.fromarray((rs.rand(h, w, 3) * 255).astype(np.uint8)).save(p)
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def pipe(ref_pipe_dir):
    return composer.load(ref_pipe_dir)


def _pil(path, mode):
    return Image.open(path).convert(mode)


# --- the network --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rgb", "gray", "light"])
def test_features_match_diffusers(adapters, name, tmp_path):
    path, ref = adapters[name]
    ours = load_t2i_adapter(path)
    cin = ref.config.in_channels
    from composer.io import save_safetensors
    bare = tmp_path / "bare.safetensors"  # diffusers names without config.json: the config is read from shapes
    save_safetensors(ours.state_dict(), str(bare))
    ours2 = load_t2i_adapter(str(bare))
    assert ours2.cfg == ours.cfg
    for h, w in ((64, 96), (72, 40)):
        x = torch.rand(1, cin, h, w)
        with torch.no_grad():
            a, b, c = ref(x), ours(x), ours2(x)
        assert [f.shape for f in a] == [f.shape for f in b] and len(b) == 4
        assert [f.shape[1] for f in b] == CH
        assert max(max_rel_err(u, v) for u, v in zip(b, a)) <= 1e-4
        assert all(torch.equal(u, v) for u, v in zip(b, c))


class _OrigBlock(nn.Module):
    """The original T2I-Adapter ResnetBlock as the SD1 adapters use it (sk=True, ksize=1, use_conv=False):
    (average-pool when it opens a level), a 1×1 in_conv when the width changes, 3×3 conv, ReLU, 1×1 conv, + input."""

    def __init__(self, cin, cout, down):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.block1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.block2 = nn.Conv2d(cout, cout, 1)

    def forward(self, x):
        x = F.avg_pool2d(x, 2, 2) if self.down else x
        x = self.in_conv(x) if self.in_conv is not None else x
        return self.block2(F.relu(self.block1(x))) + x


class _OrigAdapter(nn.Module):
    """The original Adapter: pixel-unshuffle, conv_in, one flat list of len(channels)·nrb blocks."""

    def __init__(self, cin, channels, nrb=2):
        super().__init__()
        self.nrb, self.levels = nrb, len(channels)
        self.unshuffle = nn.PixelUnshuffle(8)
        self.body = nn.ModuleList([_OrigBlock(channels[i - 1] if i and not j else channels[i], channels[i], i > 0 and j == 0)
                                   for i in range(len(channels)) for j in range(nrb)])
        self.conv_in = nn.Conv2d(cin * 64, channels[0], 3, padding=1)

    def forward(self, x):
        x, out = self.conv_in(self.unshuffle(x)), []
        for i in range(self.levels):
            for j in range(self.nrb):
                x = self.body[i * self.nrb + j](x)
            out.append(x)
        return out


class _OrigLight(nn.Module):
    """The original Adapter_light: per level (average-pool for levels > 0) 1×1 in_conv to C/4, residual blocks of two
    3×3 convs (nested ``body``), 1×1 out_conv."""

    def __init__(self, cin, channels, nrb=4):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(8)
        self.body = nn.ModuleList()
        for i, c in enumerate(channels):
            lv = nn.Module()
            lv.in_conv = nn.Conv2d(cin * 64 if i == 0 else channels[i - 1], c // 4, 1)
            lv.body = nn.ModuleList()
            for _ in range(nrb):
                rb = nn.Module()
                rb.block1, rb.block2 = nn.Conv2d(c // 4, c // 4, 3, padding=1), nn.Conv2d(c // 4, c // 4, 3, padding=1)
                lv.body.append(rb)
            lv.out_conv = nn.Conv2d(c // 4, c, 1)
            self.body.append(lv)

    def forward(self, x):
        x, out = self.unshuffle(x), []
        for i, lv in enumerate(self.body):
            x = lv.in_conv(F.avg_pool2d(x, 2, 2) if i else x)
            for rb in lv.body:
                x = rb.block2(F.relu(rb.block1(x))) + x
            x = lv.out_conv(x)
            out.append(x)
        return out


@pytest.mark.parametrize("name", ["rgb", "gray", "light"])
def test_original_pth_layout_round_trip(adapters, name, tmp_path):
    """Our exporter writes the original names; the original architecture (rebuilt above from the paper's code
    description) loads them strictly and computes diffusers' features; our loader reads the .pth back
    (weights_only) to the same features."""
    path, ref = adapters[name]
    cin = ref.config.in_channels
    ours = load_t2i_adapter(path)
    sd = original_state_dict(ours)
    orig = _OrigLight(cin, CH) if name == "light" else _OrigAdapter(cin, CH)
    orig.load_state_dict(sd, strict=True)
    p = tmp_path / "t2iadapter_test_sd14v1.pth"
    torch.save(sd, str(p))
    back = load_t2i_adapter(str(p))
    x = torch.rand(1, cin, 64, 128)  # multiples of 64: the original pools without ceil_mode
    with torch.no_grad():
        a, o, b = ref(x), orig(x), back(x)
    assert max(max_rel_err(u, v) for u, v in zip(o, a)) <= 1e-5
    assert all(torch.equal(u, v) for u, v in zip(b, ours(x)))


# --- whole images against diffusers --------------------------------------------------------------------------------

def _adapter_pipeline(ref_pipe, adapter):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionAdapterPipeline
    return StableDiffusionAdapterPipeline(
        vae=ref_pipe.vae, text_encoder=ref_pipe.text_encoder, tokenizer=ref_pipe.tokenizer, unet=ref_pipe.unet,
        adapter=adapter, scheduler=DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _img(pipe, lat):
    return (pipe.decode(lat) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


KW = dict(negative_prompt="blurry", steps=4, guidance=7.5, seed=3, height=64, width=96, sampler="dpm++2m")


def test_generate_matches_adapter_pipeline(ref_pipe, pipe, adapters, images):
    path, ref = adapters["rgb"]
    ref_img = _adapter_pipeline(ref_pipe, ref)(
        "a cat", image=_pil(images["a"], "RGB"), negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
        height=64, width=96, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        adapter_conditioning_scale=0.8).images[0]
    ours = _img(pipe, pipe.sample_latents("a cat", conditions=[
        {"kind": "t2i-adapter", "model": path, "image": images["a"], "weight": 0.8}], **KW))
    plain = _img(pipe, pipe.sample_latents("a cat", **KW))
    assert np.abs(plain - ref_img).max() > 1e-2  # the adapter changes the image
    assert np.abs(ours - ref_img).max() <= 1e-4


def test_two_adapters_summed_match_multi_adapter(ref_pipe, pipe, adapters, images):
    from diffusers import MultiAdapter
    (p1, a1), (p2, a2) = adapters["rgb"], adapters["gray"]
    ref_img = _adapter_pipeline(ref_pipe, MultiAdapter([a1, a2]))(
        "a cat", image=[_pil(images["a"], "RGB"), _pil(images["a"], "L")], negative_prompt="blurry",
        num_inference_steps=4, guidance_scale=7.5, height=64, width=96,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        adapter_conditioning_scale=[0.6, 0.9]).images[0]
    ours = _img(pipe, pipe.sample_latents("a cat", conditions=[
        {"kind": "t2i-adapter", "model": p1, "image": images["a"], "weight": 0.6},
        {"kind": "t2i-adapter", "model": p2, "image": images["a"], "weight": 0.9}], **KW))
    assert np.abs(ours - ref_img).max() <= 1e-4


def test_weight_zero_is_no_condition_and_start_end_gate_steps(pipe, adapters, images):
    kw = dict(KW, steps=3)
    plain = pipe.sample_latents("a cat", **kw)
    zero = pipe.sample_latents("a cat", conditions=[{"kind": "t2i-adapter", "model": adapters["rgb"][0],
                                                     "image": images["a"], "weight": 0.0}], **kw)
    assert torch.equal(zero, plain)  # h + 0·f == h exactly
    c = Condition("t2i-adapter", None, None, start=0.33, end=0.67)
    assert [c.active(i, 3) for i in range(3)] == [False, True, False]  # step i of n: start <= i/n, (i+1)/n <= end


# --- per-region weights ----------------------------------------------------------------------------------------

BOXES = [(0.0, 0.0, 0.5, 0.625), (0.25, 0.5, 1.0, 1.0)]  # fractional (top, left, bottom, right), overlapping


def _region_mask(r, h, w, device):
    return box_mask(BOXES[r], h, w, device)


def _cells(box, h, w):
    """The ceil/floor box rule, written out: rows ceil(top·h)..floor(bottom·h)-1, columns likewise."""
    import math
    return (slice(math.ceil(box[0] * h), math.floor(box[2] * h)), slice(math.ceil(box[1] * w), math.floor(box[3] * w)))


def _conds(model, image, **kw):
    return Conditions([Condition("t2i-adapter", model, image, **kw)], _region_mask)


def test_region_weight_maps_exact(pipe, adapters, images):
    model = load_t2i_adapter(adapters["rgb"][0])
    image = load_condition_image(images["b"], 3, 128, 128)
    with torch.no_grad():
        raw = model(image)
    # global 0.7; box 0 at 0, box 1 at 1.5 (absolute weights, set over the box cells; the higher index wins
    # where the boxes overlap)
    got = _conds(model, image, weight=0.7, regions={0: 0.0, 1: 1.5}).adapter_features(0)
    for f, g in zip(raw, got):
        h, w = f.shape[-2:]
        m = torch.full((h, w), 0.7)
        m[_cells(BOXES[0], h, w)] = 0.0
        m[_cells(BOXES[1], h, w)] = 1.5
        assert torch.equal(g, f * m), (h, w)
        if (m == 0).any():  # box 0 outside box 1: exactly nothing is added there
            assert (g[..., m == 0] == 0).all()
        assert torch.equal(g[..., m == 0.7], (f * 0.7)[..., m == 0.7])
    # through the UNet: where box 0 has weight 0, level 0's output (the first place the features join) is exactly
    # the unconditioned one; elsewhere it is not
    x, ctx = torch.randn(1, 4, 16, 16), pipe.encode_prompt(["a"])
    with torch.no_grad():
        temb = pipe.unet.embed_time(torch.tensor(500), x)
        _, s0 = pipe.unet.encode(x, temb, ctx)
        _, s1 = pipe.unet.encode(x, temb, ctx, intrablock_residuals=got)
    zero = (got[0][0] == 0).all(0)
    assert zero.any() and torch.equal(s1[2][..., zero], s0[2][..., zero])
    assert (s1[2][..., ~zero] - s0[2][..., ~zero]).abs().max() > 1e-3
    # weights are absolute: a region at the global weight, and 1 everywhere, is the global adapter itself
    one = _conds(model, image, weight=1.0, regions={0: 1.0, 1: 1.0}).adapter_features(0)
    glob = _conds(model, image, weight=1.0).adapter_features(0)
    assert all(torch.equal(a, b) for a, b in zip(one, glob))
    # on a coarse grid the ceil/floor rule can leave a box no cell: box 0 on the 2×2 level is cell (0, 0)
    m = _conds(model, image, weight=0.5, regions={0: 0.0}).weight_map(0, 2, 2, "cpu")
    assert m[0, 0].tolist() == [[0.0, 0.5], [0.5, 0.5]]


# --- composition ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def concepts(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("concepts_t2i")
    out = []
    for i, words in enumerate((["<cat1>", "<cat2>"], ["<dog1>", "<dog2>"])):
        p = d / f"c{i}.pth"
        torch.save(random_edlora(pipe, words, seed=20 + i), str(p))
        out.append(str(p))
    return out


def _spec(concepts, conditions=(), **kw):
    regions = [{"prompt": "a <cat1> <cat2>", "box": list(BOXES[0]), "lora": concepts[0]},
               {"prompt": "a <dog1> <dog2>", "box": list(BOXES[1]), "lora": concepts[1]}]
    return ComposeSpec.from_dict(dict(prompt="a photo", height=128, width=128, steps=3, seed=4, regions=regions,
                                      conditions=list(conditions), **kw))


def _spy(pipe, monkeypatch):
    calls, real = [], pipe.unet.forward

    def fwd(x, t, ctx, regions=None, **kw):
        calls.append({"n": x.shape[0], "grad": torch.is_grad_enabled(), "store": regions is not None and regions.store,
                      **{k: kw.get(k) for k in ("intrablock_residuals", "down_residuals", "mid_residual")}})
        return real(x, t, ctx, regions=regions, **kw)
    monkeypatch.setattr(pipe.unet, "forward", fwd)
    return calls


def test_conditions_reach_reinit_loss_pass_and_both_cfg_halves(pipe, concepts, adapters, images, monkeypatch):
    cond = {"kind": "t2i-adapter", "model": adapters["rgb"][0], "image": images["b"], "weight": 0.8,
            "regions": {"1": 0.3}}
    model = load_t2i_adapter(adapters["rgb"][0])
    image = load_condition_image(images["b"], 3, 128, 128)
    want = _conds(model, image, weight=0.8, regions={1: 0.3}).adapter_features(0)
    _, plain = compose_latents(pipe, _spec(concepts))
    calls = _spy(pipe, monkeypatch)
    _, info = compose_latents(pipe, _spec(concepts, [cond]))
    reinit, loss, cfg = calls[0], [c for c in calls if c["grad"]], [c for c in calls if c["n"] == 2]
    assert reinit["n"] == 1 and reinit["store"] and not reinit["grad"]
    assert len(loss) == info["optimised_steps"] >= 1 and len(cfg) == 3
    for c in [reinit] + loss + cfg:
        feats = c["intrablock_residuals"]
        assert feats is not None and len(feats) == 4
        for f, w in zip(feats, want):
            assert all(torch.allclose(f[b:b + 1], w, atol=1e-6) for b in range(c["n"]))  # every half, every pass
    # the condition changes what the loss pass sees
    assert not np.allclose(info["loss"][0], plain["loss"][0])


@pytest.mark.parametrize("switches", [{}, {"reinit": False}, {"isolate": False, "reinit": False},
                                      {"enhance": False, "isolate": False, "reinit": False}])
def test_ablation_switches_with_a_condition(pipe, concepts, adapters, images, switches):
    cond = {"kind": "t2i-adapter", "model": adapters["gray"][0], "image": images["b"]}
    lat0, info0 = compose_latents(pipe, _spec(concepts, **switches))
    lat, info = compose_latents(pipe, _spec(concepts, [cond], **switches))
    assert (lat - lat0).abs().max() > 1e-3  # the adapter acts under every switch setting
    assert info["reinit"] == info0["reinit"] == switches.get("reinit", True)
    off = not switches.get("enhance", True) and not switches.get("isolate", True)
    assert (info["optimised_steps"] == 0) == off


# --- inputs: spec, command line, images, errors ----------------------------------------------------------------------

def test_cli_condition_record_and_rerun(ref_pipe_dir, adapters, images, tmp_path, capsys):
    from composer.io import read_png_spec
    from composer.sample import main
    out = tmp_path / "a.png"
    assert main(["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
                 "--condition", f"t2i-adapter:{adapters['rgb'][0]}:{images['c']}:0.6", "--out", str(out),
                 "--quiet"]) == 0
    rec = read_png_spec(str(out))
    (c,) = rec["conditions"]
    assert c["kind"] == "t2i-adapter" and c["weight"] == 0.6 and c["image"]["name"] == "c.png"
    assert len(c["image"]["sha256"]) == 64 and c["model"]["path"] == os.path.abspath(adapters["rgb"][0])
    again = tmp_path / "b.png"
    assert main(["--spec", str(out), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    # a spec file: paths relative to it
    (tmp_path / "img.png").write_bytes(open(images["c"], "rb").read())
    spec = {"prompt": "a cat", "steps": 2, "height": 64, "width": 64,
            "conditions": [{"kind": "t2i-adapter", "model": adapters["rgb"][0], "image": "img.png", "weight": 0.6}]}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    third = tmp_path / "c.png"
    assert main(["--model", ref_pipe_dir, "--spec", str(tmp_path / "s.json"), "--out", str(third), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(third)))


def test_image_resized_with_a_warning_and_channels_converted(images, caplog):
    with caplog.at_level(logging.WARNING):
        t = load_condition_image(images["a"], 1, 128, 128, "conditions[0]")
    assert "64x96" not in caplog.text and "96x64" in caplog.text and "resized" in caplog.text
    want = np.asarray(_pil(images["a"], "L").resize((128, 128), Image.LANCZOS), dtype=np.float32) / 255.0
    assert t.shape == (1, 1, 128, 128) and torch.equal(t[0, 0], torch.from_numpy(want))
    g16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    t16 = load_condition_image(g16, 3, 64, 64)
    assert t16.shape == (1, 3, 64, 64) and abs(float(t16.max()) - 4095 * 16 / 65535) < 1e-6  # 16-bit depth kept


def test_canny_edges():
    a = np.zeros((32, 32), np.uint8)
    a[8:24, 8:24] = 255   # strong square: its outline
    a[2:5, 26:30] = 30    # weak isolated patch (gradient below the high threshold): dropped by hysteresis
    e = np.asarray(canny(Image.fromarray(a))) > 0
    assert e[8:24, 8:24].any() and not e[12:20, 12:20].any() and not e[:6, 24:].any()
    rows = e[16]  # one-pixel-thin edges across the middle row: one on each side of the square
    assert rows.sum() == 2 and (e[:, :4] == 0).all()
    img = load_condition_image(Image.fromarray(a), 3, 32, 32, preprocess="canny")
    assert img.shape == (1, 3, 32, 32) and torch.equal(img[0, 0] > 0, torch.from_numpy(e))


def test_bad_inputs_name_the_field_or_file(pipe, adapters, images, tmp_path):
    ok = {"kind": "t2i-adapter", "model": adapters["rgb"][0], "image": images["c"]}
    gen = lambda c: pipe.sample_latents("a", steps=1, height=64, width=64, conditions=[c])
    with pytest.raises(FileNotFoundError, match=r"conditions\[0\]\.image.*nope\.png"):
        gen({**ok, "image": str(tmp_path / "nope.png")})
    with pytest.raises(ValueError, match=r"conditions\[0\]\.image: 1 channel\(s\), the model takes 3"):
        gen({**ok, "image": torch.rand(1, 64, 64)})
    with pytest.raises(ValueError, match=r"conditions\[0\]\.kind: unknown kind 'lora'"):
        gen({**ok, "kind": "lora"})
    with pytest.raises(ValueError, match=r"conditions\[0\]\.regions: region 0 does not exist"):
        gen({**ok, "regions": {"0": 0.5}})
    with pytest.raises(ValueError, match=r"conditions\[0\]: unknown field\(s\) \['strength'\]"):
        ComposeSpec.from_dict({"prompt": "a", "conditions": [{**ok, "strength": 1}]})
    with pytest.raises(ValueError, match=r"start < end"):
        ComposeSpec.from_dict({"prompt": "a", "conditions": [{**ok, "start": 0.8, "end": 0.2}]})
    not_img = tmp_path / "x.png"
    not_img.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"x\.png is not a readable image"):
        gen({**ok, "image": str(not_img)})
    # corrupt and foreign adapter files
    bad = tmp_path / "t2iadapter_broken_sd14v1.pth"
    torch.save(original_state_dict(load_t2i_adapter(adapters["rgb"][0])), str(bad))
    bad.write_bytes(bad.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="t2iadapter_broken_sd14v1.pth"):
        gen({**ok, "model": str(bad)})
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter", "adapter_type": "full_adapter_xl",
                                                "in_channels": 3, "channels": [320, 640, 1280, 1280]}))
    with pytest.raises(CheckpointError, match="SDXL"):
        gen({**ok, "model": str(xl)})
    from diffusers import T2IAdapter
    other = tmp_path / "other"
    T2IAdapter(in_channels=3, channels=[16, 32, 32, 32]).save_pretrained(str(other))
    with pytest.raises(CheckpointError, match=r"another base model"):
        gen({**ok, "model": str(other)})
    style = tmp_path / "t2iadapter_style_sd14v1.pth"
    torch.save({"style_embedding": torch.zeros(1, 8, 4), "ln_post.weight": torch.ones(4)}, str(style))
    with pytest.raises(CheckpointError, match="style adapter"):
        gen({**ok, "model": str(style)})
    with pytest.raises(ValueError, match=r"--condition 'controlnet:x'"):
        from composer.conditions import parse_condition_arg
        parse_condition_arg("controlnet:x")


def test_inspect_describes_adapters(adapters, tmp_path):
    from weights_tools.inspect import inspect_path
    s = inspect_path(adapters["gray"][0])
    assert "T2I-Adapter folder" in s and "1-channel" in s and "[32, 64, 64, 64]" in s
    p = tmp_path / "t2iadapter_x_sd14v1.pth"
    torch.save(original_state_dict(load_t2i_adapter(adapters["light"][0])), str(p))
    s = inspect_path(str(p))
    assert "T2I-Adapter, light_adapter (original TencentARC names)" in s and "3-channel" in s
