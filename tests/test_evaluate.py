"""CLIP towers against transformers.CLIPModel on random weights; the metrics on constructed inputs."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from composer.clip_model import CLIPModel, preprocess
from composer.evaluate import evaluate, markdown, scores, summarize


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer_dir):
    from transformers import CLIPConfig, CLIPModel as HF
    from conftest import perturb
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=49408, max_position_embeddings=77, eos_token_id=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=224, patch_size=32),
                     projection_dim=16)
    torch.manual_seed(0)
    m = perturb(HF(cfg).eval(), seed=7)
    d = tmp_path_factory.mktemp("clip")
    m.save_pretrained(str(d))
    import shutil
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer_dir, f), d / f)
    return str(d)


def _feat(x):
    return x if isinstance(x, torch.Tensor) else (x.pooler_output if getattr(x, "pooler_output", None) is not None else x[0])


def test_clip_towers_match_transformers(clip_dir):
    from transformers import CLIPModel as HF
    ref = HF.from_pretrained(clip_dir).eval()
    ours = CLIPModel.load(clip_dir)
    px = torch.randn(2, 3, 224, 224)
    from composer.tokenizer import CLIPTokenizer
    ids = CLIPTokenizer.from_file(clip_dir)(["A photo depicts a cat", "A photo depicts a dog, at night"])
    with torch.no_grad():
        ri, rt = _feat(ref.get_image_features(pixel_values=px)), _feat(ref.get_text_features(input_ids=ids))
        oi, ot = ours.image_features(px), ours.text_features(ids)
    assert ((oi - ri).abs().max() / ri.abs().max()).item() <= 1e-4
    assert ((ot - rt).abs().max() / rt.abs().max()).item() <= 1e-4


def test_preprocess_matches_clip_processor():
    from transformers import CLIPImageProcessor
    try:
        proc = CLIPImageProcessor()
    except ImportError as e:  # the one missing capability: an image backend (Pillow / torchvision) not installed
        pytest.skip(f"CLIPImageProcessor needs a missing package: {e}")
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (300, 410, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(proc(images=[im], return_tensors="np")["pixel_values"]))
    ours = preprocess([im])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02  # same recipe; PIL vs processor resampling differ by rounding


def test_scores_by_hand():
    img = torch.tensor([1.0, 0.0, 0.0])
    refs = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    text = torch.tensor([3.0, 4.0, 0.0])
    s = scores(img, refs, text)
    assert s["I_first"] == pytest.approx(1 / math.sqrt(2))
    assert s["I"] == pytest.approx((1 / math.sqrt(2) + 0 + 0) / 3)  # negative cosine clipped to 0
    assert s["T"] == pytest.approx(2.5 * 0.6)


def test_summary_averages_per_concept_then_setting():
    rows = [dict(job="s1", concept="a", I=1.0, I_first=1.0, T=0.5), dict(job="s1", concept="a", I=0.0, I_first=0.0, T=0.5),
            dict(job="s1", concept="b", I=0.5, I_first=0.2, T=0.1), dict(job="s2", concept="a", I=0.2, I_first=0.2, T=0.3)]
    s = summarize(rows)
    assert s["settings"]["s1"]["I"] == pytest.approx((0.5 + 0.5) / 2)
    assert s["settings"]["s1"]["T"] == pytest.approx((0.5 + 0.1) / 2)
    assert s["I"] == pytest.approx((0.5 + 0.2) / 2)
    assert "| **mean** |" in markdown(s)


def test_evaluate_end_to_end_on_a_batch(clip_dir, tmp_path):
    """A fake batch folder (image + sidecar) and reference folders; scores equal a direct computation."""
    res, refs = tmp_path / "res", tmp_path / "refs"
    (res / "setting1").mkdir(parents=True)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    img.save(res / "setting1" / "0.png")
    spec = {"height": 128, "width": 128, "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 128, 64], "lora": "/x/cat.pth"}]}
    json.dump({"seed": 0, "spec": spec}, open(res / "setting1" / "0.json", "w"))
    (refs / "cat").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(refs / "cat" / f"r{i}.png")
    (refs / "cat" / "class.txt").write_text("cat\n")
    rows, summary = evaluate(str(res), str(refs), clip_dir)
    assert len(rows) == 1 and rows[0]["concept"] == "cat" and rows[0]["class"] == "cat"
    m = CLIPModel.load(clip_dir)
    from composer.tokenizer import CLIPTokenizer
    with torch.no_grad():
        f = m.image_features(preprocess([img.crop((0, 0, 64, 128))]))[0]
        r = m.image_features(preprocess([Image.open(refs / "cat" / f"r{i}.png") for i in range(2)]))
        t = m.text_features(CLIPTokenizer.from_file(clip_dir)(["A photo depicts a cat"]))[0]
    want = scores(f, r, t)
    for k in ("I", "I_first", "T"):
        assert rows[0][k] == pytest.approx(want[k], abs=1e-6)
    assert summary["I"] == pytest.approx(want["I"])


def _openclip_reference(sd, ids, px):
    """An independent OpenAI-CLIP forward written directly on open_clip's tensors (fused in_proj, x @ proj)."""
    import torch.nn.functional as F

    def resblocks(x, prefix, heads, causal):
        n = 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))
        L = x.shape[0]
        mask = torch.full((L, L), float("-inf")).triu(1) if causal else None
        for i in range(n):
            p = f"{prefix}{i}."
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
            a, _ = F.multi_head_attention_forward(h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"],
                                                  sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
                                                  sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
                                                  need_weights=False, attn_mask=mask)
            x = x + a
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
            x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x
    # text: [L, B, C] as in OpenAI CLIP
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).permute(1, 0, 2)
    x = resblocks(x, "transformer.resblocks.", sd["token_embedding.weight"].shape[1] // 64 or 1, True).permute(1, 0, 2)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    text = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    v = F.conv2d(px, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    v = torch.cat([sd["visual.class_embedding"].expand(len(px), 1, -1), v], 1) + sd["visual.positional_embedding"]
    v = F.layer_norm(v, v.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]).permute(1, 0, 2)
    v = resblocks(v, "visual.transformer.resblocks.", sd["visual.conv1.weight"].shape[0] // 64 or 1, False).permute(1, 0, 2)
    img = F.layer_norm(v[:, 0], v.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    return img, text


def test_open_clip_layout(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    tw, vw, p = 128, 128, 16
    sd = {"token_embedding.weight": r(49408, tw), "positional_embedding": r(77, tw), "ln_final.weight": 1 + r(tw),
          "ln_final.bias": r(tw), "text_projection": r(tw, p), "logit_scale": torch.tensor(4.6),
          "visual.class_embedding": r(vw), "visual.positional_embedding": r(50, vw), "visual.conv1.weight": r(vw, 3, 32, 32),
          "visual.ln_pre.weight": 1 + r(vw), "visual.ln_pre.bias": r(vw), "visual.ln_post.weight": 1 + r(vw),
          "visual.ln_post.bias": r(vw), "visual.proj": r(vw, p)}
    for pre, w in (("transformer.resblocks.", tw), ("visual.transformer.resblocks.", vw)):
        for i in range(2):
            b = f"{pre}{i}."
            sd.update({b + "ln_1.weight": 1 + r(w), b + "ln_1.bias": r(w), b + "attn.in_proj_weight": r(3 * w, w),
                       b + "attn.in_proj_bias": r(3 * w), b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                       b + "ln_2.weight": 1 + r(w), b + "ln_2.bias": r(w), b + "mlp.c_fc.weight": r(4 * w, w),
                       b + "mlp.c_fc.bias": r(4 * w), b + "mlp.c_proj.weight": r(w, 4 * w), b + "mlp.c_proj.bias": r(w)})
    f = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(f))
    m = CLIPModel.load(str(tmp_path))
    ids = torch.full((2, 77), 0, dtype=torch.long)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1], ids[1, 2] = 49406, torch.tensor([320, 1125, 539]), 49407, 2368, 49407
    px = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        ri, rt = _openclip_reference(sd, ids, px)
        torch.testing.assert_close(m.image_features(px), ri, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.text_features(ids), rt, atol=1e-4, rtol=1e-4)


def test_evaluate_cli_writes_csv_and_markdown(clip_dir, tmp_path):
    from composer.evaluate import main
    res, refs = tmp_path / "res", tmp_path / "refs"
    (res / "s").mkdir(parents=True)
    (refs / "dog").mkdir(parents=True)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(res / "s" / "3.png")
    json.dump({"seed": 3, "spec": {"height": 64, "width": 64, "regions": [
        {"prompt": "a <dog1> <dog2>", "box": [0, 0, 1, 1], "lora": "dog.safetensors"}]}}, open(res / "s" / "3.json", "w"))
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(refs / "dog" / "a.png")
    assert main(["--results", str(res), "--refs", str(refs), "--clip", clip_dir, "--device", "cpu"]) == 0
    rows = (res / "clip_scores.csv").read_text().splitlines()
    assert rows[0] == "job,seed,region,concept,class,I,I_first,T" and rows[1].startswith("s,3,0,dog,dog,")
    assert "| **mean** |" in (res / "clip_scores.md").read_text()


def test_evaluate_missing_references(clip_dir, tmp_path):
    res = tmp_path / "res"
    (res / "s").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(res / "s" / "0.png")
    json.dump({"seed": 0, "spec": {"height": 64, "width": 64, "regions": [
        {"prompt": "x", "box": [0, 0, 1, 1], "lora": "owl.pth"}]}}, open(res / "s" / "0.json", "w"))
    with pytest.raises(FileNotFoundError, match="no reference images for concept 'owl'"):
        evaluate(str(res), str(tmp_path / "refs"), clip_dir)
