"""Every concept gets the whole method: concept tokens from each source, community LoRAs (kohya, LoCon, LoHa,
PEFT), LoRA-free regions, mixed compositions, and lora_scope="all" (a LoRA confined to its region in every
layer it touches), checked for exactness."""
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.compose import ComposeSpec, compose_latents, prepare
from composer.concepts import select_tokens
from composer.io import save_safetensors
from composer.layers import Conv2d, Linear
from composer.tiny import random_edlora
from composer.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    t = CLIPTokenizer.default()
    t.add_tokens(["<cat1>", "<cat2>"])
    return t


def positions_by_hand(tok, prompt, wanted):
    """Sequence positions of the words in ``wanted``, walking the prompt word by word (BOS at 0)."""
    pos, i = [], 1
    for word in prompt.replace(",", " , ").split():
        n = len(tok.encode_raw(word))
        if word in wanted:
            pos += list(range(i, i + n))
        i += n
    return pos


# --- token selection ---------------------------------------------------------------------------------------------

def test_explicit_tokens_map_to_every_bpe_position(tok):
    prompt = "a girl with red hair and a zkxqjwv hat"
    assert len(tok.encode_raw("zkxqjwv")) > 1  # a word of several BPE tokens
    t = select_tokens(tok, prompt, explicit=["girl", "red hair", "zkxqjwv"])
    assert t.source == "explicit" and t.phrases == ["girl", "red hair", "zkxqjwv"]
    assert t.positions == sorted(positions_by_hand(tok, prompt, {"girl", "red", "hair", "zkxqjwv"}))
    ids = tok([prompt])[0]
    assert [tok.tok.id_to_token(int(ids[p])) for p in t.positions] == t.words
    # every occurrence counts; matching is case-insensitive on word boundaries ("hair" does not match "haircut")
    t2 = select_tokens(tok, "Hair, a haircut and hair", explicit=["hair"])
    assert t2.positions == [1, 6]


def test_explicit_token_not_in_prompt_is_an_error_naming_it(tok):
    with pytest.raises(ValueError, match="region 2: token 'dragon' is not in its prompt"):
        select_tokens(tok, "a girl", explicit=["dragon"], where="region 2")


def test_pseudo_words_trigger_words_and_content_fallback(tok, caplog):
    t = select_tokens(tok, "a <cat1> <cat2>, sitting", pseudo_words=["<cat1>", "<cat2>"])
    assert t.source == "pseudo-words" and t.positions == [2, 3] and t.words == ["<cat1>", "<cat2>"]
    t = select_tokens(tok, "a photo of sks dog running", triggers=["sks dog", "zzz"])
    assert t.source == "trigger" and t.phrases == ["sks dog"]
    assert t.positions == positions_by_hand(tok, "a photo of sks dog running", {"sks", "dog"})
    with caplog.at_level(logging.WARNING):
        t = select_tokens(tok, "a photo of a red ball, on the grass", triggers=["sks"], where="region 1")
    assert t.source == "content" and t.phrases == ["red", "ball", "grass"]  # no stop words, punctuation, 'photo'
    assert "region 1" in caplog.text and "['red', 'ball', 'grass']" in caplog.text and '"tokens"' in caplog.text
    assert select_tokens(tok, "the, of a").source == "none"


# --- fixtures: community LoRA files ----------------------------------------------------------------------------

