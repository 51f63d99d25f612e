"""LoRA-Composer semantics on the tiny model with random ED-LoRAs (method.md §4-§9, §11)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import composer
from composer.attention import merge_heads, split_heads
from composer.compose import ComposeSpec, compose, compose_latents, parse_region_string, prepare
from composer.tiny import random_edlora

WORDS = [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"), ("<owl1>", "<owl2>"), ("<fox1>", "<fox2>"), ("<emu1>", "<emu2>")]


@pytest.fixture(scope="module")
def concepts(our_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("concepts")
    paths = []
    for i, words in enumerate(WORDS):
        p = d / f"c{i}.pth"
        torch.save(random_edlora(our_pipe, list(words), seed=10 + i, key_style="new" if i % 2 else "old"), str(p))
        paths.append(str(p))
    return paths


@pytest.fixture()
def pipe(ref_pipe_dir):
    return composer.load(ref_pipe_dir)


def spec_for(concepts, n, **kw):
    """n concepts side by side, vertical strips of 64 px (2 cells of the 1/32 analysis grid each)."""
    width = kw.pop("width", 64 * n if n > 1 else 128)
    regions = [{"prompt": f"a {WORDS[i][0]} {WORDS[i][1]}", "box": [0, i / n, 1, (i + 1) / n], "lora": concepts[i]}
               for i in range(n)]
    base = dict(prompt="a photo", height=128, width=width, steps=3, seed=4, regions=regions)
    base.update(kw)
    return ComposeSpec.from_dict(base)


def test_no_regions_equals_generate(pipe):
    for sampler in ("dpm++2m", "ddim"):
        lat, info = compose_latents(pipe, ComposeSpec(prompt="a cat", negative_prompt="blurry", height=64, width=64,
                                                      steps=3, seed=2, sampler=sampler))
        ref = pipe.sample_latents("a cat", negative_prompt="blurry", height=64, width=64, steps=3, seed=2,
                                  sampler=sampler)
        assert torch.equal(lat, ref) and info["optimised_steps"] == 0


def concept_output(ra, attn, x, r):
    """Region r's cross-attention output computed by hand: base query, concept K/V/out adapters, own tokens."""
    name = ra.adapters[r]
    c = ra._region_context(r, attn.layer_index)
    q = split_heads(attn.to_q(x), attn.heads)
    k = split_heads(attn.to_k(c, adapter=(name,)), attn.heads)
    v = split_heads(attn.to_v(c, adapter=(name,)), attn.heads)
    o = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
    return attn.to_out[0](merge_heads(o), adapter=(name,))


def test_cross_attention_outside_is_base_inside_is_concept(pipe, concepts):
    spec = spec_for(concepts, 2)
    prep = prepare(pipe, spec)
    ra = prep.ra.for_batch(("cond",))
    blk = pipe.unet.transformer_blocks()[0]  # a 16×16 layer
    attn = blk.attn2
    h = w = 16
    x = torch.randn(1, h * w, attn.to_q.weight.shape[1])
    ctx = prep.cond[0] if prep.cond.ndim == 4 else prep.cond
    # boxes covering only the top half of each strip, so there is background
    ra.boxes = [(0, 0, 0.5, 0.5), (0, 0.5, 0.5, 1.0)]
    ra._tr.clear()
    with torch.no_grad():
        out = ra.cross_attention(attn, x, ctx, (h, w))
        base = attn(x, ctx)
        tr = ra.token_regions((h, w), x.device)
        bg = tr == 0
        torch.testing.assert_close(out[0, bg], base[0, bg], atol=1e-6, rtol=1e-6)
        for r in range(2):
            want = concept_output(ra, attn, x, r)
            inside = tr == (1 << r)
            assert inside.sum() > 0
            torch.testing.assert_close(out[0, inside], want[0, inside], atol=1e-5, rtol=1e-5)
            assert (want[0, inside] - base[0, inside]).abs().max() > 1e-3  # the concept really differs


