"""python -m composer.sample: embedded default, a real folder, PNG parameters, atomic writes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from composer.sample import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_text_to_image(tmp_path, capsys):
    out = tmp_path / "t2i.png"
    assert main(["--prompt", "a photo of a cat", "--out", str(out), "--quiet"]) == 0
    im = Image.open(out)
    assert im.size == (64, 64)
    params = json.loads(im.text["parameters"])
    assert params["model"] == "embedded-tiny" and params["steps"] == 8 and params["sampler"] == "dpm++2m"
    assert "embedded tiny random-weight model" in capsys.readouterr().err


def test_folder_model_matches_api(tmp_path, ref_pipe_dir, our_pipe):
    out = tmp_path / "x.png"
    main(["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "3", "--height", "64", "--width", "64",
          "--seed", "9", "--sampler", "ddim", "--out", str(out), "--quiet"])
    api = our_pipe.generate("a cat", steps=3, height=64, width=64, seed=9, sampler="ddim")
    assert (np.asarray(Image.open(out)) == np.asarray(api)).all()
    p = json.loads(Image.open(out).text["parameters"])
    assert p["prompt"] == "a cat" and p["seed"] == 9 and p["guidance"] == 7.5


def test_failure_leaves_no_file(tmp_path, ref_pipe_dir):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="multiple of 8"):
        main(["--model", ref_pipe_dir, "--height", "63", "--out", str(out), "--quiet"])
    assert os.listdir(tmp_path) == []


def test_module_entry_point_reports_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "composer.sample", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "model path not found" in r.stderr
    assert not (tmp_path / "o.png").exists()