def kohya_file(pipe, path, trigger, seed, *, convs=False, loha=False, te=True, rank=4, alpha=2.0, meta_key="ss"):
    """A random kohya / LyCORIS file for ``pipe``: attention, feed-forward, proj_in/out (+ LoCon resnet convs,
    time_emb_proj and resamplers with ``convs``; LoHa factors with ``loha``), text-encoder attention/MLP."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.08
    sd = {}
    ends = [".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"]
    if convs:
        ends += [".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", ".downsamplers.0.conv", ".upsamplers.0.conv"]
    targets = [("lora_unet_", p, l) for p, l in pipe.unet.named_modules() if p.endswith(tuple(ends))]
    if te:
        targets += [("lora_te_", p, l) for p, l in pipe.text_encoder.named_modules() if p.endswith(("_proj", ".fc1"))]
    for prefix, p, l in targets:
        base = prefix + p.replace(".", "_")
        w = l.weight
        if loha and prefix == "lora_unet_" and w.ndim == 2:
            sd[base + ".hada_w1_a"], sd[base + ".hada_w1_b"] = r(w.shape[0], rank), r(rank, w.shape[1])
            sd[base + ".hada_w2_a"], sd[base + ".hada_w2_b"] = r(w.shape[0], rank) * 4, r(rank, w.shape[1]) * 4
        elif w.ndim == 4:
            sd[base + ".lora_down.weight"] = r(rank, w.shape[1], *w.shape[2:])
            sd[base + ".lora_up.weight"] = r(w.shape[0], rank, 1, 1)
        else:
            sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = r(rank, w.shape[1]), r(w.shape[0], rank)
        sd[base + ".alpha"] = torch.tensor(alpha)
    meta = {"ss_tag_frequency": json.dumps({"5_" + trigger: {trigger: 30, "animal": 4}})} if meta_key == "ss" else \
        {"modelspec.trigger_phrase": trigger}
    save_safetensors(sd, str(path), meta)
    return str(path)


def peft_file(pipe, path, seed, alpha=8, r_=4):
    """A PEFT/diffusers LoRA on attn2 and the text encoder, with its config in the metadata."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p, l in pipe.unet.named_modules():
        if p.endswith(("attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn1.to_q")):
            sd[f"unet.{p}.lora_A.weight"] = torch.randn(r_, l.weight.shape[1], generator=g) * 0.1
            sd[f"unet.{p}.lora_B.weight"] = torch.randn(l.weight.shape[0], r_, generator=g) * 0.1
    for p, l in pipe.text_encoder.named_modules():
        if p.endswith("self_attn.q_proj"):
            sd[f"text_encoder.{p}.lora_A.weight"] = torch.randn(r_, l.weight.shape[1], generator=g) * 0.1
            sd[f"text_encoder.{p}.lora_B.weight"] = torch.randn(l.weight.shape[0], r_, generator=g) * 0.1
    save_safetensors(sd, str(path), {"lora_adapter_metadata": json.dumps({"r": r_, "lora_alpha": alpha}),
                                     "modelspec.trigger_phrase": "ohwx bird"})
    return str(path)


