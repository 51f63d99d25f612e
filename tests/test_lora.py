"""LoRA loading: PEFT files made by diffusers+peft and the same deltas in kohya form against diffusers'
``load_lora_weights``; ED-LoRA (both key styles) against a hand-built reference; merge vs live; bad input."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import composer
from composer.checkpoint import CheckpointError
from conftest import max_rel_err

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def peft_lora(ref_pipe_dir, tmp_path_factory):
    """A LoRA file written by diffusers' save_lora_weights from peft adapters (per-module alpha included)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(ref_pipe_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(ref_pipe_dir, subfolder="text_encoder")
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, alpha_pattern={"to_k": 2},
                      init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS, init_lora_weights=False)
    torch.manual_seed(11)
    unet.add_adapter(ucfg)
    te = inject_adapter_in_model(tcfg, te)
    d = tmp_path_factory.mktemp("peft")
    usd, tsd = get_peft_model_state_dict(unet), get_peft_model_state_dict(te)
    for sd in (usd, tsd):  # make the deltas sizeable
        for k in sd:
            sd[k] = torch.randn_like(sd[k]) * 0.2
    StableDiffusionPipeline.save_lora_weights(str(d), unet_lora_layers=usd, text_encoder_lora_layers=tsd,
                                              unet_lora_adapter_metadata=ucfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return str(d / "pytorch_lora_weights.safetensors")


def peft_modules(peft_lora):
    """(namespace, module path, down, up, alpha) for each module of the diffusers+peft file (per-module alpha:
    the fixture's alpha_pattern gives to_k alpha 2)."""
    from safetensors import safe_open
    import json
    sd = load_file(peft_lora)
    with safe_open(peft_lora, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    for k, down in sd.items():
        if ".lora_A." not in k:
            continue
        mod = k[: k.index(".lora_A.")]
        ns, path = mod.split(".", 1)
        if ns == "unet":
            alpha = 2.0 if path.endswith("to_k") else meta["unet.lora_alpha"]
        else:
            alpha = meta["text_encoder.lora_alpha"]
        yield ns, path, down, sd[mod + ".lora_B.weight"], alpha


@pytest.fixture(scope="module")
def kohya_lora(peft_lora, tmp_path_factory):
    """The same deltas in kohya naming (alpha/rank scale), some UNet modules in the LDM spelling."""
    out = {}
    for ns, path, v, up, alpha in peft_modules(peft_lora):
        if ns == "unet":
            if path.startswith("down_blocks.0.attentions.0."):  # LDM spelling: input_blocks.1.1
                name = "lora_unet_" + ("input_blocks.1.1." + path[len("down_blocks.0.attentions.0."):]).replace(".", "_")
            else:
                name = "lora_unet_" + path.replace(".", "_")
        else:
            name = "lora_te_text_model_" + path.replace(".", "_")
        out[name + ".lora_down.weight"] = v
        out[name + ".lora_up.weight"] = up
        out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    p = tmp_path_factory.mktemp("kohya") / "kohya.safetensors"
    save_file(out, str(p))
    return str(p)


@pytest.fixture(scope="module")
def ref_with_lora(ref_pipe_dir, peft_lora):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(ref_pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(peft_lora)
    return pipe


def outputs(unet, te, ids, hf=False):
    torch.manual_seed(5)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        if hf:
            return unet(x, 321, ctx).sample, te(ids).last_hidden_state
        return unet(x, 321, ctx), te(ids)


@pytest.mark.parametrize("which", ["peft", "kohya"])
@pytest.mark.parametrize("mode", ["merge", "live"])
def test_matches_diffusers_load_lora_weights(ref_pipe_dir, ref_with_lora, peft_lora, kohya_lora, which, mode):
    pipe = composer.load(ref_pipe_dir)
    lora = pipe.load_lora(peft_lora if which == "peft" else kohya_lora, mode=mode)
    assert {m.model for m in lora.modules} == {"unet", "text_encoder"}
    assert not lora.unmatched
    ids = pipe.tokenizer(["a photo of a cat"])
    ref_u, ref_t = outputs(ref_with_lora.unet, ref_with_lora.text_encoder, ids, hf=True)
    base_u, _ = outputs(composer.load(ref_pipe_dir).unet, pipe.text_encoder, ids)
    u, t = outputs(pipe.unet, pipe.text_encoder, ids)
    assert max_rel_err(base_u, ref_u) > 1e-3  # the LoRA changes the output...
    assert max_rel_err(u, ref_u) <= 1e-5      # ...exactly as diffusers applies it
    assert max_rel_err(t, ref_t) <= 1e-5


def test_merge_equals_live_and_unmerge_is_bit_exact(ref_pipe_dir, kohya_lora):
    a, b = composer.load(ref_pipe_dir), composer.load(ref_pipe_dir)
    orig = {k: v.clone() for k, v in a.unet.state_dict().items()}
    orig_te = {k: v.clone() for k, v in a.text_encoder.state_dict().items()}
    a.load_lora(kohya_lora, scale=0.7, mode="merge", name="k")
    b.load_lora(kohya_lora, scale=0.7, mode="live", name="k")
    ids = a.tokenizer(["hello"])
    ua, ta = outputs(a.unet, a.text_encoder, ids)
    ub, tb = outputs(b.unet, b.text_encoder, ids)
    assert max_rel_err(ua, ub) <= 1e-5 and max_rel_err(ta, tb) <= 1e-5
    assert any(not torch.equal(v, orig[k]) for k, v in a.unet.state_dict().items())
    a.unload_lora("k")
    assert all(torch.equal(v, orig[k]) for k, v in a.unet.state_dict().items())
    assert all(torch.equal(v, orig_te[k]) for k, v in a.text_encoder.state_dict().items())
    # live adapters never touch the base weights; unloading removes them
    assert all(torch.equal(v, orig[k]) for k, v in b.unet.state_dict().items())
    b.unload_lora("k")
    assert all(not l.adapters and not l.active for l in b._layers().values())


def test_region_mode_is_inactive_until_selected(ref_pipe_dir, kohya_lora):
    pipe = composer.load(ref_pipe_dir)
    ids = pipe.tokenizer(["hello"])
    with torch.no_grad():
        base = pipe.text_encoder(ids)
        pipe.load_lora(kohya_lora, mode="region", name="c")
        assert torch.equal(pipe.text_encoder(ids), base)
        sel = pipe.text_encoder(ids, adapter="c")
        pipe2 = composer.load(ref_pipe_dir)
        pipe2.load_lora(kohya_lora, mode="merge")
        assert max_rel_err(sel, pipe2.text_encoder(ids)) <= 1e-5


def test_locon_tucker_loha_lokr_by_hand(ref_pipe_dir, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    conv = pipe.unet.down_blocks[1].resnets[0].conv1  # 3×3 conv, [64, 32, 3, 3]
    lin = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q  # [32, 32]
    W, Wl = conv.weight.clone(), lin.weight.clone()
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    # LoHa factors large enough that the delta (~1e-2) is resolvable in float32 outputs of magnitude ~1:
    # with 0.1-scale factors it is ~5e-5 and float32 cancellation alone gives ~1e-3 relative error.
    rh = lambda *s: torch.randn(*s, generator=g) * 0.4
    sd = {  # LoCon with a Tucker core on the conv
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight": r(4, 32, 1, 1),
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_mid.weight": r(4, 4, 3, 3),
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight": r(64, 4, 1, 1),
        "lora_unet_down_blocks_1_resnets_0_conv1.alpha": torch.tensor(2.0),
        # LoHa on a linear
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": rh(32, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b": rh(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_a": rh(32, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b": rh(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        # LoKr on another linear (full factors: no alpha/r scaling)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w1": r(4, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w2": r(8, 8),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.alpha": torch.tensor(3.0),
    }
    f = tmp_path / "lyco.safetensors"
    save_file(sd, str(f))
    live = composer.load(ref_pipe_dir)
    live.load_lora(str(f), scale=0.5, mode="live")
    pipe.load_lora(str(f), scale=0.5, mode="merge")
    p = "lora_unet_down_blocks_1_resnets_0_conv1."
    tucker = torch.einsum("oa,abhw,bi->oihw", sd[p + "lora_up.weight"][:, :, 0, 0], sd[p + "lora_mid.weight"],
                          sd[p + "lora_down.weight"][:, :, 0, 0])
    torch.testing.assert_close(conv.weight, W + 0.5 * (2.0 / 4) * tucker, rtol=0, atol=1e-6)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q."
    loha = (sd[q + "hada_w1_a"] @ sd[q + "hada_w1_b"]) * (sd[q + "hada_w2_a"] @ sd[q + "hada_w2_b"])
    # relative to the delta itself: an absolute tolerance would hide an error of a few per cent
    got = lin.weight - Wl
    want = 0.5 * (1.0 / 4) * loha
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-3
    kk = pipe.unet.down_blocks[1].resnets[0].conv1
    assert (((kk.weight - W) - 0.5 * (2.0 / 4) * tucker).abs().max() / tucker.abs().max()).item() <= 1e-4
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k."
    lk = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k
    kron = torch.kron(sd[k + "lokr_w1"], sd[k + "lokr_w2"])
    torch.testing.assert_close(lk.weight, live.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight
                               + 0.5 * kron, rtol=0, atol=1e-6)
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():  # live LoCon-Tucker adapter equals the merged conv
        torch.testing.assert_close(live.unet.down_blocks[1].resnets[0].conv1(x), conv(x), rtol=1e-5, atol=1e-5)
    # live LoHa and LoKr forwards equal their merged layers (the dense-delta path of Linear)
    t = torch.randn(2, 7, 32)
    la = live.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        for name in ("to_q", "to_k"):
            lv, mg = getattr(la, name), getattr(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, name)
            assert lv.adapters and next(iter(lv.adapters.values())).dense is not None
            assert max_rel_err(lv(t) - t @ lv.weight.T, mg(t) - t @ lv.weight.T) <= 1e-4  # measured ~4e-6


# --- ED-LoRA --------------------------------------------------------------------------------------------

def make_edlora(pipe, words, seed, style):
    """An ED-LoRA params dict for the tiny model: rank-4 LoRA on attn1/attn2 q,k,v,out and TE attention."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    te, unet = {}, {}
    sep_d, sep_u = (".lora_down.weight", ".lora_up.weight") if style == "new" else ("_lora.down.weight", "_lora.up.weight")
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            m = f"text_model.encoder.layers.{i}.self_attn.{p}"
            te[m + sep_d], te[m + sep_u] = r(4, 32), r(32, 4)
    for path, layer in pipe.unet.named_modules():
        if path.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0")):
            unet[path + sep_d], unet[path + sep_u] = r(4, layer.weight.shape[1]), r(layer.weight.shape[0], 4)
    emb = {w: r(16, 32) * 5 for w in words}
    return {"params": {"new_concept_embedding": emb, "text_encoder": te, "unet": unet}}


@pytest.fixture(scope="module")
def edlora_files(our_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("edlora")
    out = {}
    for style in ("new", "old"):
        obj = make_edlora(our_pipe, ["<cat1>", "<cat2>"], 3, style)
        torch.save(obj, str(d / f"cat_{style}.pth"))
        out[style] = (str(d / f"cat_{style}.pth"), obj)
    obj = make_edlora(our_pipe, ["<dog1>", "<dog2>"], 4, "new")
    torch.save(obj, str(d / "dog.pth"))
    out["dog"] = (str(d / "dog.pth"), obj)
    return out


def hand_reference(ref_pipe_dir, obj, prompt, alpha=1.0):
    """diffusers UNet + transformers CLIP with W += alpha·up@down merged by hand, and 16 layer contexts
    encoded by hand (row l of each pseudo-word substituted at its token positions)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    from composer.tokenizer import CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(ref_pipe_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(ref_pipe_dir, subfolder="text_encoder")
    P = obj["params"]
    with torch.no_grad():
        for model, sd in ((unet, P["unet"]), (te, P["text_encoder"])):
            mods = dict(model.named_modules())
            for k, down in sd.items():
                if not k.endswith("down.weight"):
                    continue
                base = k[: -len(".lora_down.weight")] if k.endswith(".lora_down.weight") else k[: -len("_lora.down.weight")]
                up = sd[k.replace("down.weight", "up.weight")]
                name = base if base in mods else base.replace("text_model.", "", 1)
                mods[name].weight += alpha * up @ down
    tok = CLIPTokenizer.from_file(os.path.join(ref_pipe_dir, "tokenizer"))
    words = list(P["new_concept_embedding"])
    ids = [49406]
    for w in prompt.split():  # build ids by hand, word by word; each pseudo-word gets a borrowed id 100 + i
        core = w.rstrip(",")
        ids += [100 + words.index(core)] if core in words else tok.encode_raw(core)
        if w.endswith(","):
            ids += tok.encode_raw(",")
    ids = torch.tensor(ids + [49407] * (77 - len(ids)))[None]
    ctxs = []
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        for l in range(16):  # Mix-of-Show's way: the pseudo-word's token row holds embedding row l
            for i, w in enumerate(words):
                table[100 + i] = P["new_concept_embedding"][w][l]
            ctxs.append(te(ids).last_hidden_state)
    return unet, torch.stack(ctxs)


def run_diffusers_per_layer(unet, ctxs, x, t):
    """diffusers UNet with cross-attention layer l fed context l (attn2 wrapped, in forward order)."""
    attns = [a for b in unet.down_blocks if hasattr(b, "attentions") for a in b.attentions]
    attns += list(unet.mid_block.attentions)
    attns += [a for b in unet.up_blocks if hasattr(b, "attentions") for a in b.attentions]
    assert len(attns) == 16
    saved = []
    for l, a in enumerate(attns):
        attn2 = a.transformer_blocks[0].attn2
        orig = attn2.forward
        saved.append((attn2, orig))
        attn2.forward = (lambda o, c: lambda hs, encoder_hidden_states=None, **kw: o(hs, encoder_hidden_states=c, **kw))(orig, ctxs[l])
    try:
        with torch.no_grad():
            return unet(x, t, ctxs[0]).sample
    finally:
        for attn2, orig in saved:
            attn2.forward = orig


@pytest.mark.parametrize("style", ["new", "old"])
def test_edlora_matches_hand_reference(ref_pipe_dir, edlora_files, style):
    path, obj = edlora_files[style]
    prompt = "a <cat1> <cat2>, sitting on a sofa"
    unet_ref, ctx_ref = hand_reference(ref_pipe_dir, obj, prompt)
    pipe = composer.load(ref_pipe_dir)
    lora = pipe.load_lora(path)
    assert lora.kind == "edlora" and sorted(lora.embeddings) == ["<cat1>", "<cat2>"]
    assert len(lora.modules) == 8 + 128  # 2 TE layers × 4, 16 transformers × 8
    ctx = pipe.encode_prompt([prompt])
    assert ctx.shape == (16, 1, 77, 32)
    assert max_rel_err(ctx[:, 0], ctx_ref[:, 0]) <= 1e-5
    assert (ctx[0] - ctx[15]).abs().max() > 1e-3  # the layers really differ
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ours = pipe.unet(x, 400, ctx)
    assert max_rel_err(ours, run_diffusers_per_layer(unet_ref, ctx_ref, x, 400)) <= 1e-5


def test_edlora_generate_and_live_mode(ref_pipe_dir, edlora_files):
    path, _ = edlora_files["new"]
    a, b = composer.load(ref_pipe_dir), composer.load(ref_pipe_dir)
    a.load_lora(path)
    b.load_lora(path, mode="live")
    kw = dict(steps=2, height=64, width=64, seed=1)
    la = a.sample_latents("a <cat1> <cat2>", **kw)
    lb = b.sample_latents("a <cat1> <cat2>", **kw)
    assert max_rel_err(la, lb) <= 1e-5


def test_edlora_convert_to_safetensors_loads_same(ref_pipe_dir, edlora_files, tmp_path):
    from weights_tools.convert import main as convert_main
    from weights_tools.inspect import inspect_path
    path, _ = edlora_files["old"]
    st = tmp_path / "cat.safetensors"
    convert_main(["edlora2st", path, str(st)])
    s = inspect_path(str(st))
    assert "edlora" in s and "<cat1>" in s and "bare alpha 1.0" in s
    a, b = composer.load(ref_pipe_dir), composer.load(ref_pipe_dir)
    la, lb = a.load_lora(path), b.load_lora(str(st))
    assert len(la.modules) == len(lb.modules) == 8 + 128  # every UNet and text-encoder module survived
    assert {(m.model, m.path) for m in la.modules} == {(m.model, m.path) for m in lb.modules}
    ctx = a.encode_prompt(["a <cat1> <cat2>"])
    assert torch.equal(ctx, b.encode_prompt(["a <cat1> <cat2>"]))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # and the UNet deltas are the same (a converter dropping them fails here)
        assert torch.equal(a.unet(x, 500, ctx), b.unet(x, 500, ctx))
        base = composer.load(ref_pipe_dir).unet(x, 500, ctx)
    assert (a.unet(x, 500, ctx) - base).abs().max() > 1e-4


def test_kohya_peft_conversions_round_trip(ref_pipe_dir, kohya_lora, tmp_path):
    from weights_tools.convert import main as convert_main
    peft = tmp_path / "p.safetensors"
    back = tmp_path / "k.safetensors"
    convert_main(["kohya2peft", kohya_lora, str(peft)])
    convert_main(["peft2kohya", str(peft), str(back)])
    ids = None
    outs = []
    for f in (kohya_lora, str(peft), str(back)):
        p = composer.load(ref_pipe_dir)
        p.load_lora(f)
        ids = p.tokenizer(["x"])
        outs.append(outputs(p.unet, p.text_encoder, ids))
    for u, t in outs[1:]:
        assert max_rel_err(u, outs[0][0]) <= 1e-5 and max_rel_err(t, outs[0][1]) <= 1e-5


def test_inspect_lora(kohya_lora, peft_lora):
    from weights_tools.inspect import inspect_path
    s = inspect_path(kohya_lora)
    assert "LoRA (kohya)" in s and "ranks [2]" in s and "ranks [4]" in s
    assert "LoRA (peft)" in inspect_path(peft_lora)


# --- bad input ------------------------------------------------------------------------------------------

def test_corrupt_lora_file(ref_pipe_dir, kohya_lora, tmp_path):
    data = open(kohya_lora, "rb").read()
    f = tmp_path / "cut.safetensors"
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        composer.load(ref_pipe_dir).load_lora(str(f))


class _Evil:
    def __init__(self, p):
        self.p = p

    def __reduce__(self):
        return (os.system, (f"touch {self.p}",))


def test_pickle_with_code_is_refused_not_run(ref_pipe_dir, tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "evil.pth"
    torch.save({"params": {"new_concept_embedding": {}, "unet": {"x": _Evil(str(marker))}}}, str(f))
    with pytest.raises(CheckpointError, match="refused"):
        composer.load(ref_pipe_dir).load_lora(str(f))
    assert not marker.exists()


def test_non_tensor_payload(ref_pipe_dir, tmp_path):
    f = tmp_path / "odd.pth"
    torch.save({"lora_unet_x.lora_down.weight": "not a tensor"}, str(f))
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        composer.load(ref_pipe_dir).load_lora(str(f))


def test_lora_for_another_base_model(ref_pipe_dir, tmp_path):
    f = tmp_path / "sd2.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)}, str(f))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*attn2_to_k.*\(4, 1024\).*\(32, 32\)"):
        composer.load(ref_pipe_dir).load_lora(str(f))
    g = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}, str(g))
    with pytest.raises(CheckpointError, match="SDXL"):
        composer.load(ref_pipe_dir).load_lora(str(g))


def test_rank_mismatch(ref_pipe_dir, tmp_path):
    f = tmp_path / "r.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 8)}, str(f))
    with pytest.raises(CheckpointError, match="rank mismatch.*attn1_to_q"):
        composer.load(ref_pipe_dir).load_lora(str(f))


def test_unmatched_keys_error_or_warning(ref_pipe_dir, tmp_path, caplog):
    f = tmp_path / "u.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(32, 4)}, str(f))
    with pytest.raises(CheckpointError, match="nonexistent_layer"):
        composer.load(ref_pipe_dir).load_lora(str(f))
    lora = composer.load(ref_pipe_dir).load_lora(str(f), strict=False)
    assert lora.unmatched == ["unet:nonexistent_layer"] and len(lora.modules) == 1
    assert "nonexistent_layer" in caplog.text


def test_refused_formats_by_name(ref_pipe_dir, tmp_path):
    f = tmp_path / "dora.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(1, 1), "lora_unet_a.dora_scale": torch.zeros(1)}, str(f))
    with pytest.raises(CheckpointError, match="DoRA"):
        composer.load(ref_pipe_dir).load_lora(str(f))


def test_duplicate_pseudo_word_and_unknown_pseudo_word(ref_pipe_dir, edlora_files):
    pipe = composer.load(ref_pipe_dir)
    pipe.load_lora(edlora_files["new"][0], name="cat")
    with pytest.raises(CheckpointError, match="<cat1>.*already defined by LoRA 'cat'"):
        pipe.load_lora(edlora_files["old"][0], name="cat-again")
    with pytest.raises(ValueError, match="<dog1> that no loaded LoRA defines"):
        pipe.generate("a <dog1> <dog2>", steps=1, height=64, width=64)
    pipe.load_lora(edlora_files["dog"][0])
    assert pipe.encode_prompt(["a <cat1> <cat2> and a <dog1> <dog2>"]).shape == (16, 1, 77, 32)


def test_premerged_model_is_not_a_lora(ref_pipe_dir, tmp_path):
    f = tmp_path / "combined_model_.pth"
    torch.save({"params": {"new_concept_embedding": {}, "unet": {"conv_in.weight": torch.zeros(1)}, "text_encoder": {}}}, str(f))
    with pytest.raises(CheckpointError, match="pre-merged full model"):
        composer.load(ref_pipe_dir).load_lora(str(f))


def test_cli_lora_flag(ref_pipe_dir, kohya_lora, tmp_path):
    from PIL import Image
    from composer.sample import main, parse_lora_arg
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    out = tmp_path / "o.png"
    main(["--model", ref_pipe_dir, "--prompt", "a photo of a cat", "--lora", f"{kohya_lora}:0.6", "--steps", "2",
          "--height", "64", "--width", "64", "--out", str(out), "--quiet", "--no-prepack"])  # the API's conv path
    pipe = composer.load(ref_pipe_dir)
    pipe.load_lora(kohya_lora, 0.6)
    import numpy as np
    assert (np.asarray(Image.open(out)) == np.asarray(pipe.generate("a photo of a cat", steps=2, height=64, width=64,
                                                                       sampler="dpm++2m"))).all()


def test_old_diffusers_attn_procs_spelling(ref_pipe_dir, peft_lora, ref_with_lora, tmp_path):
    """The same deltas as old attn-procs keys (…processor.to_q_lora.down.weight, to_out_lora, lora_linear_layer)."""
    out = {}
    for ns, path, v, up, alpha in peft_modules(peft_lora):
        up = up * (alpha / up.shape[1])  # old files carry no alpha: fold the scale in
        if ns == "unet":
            if not any(path.endswith(t) for t in ("to_q", "to_k", "to_v", "to_out.0")):
                continue
            blk, _, proj = path.rpartition(".") if not path.endswith("to_out.0") else (path[:-len(".to_out.0")], "", "to_out")
            name = f"unet.{blk}.processor.{proj}_lora"
        else:
            name = f"text_encoder.text_model.{path}.lora_linear_layer"
        out[name + ".down.weight"], out[name + ".up.weight"] = v, up
    f = tmp_path / "old.safetensors"
    save_file(out, str(f))
    pipe = composer.load(ref_pipe_dir)
    lora = pipe.load_lora(str(f))
    assert lora.kind == "diffusers-old" and len(lora.modules) == 128 + 10
    ids = pipe.tokenizer(["a photo of a cat"])
    _, ref_t = outputs(ref_with_lora.unet, ref_with_lora.text_encoder, ids, hf=True)
    _, t = outputs(pipe.unet, pipe.text_encoder, ids)
    assert max_rel_err(t, ref_t) <= 1e-5  # the text encoder carries the whole LoRA
    full = composer.load(ref_pipe_dir)
    full.load_lora(peft_lora)
    # the UNet file holds only the attention projections: those match the full LoRA's merged weights
    for p, layer in pipe._layers().items():
        if p[1].endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")):
            torch.testing.assert_close(layer.weight, full._layers()[p].weight, atol=1e-6, rtol=1e-6)


def test_rslora_alpha_pattern_and_adapter_config(ref_pipe_dir, tmp_path):
    """Raw PEFT: scale lora_alpha / sqrt(r) with use_rslora, per-module alpha_pattern, read from the
    adapter_config.json beside adapter_model.safetensors."""
    import json
    pipe = composer.load(ref_pipe_dir)
    g = torch.Generator().manual_seed(3)
    mods = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 32),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (32, 32)}
    sd = {}
    for m, (o, i) in mods.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, i, generator=g)
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, 4, generator=g)
    d = tmp_path / "peft"
    d.mkdir()
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True,
                                                       "alpha_pattern": {"attn2.to_v": 2}}))
    lora = pipe.load_lora(str(d / "adapter_model.safetensors"))
    scales = {m.path.rsplit(".", 1)[-1]: m.scale for m in lora.modules}
    assert scales == {"to_k": pytest.approx(8 / 2), "to_v": pytest.approx(2 / 2)}  # alpha / sqrt(4)
    ref = composer.load(ref_pipe_dir)
    for m, _ in mods.items():
        got = dict(pipe.unet.named_modules())[m].weight - dict(ref.unet.named_modules())[m].weight
        A, B = sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"]
        want = (8 if m.endswith("to_k") else 2) / 2 * B @ A
        assert max_rel_err(got, want) <= 1e-5
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))  # no rsLoRA: alpha / r
    p2 = composer.load(ref_pipe_dir)
    assert {m.scale for m in p2.load_lora(str(d / "adapter_model.safetensors")).modules} == {2.0}