def test_overlap_averages_projected_outputs(pipe, concepts):
    spec = spec_for(concepts, 2)
    prep = prepare(pipe, spec)
    ra = prep.ra.for_batch(("cond",))
    ra.boxes = [(0, 0, 1.0, 0.75), (0, 0.25, 1.0, 1.0)]
    ra._tr.clear()
    attn = pipe.unet.transformer_blocks()[0].attn2
    x = torch.randn(1, 256, attn.to_q.weight.shape[1])
    ctx = prep.cond[0] if prep.cond.ndim == 4 else prep.cond
    with torch.no_grad():
        out = ra.cross_attention(attn, x, ctx, (16, 16))
        tr = ra.token_regions((16, 16), x.device)
        both = tr == 3
        outs = [concept_output(ra, attn, x, r) for r in range(2)]
        torch.testing.assert_close(out[0, both], ((outs[0] + outs[1]) / 2)[0, both], atol=1e-5, rtol=1e-5)


def test_isolation_in_self_attention(pipe, concepts):
    prep = prepare(pipe, spec_for(concepts, 2))
    ra = prep.ra.for_batch(("cond",))
    ra.boxes = [(0, 0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    ra._tr.clear()
    attn = pipe.unet.transformer_blocks()[0].attn1
    tr = ra.token_regions((16, 16), "cpu")
    x = torch.randn(1, 256, attn.to_q.weight.shape[1])
    x2 = x.clone()
    x2[0, tr == 2] += 1.0  # change the tokens of box 1 (their keys and values)
    with torch.no_grad():
        a, b = ra.self_attention(attn, x, (16, 16)), ra.self_attention(attn, x2, (16, 16))
    torch.testing.assert_close(a[0, tr == 1], b[0, tr == 1], atol=1e-6, rtol=1e-6)  # box 0 queries: unchanged
    assert (a[0, tr == 0] - b[0, tr == 0]).abs().max() > 1e-3  # background queries still see box 1


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_compose_n_concepts_deterministic(pipe, concepts, n):
    spec = spec_for(concepts, n, steps=2)
    a, info = compose_latents(pipe, spec)
    b, _ = compose_latents(pipe, spec)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert info["reinit"] and info["optimised_steps"] == 2 and len(info["loss"]) == 2
    assert all(l > 0 for l in info["loss"])


def test_latent_update_lowers_loss_direction(pipe, concepts):
    """The step is z − lr·∇L: with lr scaled down, the loss of the updated latent is lower (first-order)."""
    from composer.compose import _analysis_layers
    from composer.losses import compute_losses
    spec = spec_for(concepts, 2, steps=2, reinit=False)
    prep = prepare(pipe, spec)
    ra = prep.ra
    _, last = _analysis_layers(pipe.unet)
    z = torch.randn(1, 4, 16, 16, requires_grad=True)

    def L(z):
        ra.for_batch(("cond",), store=True)
        pipe.unet(z, 999, prep.cond, regions=ra, stop_after_layer=last)
        cross, smap = ra.aggregated_maps()
        t = compute_losses(cross, prep.token_pos, prep.boxes, smap)
        return t.total
    loss = L(z)
    g, = torch.autograd.grad(loss, z)
    assert g.abs().max() > 0
    with torch.no_grad():
        assert L(z - 1e-2 / g.norm() * g) < loss


def test_overlapping_boxes_and_vanishing_box(pipe, concepts):
    regs = [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 128, 80], "lora": concepts[0]},
            {"prompt": "a <dog1> <dog2>", "box": [0, 48, 128, 128], "lora": concepts[1]},
            {"prompt": "a <owl1> <owl2>", "box": [0, 0, 10, 128], "lora": concepts[2]}]  # gone at 8×8 and below
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=2, regions=regs))
    prep = prepare(pipe, spec)
    assert int((prep.ra.token_regions((8, 8), "cpu") & 4).sum()) == 0
    assert int((prep.ra.token_regions((16, 16), "cpu") & 4).sum()) > 0
    lat, info = compose_latents(pipe, spec)
    assert torch.isfinite(lat).all() and all(np.isfinite(info["loss"]))


def test_boxes_covering_everything_never_nan(pipe, concepts):
    regs = [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 128, 96], "lora": concepts[0]},
            {"prompt": "a <dog1> <dog2>", "box": [0, 32, 128, 128], "lora": concepts[1]}]
    lat, _ = compose_latents(pipe, ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=2, regions=regs)))
    assert torch.isfinite(lat).all()


