"""Bad input gets a clear error naming what is at fault, and nothing runs or is left half-done."""
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import composer
from composer.checkpoint import CheckpointError, read_weights


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        composer.load(str(tmp_path / "nope.safetensors"))


def test_unknown_format(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unknown weights format"):
        composer.load(str(f), tokenizer="x")


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="unet/config.json missing"):
        composer.load(str(tmp_path))


def test_truncated_safetensors(ldm_file, tmp_path):
    data = open(ldm_file, "rb").read()
    f = tmp_path / "cut.safetensors"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_weights(str(f))
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        read_weights(str(f))


def test_renamed_pickle_is_not_safetensors(tmp_path):
    f = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_weights(str(f))


def test_corrupt_header(tmp_path):
    f = tmp_path / "bad.safetensors"
    hdr = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    f.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\x00" * 8)  # 8 bytes where 16 are declared by shape
    with pytest.raises(CheckpointError, match=str(f.name)):
        read_weights(str(f))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_does_not_execute(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.ckpt"
    if zip_format:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(str(marker))}, str(f))
    else:
        with open(f, "wb") as fh:
            pickle.dump({"state_dict": _Evil(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="refused to load this pickle"):
        composer.load(str(f), tokenizer="x")
    assert not marker.exists()


def test_non_tensor_payload(tmp_path):
    f = tmp_path / "weird.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1), "note": "hello"}}, str(f))
    with pytest.raises(CheckpointError, match="non-tensor entries.*note"):
        read_weights(str(f))


@pytest.mark.parametrize("mutate,msg", [
    (lambda sd: sd.update({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}), "SDXL"),
    (lambda sd: sd.update({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}), "SD2.x"),
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.1.1.proj_in.weight":
                           sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"][:, :, 0, 0]}), "SD2.x"),
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.0.0.weight":
                           torch.zeros(32, 9, 3, 3)}), "inpainting"),
])
def test_wrong_architecture(ldm_file, tmp_path, mutate, msg):
    sd = load_file(ldm_file)
    mutate(sd)
    f = tmp_path / "variant.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=msg):
        composer.load(str(f), tokenizer="unused")


def test_shape_mismatch_names_key_and_shapes(ref_pipe_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(ref_pipe_dir, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight: model \(32, 4, 3, 3\) vs file \(32, 4, 1, 1\)"):
        composer.load(str(d))


def test_missing_and_unexpected_keys(ref_pipe_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(ref_pipe_dir, d)
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["decoder.extra.weight"] = sd.pop("decoder.conv_out.weight")
    save_file(sd, str(f))
    with pytest.raises(CheckpointError) as e:
        composer.load(str(d))
    assert "decoder.conv_out.weight" in str(e.value) and "decoder.extra.weight" in str(e.value)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_nan_weights_reported(ldm_file, tmp_path):
    sd = load_file(ldm_file)
    k = "model.diffusion_model.out.2.weight"
    sd[k][0, 0, 0, 0] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"non-finite.*out\.2\.weight"):
        composer.load(str(f), tokenizer="unused")


def test_leftover_keys_are_errors(ldm_file, tmp_path):
    sd = load_file(ldm_file)
    sd["some_adapter.weight"] = torch.zeros(3)
    f = tmp_path / "extra.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="some_adapter.weight"):
        composer.load(str(f), tokenizer="unused")


def test_single_file_loads_with_the_packaged_tokenizer(ldm_file, ref_pipe_dir):
    """A single file carries no tokenizer: SD1's CLIP vocabulary ships with composer (no --tokenizer needed)."""
    p = composer.load(ldm_file)
    ref = composer.load(ref_pipe_dir)  # the folder's own tokenizer/ (saved by transformers)
    prompts = ["a photo of a cat", "Hello,  WORLD!! 1234 don't", "café naïve"]
    assert torch.equal(p.tokenizer(prompts), ref.tokenizer(prompts))
    assert p.tokenizer.source == "packaged SD1 CLIP vocabulary"


def test_empty_prompt_list(our_pipe):
    with pytest.raises(ValueError, match="empty prompt list"):
        our_pipe.encode_prompt([])


@pytest.mark.parametrize("change,msg", [({"use_linear_projection": True}, "SD2.x"), ({"in_channels": 9}, "inpainting"),
                                        ({"addition_embed_type": "text_time"}, "SDXL")])
def test_non_sd1_diffusers_folders_are_refused(ref_pipe_dir, tmp_path, change, msg):
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(ref_pipe_dir, d)
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg.update(change)
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        composer.load(str(d))
