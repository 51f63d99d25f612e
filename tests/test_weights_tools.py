"""weights_tools: inspect, convert (ckpt -> safetensors, LDM <-> diffusers), make_tiny."""
import os

import pytest
import torch
from safetensors.torch import load_file

import composer
from weights_tools import convert as wconvert
from weights_tools.inspect import inspect_path
from weights_tools.make_tiny import make_tiny


def test_inspect_formats(ldm_file, ref_pipe_dir):
    s = inspect_path(ldm_file)
    assert "LDM single file" in s and "unet" in s and "684 tensors" in s
    s = inspect_path(ref_pipe_dir)
    assert "diffusers folder" in s and "text_encoder" in s and "tokenizer" in s


def test_ckpt_to_safetensors(ldm_file, tmp_path):
    src = tmp_path / "m.ckpt"
    sd = load_file(ldm_file)
    torch.save({"state_dict": sd, "global_step": 1}, str(src))
    dst = tmp_path / "m.safetensors"
    assert wconvert.main(["ckpt2st", str(src), str(dst)]) == 0
    back = load_file(str(dst))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_ldm_diffusers_round_trip(ldm_file, tokenizer_dir, tmp_path, our_pipe):
    folder = tmp_path / "folder"
    wconvert.main(["ldm2diffusers", ldm_file, str(folder), "--tokenizer", tokenizer_dir])
    p = composer.load(str(folder))
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(p.unet(x, 3, ctx), our_pipe.unet(x, 3, ctx))
    back = tmp_path / "back.safetensors"
    wconvert.main(["diffusers2ldm", str(folder), str(back)])
    a, b = load_file(str(back)), load_file(ldm_file)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_convert_refuses_same_path(ldm_file):
    with pytest.raises(SystemExit):
        wconvert.main(["ckpt2st", ldm_file, ldm_file])


def test_make_tiny_both_layouts_agree(tmp_path, bpe_path):
    make_tiny(str(tmp_path), tokenizer=bpe_path, seed=3)
    a = composer.load(str(tmp_path / "diffusers"))
    b = composer.load(str(tmp_path / "model.safetensors"), tokenizer=str(tmp_path / "tokenizer"))
    x, ids = torch.randn(1, 4, 8, 8), a.tokenizer(["hello"])
    with torch.no_grad():
        assert torch.equal(a.unet(x, 1, a.text_encoder(ids)), b.unet(x, 1, b.text_encoder(ids)))
    assert sorted(os.listdir(tmp_path)) == ["concepts", "diffusers", "model.safetensors", "spec.json", "tokenizer"]


def test_make_tiny_example_concepts_and_spec_compose(tmp_path):
    """make_tiny's walkthrough: its spec (paths relative to the spec file) composes an ED-LoRA and a kohya concept."""
    import json
    from PIL import Image
    from composer.sample import main
    make_tiny(str(tmp_path / "tiny"), seed=1)
    spec = json.loads((tmp_path / "tiny" / "spec.json").read_text())
    assert [r["lora"] for r in spec["regions"]] == ["concepts/cat.safetensors", "concepts/dog.safetensors"]
    out = tmp_path / "composed.png"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the spec's paths must not depend on the current folder
    try:
        assert main(["--spec", str(tmp_path / "tiny" / "spec.json"), "--out", str(out), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    rec = json.loads(Image.open(out).text["composer"])
    assert [r["lora"]["name"] for r in rec["regions"]] == ["cat.safetensors", "dog.safetensors"]
    assert rec["model"]["path"] == str(tmp_path / "tiny" / "diffusers")
    assert "edlora" in inspect_path(str(tmp_path / "tiny" / "concepts" / "cat.safetensors"))
    assert "trigger words: 'sks dog'" in inspect_path(str(tmp_path / "tiny" / "concepts" / "dog.safetensors"))


def test_inspect_every_loader_format(tmp_path, our_pipe, ref_pipe_dir, bpe_path):
    from composer.io import save_safetensors
    from composer.tiny import random_edlora, random_kohya
    pth = tmp_path / "cat.pth"
    torch.save(random_edlora(our_pipe, ["<cat1>", "<cat2>"], seed=1), str(pth))
    s = inspect_path(str(pth))  # used to crash on the 'params' dict
    assert "LoRA (edlora)" in s and "<cat1> (16, 32)" in s and "bare alpha 1.0" in s
    tok = inspect_path(os.path.join(ref_pipe_dir, "tokenizer"))
    assert "tokenizer folder" in tok and "49408 ids" in tok and "48894 merges" in tok
    assert "49408 ids" in inspect_path(bpe_path)
    s = inspect_path(ref_pipe_dir)
    assert "UNet2DConditionModel" in s and "49408 ids" in s and "scheduler_config.json" in s
    assert "model component folder" in inspect_path(os.path.join(ref_pipe_dir, "unet"))
    sd, meta = random_kohya(our_pipe, "zkx", seed=2)
    save_safetensors(sd, str(tmp_path / "k.safetensors"), {**meta, "modelspec.trigger_phrase": "zkx shape"})
    assert "trigger words: 'zkx shape' (from modelspec.trigger_phrase)" in inspect_path(str(tmp_path / "k.safetensors"))
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_safetensors({"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
                      torch.zeros(2, 32),
                      "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight":
                      torch.zeros(32, 2)}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    s = inspect_path(str(peft_dir))
    assert "LoRA (peft)" in s and "PEFT config present" in s
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        inspect_path(str(tmp_path / "missing.safetensors"))


def test_lora_conversions_keep_everything_or_refuse(tmp_path, our_pipe):
    from safetensors import safe_open
    from composer.checkpoint import CheckpointError
    from composer.io import save_safetensors
    from composer.tiny import random_edlora, random_kohya
    pth = tmp_path / "cat.pth"
    torch.save(random_edlora(our_pipe, ["<cat1>", "<cat2>"], seed=1), str(pth))
    with pytest.raises(CheckpointError, match=r"pseudo-word embeddings \['<cat1>', '<cat2>'\].*edlora2st"):
        wconvert.main(["kohya2peft", str(pth), str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
    sd, meta = random_kohya(our_pipe, "zkx", seed=2)
    src = tmp_path / "k.safetensors"
    save_safetensors(sd, str(src), meta)
    dst = tmp_path / "p.safetensors"
    wconvert.main(["kohya2peft", str(src), str(dst)])
    with safe_open(str(dst), "pt") as f:
        out_meta, keys = f.metadata(), list(f.keys())
    assert out_meta["ss_tag_frequency"] == meta["ss_tag_frequency"]  # metadata (the trigger word) carried over
    assert len(keys) == sum(1 for k in sd if not k.endswith(".alpha"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