def test_ablation_switches(pipe, concepts):
    full, i_full = compose_latents(pipe, spec_for(concepts, 2, steps=2))
    no_lr, i1 = compose_latents(pipe, spec_for(concepts, 2, steps=2, reinit=False))
    none, i3 = compose_latents(pipe, spec_for(concepts, 2, steps=2, reinit=False, enhance=False, isolate=False))
    assert i_full["reinit"] and not i1["reinit"] and i3["optimised_steps"] == 0 and i3["loss"] == []
    assert not torch.equal(full, no_lr) and not torch.equal(no_lr, none)


@pytest.mark.parametrize("backend", ["torch", "segmented", "triton"])
def test_backends_agree_in_a_composed_unet_pass(pipe, concepts, backend):
    prep = prepare(pipe, spec_for(concepts, 2, height=64, width=64), backend=backend)
    assert prep.ra.backend == backend
    prep.ra.for_batch(("cond",))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = pipe.unet(x, 500, prep.cond, regions=prep.ra)
        prep2 = prepare(pipe, spec_for(concepts, 2, height=64, width=64), backend="torch")
        ref = pipe.unet(x, 500, prep2.cond, regions=prep2.ra.for_batch(("cond",)))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_region_string_and_pseudo_word_binding(pipe, concepts):
    regs = parse_region_string("[a <cat1> <cat2>, in a hat]-*-[blurry]-*-[0, 0, 128, 64]|"
                               "[a <dog1> <dog2>]-*-[]-*-[0, 64, 128, 128]")
    assert regs[0].prompt == "a <cat1> <cat2>, in a hat" and regs[0].negative_prompt == "blurry"
    pipe.load_lora(concepts[0], mode="region", name="cat")
    pipe.load_lora(concepts[1], mode="region", name="dog")
    spec = ComposeSpec(prompt="x", height=128, width=128, steps=2, regions=regs)
    prep = prepare(pipe, spec)
    assert prep.ra.adapters == ["cat", "dog"]
    ids = pipe.tokenizer(["a <cat1> <cat2>, in a hat"])[0].tolist()
    assert prep.token_pos[0] == [ids.index(pipe.tokenizer.tok.token_to_id("<cat1>")),
                                 ids.index(pipe.tokenizer.tok.token_to_id("<cat2>"))] == [2, 3]
    assert prep.boxes[1] == (0.0, 0.5, 1.0, 1.0)


def test_free_form_mask_region(pipe, concepts, tmp_path):
    m = np.zeros((128, 128), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    m[(yy - 64) ** 2 + (xx - 40) ** 2 < 35 ** 2] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    regs = [{"prompt": "a <cat1> <cat2>", "mask": str(tmp_path / "m.png"), "lora": concepts[0]}]
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=2, regions=regs))
    prep = prepare(pipe, spec)
    tr = prep.ra.token_regions((16, 16), "cpu").view(16, 16)
    assert tr[8, 5] == 1 and tr[0, 0] == 0 and tr[8, 15] == 0
    lat, info = compose_latents(pipe, spec)
    assert torch.isfinite(lat).all() and info["optimised_steps"] == 2


def test_reinit_copies_best_window_and_keeps_stats():
    from composer.losses import reinit_latents
    z = torch.randn(1, 4, 32, 32)
    a = torch.zeros(8, 8)
    a[5:7, 1:3] = 1.0  # strongest 2×2 window at rows 5-6, cols 1-2
    box = (0.0, 0.5, 0.25, 0.75)  # cells rows 0-1, cols 4-5
    out = reinit_latents(z, [[a, a * 0.5]], [box], (8, 8))
    clone = z.clone()
    clone[:, :, 0:8, 16:24] = z[:, :, 20:28, 4:12]
    want = (clone - clone.mean()) / clone.std() * z.std() + z.mean()
    torch.testing.assert_close(out, want)
    assert out.mean().item() == pytest.approx(z.mean().item(), abs=1e-6)
    assert out.std().item() == pytest.approx(z.std().item(), rel=1e-5)


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("box,msg", [([0, 0, 200, 64], "outside the 128×128 image"), ([0, 64, 128, 64], "empty or inverted"),
                                     ([100, 0, 50, 64], "empty or inverted"), ([0, 0, 1], "4 numbers"),
                                     ([-0.1, 0, 0.5, 0.5], "negative")])
