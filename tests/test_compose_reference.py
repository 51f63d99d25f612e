"""The composition checked against references that share none of its code paths (method.md §4-§9):

- one composed CFG UNet pass against diffusers' UNet with each concept's LoRA merged by hand into its own copy,
  fed by hand the per-layer, per-region contexts (transformers' CLIP with the concept's text-encoder LoRA merged,
  pseudo-word rows substituted per layer), the box masks by the ceil/floor rule and the isolation rule as a dense
  mask — written here from the spec;
- the stored loss maps against a hand average over the five analysis layers and the heads;
- one latent step against z − lr_i·∂L/∂z, read through the observer; the stopping rule on a scripted loss;
- each switch against what it must change.
Each of these fails on a deliberate breakage of the code (see the closing note of issue 10).
"""
import copy
import math
import os

import numpy as np
import pytest
import torch

import composer
from composer.compose import ComposeSpec, LatentOptimiser, compose_latents, prepare
from composer.losses import compute_losses, reinit_latents
from composer.tokenizer import CLIPTokenizer
from conftest import max_rel_err

WORDS = [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]
BOXES = [[0.0, 0.0, 0.75, 0.625], [0.25, 0.375, 1.0, 1.0]]  # overlapping, with background left and right


def make_edlora(unet_paths, te_paths, words, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.15
    unet = {}
    for path, (cout, cin) in unet_paths.items():
        unet[path + ".lora_down.weight"], unet[path + ".lora_up.weight"] = r(4, cin), r(cout, 4)
    te = {}
    for path, (cout, cin) in te_paths.items():
        te[path + ".lora_down.weight"], te[path + ".lora_up.weight"] = r(4, cin), r(cout, 4)
    emb = {w: torch.randn(16, 32, generator=g) * 0.8 for w in words}
    return {"params": {"new_concept_embedding": emb, "text_encoder": te, "unet": unet}}


@pytest.fixture(scope="module")
def concepts(our_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("refconcepts")
    unet_paths = {p: tuple(l.weight.shape) for p, l in our_pipe.unet.named_modules()
                  if p.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))}
    te_paths = {p: tuple(l.weight.shape) for p, l in our_pipe.text_encoder.named_modules()
                if p.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))}
    out = []
    for i, words in enumerate(WORDS):
        obj = make_edlora(unet_paths, te_paths, words, 20 + i)
        p = d / f"c{i}.pth"
        torch.save(obj, str(p))
        out.append((str(p), obj))
    return out


def spec_dict(concepts, **kw):
    regions = [{"prompt": f"a {a} {b} on grass", "negative_prompt": f"blurry {'cat' if i == 0 else 'dog'}",
                "box": BOXES[i], "lora": concepts[i][0]} for i, (a, b) in enumerate(WORDS)]
    d = dict(prompt="two animals", negative_prompt="ugly", height=128, width=128, steps=4, seed=3, regions=regions)
    d.update(kw)
    return d


# --- the independent reference ---------------------------------------------------------------------------------

def merged(module, sd):
    """module with W += up @ down for every LoRA pair of ``sd`` (ED-LoRA scale 1), merged by hand."""
    module = copy.deepcopy(module)
    mods = dict(module.named_modules())
    with torch.no_grad():
        for k, down in sd.items():
            if k.endswith(".lora_down.weight"):
                base = k[: -len(".lora_down.weight")]
                name = base if base in mods else base.replace("text_model.", "", 1)
                mods[name].weight += sd[base + ".lora_up.weight"] @ down
    return module


def encode_by_hand(te, tok, prompt, embeddings):
    """[16, 77, C]: layer l substitutes row l of each pseudo-word's embedding (a borrowed id per pseudo-word)."""
    words = list(embeddings)
    ids = [49406]
    for w in prompt.split():
        ids += [100 + words.index(w)] if w in words else tok.encode_raw(w)
    ids = torch.tensor(ids + [49407] * (77 - len(ids)))[None]
    te = copy.deepcopy(te)
    table = te.get_input_embeddings().weight
    out = []
    with torch.no_grad():
        for l in range(16):
            for i, w in enumerate(words):
                table[100 + i] = embeddings[w][l]
            out.append(te(ids).last_hidden_state[0])
    return torch.stack(out)