@pytest.fixture(scope="module")
def files(our_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("community")
    ed = d / "cat.pth"
    torch.save(random_edlora(our_pipe, ["<cat1>", "<cat2>"], seed=2), str(ed))
    return {"edlora": str(ed), "kohya": kohya_file(our_pipe, d / "dog.safetensors", "sks dog", 3),
            "locon": kohya_file(our_pipe, d / "fox.safetensors", "zxq fox", 4, convs=True, meta_key="modelspec"),
            "loha": kohya_file(our_pipe, d / "owl.safetensors", "pqr owl", 5, loha=True),
            "peft": peft_file(our_pipe, d / "bird.safetensors", 6),
            "style": kohya_file(our_pipe, d / "style.safetensors", "oil painting", 7)}


@pytest.fixture()
def pipe(ref_pipe_dir):
    return composer.load(ref_pipe_dir)


def two(files, kind, prompt, **kw):
    d = dict(prompt="two things", height=128, width=128, steps=4, seed=1, regions=[
        {"prompt": prompt, "box": [0, 0, 1, 0.5], "lora": files[kind] if kind else None},
        {"prompt": "a <cat1> <cat2>", "box": [0, 0.5, 1, 1], "lora": files["edlora"]}])
    d.update(kw)
    return ComposeSpec.from_dict(d)


@pytest.mark.parametrize("kind,prompt,source", [("kohya", "a sks dog running", "trigger"),
                                                 ("peft", "an ohwx bird flying", "trigger"),
                                                 (None, "a red ball on grass", "content"),
                                                 ("kohya", "a sks dog running", "explicit")])
def test_every_kind_of_region_gets_enhancement_and_reinit(pipe, files, kind, prompt, source):
    extra = {"tokens": ["running"]} if source == "explicit" else {}
    spec = two(files, kind, prompt)
    if extra:
        spec.regions[0].tokens = extra["tokens"]
    lat, info = compose_latents(pipe, spec)
    assert info["reinit"] and 2 <= info["optimised_steps"] <= 3  # 4 steps: optimised up to i = 2
    r0 = info["regions"][0]
    assert r0["source"] == source and r0["positions"]
    if source == "explicit":
        assert r0["tokens"] == ["running"]
    # the region's tokens really drive the method: enhancement off on a LoRA-free/kohya region changes the latent
    off, _ = compose_latents(pipe, two(files, kind, prompt, enhance=False, reinit=False))
    assert (lat - off).abs().max() > 1e-3


def test_kohya_lora_given_globally_binds_by_its_trigger_word(pipe, files):
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=2, loras=[files["kohya"]], regions=[
        {"prompt": "a sks dog", "box": [0, 0, 1, 0.5]}, {"prompt": "a tree", "box": [0, 0.5, 1, 1]}]))
    prep = prepare(pipe, spec)
    assert prep.ra.adapters[0] and prep.ra.adapters[0].endswith("dog.safetensors:1.0") and prep.ra.adapters[1] is None
    assert prep.tokens[0].source == "trigger" and prep.tokens[1].source == "content"


def test_mixed_composition_with_background_style(pipe, files):
    """ED-LoRA, kohya, LoCon, LoHa and PEFT concepts side by side plus a background style LoRA."""
    regs = [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 0.5, 0.5], "lora": files["edlora"]},
            {"prompt": "a sks dog", "box": [0, 0.5, 0.5, 1], "lora": files["kohya"]},
            {"prompt": "a zxq fox", "box": [0.5, 0, 1, 0.34], "lora": files["locon"]},
            {"prompt": "a pqr owl", "box": [0.5, 0.34, 1, 0.67], "lora": files["loha"]},
            {"prompt": "an ohwx bird", "box": [0.5, 0.67, 1, 1], "lora": files["peft"]}]
    for scope in ("cross", "all"):
        spec = ComposeSpec.from_dict(dict(prompt="oil painting of animals", height=128, width=128, steps=2,
                                          regions=regs, background_lora=files["style"], lora_scope=scope))
        lat, info = compose_latents(pipe, spec)
        assert torch.isfinite(lat).all() and info["reinit"]
        assert [r["source"] for r in info["regions"]] == ["pseudo-words", "trigger", "trigger", "trigger", "trigger"]


def test_dense_loha_to_out_takes_the_exact_unfused_path(pipe, files):
    """A LoHa concept has no low-rank to_out factors to fuse: each region's own to_out, averaged, as the formula."""
    from composer.attention import merge_heads, split_heads
    spec = two(files, "loha", "a pqr owl")
    prep = prepare(pipe, spec)
    ra = prep.ra.for_batch(("cond",))
    attn = pipe.unet.transformer_blocks()[0].attn2
    x = torch.randn(1, 256, attn.to_q.weight.shape[1])
    ctx = prep.cond[0] if prep.cond.ndim == 4 else prep.cond
    with torch.no_grad():
        out = ra.cross_attention(attn, x, ctx, (16, 16))
        tr = ra.token_regions((16, 16), x.device)
        q = split_heads(attn.to_q(x), attn.heads)
        for r in range(2):
            name = ra.adapters[r]
            c = ra._region_context(r, 0)
            k, v = (split_heads(f(c, adapter=(name,)), attn.heads) for f in (attn.to_k, attn.to_v))
            o = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
            want = attn.to_out[0](merge_heads(o), adapter=(name,))
            inside = tr == (1 << r)
            torch.testing.assert_close(out[0, inside], want[0, inside], atol=1e-5, rtol=1e-5)
    assert attn.to_out[0].adapters[ra.adapters[0]].dense is not None


