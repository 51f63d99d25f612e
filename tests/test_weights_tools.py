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
    assert sorted(os.listdir(tmp_path)) == ["diffusers", "model.safetensors", "tokenizer"]