def box_rows_cols(box, h, w):
    y0, x0, y1, x1 = box
    return range(math.ceil(y0 * h), math.floor(y1 * h)), range(math.ceil(x0 * w), math.floor(x1 * w))


def masks_at(h, w):
    m = torch.zeros(len(BOXES), h * w, dtype=torch.bool)
    for r, box in enumerate(BOXES):
        rows, cols = box_rows_cols(box, h, w)
        for y in rows:
            for x in cols:
                m[r, y * w + x] = True
    return m


def heads(t, n):
    b, l, c = t.shape
    return t.view(b, l, n, c // n).transpose(1, 2)


class SelfIsolation:
    """attn1: softmax with the official rule as a dense mask (allowed iff q in no box, or k in no box, or both in
    exactly the same single box)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n, c = hidden_states.shape
        h = w = int(round(n ** 0.5))
        m = masks_at(h, w).float()  # [R, N]
        cq = m.sum(0)
        same = (m[:, :, None] * m[:, None, :]).sum(0)  # |A ∩ K|
        cost = cq[:, None] * cq[None, :] - same
        q, k, v = (heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(cost[None, None] > 0, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[0](o)


class RegionInjection:
    """attn2: base query; background pixels: the global output; box pixels: mean over covering regions of
    to_out_n(softmax(Q K_nᵀ) V_n) with concept n's merged K/V/out over its layer-l context (per CFG half)."""

    def __init__(self, layer, concept_attn2, ctx_pos, ctx_neg):
        self.layer, self.concept_attn2, self.pos, self.neg = layer, concept_attn2, ctx_pos, ctx_neg

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n, c = hidden_states.shape
        h = w = int(round(n ** 0.5))
        m = masks_at(h, w)
        q = heads(attn.to_q(hidden_states), attn.heads)

        def attend(a2, ctx):
            k, v = heads(a2.to_k(ctx), attn.heads), heads(a2.to_v(ctx), attn.heads)
            o = ((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            return a2.to_out[0](o)
        out = attend(attn, encoder_hidden_states)
        region_sum = torch.zeros_like(out)
        for r, a2 in enumerate(self.concept_attn2):
            ctx = torch.stack([self.neg[r], self.pos[r][self.layer]])  # CFG order [uncond, cond]
            region_sum = region_sum + attend(a2, ctx) * m[r][None, :, None]
        cnt = m.sum(0).float()[None, :, None]
        return torch.where(cnt > 0, region_sum / cnt.clamp(min=1), out)


def attn_modules(unet, which):
    tfs = [a for b in unet.down_blocks if hasattr(b, "attentions") for a in b.attentions]
    tfs += list(unet.mid_block.attentions)
    tfs += [a for b in unet.up_blocks if hasattr(b, "attentions") for a in b.attentions]
    return [getattr(t.transformer_blocks[0], which) for t in tfs]


@pytest.fixture(scope="module")
def reference(ref_pipe_dir, concepts):
    """(eps function of (x, t)) of the independent reference for spec_dict(concepts)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    base = UNet2DConditionModel.from_pretrained(ref_pipe_dir, subfolder="unet").eval()
    te = CLIPTextModel.from_pretrained(ref_pipe_dir, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_file(os.path.join(ref_pipe_dir, "tokenizer"))
    spec = spec_dict(concepts)
    with torch.no_grad():
        enc = lambda t, s: t(tok([s])).last_hidden_state[0]
        g_pos, g_neg = enc(te, spec["prompt"]), enc(te, spec["negative_prompt"])
        pos, neg, concept_attn2 = [], [], []
        for (path, obj), reg in zip(concepts, spec["regions"]):
            P = obj["params"]
            te_n = merged(te, P["text_encoder"])
            pos.append(encode_by_hand(te_n, tok, reg["prompt"], P["new_concept_embedding"]))
            neg.append(enc(te_n, reg["negative_prompt"]))
            concept_attn2.append(attn_modules(merged(base, P["unet"]), "attn2"))
    for l, a in enumerate(attn_modules(base, "attn1")):
        a.set_processor(SelfIsolation())
    for l, a in enumerate(attn_modules(base, "attn2")):
        a.set_processor(RegionInjection(l, [c[l] for c in concept_attn2], pos, neg))

    def eps(x, t):
        with torch.no_grad():
            return base(torch.cat([x, x]), t, torch.stack([g_neg, g_pos])).sample
    return eps


@pytest.mark.parametrize("backend", ["torch", "segmented"])
def test_composed_cfg_pass_matches_independent_reference(ref_pipe_dir, concepts, reference, backend):
    pipe = composer.load(ref_pipe_dir)
    spec = ComposeSpec.from_dict(spec_dict(concepts))
    prep = prepare(pipe, spec, backend=backend)
    ra = prep.ra.for_batch(("uncond", "cond"))
    from composer.compose import _cat_ctx
    ctx = _cat_ctx(prep.uncond, prep.cond)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pipe.unet(torch.cat([x, x]), 700, ctx, regions=ra)
        plain = pipe.unet(torch.cat([x, x]), 700, ctx)
    ref = reference(x, 700)
    err = max_rel_err(ours, ref)
    assert err <= 1e-4, err
    assert max_rel_err(plain, ref) > 1e-2  # the region machinery really changes the pass
    # and each CFG half differs from the other (negative vs positive region contexts)
    assert (ours[0] - ours[1]).abs().max() > 1e-3


# --- the maps the losses read -------------------------------------------------------------------------------

def test_stored_maps_are_the_average_over_the_five_analysis_layers_and_heads(ref_pipe_dir, concepts):
    pipe = composer.load(ref_pipe_dir)
    prep = prepare(pipe, ComposeSpec.from_dict(spec_dict(concepts)), backend="torch")
    ra = prep.ra.for_batch(("cond",), store=True)
    blocks = pipe.unet.transformer_blocks()
    inputs = {}
    hooks = [b.norm2.register_forward_hook(lambda m, i, o, l=l: inputs.__setitem__(l, o.detach()))
             for l, b in enumerate(blocks)]
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        pipe.unet(x, 500, prep.cond, regions=ra)
    for hk in hooks:
        hk.remove()
    cross, _ = ra.aggregated_maps()
    analysis = [l for l, t in inputs.items() if t.shape[1] == 16]  # 4×4 tokens: the 1/32 grid of a 128² image
    assert analysis == [4, 5, 7, 8, 9]
    for r in range(2):
        per_layer = []
        for l in analysis:
            attn = blocks[l].attn2
            a = attn.to_q.adapters  # noqa: F841 (the query is the base one)
            name = ra.adapters[r]
            c = prep.ra.pos_ctx[r][l, 0]
            wk = attn.to_k.weight + attn.to_k.adapters[name].up @ attn.to_k.adapters[name].down
            q = heads(inputs[l] @ attn.to_q.weight.T, attn.heads)
            k = heads((c @ wk.T)[None], attn.heads)
            per_layer.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)[0])  # [N, 77]
        want = torch.stack(per_layer).mean(0).reshape(4, 4, 77)
        torch.testing.assert_close(cross[r], want, atol=1e-5, rtol=1e-4)
        # a single layer's map is not the average
        assert (per_layer[0].reshape(4, 4, 77) - want).abs().max() > 1e-4


# --- the latent step and the stopping rule -------------------------------------------------------------------

def test_latent_step_is_z_minus_lr_times_the_gradient(ref_pipe_dir, concepts):
    pipe = composer.load(ref_pipe_dir)
    steps = 6
    spec = ComposeSpec.from_dict(spec_dict(concepts, steps=steps, reinit=False))
    seen = []
    compose_latents(pipe, spec, observer=lambda ev, **d: seen.append(d) if ev == "optimise" else None)
    assert [d["i"] for d in seen] == list(range(len(seen))) and len(seen) >= 2
    prep = prepare(pipe, spec)
    opt = LatentOptimiser(pipe, prep, spec, steps)
    for d in seen[:2]:
        z = d["z_before"].clone().requires_grad_(True)
        (cross, smap), = opt.maps(z, d["t"], True)  # one (cross, self) pair per image of z
        terms = compute_losses(cross, prep.token_pos, prep.loss_boxes, smap.float())
        g, = torch.autograd.grad(terms.total, z)
        lr = 20.0 * math.sqrt(np.linspace(1.0, 0.5, steps)[d["i"]])  # method.md §8
        assert d["lr"] == pytest.approx(lr) and d["loss"] == pytest.approx(terms.total.item(), rel=1e-5)
        torch.testing.assert_close(d["z_after"], d["z_before"] - lr * g, atol=1e-5, rtol=1e-5)
        assert g.abs().max() * lr > 1e-3  # the step is not negligible, so a sign error shows


class Scripted(LatentOptimiser):
    """The loop's optimiser with its loss replaced by a script: tests the stopping rule alone."""

    def __init__(self, pipe, values, steps, **spec):
        self.values = list(values)
        prep = type("P", (), {"ra": type("RA", (), {"want_self_maps": True})(), "token_pos": [[1]]})()
        super().__init__(pipe, prep, ComposeSpec(**spec), steps)

    def maps(self, z, t, grad, i=0):
        return [([z[b:b + 1]], None) for b in range(z.shape[0])]

    def loss(self, cross, smap):
        return cross[0].sum() * 0 + self.values.pop(0), None


@pytest.mark.parametrize("values,steps,optimised", [
    ([10, 9, 8, 9, 7, 6, 7, 1, 1], 50, 7),            # a rise at i = 3 is ignored, at i = 6 (≥ 5) it stops
    ([10 - 0.1 * i for i in range(40)], 50, 26),      # never rises: the last optimised step is 25
    ([5, 6, 7, 8, 9], 8, 2),                          # 8 steps: rise-stop from i ≥ 1, last optimised step 4
    ([5, 4, 3, 2, 1, 0.5, 0.4], 8, 5),
    ([10 - 0.1 * i for i in range(40)], 50, 31),
])
def test_stopping_rule_on_a_scripted_loss(our_pipe, values, steps, optimised):
    kw = {"max_opt_step": 30} if optimised == 31 else {}
    opt = Scripted(our_pipe, values, steps, **kw)
    sch = type("S", (), {"scale_model_input": staticmethod(lambda i, x: x)})()
    x = torch.zeros(1)
    for i in range(steps):
        x = opt.step(i, 0, x, sch)
    assert opt.optimised_steps == [optimised]
    assert opt.losses[0] == pytest.approx(values[:optimised])


# --- each switch against what it must change --------------------------------------------------------------------

def run_losses(pipe, spec):
    seen = []
    _, info = compose_latents(pipe, spec, observer=lambda ev, **d: seen.append((ev, d)))
    return seen, info


def test_isolate_off_is_unmasked_self_attention_exactly(ref_pipe_dir, concepts):
    from composer.attention import attention, merge_heads, split_heads
    pipe = composer.load(ref_pipe_dir)
    x = torch.randn(1, 256, 32)
    attn = pipe.unet.transformer_blocks()[0].attn1
    with torch.no_grad():
        q, k, v = (split_heads(p(x), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        plain = attn.to_out[0](merge_heads(attention(q, k, v, backend="sdpa")))
        outs = {}
        for iso in (False, True):
            prep = prepare(pipe, ComposeSpec.from_dict(spec_dict(concepts, isolate=iso)))
            outs[iso] = prep.ra.for_batch(("cond",)).self_attention(attn, x, (16, 16))
    torch.testing.assert_close(outs[False], plain, atol=1e-6, rtol=1e-6)
    assert (outs[True] - plain).abs().max() > 1e-3


def test_each_loss_switch_changes_exactly_its_term(ref_pipe_dir, concepts):
    pipe = composer.load(ref_pipe_dir)
    base = dict(steps=3, reinit=False)

    def step0(**kw):
        spec = ComposeSpec.from_dict(spec_dict(concepts, **base, **kw))
        seen, info = run_losses(pipe, spec)
        d = next(d for ev, d in seen if ev == "optimise" and d["i"] == 0)
        prep = d["prep"]
        return spec, d, prep
    spec, d, prep = step0()
    cross = [c.detach() for c in d["cross"]]
    ra = prep.ra

    def hand(enhance=True, gaussian=True, fill=True, region=True, smap_from=None, weights=(8, 2, 10)):
        smap = None
        if region:
            z = d["z_before"].clone()
            ra.for_batch(("cond",), store=True)
            with torch.no_grad():
                pipe.unet(z, d["t"], prep.cond, regions=ra, stop_after_layer=9)
            smap = ra.aggregated_maps()[1].float()
        t = compute_losses(cross, prep.token_pos, prep.loss_boxes, smap, enhance=enhance, gaussian=gaussian,
                           fill=fill, region=region)
        w = weights
        return (w[0] / 8 * sum(t.ce, torch.tensor(0.0)) + w[1] / 2 * (sum(t.fill_x, torch.tensor(0.0)) +
                sum(t.fill_y, torch.tensor(0.0))) + w[2] / 10 * sum(t.region, torch.tensor(0.0))).item()
    full = hand()
    assert d["loss"] == pytest.approx(full, rel=1e-5)
    for kw, want in ((dict(gaussian=False), dict(gaussian=False)), (dict(fill=False), dict(fill=False)),
                     (dict(region_loss=False), dict(region=False)),
                     (dict(loss_weights="paper"), dict(weights=(1.0, 0.25, 0.8)))):
        _, dk, _ = step0(**kw)
        got = dk["loss"]
        assert got == pytest.approx(hand(**want), rel=1e-5), kw
        assert abs(got - full) > 1e-4 * abs(full), kw  # the switch does change the loss
    _, dk, _ = step0(enhance=False)
    assert dk["loss"] == pytest.approx(hand(enhance=False), rel=1e-5)
    # no enhancement and no isolation: nothing to optimise at all
    _, info = run_losses(pipe, ComposeSpec.from_dict(spec_dict(concepts, **base, enhance=False, isolate=False)))
    assert info["optimised_steps"] == 0 and info["loss"] == []


def test_region_mask_switch_without_region_loss_and_the_reverse(ref_pipe_dir, concepts):
    pipe = composer.load(ref_pipe_dir)
    a = prepare(pipe, ComposeSpec.from_dict(spec_dict(concepts, region_mask=False)))
    b = prepare(pipe, ComposeSpec.from_dict(spec_dict(concepts, region_loss=False)))
    assert a.ra.isolate is False and a.ra.want_self_maps is True
    assert b.ra.isolate is True and b.ra.want_self_maps is False


def test_reinit_event_is_the_official_replacement(ref_pipe_dir, concepts):
    pipe = composer.load(ref_pipe_dir)
    seen, info = run_losses(pipe, ComposeSpec.from_dict(spec_dict(concepts, steps=2)))
    ev = [d for e, d in seen if e == "reinit"]
    assert info["reinit"] and len(ev) == 1
    d = ev[0]
    z0, _ = pipe.initial_latent(3, 128, 128)
    torch.testing.assert_close(d["z_before"], z0)
    want = reinit_latents(z0, d["maps"], [d["prep"].loss_boxes[i] for i in d["regions"]], (4, 4))
    torch.testing.assert_close(d["z_after"], want)
    assert (d["z_after"] - z0).abs().max() > 1e-3
    seen, info = run_losses(pipe, ComposeSpec.from_dict(spec_dict(concepts, steps=2, reinit=False)))
    assert not info["reinit"] and not [e for e, _ in seen if e == "reinit"]


def test_official_schedule_switch_uses_the_014_sampler(ref_pipe_dir):
    from composer.schedulers import DPMSolverPP2M
    pipe = composer.load(ref_pipe_dir)
    spec = ComposeSpec(prompt="x", height=64, width=64, steps=4, seed=2, schedule="official")
    lat, _ = compose_latents(pipe, spec)
    noise, g = pipe.initial_latent(2, 64, 64)
    ctx = pipe.encode_prompt(["", "x"])
    want = pipe.denoise(noise, DPMSolverPP2M(pipe.scheduler_config, 4, final="official"), ctx, 7.5, generator=g)
    cur = pipe.denoise(noise, DPMSolverPP2M(pipe.scheduler_config, 4), ctx, 7.5, generator=g)
    assert torch.equal(lat, want) and not torch.equal(lat, cur)