def test_region_scale_other_than_one(ref_pipe_dir, edlora_files):
    """A region's LoRA scale multiplies its deltas (K/V/out and the text encoder), as merging at that scale does."""
    from composer.compose import ComposeSpec, prepare
    path, _ = edlora_files["new"]
    pipe = composer.load(ref_pipe_dir)
    prep = {s: prepare(pipe, ComposeSpec.from_dict(dict(prompt="x", height=64, width=64, regions=[
        {"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 1], "lora": path, "scale": s}]))) for s in (1.0, 0.4)}
    names = {s: p.ra.adapters[0] for s, p in prep.items()}
    assert names[0.4] != names[1.0]
    k = pipe.unet.transformer_blocks()[0].attn2.to_k
    a1, a4 = k.adapters.get(names[1.0]), k.adapters[names[0.4]]
    merged = composer.load(ref_pipe_dir)
    merged.load_lora(path, scale=0.4)
    mk = merged.unet.transformer_blocks()[0].attn2.to_k
    assert max_rel_err(a4.up @ a4.down, mk.weight - k.weight) <= 1e-5
    if a1 is not None:  # the 1.0 adapter was replaced when the same file came back at 0.4
        assert max_rel_err(a1.up @ a1.down, 2.5 * (a4.up @ a4.down)) <= 1e-5
    torch.testing.assert_close(prep[0.4].ra.pos_ctx[0], merged.encode_prompt(["a <cat1> <cat2>"]), atol=1e-5, rtol=1e-5)