def test_bad_tokens_and_unsupported_combinations(pipe, files):
    with pytest.raises(ValueError, match="'tokens' must be a non-empty list"):
        ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, regions=[
            {"prompt": "a dog", "box": [0, 0, 1, 1], "tokens": []}]))
    with pytest.raises(ValueError, match="'tokens' must be a non-empty list"):
        ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, regions=[
            {"prompt": "a dog", "box": [0, 0, 1, 1], "tokens": "dog"}]))
    with pytest.raises(ValueError, match="lora_scope must be one of"):
        ComposeSpec.from_dict(dict(prompt="x", lora_scope="everything"))
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=1, regions=[
        {"prompt": "a sks dog", "box": [0, 0, 1, 1], "lora": files["kohya"], "tokens": ["cat"]}]))
    with pytest.raises(ValueError, match="region 0: token 'cat' is not in its prompt"):
        compose_latents(pipe, spec)
    two_owners = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=1,
                                            loras=[files["kohya"], files["locon"]], regions=[
                                                {"prompt": "a sks dog and a zxq fox", "box": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match="trigger words of several LoRAs"):
        compose_latents(pipe, two_owners)


# --- lora_scope="all" ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["locon", "edlora"])
def test_scope_all_full_box_equals_generate_with_the_lora_merged(ref_pipe_dir, files, kind):
    """One region covering the image, its prompt = the global prompt, enhancement/isolation/re-init off: the
    composition is the LoRA merged into the model."""
    prompt = "a zxq fox in snow" if kind == "locon" else "a <cat1> <cat2> in snow"
    pipe = composer.load(ref_pipe_dir)
    spec = ComposeSpec.from_dict(dict(prompt=prompt, negative_prompt="blurry", height=128, width=128, steps=3, seed=5,
                                      enhance=False, isolate=False, reinit=False, lora_scope="all", regions=[
                                          {"prompt": prompt, "negative_prompt": "blurry", "box": [0, 0, 1, 1],
                                           "lora": files[kind]}]))
    lat, info = compose_latents(pipe, spec)
    merged = composer.load(ref_pipe_dir)
    merged.load_lora(files[kind])
    want = merged.sample_latents(prompt, negative_prompt="blurry", height=128, width=128, steps=3, seed=5,
                                 sampler="dpm++2m")
    err = ((lat - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, err
    cross, _ = compose_latents(pipe, ComposeSpec.from_dict({**spec.__dict__, "regions": spec.regions,
                                                            "lora_scope": "cross"}))
    assert ((cross - want).abs().max() / want.abs().max()).item() > 1e-3  # the paper's scope is not the merge


def _cells(box, h, w):
    y0, x0, y1, x1 = box
    m = torch.zeros(h, w, dtype=torch.bool)
    m[math.ceil(y0 * h): math.floor(y1 * h), math.ceil(x0 * w): math.floor(x1 * w)] = True
    return m


def test_scope_all_every_layer_is_lora_r_inside_box_r_and_base_outside(pipe, files):
    """Hooks on every adapter-capable layer during one composed pass: inside box r (and no other box) the output
    equals the layer with LoRA r merged by hand; outside every box it equals the base layer."""
    boxes = [[0, 0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]]
    spec = ComposeSpec.from_dict(dict(prompt="x", height=128, width=128, steps=1, isolate=False, lora_scope="all",
                                      regions=[{"prompt": "a zxq fox", "box": boxes[0], "lora": files["locon"]},
                                               {"prompt": "a <cat1> <cat2>", "box": boxes[1], "lora": files["edlora"]}]))
    prep = prepare(pipe, spec)
    ra = prep.ra.for_batch(("uncond", "cond"))
    names = ra.adapters
    seen = []
    skip = ("attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # applied per region context / per slot (injection)

    def hook(mod, args, kwargs, out, path):
        if kwargs.get("scope") is not None and not path.endswith(skip) and any(n in mod.adapters for n in names):
            # clones: under no_grad the UNet adds residuals into layer outputs in place (layers.residual)
            seen.append((path, mod, args[0].detach().clone(), out.detach().clone()))
    hooks = [m.register_forward_hook(lambda mod, a, k, o, p=p: hook(mod, a, k, o, p), with_kwargs=True)
             for p, m in pipe.unet.named_modules() if isinstance(m, (Linear, Conv2d))]
    x = torch.randn(1, 4, 16, 16)
    from composer.compose import _cat_ctx
    with torch.no_grad():
        pipe.unet(torch.cat([x, x]), 300, _cat_ctx(prep.uncond, prep.cond), regions=ra)
    for hk in hooks:
        hk.remove()
    kinds = {type(m).__name__ for _, m, _, _ in seen}
    assert kinds == {"Linear", "Conv2d"} and len(seen) > 100
    checked = 0
    for path, mod, inp, out in seen:
        W, b = mod.weight, mod.bias
        if isinstance(mod, Linear):
            base = F.linear(inp, W, b)
            n = inp.shape[1]
            h = w = int(round(n ** 0.5))
            flat = lambda m: m.flatten()
            pick = lambda t, m: t[:, flat(m)]
        else:
            conv = lambda wt: F.conv2d(inp, wt, b, mod.stride, mod.padding)
            base = conv(W)
            h, w = out.shape[-2:]
            pick = lambda t, m: t[:, :, m]
        masks = [_cells(bx, h, w) for bx in boxes]
        for r, name in enumerate(names):
            a = mod.adapters.get(name)
            if a is None:
                continue
            if a.mid is not None or a.dense is not None:
                continue
            dW = (a.up.flatten(1) @ a.down.flatten(1)).reshape(W.shape) if isinstance(mod, Conv2d) else a.up @ a.down
            lora_out = F.linear(inp, W + dW, b) if isinstance(mod, Linear) else conv(W + dW)
            only = masks[r] & ~masks[1 - r]
            if only.any():
                torch.testing.assert_close(pick(out, only), pick(lora_out, only), atol=1e-5, rtol=1e-4, msg=path)
                checked += 1
        outside = ~(masks[0] | masks[1])
        if outside.any():
            torch.testing.assert_close(pick(out, outside), pick(base, outside), atol=1e-6, rtol=1e-6, msg=path)
    assert checked > 100


def test_scope_cross_is_the_default_and_leaves_other_layers_base(pipe, files):
    spec = two(files, "locon", "a zxq fox")
    assert spec.lora_scope == "cross"
    prep = prepare(pipe, spec)
    assert prep.ra.lora is None


def test_cli_tokens_flag_and_record(ref_pipe_dir, files, tmp_path):
    from PIL import Image
    from composer.cli import run
    from composer.sample import PROG, main
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"prompt": "x", "height": 128, "width": 128, "steps": 2, "regions": [
        {"prompt": "a red ball on grass", "box": [0, 0, 1, 0.5]},
        {"prompt": "a sks dog", "box": [0, 0.5, 1, 1], "lora": files["kohya"]}]}))
    out = tmp_path / "o.png"
    assert main(["--model", ref_pipe_dir, "--spec", str(f), "--tokens", "1:ball", "--out", str(out), "--quiet"]) == 0
    rec = json.loads(Image.open(out).text["composer"])
    assert rec["regions"][0]["tokens"] == ["ball"] and "tokens" not in rec["regions"][1]
    assert run(PROG, main, ["--model", ref_pipe_dir, "--spec", str(f), "--tokens", "3:ball", "--out",
                            str(tmp_path / "x.png"), "--quiet"]) == 2
