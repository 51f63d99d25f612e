"""The VAE decoder's fast path against the reference path (and diffusers), the sub-pixel upsampling conv, the
weight layout switch, and tiled decoding: tile placement, blending, seams, odd sizes, the automatic default,
bad arguments, the spec field and the CLI flag."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import max_rel_err
from composer.vae import (AUTO_TILE, AutoencoderKL, VAEConfig, auto_tile, decode_tiled, tile_spans,
                          upsample_conv)


@pytest.fixture(scope="module")
def vae(our_pipe):
    """The tiny perturbed VAE of the reference pipeline, copied so that layout switches stay local."""
    return copy.deepcopy(our_pipe.vae)


def conv_weights(m):
    """The decoder's 3×3 conv weights (for 1×1 kernels the two layouts coincide)."""
    return [p for p in m.decoder.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


# --- the fast path --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_is_nearest_upsample_then_conv(fmt, bias):
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=fmt)  # odd sizes: every border case of the phases
    with torch.no_grad():
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        got = upsample_conv(conv, x)
    assert got.shape == (2, 5, 10, 14)
    assert got.is_contiguous(memory_format=fmt)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fast_decode_matches_reference_and_diffusers(ref_pipe, vae):
    z = torch.randn(2, 4, 13, 10)  # batch 2, odd latent
    with torch.no_grad():
        ref = vae.decode(z, fast=False)
        fast = vae.decode(z)
        theirs = ref_pipe.vae.decode(z).sample
    assert fast.shape == (2, 3, 104, 80) and fast.is_contiguous()
    assert max_rel_err(ref, theirs) <= 1e-5  # the reference path: diffusers' ops (GEMM layouts may round apart)
    err = max_rel_err(fast, ref)
    assert err <= 1e-5
    assert err > 0  # the fast path really ran (sub-pixel convs round differently)
    assert max_rel_err(fast, theirs) <= 2e-5


def test_fast_decode_matches_reference_at_sd15_width():
    """SD1.5's channel widths (128-512) and groups, small latent: the bound holds at the real sizes too."""
    torch.manual_seed(0)
    m = AutoencoderKL(VAEConfig()).eval()
    z = torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        assert max_rel_err(m.decode(z), m.decode(z, fast=False)) <= 1e-5


def test_layout_switch_keeps_values_and_reference_bits(vae):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z, fast=False)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.inference_mode():  # the bench's context: the converted weights must stay ordinary tensors
        vae.decode(z)
    ws = conv_weights(vae)
    assert ws and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in ws)
    assert not any(p.is_inference() for p in vae.parameters())
    after = vae.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    vae.load_state_dict(before)  # in-place copy into the converted parameters works outside inference mode
    with torch.no_grad():
        again = vae.decode(z, fast=False)
    assert all(p.is_contiguous() for p in conv_weights(vae))
    assert torch.equal(again, ref)


# --- tiles ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,tile,overlap", [(13, 8, 2), (100, 64, 16), (128, 64, 16), (96, 64, 16), (17, 4, 1),
                                            (10, 3, 0), (64, 64, 16), (65, 64, 16), (9, 5, 4), (200, 7, 3)])
