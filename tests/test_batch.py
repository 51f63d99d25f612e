"""--jobs batches: parsing and validation, resume, atomic writes, failures, sharding, torchrun on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import composer
from composer.batch import items_of, parse_seeds, read_jobs, run_jobs, shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jobs(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def concept(our_pipe, tmp_path_factory):
    from composer.tiny import random_edlora
    p = tmp_path_factory.mktemp("bc") / "cat.pth"
    torch.save(random_edlora(our_pipe, ["<cat1>", "<cat2>"], seed=3), str(p))
    return str(p)


def jobs_lines(concept):
    return [
        {"name": "plain", "prompt": "a photo", "height": 64, "width": 64, "steps": 2, "seeds": "0-1"},
        "# a comment line",
        "",
        {"name": "comp", "prompt": "a cat", "height": 64, "width": 64, "steps": 2, "seeds": [5],
         "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 0.5], "lora": concept}]},
    ]


def test_seed_forms():
    assert parse_seeds("0-3", "x") == [0, 1, 2, 3] and parse_seeds(7, "x") == [7] and parse_seeds([3, 1], "x") == [3, 1]
    for bad in ("3-1", "a-b", [], [1, 1], True, 1.5):
        with pytest.raises(ValueError, match="x"):
            parse_seeds(bad, "x")


@pytest.mark.parametrize("line,msg", [
    ("{not json", "line 1: invalid JSON"),
    ('["a"]', "line 1: expected a JSON object"),
    ('{"prompt": "a", "heigth": 64}', r"line 1: unknown field\(s\) \['heigth'\]"),
    ('{"prompt": "a", "name": "bad name!"}', "line 1: name 'bad name!'"),
    ('{"prompt": "a", "seeds": "9-2"}', "line 1: seeds range"),
    ('{"prompt": "a", "height": 80, "regions": [{"prompt": "x", "box": [0, 0, 1, 1]}]}', "line 1: height=80"),
])
def test_bad_lines_name_the_line(tmp_path, line, msg):
    with pytest.raises(ValueError, match=msg):
        read_jobs(write_jobs(tmp_path / "j.jsonl", [line]))


def test_duplicate_names_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="line 2: duplicate job name 'a'"):
        read_jobs(write_jobs(tmp_path / "j.jsonl", ['{"name": "a", "prompt": "x"}', '{"name": "a", "prompt": "y"}']))
    (tmp_path / "e.jsonl").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no jobs"):
        read_jobs(str(tmp_path / "e.jsonl"))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharding_covers_every_item_once(world):
    jobs = [type("J", (), {"seeds": list(range(n))}) for n in (5, 1, 7, 3)]
    items = items_of(jobs)
    got = [it for r in range(world) for it in shard(items, r, world)]
    assert sorted(got) == sorted(items) and len(got) == len(set(got)) == 16
    assert shard(items, 0, world) == shard(items, 0, world)  # deterministic


def test_run_resume_and_outputs(ref_pipe_dir, concept, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    jp = write_jobs(tmp_path / "jobs.jsonl", jobs_lines(concept))
    out = tmp_path / "out"
    s = run_jobs(pipe, jp, str(out), quiet=True)
    assert s["plain"]["done"] == 2 and s["comp"]["done"] == 1
    side = json.load(open(out / "comp" / "5.json"))
    assert side["spec"]["seed"] == 5 and side["versions"]["torch"] == torch.__version__
    assert side["seconds"] > 0 and side["memory"]["process_peak_rss_mb"] > 0 and side["info"]["optimised_steps"] == 2
    img = Image.open(out / "plain" / "1.png")
    direct = pipe.generate("a photo", height=64, width=64, steps=2, seed=1, sampler="dpm++2m")
    assert (torch.tensor(list(img.getdata())) == torch.tensor(list(direct.getdata()))).all()
    # simulate a kill: one image and its sidecar lost, a stray temporary file left
    os.remove(out / "plain" / "0.json")
    (out / "plain" / ".0.png.999.tmp").write_bytes(b"partial")
    s2 = run_jobs(pipe, jp, str(out), quiet=True)
    assert s2["plain"] == {"done": 1, "skipped": 1, "failed": 0, "seconds": s2["plain"]["seconds"]}
    assert s2["comp"]["skipped"] == 1
    assert not (out / "failures.jsonl").exists()


def test_failure_is_logged_and_batch_goes_on(ref_pipe_dir, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    jp = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "bad", "prompt": "x", "height": 64, "width": 64, "steps": 1,
         "regions": [{"prompt": "a", "box": [0, 0, 1, 1], "lora": str(tmp_path / "missing.pth")}]},
        {"name": "good", "prompt": "x", "height": 64, "width": 64, "steps": 1}])
    s = run_jobs(pipe, jp, str(tmp_path / "o"), quiet=True)
    assert s["bad"]["failed"] == 1 and s["good"]["done"] == 1
    rec = json.loads((tmp_path / "o" / "failures.jsonl").read_text().splitlines()[0])
    assert rec["job"] == "bad" and "missing.pth" in rec["error"] and rec["line"] == 1
    assert not (tmp_path / "o" / "bad" / "0.png").exists()


def test_cli_exit_status_and_summary(ref_pipe_dir, tmp_path, capsys):
    from composer.sample import main
    jp = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "ok", "prompt": "x", "height": 64, "width": 64, "steps": 1},
        {"name": "bad", "prompt": "a <nope1>", "height": 64, "width": 64, "steps": 1}])
    assert main(["--model", ref_pipe_dir, "--jobs", jp, "--out-dir", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "total" in err and "1 item(s) failed" in err


def test_torchrun_two_ranks_gloo(ref_pipe_dir, concept, tmp_path):
    jp = write_jobs(tmp_path / "jobs.jsonl", jobs_lines(concept))
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                        "-m", "composer.sample", "--model", ref_pipe_dir, "--jobs", jp, "--out-dir", str(out),
                        "--quiet", "--device", "cpu"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {}
    for name, seed in (("plain", 0), ("plain", 1), ("comp", 5)):
        side = json.load(open(out / name / f"{seed}.json"))
        ranks[(name, seed)] = side["rank"]
    assert ranks == {("plain", 0): 0, ("plain", 1): 1, ("comp", 5): 0}
    assert "total" in r.stderr and r.stderr.count("total") == 1  # gathered summary, printed once (rank 0)


def test_batch_cache_reuses_encodings(ref_pipe_dir, concept, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    pipe.prompt_cache_mb = 64
    a = pipe.encode_prompt(["a photo"])
    assert pipe.encode_prompt(["a photo"]) is a  # cached
    pipe.load_lora(concept, mode="region", name="c")
    assert pipe.encode_prompt(["a photo"]) is not a  # LoRA change clears the cache
