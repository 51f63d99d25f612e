"""The command lines: embedded default, a real folder, settings resolution (model < spec < flag), PNG metadata
(A1111 text + the composer spec) and re-running an image from its PNG, one-line errors, Ctrl-C, help text."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from composer.cli import run
from composer.sample import EMBEDDED_DEFAULTS, PROG, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_of(png):
    return json.loads(Image.open(png).text["composer"])


def test_embedded_text_to_image(tmp_path, capsys):
    out = tmp_path / "t2i.png"
    assert main(["--prompt", "a photo of a cat", "--out", str(out), "--quiet"]) == 0
    im = Image.open(out)
    assert im.size == (EMBEDDED_DEFAULTS["width"], EMBEDDED_DEFAULTS["height"])
    p = spec_of(out)
    assert p["model"]["name"] == "embedded-tiny" and p["steps"] == EMBEDDED_DEFAULTS["steps"]
    assert p["sampler"] == "dpm++2m" and "regions" not in p and "enhance" not in p  # no composition fields
    assert "embedded tiny random-weight model" in capsys.readouterr().err


def test_folder_model_matches_api(tmp_path, ref_pipe_dir, our_pipe):
    out, packed = tmp_path / "x.png", tmp_path / "packed.png"
    args = ["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "3", "--height", "64", "--width", "64",
            "--seed", "9", "--sampler", "ddim", "--quiet"]
    main(args + ["--out", str(out), "--no-prepack"])  # the API's conv path: the API's bits
    main(args + ["--out", str(packed)])  # the CLI's CPU default (pre-packed convs): the API's image to rounding
    api = np.asarray(our_pipe.generate("a cat", steps=3, height=64, width=64, seed=9, sampler="ddim"))
    assert (np.asarray(Image.open(out)) == api).all()
    assert np.abs(np.asarray(Image.open(packed)).astype(int) - api).max() <= 2
    p = spec_of(out)
    assert p["prompt"] == "a cat" and p["seed"] == 9 and p["guidance"] == 7.5
    assert p["model"]["path"] == os.path.abspath(ref_pipe_dir)


def test_a1111_parameters_text(tmp_path, ref_pipe_dir):
    out = tmp_path / "x.png"
    main(["--model", ref_pipe_dir, "--prompt", "a cat, sitting", "--negative", "blurry", "--steps", "2",
          "--height", "64", "--width", "72", "--seed", "5", "--out", str(out), "--quiet"])
    lines = Image.open(out).text["parameters"].split("\n")
    assert lines[0] == "a cat, sitting" and lines[1] == "Negative prompt: blurry"
    fields = lines[2]
    assert fields.startswith("Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5, Size: 72x64, Model: sd-tiny")
    assert "Version: composer" in fields


def test_spec_steps_win_over_model_defaults_and_flags_win_over_spec(tmp_path):
    """On the embedded model too: defaults < spec < explicit flag (the spec's steps used to be ignored)."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"prompt": "a cat", "steps": 3, "height": 72, "width": 64}))
    calls = []
    out = tmp_path / "a.png"
    main(["--spec", str(f), "--out", str(out), "--quiet"])
    p = spec_of(out)
    assert p["steps"] == 3 and p["height"] == 72 and Image.open(out).size == (64, 72)
    out2 = tmp_path / "b.png"
    main(["--spec", str(f), "--steps", "2", "--out", str(out2), "--quiet"])
    assert spec_of(out2)["steps"] == 2 and spec_of(out2)["height"] == 72
    del calls


def test_rerun_from_png_gives_the_same_image(tmp_path, ref_pipe_dir, kohya_file):
    out = tmp_path / "first.png"
    main(["--model", ref_pipe_dir, "--prompt", "a cat", "--lora", f"{kohya_file}:0.7", "--steps", "2",
          "--height", "64", "--width", "64", "--seed", "11", "--out", str(out), "--quiet"])
    p = spec_of(out)
    assert p["loras"][0]["name"] == os.path.basename(kohya_file) and p["loras"][0]["scale"] == 0.7
    assert len(p["loras"][0]["sha256"]) == 64
    assert "Lora hashes: " in Image.open(out).text["parameters"]
    again = tmp_path / "again.png"
    assert main(["--spec", str(out), "--out", str(again), "--quiet"]) == 0
    assert (np.asarray(Image.open(out)) == np.asarray(Image.open(again))).all()
    # without the LoRA the image differs: the re-run really re-applied it
    plain = tmp_path / "plain.png"
    main(["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
          "--seed", "11", "--out", str(plain), "--quiet"])
    assert (np.asarray(Image.open(out)) != np.asarray(Image.open(plain))).any()


def test_rerun_refuses_a_changed_lora_file(tmp_path, ref_pipe_dir, kohya_file):
    import shutil
    lora = tmp_path / "style.safetensors"
    shutil.copy(kohya_file, lora)
    out = tmp_path / "first.png"
    main(["--model", ref_pipe_dir, "--prompt", "a cat", "--lora", str(lora), "--steps", "1", "--height", "64",
          "--width", "64", "--out", str(out), "--quiet"])
    data = lora.read_bytes()
    lora.write_bytes(data[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="has sha256 .* the record says"):
        main(["--spec", str(out), "--out", str(tmp_path / "x.png"), "--quiet"])


def test_png_without_metadata_cannot_be_rerun(tmp_path):
    f = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(f)
    with pytest.raises(ValueError, match="no 'composer' metadata chunk"):
        main(["--spec", str(f), "--out", str(tmp_path / "o.png"), "--quiet"])


def test_failure_leaves_no_file(tmp_path, ref_pipe_dir):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="multiple of 8"):
        main(["--model", ref_pipe_dir, "--height", "63", "--out", str(out), "--quiet"])
    assert os.listdir(tmp_path) == []


def test_module_entry_point_reports_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "composer.sample", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith(f"{PROG}: error: model path not found")
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()


def test_ctrl_c_is_one_line_exit_130_and_no_partial_file(tmp_path, ref_pipe_dir, monkeypatch, capsys):
    from composer.pipeline import Pipeline

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Pipeline, "denoise", interrupted)
    out = tmp_path / "o.png"
    rc = run(PROG, main, ["--model", ref_pipe_dir, "--prompt", "x", "--steps", "2", "--height", "64", "--width", "64",
                          "--out", str(out), "--quiet"])
    assert rc == 130 and capsys.readouterr().err.strip().endswith(f"{PROG}: interrupted")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("prog,argv,msg", [
    ("python -m weights_tools.inspect", ["/nonexistent/model.safetensors"], "no such file or folder"),
    ("python -m weights_tools.convert", ["ckpt2st", "/nonexistent/a.ckpt", "/tmp/x.safetensors"], "no such file"),
    ("python -m composer.evaluate", ["--results", "/nonexistent/runs", "--refs", "/tmp", "--clip", "/tmp"],
     "--results /nonexistent/runs: the path does not exist"),
    ("python -m composer.sample", ["--spec", "/nonexistent/spec.json"], "spec file not found"),
])
def test_every_cli_one_line_error_exit_2(prog, argv, msg, capsys):
    mod = {"python -m weights_tools.inspect": "weights_tools.inspect", "python -m weights_tools.convert":
           "weights_tools.convert", "python -m composer.evaluate": "composer.evaluate",
           "python -m composer.sample": "composer.sample"}[prog]
    import importlib
    m = importlib.import_module(mod)
    assert run(prog, m.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and msg in err[0]


def test_lora_strict_hint_names_the_cli_flag(tmp_path, ref_pipe_dir, capsys):
    from safetensors.torch import save_file
    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, str(bad))
    argv = ["--model", ref_pipe_dir, "--prompt", "x", "--lora", str(bad), "--steps", "1", "--height", "64",
            "--width", "64", "--out", str(tmp_path / "o.png"), "--quiet"]
    assert run(PROG, main, argv) == 2
    err = capsys.readouterr().err
    assert "--no-lora-strict loads the rest" in err and "strict=False" not in err
    # and the flag does what the hint says: the unmatched module is skipped with a warning
    with pytest.raises(ValueError, match="no LoRA module matched"):  # nothing else in this file
        main(argv + ["--no-lora-strict"])


def test_help_text_is_true(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"embedded model: {EMBEDDED_DEFAULTS['height']}" in text and "--out OUT the PNG to write" in text
    from weights_tools.convert import main as convert_main
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    text = capsys.readouterr().out
    from composer.lora import CONVERT_KINDS
    for kind in ("ckpt2st", "ldm2diffusers", "diffusers2ldm", *CONVERT_KINDS):
        assert f"\n  {kind} " in text, kind


@pytest.fixture(scope="module")
def kohya_file(our_pipe, tmp_path_factory):
    from composer.io import save_safetensors
    from composer.tiny import random_kohya
    sd, meta = random_kohya(our_pipe, "sks", seed=5)
    p = tmp_path_factory.mktemp("k") / "style.safetensors"
    save_safetensors(sd, str(p), meta)
    return str(p)
