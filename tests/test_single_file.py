"""LDM single files: our exporter checked by diffusers' own converters, then loaded by composer.load."""
import json
import os
import sys
import types

import torch
from safetensors.torch import load_file, save_file

import composer
from composer import convert


def test_exporter_against_diffusers_converters(ldm_file, ref_pipe_dir):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    sd = load_file(ldm_file)
    for sub, conv in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        cfg = json.load(open(os.path.join(ref_pipe_dir, sub, "config.json")))
        back = conv(sd, cfg)
        orig = load_file(os.path.join(ref_pipe_dir, sub, "diffusion_pytorch_model.safetensors"))
        assert set(back) == set(orig)
        assert all(torch.equal(back[k], orig[k]) for k in orig), sub
    clip = convert_ldm_clip_checkpoint(sd)
    orig = load_file(os.path.join(ref_pipe_dir, "text_encoder", "model.safetensors"))
    norm = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in orig.items()}
    assert {k for k in clip if "position_ids" not in k} == set(norm)
    assert all(torch.equal(clip[k], norm[k]) for k in norm)


def test_key_counts_sd15_structure():
    from composer.unet import UNet, UNetConfig
    from composer.vae import AutoencoderKL, VAEConfig
    from composer.clip import CLIPTextModel, CLIPTextConfig
    with torch.device("meta"):
        u, v, c = UNet(UNetConfig()), AutoencoderKL(VAEConfig()), CLIPTextModel(CLIPTextConfig())
    assert len(u.state_dict()) == 686 and len(v.state_dict()) == 248 and len(c.state_dict()) == 196  # formats.md §1.8
    names = convert.ldm_name_table("unet", u.state_dict().keys(), u.cfg)
    assert names["down_blocks.1.resnets.0.conv_shortcut.weight"] == "model.diffusion_model.input_blocks.4.0.skip_connection.weight"
    assert names["up_blocks.0.upsamplers.0.conv.weight"] == "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert names["up_blocks.2.upsamplers.0.conv.bias"] == "model.diffusion_model.output_blocks.8.2.conv.bias"
    assert len(set(names.values())) == 686


def test_single_file_same_outputs_as_folder(ldm_file, our_pipe, tokenizer_dir):
    p = composer.load(ldm_file, tokenizer=tokenizer_dir)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    ids = our_pipe.tokenizer(["a cat"])
    with torch.no_grad():
        assert torch.equal(p.unet(x, 7, ctx), our_pipe.unet(x, 7, ctx))
        assert torch.equal(p.text_encoder(ids), our_pipe.text_encoder(ids))
        assert torch.equal(p.vae.decode(x[:, :, :8, :8]), our_pipe.vae.decode(x[:, :, :8, :8]))


def test_ignored_keys_and_missing_text_model_prefix(ldm_file, our_pipe, tokenizer_dir, tmp_path):
    sd = load_file(ldm_file)
    cp = convert.CLIP_PREFIX
    sd2 = {(cp + k[len(cp + "text_model."):] if k.startswith(cp + "text_model.") else k): v for k, v in sd.items()}
    sd2[cp + "embeddings.position_ids"] = torch.arange(77.0)[None]  # float, as merged files have it
    sd2["alphas_cumprod"] = torch.rand(1000)
    # EMA copy (> 100 keys) is ignored by default and can be chosen explicitly
    unet_keys = [k for k in sd if k.startswith(convert.UNET_PREFIX)]
    for k in unet_keys:
        sd2[convert.ema_key(k)] = sd[k] * 0 + 0.01
    f = tmp_path / "variant.safetensors"
    from safetensors import safe_open
    with safe_open(ldm_file, "pt") as fh:
        save_file(sd2, str(f), metadata=fh.metadata())
    p = composer.load(str(f), tokenizer=tokenizer_dir)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(p.unet(x, 7, ctx), our_pipe.unet(x, 7, ctx))
        pe = composer.load(str(f), tokenizer=tokenizer_dir, use_ema=True)
        assert all((v == 0.01).all() for v in pe.unet.state_dict().values())


def test_ckpt_with_lightning_callback(ldm_file, our_pipe, tokenizer_dir, tmp_path):
    """Real SD1 .ckpt files carry a pytorch_lightning ModelCheckpoint: loaded through a stub, not executed."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # stands in for the real class when the file is written
        def __init__(self):
            self.monitor = "val/loss"
    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    try:
        f = tmp_path / "model.ckpt"
        torch.save({"state_dict": load_file(ldm_file), "global_step": 470000, "epoch": 5,
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, str(f))
    finally:
        for name in (mod.__name__, "pytorch_lightning.callbacks", "pytorch_lightning"):
            sys.modules.pop(name, None)
    # head/group counts are not visible in a .ckpt's shapes (they default to SD1.5's 8/32), so compare the
    # loaded tensors: every one must land in the same place as from the folder
    from composer.loading import load_single_file
    from composer.checkpoint import read_weights
    sd, _ = read_weights(str(f))
    assert set(sd) == set(load_file(ldm_file))
    models, _ = load_single_file(str(f), dtype=torch.float32, device="cpu", backend="sdpa")
    for comp, ours in (("unet", our_pipe.unet), ("vae", our_pipe.vae), ("text_encoder", our_pipe.text_encoder)):
        a, b = models[comp].state_dict(), ours.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_folder_with_bin_and_sharded_components(ref_pipe_dir, our_pipe, tmp_path):
    """A component stored as a pickled .bin (read with weights_only) and one split into safetensors shards."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(ref_pipe_dir, d)
    te = d / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(te)), str(d / "text_encoder" / "pytorch_model.bin"))
    te.unlink()
    u = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(u))
    keys = sorted(sd)
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(d / "unet" / name))
        wm.update({k: name for k in part})
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    u.unlink()
    p = composer.load(str(d))
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    ids = our_pipe.tokenizer(["a cat"])
    with torch.no_grad():
        assert torch.equal(p.unet(x, 5, ctx), our_pipe.unet(x, 5, ctx))
        assert torch.equal(p.text_encoder(ids), our_pipe.text_encoder(ids))