def test_bad_boxes(pipe, concepts, box, msg):
    with pytest.raises(ValueError, match=msg):  # refused when the spec is read, before anything is loaded
        ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=1,
                                   regions=[{"prompt": "a <cat1> <cat2>", "box": box, "lora": concepts[0]}]))


def test_too_many_regions(pipe):
    regs = [{"prompt": "a", "box": [0, 0, 1, 1]}] * 33
    with pytest.raises(ValueError, match="at most 32"):
        compose_latents(pipe, ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, regions=regs)))


def test_missing_lora_file_and_undefined_pseudo_word(pipe, tmp_path):
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, regions=[
        {"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 0.5], "lora": str(tmp_path / "nope.pth")}]))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        compose_latents(pipe, spec)
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, regions=[
        {"prompt": "a <zebra1> <zebra2>", "box": [0, 0, 1, 0.5]}]))
    with pytest.raises(ValueError, match="<zebra1> that no loaded LoRA defines"):
        compose_latents(pipe, spec)


@pytest.mark.parametrize("h,w,near", [(100, 128, 96), (128, 200, 192), (520, 512, 512)])
def test_size_not_on_the_32_grid(pipe, h, w, near):
    with pytest.raises(ValueError, match=f"multiple of 32.*nearest valid: {near}"):
        compose_latents(pipe, ComposeSpec(prompt="x", height=h, width=w, regions=[{"prompt": "a", "box": [0, 0, 1, 1]}]))


def test_spec_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heigth'\]"):
        ComposeSpec.from_dict({"prompt": "x", "heigth": 512})
    with pytest.raises(ValueError, match=r"region 0: unknown field\(s\) \['bx'\]"):
        ComposeSpec.from_dict({"prompt": "x", "regions": [{"prompt": "a", "bx": [0, 0, 1, 1]}]})
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        ComposeSpec.from_dict({"prompt": "x", "steps": "50"})
    f = tmp_path / "s.json"
    f.write_text("{bad json")
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        ComposeSpec.from_file(str(f))


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_spec_debug_dir_and_flags(ref_pipe_dir, concepts, tmp_path):
    from composer.sample import main
    spec = {"prompt": "a cat and a dog", "negative_prompt": "", "height": 128, "width": 128, "steps": 3,
            "guidance": 7.5, "seed": 1, "sampler": "dpm++2m", "enhance": True, "isolate": True, "reinit": True,
            "regions": [{"prompt": "a <cat1> <cat2>", "negative_prompt": "", "box": [0, 0, 128, 64],
                         "lora": concepts[0], "scale": 1.0},
                        {"prompt": "a <dog1> <dog2>", "box": [0, 64, 128, 128], "lora": concepts[1]}]}
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    out, dbg = tmp_path / "o.png", tmp_path / "dbg"
    assert main(["--model", ref_pipe_dir, "--spec", str(f), "--out", str(out), "--debug-dir", str(dbg), "--quiet",
                 "--no-prepack"]) == 0  # the API's conv path: compared bit for bit below
    files = set(os.listdir(dbg))
    assert {"layout.png", "attention.png", "loss.png", "losses.json"} <= files
    p = json.loads(Image.open(out).text["composer"])
    assert p["seed"] == 1 and len(p["regions"]) == 2
    pipe = composer.load(ref_pipe_dir)
    api = compose(pipe, ComposeSpec.from_dict(spec))
    assert (np.asarray(api) == np.asarray(Image.open(out))).all()
    # flags override the spec; ablation flag switches the optimisation off
    out2 = tmp_path / "o2.png"
    main(["--model", ref_pipe_dir, "--spec", str(f), "--seed", "2", "--no-enhance", "--no-isolate", "--out", str(out2),
          "--quiet"])
    p2 = json.loads(Image.open(out2).text["composer"])
    assert p2["seed"] == 2 and p2["enhance"] is False and p2["isolate"] is False