def test_tile_spans_cover_exactly(n, tile, overlap):
    spans = tile_spans(n, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    sizes = {e - s for s, e in spans}
    assert len(sizes) == 1 and 0 < sizes.pop() <= tile
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 - s1 >= overlap  # ordered, overlapping by at least `overlap`
    k = len(spans)
    assert k == 1 or (k - 1) * (tile - overlap) + tile < n + (tile - overlap)  # no tile more than needed


def local_decoder(vae):
    """A stand-in decode that is local and translation-equivariant (nearest ×8 of channels 0-2): tiling it changes
    nothing, so any error of placement or blend weights shows up exactly."""
    def decode(z, tile=0, overlap=None, fast=True):
        if tile:
            return decode_tiled(vae, z, tile, overlap, fast=fast)
        return F.interpolate(z[:, :3], scale_factor=vae.upscale, mode="nearest")
    return decode


@pytest.mark.parametrize("hw,tile,overlap", [((13, 10), 6, 2), ((13, 10), 4, 1), ((9, 31), 8, 3), ((16, 16), 5, 0),
                                             ((7, 12), 3, 2)])
def test_tiles_place_and_blend_exactly(vae, monkeypatch, hw, tile, overlap):
    monkeypatch.setattr(vae, "decode", local_decoder(vae))
    z = torch.randn(2, 4, *hw)
    out = vae.decode(z, tile=tile, overlap=overlap)
    want = F.interpolate(z[:, :3], scale_factor=8, mode="nearest")
    assert out.shape == want.shape
    assert (out - want).abs().max() <= 1e-6  # the ramps are a partition of unity; every pixel covered


def test_tile_as_large_as_the_image_is_the_untiled_decode(vae, our_pipe):
    z = torch.randn(1, 4, 13, 10)
    with torch.no_grad():
        untiled = vae.decode(z)
        assert torch.equal(vae.decode(z, tile=13), untiled)
        assert torch.equal(vae.decode(z, tile=40, overlap=3), untiled)
        assert torch.equal(vae.decode(z, tile=None), untiled)  # automatic: small images are not tiled
        lat = z * our_pipe.vae.scaling_factor
        assert torch.equal(our_pipe.decode(lat), our_pipe.decode(lat, tile=0))


def test_tiled_decode_blends_the_tiles_it_decodes(vae):
    """Two tiles across the width: outside the overlap each pixel is its tile's own decode, bit for bit; inside,
    a convex combination of the two (weights rising linearly)."""
    z = torch.randn(1, 4, 8, 20)
    (a0, a1), (b0, b1) = tile_spans(20, 12, 4)
    assert (a0, a1, b0, b1) == (0, 12, 8, 20)
    with torch.no_grad():
        out = vae.decode(z, tile=12, overlap=4)
        ta, tb = vae.decode(z[..., a0:a1]), vae.decode(z[..., b0:b1])
    f = 8
    assert torch.equal(out[..., :f * b0], ta[..., :f * b0])
    assert torch.equal(out[..., f * a1:], tb[..., f * (a1 - b0):])
    oa, ob, oo = ta[..., f * b0:], tb[..., :f * (a1 - b0)], out[..., f * b0:f * a1]
    lam = (torch.arange(f * (a1 - b0)) + 0.5) / (f * (a1 - b0))  # tile b's weight across the overlap
    assert (oo - (oa * (1 - lam) + ob * lam)).abs().max() <= 1e-5


def test_blended_seam_has_no_step(vae):
    """Across the overlap of two tiles a and b (L pixels, tile b's weight λ rising by 1/L per pixel) the blend
    out = (1-λ)·a + λ·b steps between neighbouring pixel columns by at most the tiles' own steps plus |b - a|/L:
    the gap between the tiles is spread over the overlap, never a jump. Cutting over from a to b at one column
    instead (a hard seam) breaks the same bound there, so the check can fail."""
    z = torch.randn(1, 4, 8, 20)
    (a0, a1), (b0, b1) = tile_spans(20, 12, 4)
    f, L = 8, 8 * (a1 - b0)
    with torch.no_grad():  # pixel columns f·b0 - 1 .. f·a1: the overlap and one column each side
        out = vae.decode(z, tile=12, overlap=4)[..., f * b0 - 1:f * a1 + 1]
        # each tile extended by replicating its edge column: its weight is 0 there, so any value keeps
        # out[c] - out[c-1] = (1-λc)·Δa + λc·Δb + (λc - λc-1)·(b - a)[c-1] exact
        ta = F.pad(vae.decode(z[..., a0:a1])[..., f * b0 - 1:], (0, 1, 0, 0), mode="replicate")
        tb = F.pad(vae.decode(z[..., b0:b1])[..., :f * (a1 - b0) + 1], (1, 0, 0, 0), mode="replicate")

    def bound_holds(img):
        step = (img[..., 1:] - img[..., :-1]).abs()
        da, db = ((t[..., 1:] - t[..., :-1]).abs() for t in (ta, tb))
        gap = (tb - ta).abs()[..., :-1]
        return bool((step <= torch.maximum(da, db) + gap / L + 1e-5).all())

    assert bound_holds(out)
    mid = out.shape[-1] // 2
    hard = torch.cat([ta[..., :mid], tb[..., mid:]], -1)
    assert (tb - ta).abs().max() > 0.1 and not bound_holds(hard)


def test_tiled_decode_stays_close_to_untiled(vae):
    """Per-tile GroupNorm and attention change the image. Measured on this tiny random model (13×10 latent, tile 8,
    overlap 2, latent seeds 0-5): max |Δ| 2.6-3.8 and mean |Δ| 0.28-0.40 on outputs of max |x| 4.4-6.4; its
    GroupNorms see 64 px tiles of an image with no large-scale structure, the worst case. The bounds keep a ~1.3x
    margin; SD1.5-sized figures are in bench/results/vae_cpu.json."""
    z = torch.randn(1, 4, 13, 10)
    with torch.no_grad():
        untiled = vae.decode(z)
        tiled = vae.decode(z, tile=8, overlap=2)
    d = (tiled - untiled).abs()
    assert tiled.shape == untiled.shape
    assert d.max() > 0  # it did tile
    assert d.max() <= 5.0 and d.mean() <= 0.5


def test_auto_tiling_above_768_squared(our_pipe):
    assert auto_tile(96, 96) == 0 and auto_tile(64, 128) == 0  # ≤ 768² pixels of area: untiled
    assert auto_tile(96, 97) == AUTO_TILE and auto_tile(128, 128) == AUTO_TILE
    lat = torch.randn(1, 4, 100, 97)  # 800×776 px
    with torch.no_grad():
        auto = our_pipe.decode(lat)
        explicit = our_pipe.decode(lat, tile=AUTO_TILE, overlap=AUTO_TILE // 4)
        untiled = our_pipe.decode(lat, tile=0)
    assert torch.equal(auto, explicit) and not torch.equal(auto, untiled)


@pytest.mark.parametrize("kw,match", [(dict(tile=-1), "tile must be a positive"),
                                      (dict(tile=8, overlap=8), r"overlap must be an integer in \[0, tile=8\)"),
                                      (dict(tile=8, overlap=-1), "overlap must be"),
                                      (dict(tile=2.5), "tile must be a positive")])
def test_bad_tile_arguments(vae, kw, match):
    with pytest.raises(ValueError, match=match):
        decode_tiled(vae, torch.randn(1, 4, 16, 16), **kw)


def test_spec_and_cli_carry_vae_tile(tmp_path, ref_pipe_dir):
    import json

    from PIL import Image

    from composer.sample import build_parser, main
    from composer.spec import ComposeSpec
    assert ComposeSpec.from_dict({"prompt": "x"}).vae_tile is None
    with pytest.raises(ValueError, match="'vae_tile' must be ≥ 0"):
        ComposeSpec.from_dict({"prompt": "x", "vae_tile": -4})
    with pytest.raises(ValueError, match="'vae_tile' must be an integer"):
        ComposeSpec.from_dict({"prompt": "x", "vae_tile": "big"})
    help_text = build_parser().format_help()
    assert "--vae-tile N" in help_text and "768²" in help_text
    outs = {}
    for t in ("0", "4"):  # 64² = 8×8 latent: tile 4 really tiles
        out = tmp_path / f"t{t}.png"
        assert main(["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
                     "--vae-tile", t, "--out", str(out), "--quiet"]) == 0
        outs[t] = Image.open(out)
        assert json.loads(outs[t].text["composer"])["vae_tile"] == int(t)
    import numpy as np
    a, b = (np.asarray(outs[t]).astype(int) for t in ("0", "4"))
    assert (a != b).any()
    again = tmp_path / "again.png"  # re-run from the PNG: the same tiling, the same image
    assert main(["--spec", str(tmp_path / "t4.png"), "--out", str(again), "--quiet"]) == 0
    assert (np.asarray(Image.open(again)).astype(int) == b).all()


def test_generate_and_batched_decode_carry_the_tile(our_pipe):
    """generate(vae_tile=N) and decode_images(tile=N) decode exactly as decode(tile=N), also for several seeds."""
    import numpy as np
    kw = dict(height=64, width=64, steps=2, seed=[3, 4])
    lat = our_pipe.sample_latents("a cat", **kw)
    with torch.no_grad():
        want = [np.asarray(im) for im in our_pipe.decode_images(lat, tile=4)]
        plain = [np.asarray(im) for im in our_pipe.decode_images(lat)]
        direct = our_pipe.decode(lat[1:], tile=4)
    got = [np.asarray(im) for im in our_pipe.generate("a cat", vae_tile=4, **kw)]
    assert all((g == w).all() for g, w in zip(got, want))
    assert any((w != p).any() for w, p in zip(want, plain))  # the tile reached the decoder
    from composer.pipeline import to_pil
    # a batch of one against the same image in a batch of two: other conv blocking, so rounding may move a level
    assert np.abs(np.asarray(to_pil(direct)[0]).astype(int) - want[1]).max() <= 1
