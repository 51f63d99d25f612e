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
    ('{"prompt": "a", "height": 72, "width": 72, "regions": [{"prompt": "x", "box": [0, 0, 1, 1]}]}',
     "line 1: height=72 must be a positive multiple of 32 for composition"),
    ('{"prompt": "a", "height": 60}', "line 1: height=60 must be a positive multiple of 8"),
    ('{"prompt": "a", "sampler": "plms"}', "line 1: unknown sampler 'plms'"),
])
def test_bad_lines_name_the_line(tmp_path, line, msg):
    with pytest.raises(ValueError, match=msg):
        read_jobs(write_jobs(tmp_path / "j.jsonl", [line]))


def test_plain_sizes_follow_the_text_to_image_rule(tmp_path):
    """72×72 is a valid text-to-image size (multiple of 8) though not a composition size."""
    jobs = read_jobs(write_jobs(tmp_path / "j.jsonl", ['{"prompt": "a", "height": 72, "width": 72}']))
    assert (jobs[0].spec.height, jobs[0].spec.width) == (72, 72)


def test_everything_is_validated_before_the_first_image(ref_pipe_dir, concept, tmp_path):
    """A missing file or an undefined pseudo-word on the LAST line stops the run before any image is made."""
    from composer.batch import validate_jobs
    pipe = composer.load(ref_pipe_dir)
    good = {"name": "ok", "prompt": "x", "height": 64, "width": 64, "steps": 1}
    cases = [({"name": "miss", "prompt": "x", "height": 64, "width": 64, "regions": [
                 {"prompt": "a", "box": [0, 0, 1, 1], "lora": "nope.pth"}]}, r"line 2 .*regions\[0\]\.lora file not found"),
             ({"name": "word", "prompt": "a <nope1>", "height": 64, "width": 64}, "line 2 .*pseudo-word <nope1>"),
             ({"name": "mask", "prompt": "x", "height": 64, "width": 64, "regions": [
                 {"prompt": "a", "mask": "m.png"}]}, r"line 2 .*mask file not found")]
    for bad, msg in cases:
        jp = write_jobs(tmp_path / "j.jsonl", [good, bad])
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            run_jobs(pipe, jp, str(tmp_path / "o"), quiet=True)
        assert not (tmp_path / "o" / "ok").exists()  # nothing ran
    # a region LoRA's own pseudo-words count as defined; paths resolve against the jobs file's folder
    import shutil
    shutil.copy(concept, tmp_path / "cat.pth")
    jp = write_jobs(tmp_path / "j.jsonl", [{"prompt": "x", "height": 64, "width": 64, "regions": [
        {"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 1], "lora": "cat.pth"}]}])
    jobs = read_jobs(jp)
    assert jobs[0].spec.regions[0].lora == str(tmp_path / "cat.pth")
    validate_jobs(pipe, jobs)


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
    assert side["spec"]["model"]["path"] == os.path.abspath(ref_pipe_dir)  # jobs record the model
    assert side["spec"]["regions"][0]["lora"]["name"] == "cat.pth" and len(side["spec"]["regions"][0]["lora"]["sha256"]) == 64
    assert side["seconds"] > 0 and side["memory"]["process_peak_rss_mb"] > 0 and side["info"]["optimised_steps"] == 2
    plain = json.load(open(out / "plain" / "1.json"))["spec"]
    assert "regions" not in plain and "enhance" not in plain  # text-to-image jobs carry no composition fields
    img = Image.open(out / "plain" / "1.png")
    direct = pipe.generate("a photo", height=64, width=64, steps=2, seed=1, sampler="dpm++2m")
    # seeds 0 and 1 ran as one batch: equal to the single run up to batched matmuls' last bits, so a pixel may round
    # the other way (batch_size=1 is bit-exact: tests/test_batch_seeds.py)
    diff = (torch.tensor(list(img.getdata())) - torch.tensor(list(direct.getdata()))).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    assert json.load(open(out / "plain" / "1.json"))["batch"] == 2
    # simulate a kill: one sidecar lost, a stray temporary file left behind
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "plain" / "1.png", out / "plain" / "1.json",
                                                                out / "comp" / "5.png", out / "comp" / "5.json")}
    os.remove(out / "plain" / "0.json")
    stray = out / "plain" / ".0.png.a1b2c3.tmp"
    stray.write_bytes(b"partial")
    s2 = run_jobs(pipe, jp, str(out), quiet=True)
    assert s2["plain"] == {"done": 1, "skipped": 1, "failed": 0, "seconds": s2["plain"]["seconds"]}
    assert s2["comp"]["skipped"] == 1
    assert not stray.exists() and not [p for p in os.listdir(out / "plain") if p.endswith(".tmp")]
    for p, (data, mtime) in kept.items():  # completed outputs are skipped untouched, byte for byte
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert not (out / "failures.jsonl").exists()


def _empty_mask(tmp_path):
    m = tmp_path / "empty.png"
    Image.new("L", (64, 64), 0).save(m)
    return str(m)


def test_failure_is_logged_and_batch_goes_on(ref_pipe_dir, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    jp = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "bad", "prompt": "x", "height": 64, "width": 64, "steps": 1,
         "regions": [{"prompt": "a", "mask": _empty_mask(tmp_path)}]},  # fails only when it runs
        {"name": "good", "prompt": "x", "height": 64, "width": 64, "steps": 1}])
    s = run_jobs(pipe, jp, str(tmp_path / "o"), quiet=True)
    assert s["bad"]["failed"] == 1 and s["good"]["done"] == 1
    rec = json.loads((tmp_path / "o" / "failures.jsonl").read_text().splitlines()[0])
    assert rec["job"] == "bad" and "is empty" in rec["error"] and rec["line"] == 1
    assert not (tmp_path / "o" / "bad" / "0.png").exists()


def test_cli_exit_status_and_summary(ref_pipe_dir, tmp_path, capsys):
    from composer.cli import run
    from composer.sample import PROG, main
    jp = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "ok", "prompt": "x", "height": 64, "width": 64, "steps": 1},
        {"name": "bad", "prompt": "x", "height": 64, "width": 64, "steps": 1,
         "regions": [{"prompt": "a", "mask": _empty_mask(tmp_path)}]}])
    assert main(["--model", ref_pipe_dir, "--jobs", jp, "--out-dir", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "total" in err and "1 item(s) failed" in err
    # a validation error is a usage error (exit 2) before anything runs
    jp2 = write_jobs(tmp_path / "jobs2.jsonl", [{"name": "w", "prompt": "a <nope1>", "height": 64, "width": 64}])
    assert run(PROG, main, ["--model", ref_pipe_dir, "--jobs", jp2, "--out-dir", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "line 1 (job 'w'): prompt 'a <nope1>' names pseudo-word <nope1>" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "w").exists()


def test_lora_cache_evicts_least_recently_used(ref_pipe_dir, our_pipe, tmp_path):
    from composer.batch import LoRACache
    from composer.compose import region_lora_name
    from composer.spec import ComposeSpec
    from composer.tiny import random_edlora
    pipe = composer.load(ref_pipe_dir)
    paths = []
    for i, w in enumerate(("ant", "bee", "cow")):
        p = tmp_path / f"{w}.pth"
        torch.save(random_edlora(our_pipe, [f"<{w}1>", f"<{w}2>"], seed=i), str(p))
        paths.append(str(p))
    def spec(i):
        return ComposeSpec.from_dict({"prompt": "x", "height": 64, "width": 64, "regions": [
            {"prompt": "a", "box": [0, 0, 1, 1], "lora": paths[i]}]})
    one = None
    for i in range(3):
        from composer.compose import _ensure_region_lora
        _ensure_region_lora(pipe, paths[i], 1.0)
        name = region_lora_name(paths[i], 1.0)
        one = one or sum(a.nbytes() for l in pipe.loras.live[name] for a in [l.adapters[name]])
    cache = LoRACache(pipe, budget_mb=2.5 * one / 2**20)  # room for two adapters
    for i in (0, 1, 2):
        cache.order[region_lora_name(paths[i], 1.0)] = True
    cache.touch(spec(0))  # 0 is now the most recent; 1 is the least recently used
    loaded = {p for p in paths if region_lora_name(p, 1.0) in pipe.loras.loras}
    assert loaded == {paths[0], paths[2]}
    cache.touch(spec(1))  # reload of 1 is needed by the next job: now 2 goes
    _ensure_region_lora(pipe, paths[1], 1.0)
    cache.touch(spec(1))
    loaded = {p for p in paths if region_lora_name(p, 1.0) in pipe.loras.loras}
    assert loaded == {paths[0], paths[1]}


def test_torchrun_two_ranks_gloo(ref_pipe_dir, concept, tmp_path):
    jp = write_jobs(tmp_path / "jobs.jsonl", jobs_lines(concept))
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    import socket
    with socket.socket() as sock:  # a free port, not a fixed one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
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