def test_cli_region_string_with_loras(ref_pipe_dir, concepts, tmp_path):
    from composer.sample import main
    out = tmp_path / "r.png"
    main(["--model", ref_pipe_dir, "--prompt", "two animals", "--lora", concepts[0], "--lora", concepts[1],
          "--regions", "[a <cat1> <cat2>]-*-[]-*-[0, 0, 128, 64]|[a <dog1> <dog2>]-*-[]-*-[0, 64, 128, 128]",
          "--height", "128", "--width", "128", "--steps", "2", "--out", str(out), "--quiet"])
    assert Image.open(out).size == (128, 128)


def test_cli_failure_leaves_no_file(ref_pipe_dir, concepts, tmp_path):
    from composer.sample import main
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="outside"):
        main(["--model", ref_pipe_dir, "--prompt", "x", "--lora", concepts[0], "--regions",
              "[a <cat1> <cat2>]-*-[]-*-[0, 0, 999, 64]", "--height", "128", "--width", "128", "--out", str(out),
              "--quiet"])
    assert not out.exists() and [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_embedded_demo_composes(tmp_path, capsys):
    from composer.sample import main
    out = tmp_path / "demo.png"
    assert main(["--out", str(out), "--quiet"]) == 0
    assert "composing 2 random concepts" in capsys.readouterr().err
    p = json.loads(Image.open(out).text["composer"])
    assert len(p["regions"]) == 2 and Image.open(out).size == (128, 128)


def test_background_lora_applies_during_compose_and_is_restored(pipe, concepts, tmp_path):
    from composer.tiny import random_edlora
    bg = tmp_path / "rock.pth"
    torch.save(random_edlora(pipe, ["<rock1>", "<rock2>"], seed=99), str(bg))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = spec_for(concepts, 2, steps=2)
    with_bg = ComposeSpec.from_dict({**{k: getattr(base, k) for k in ("height", "width", "steps", "seed")},
                                     "prompt": "a photo at <rock1> <rock2>", "background_lora": str(bg),
                                     "regions": base.regions})
    a, _ = compose_latents(pipe, with_bg)
    b, _ = compose_latents(pipe, base)
    assert not torch.equal(a, b)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # merged, then restored
    assert not any(n.startswith("background:") for n in pipe.loras.loras)


def test_yaml_spec(tmp_path, concepts):
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"prompt": "x", "height": 128, "width": 128,
                                 "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 64, 64], "lora": concepts[0]}]}))
    spec = ComposeSpec.from_file(str(f))
    assert spec.regions[0].box == [0, 0, 64, 64] and spec.height == 128


def test_public_api_names():
    assert composer.compose is compose and composer.ComposeSpec is ComposeSpec


def test_debug_layout_labels_stay_inside_their_boxes_and_heatmaps_are_labelled(pipe, concepts, tmp_path):
    from PIL import ImageDraw
    from composer.debug import CAPTION, TILE, label_rects, _font
    regs = [{"prompt": "a <cat1> <cat2> with a very long prompt that would run into the next box", "box": [0, 0, 128, 80],
             "lora": concepts[0]},
            {"prompt": "a <dog1> <dog2>", "box": [0, 8, 128, 128], "lora": concepts[1]},  # same top-left area
            {"prompt": "a <owl1> <owl2>", "box": [64, 64, 128, 128], "lora": concepts[2]}]
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=3, regions=regs))
    compose(pipe, spec, debug_dir=str(tmp_path))
    d = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    rects = label_rects(spec, d, _font())
    tags = [t for _, t in rects]
    for (box, tag) in rects:
        assert box[0] <= tag[0] and box[1] <= tag[1] and tag[2] <= box[2] and tag[3] <= box[3]
    for i in range(3):
        for j in range(i):
            a, b = tags[i], tags[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (i, j)
    lay = Image.open(tmp_path / "layout.png")
    assert lay.size == (128, 128 + 8 + 14 * 3)  # image + a legend line per region
    sheet = Image.open(tmp_path / "attention.png")
    rows = 1 + 2  # reinit + steps 0 and the last optimised (step 3 // 5 = 0 is step 0)
    assert sheet.size == (4 + 6 * (TILE + 4), 4 + rows * (TILE + CAPTION + 4))  # 3 regions × 2 tokens per row
