"""Batched seeds: several images of one spec through the UNet as one batch, each equal to its single run.

Batched matmuls may round the last bits differently from a batch of one (or two, with CFG), so latents are compared
by relative error (≤ 1e-5), images by at most one 8-bit level; batch_size=1 is bit-exact. Covered: generate with
DDIM, DPM-Solver++ and Euler ancestral (per-image noise from per-image generators), no-CFG, groups of batch_size;
composition with the full method (re-init, optimisation, early stops that differ between images), a stopped image
left untouched, T2I-Adapter and ControlNet (guess mode) conditions; the command line (--num-images, --seeds, file
names, per-image records, re-run); --jobs grouping across lines and the retry of a failed batch; bad input.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import composer
from composer.batch import run_jobs
from composer.cli import run
from composer.compose import ComposeSpec, LatentOptimiser, compose, compose_latents
from composer.sample import PROG, main
from composer.spec import resolve_seeds
from composer.tiny import random_edlora
from conftest import max_rel_err, perturb

TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(ref_pipe_dir):
    return composer.load(ref_pipe_dir)


@pytest.fixture(scope="module")
def concepts(our_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("bs_concepts")
    paths = []
    for i, words in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        p = d / f"c{i}.pth"
        torch.save(random_edlora(our_pipe, list(words), seed=10 + i), str(p))
        paths.append(str(p))
    return paths


def comp_spec(concepts, **kw):
    base = dict(prompt="a photo", height=128, width=128, steps=8, seed=0,
                regions=[{"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 0.5], "lora": concepts[0]},
                         {"prompt": "a <dog1> <dog2>", "box": [0, 0.5, 1, 1], "lora": concepts[1]}])
    base.update(kw)
    return ComposeSpec.from_dict(base)


def pixels(im):
    return np.asarray(im).astype(np.int16)


# --- seeds ---------------------------------------------------------------------------------------------------------

def test_seed_forms_and_bad_input():
    assert resolve_seeds(4) == ([4], False)
    assert resolve_seeds(4, 3) == ([4, 5, 6], True)
    assert resolve_seeds([9, 2]) == ([9, 2], True) and resolve_seeds([9, 2], 2) == ([9, 2], True)
    assert resolve_seeds(7, 1) == ([7], True)  # asked for a batch: a list back, even of one
    for seed, n, msg in [("3", None, "'seed' must be an integer"), (1.5, None, "'seed' must be an integer"),
                         (True, None, "'seed' must be an integer"), ([1, "2"], None, "list of integers"),
                         ([], None, "non-empty list"), ([1, 1], None, "duplicate seeds"),
                         (0, 0, "'num_images' must be an integer >= 1"), (0, 2.0, "'num_images'"),
                         ([1, 2], 3, "lists 2 seeds but 'num_images' is 3")]:
        with pytest.raises(ValueError, match=msg):
            resolve_seeds(seed, n)


def test_bad_input_through_the_api(pipe, concepts):
    with pytest.raises(ValueError, match="'num_images' must be an integer >= 1"):
        pipe.generate("a cat", height=64, width=64, steps=1, num_images=0)
    with pytest.raises(ValueError, match="'seed' must be an integer or a non-empty list"):
        pipe.sample_latents("a cat", height=64, width=64, steps=1, seed=[1, "x"])
    with pytest.raises(ValueError, match="lists 2 seeds but 'num_images' is 3"):
        compose_latents(pipe, comp_spec(concepts, steps=1), seed=[1, 2], num_images=3)
    with pytest.raises(ValueError, match="'batch_size' must be an integer >= 1"):
        compose_latents(pipe, comp_spec(concepts, steps=1), num_images=2, batch_size=0)


# --- text to image -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,guidance", [("ddim", 7.5), ("dpm++2m", 7.5), ("euler-a", 7.5), ("dpm++2m", 1.0)])
def test_generate_batch_equals_one_at_a_time(pipe, sampler, guidance):
    kw = dict(negative_prompt="blurry", height=64, width=64, steps=4, sampler=sampler, guidance=guidance)
    seeds = [3, 8, 5]
    batch = pipe.sample_latents("a cat", seed=seeds, **kw)
    assert batch.shape == (3, 4, 8, 8)
    singles = [pipe.sample_latents("a cat", seed=s, **kw) for s in seeds]
    for b, one in enumerate(singles):
        assert max_rel_err(batch[b:b + 1], one) <= TOL, (sampler, b)
    assert max_rel_err(singles[0], singles[1]) > 1e-2  # the seeds differ
    # num_images: consecutive seeds from seed
    n = pipe.sample_latents("a cat", seed=3, num_images=2, **kw)
    assert max_rel_err(n[1:2], pipe.sample_latents("a cat", seed=4, **kw)) <= TOL


def test_ancestral_noise_comes_from_each_images_generator(pipe):
    """Euler-a with one generator shared by the batch would give image 1 other noise than its single run."""
    kw = dict(height=64, width=64, steps=4, sampler="euler-a")
    ctx = pipe.encode_prompt(["", "a cat"])
    from composer.pipeline import expand_context
    noise, gens = pipe.initial_latents([3, 8], 64, 64)
    shared = pipe.denoise(noise, pipe.make_sampler("euler-a", 4), expand_context(ctx, 2), 7.5, generator=gens[0])
    want = pipe.sample_latents("a cat", seed=8, **kw)
    assert max_rel_err(shared[1:2], want) > 1e-3
    assert max_rel_err(pipe.sample_latents("a cat", seed=[3, 8], **kw)[1:2], want) <= TOL


def test_batch_size_groups_and_images(pipe):
    kw = dict(height=64, width=64, steps=3, sampler="euler-a")
    seeds = [1, 2, 3]
    singles = [pipe.sample_latents("a cat", seed=s, **kw) for s in seeds]
    exact = pipe.sample_latents("a cat", seed=seeds, batch_size=1, **kw)
    assert all(torch.equal(exact[b:b + 1], singles[b]) for b in range(3))  # groups of one: the single runs
    two = pipe.sample_latents("a cat", seed=seeds, batch_size=2, **kw)  # a group of 2, then one of 1
    assert all(max_rel_err(two[b:b + 1], singles[b]) <= TOL for b in range(3))
    calls = []
    pipe.sample_latents("a cat", seed=seeds, batch_size=2, callback=lambda i, n, **p: calls.append(i), **kw)
    assert calls == [0, 1, 2, 0, 1, 2]
    ims = pipe.generate("a cat", num_images=2, seed=1, **kw)
    assert isinstance(ims, list) and len(ims) == 2
    one = pipe.generate("a cat", seed=2, **kw)
    assert isinstance(one, Image.Image) and np.abs(pixels(ims[1]) - pixels(one)).max() <= 1


# --- composition ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["dpm++2m", "euler-a"])
def test_compose_batch_equals_one_at_a_time(pipe, concepts, sampler):
    """The full method (re-init, latent optimisation with its early stop) per image; the seeds are chosen so the
    images stop optimising at different steps."""
    spec = comp_spec(concepts, sampler=sampler)
    seeds = list(range(6))
    seen = []
    lat, infos = compose_latents(pipe, spec, seed=seeds, observer=lambda ev, **d: seen.append((ev, d)))
    assert lat.shape[0] == 6 and [i["seed"] for i in infos] == seeds
    steps = [i["optimised_steps"] for i in infos]
    assert len(set(steps)) > 1, steps  # some image stops earlier than another
    for b, s in enumerate(seeds):
        one, info = compose_latents(pipe, spec, seed=s)
        assert max_rel_err(lat[b:b + 1], one) <= TOL, (sampler, s)
        assert info["optimised_steps"] == infos[b]["optimised_steps"] and info["reinit"] and infos[b]["reinit"]
        assert infos[b]["loss"] == pytest.approx(info["loss"], rel=TOL)
        assert infos[b]["regions"] == info["regions"] and info["seed"] == s
    # the observer sees each image on its own: one reinit each, then one "optimise" per optimised step
    for b, s in enumerate(seeds):
        mine = [(ev, d) for ev, d in seen if d["image"] == b]
        assert all(d["seed"] == s and d["z_before"].shape[0] == 1 for _, d in mine)
        assert [ev for ev, _ in mine] == ["reinit"] + ["optimise"] * steps[b]
        assert [d["i"] for ev, d in mine[1:]] == list(range(steps[b]))


def test_compose_batch_with_region_loras_in_every_layer(pipe, concepts):
    """lora_scope="all": each concept's whole LoRA on its region's tokens/pixels (RegionLoRA), with B images."""
    spec = comp_spec(concepts, steps=2, lora_scope="all", guidance=1.0)  # and no CFG: the cond half only
    lat, infos = compose_latents(pipe, spec, seed=[3, 4])
    for b, s in enumerate((3, 4)):
        one, info = compose_latents(pipe, spec, seed=s)
        assert max_rel_err(lat[b:b + 1], one) <= TOL and infos[b]["loss"] == pytest.approx(info["loss"], rel=TOL)


class ScriptedBatch(LatentOptimiser):
    """The loop's optimiser with each image's loss scripted (a real gradient: L_b = v·mean(z_b)), to check that an
    image that stopped is left out of the loss pass and its latent is never changed again."""

    def __init__(self, pipe, scripts, steps):
        self.scripts, self.batches = scripts, []
        prep = type("P", (), {"ra": type("RA", (), {"want_self_maps": True})(), "token_pos": [[1]]})()
        super().__init__(pipe, prep, ComposeSpec(), steps, images=len(scripts))

    def maps(self, z, t, grad, i=0):
        act = [b for b in range(self.images) if self.active[b]]
        self.batches.append(act)
        return [([z[j:j + 1]], torch.tensor(float(self.scripts[b][i]))) for j, b in enumerate(act)]

    def loss(self, cross, v):
        return cross[0].mean() * 0 + v * (1 + cross[0].mean() * 1e-3), None


def test_a_stopped_image_gets_no_further_update(our_pipe):
    steps = 8  # rise-stop from step 1, last optimised step 4
    scripts = [[5, 6, 1, 1, 1, 1, 1, 1],   # image 0 rises at step 1: stops after it
               [5, 4, 3, 2, 1, 1, 1, 1]]   # image 1 goes on to step 4
    opt = ScriptedBatch(our_pipe, scripts, steps)
    sch = type("S", (), {"scale_model_input": staticmethod(lambda i, x: x)})()
    x = torch.randn(2, 4, 2, 2)
    history = [x]
    for i in range(steps):
        x = opt.step(i, 0, x, sch)
        history.append(x)
    assert opt.optimised_steps == [2, 5] and opt.losses[0] == pytest.approx([5, 6], rel=1e-3)
    assert opt.batches == [[0, 1], [0, 1], [1], [1], [1]]  # the loss pass runs the active images only
    for i in range(2, steps):
        assert torch.equal(history[i + 1][0], history[2][0])  # image 0: unchanged after its last step
    assert all(not torch.equal(history[i + 1][1], history[i][1]) for i in range(5))  # image 1 moves to step 4
    assert torch.equal(history[6][1], history[8][1])


def test_compose_debug_dirs_and_lists(pipe, concepts, tmp_path):
    spec = comp_spec(concepts, steps=2)
    ims, infos = compose(pipe, spec, num_images=2, debug_dir=str(tmp_path / "dbg"), return_info=True)
    assert len(ims) == 2 and [i["seed"] for i in infos] == [0, 1]
    for s in (0, 1):
        assert (tmp_path / "dbg" / str(s) / "layout.png").exists()
        assert json.load(open(tmp_path / "dbg" / str(s) / "losses.json"))["seed"] == s
    single = compose(pipe, spec)
    assert isinstance(single, Image.Image) and np.abs(pixels(single) - pixels(ims[0])).max() <= 1


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from diffusers import T2IAdapter
    d = tmp_path_factory.mktemp("bs_adapter")
    perturb(T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2), std=0.2, seed=5).save_pretrained(
        str(d / "a"))
    img = d / "c.png"
    Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype(np.uint8)).save(img)
    return str(d / "a"), str(img)


def test_compose_batch_with_a_t2i_adapter(pipe, concepts, adapter):
    cond = [{"kind": "t2i-adapter", "model": adapter[0], "image": adapter[1], "weight": 0.8, "regions": {"1": 0.3}}]
    spec = comp_spec(concepts, steps=4, conditions=cond)
    lat, infos = compose_latents(pipe, spec, seed=[2, 9])
    plain, _ = compose_latents(pipe, comp_spec(concepts, steps=4), seed=2)
    assert max_rel_err(lat[:1], plain) > 1e-3  # the adapter acts
    for b, s in enumerate((2, 9)):
        one, info = compose_latents(pipe, spec, seed=s)
        assert max_rel_err(lat[b:b + 1], one) <= TOL and infos[b]["loss"] == pytest.approx(info["loss"], rel=TOL)


def test_generate_batch_with_a_controlnet_in_guess_mode(pipe, tmp_path):
    """Guess mode runs the ControlNet on the cond half only: with B images that is the last B of the CFG batch."""
    from diffusers import ControlNetModel
    from composer.controlnet import ControlNetConfig
    from composer.unet import UNetConfig
    cfg = {k: v for k, v in ControlNetConfig(unet=UNetConfig.from_name("tiny")).to_diffusers().items()
           if k != "_class_name"}
    perturb(ControlNetModel(**{**cfg, "conditioning_embedding_out_channels": (8, 16, 16, 32)}), std=0.05,
            seed=6).save_pretrained(str(tmp_path / "cn"))
    img = tmp_path / "pose.png"
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(img)
    cond = [{"kind": "controlnet", "model": str(tmp_path / "cn"), "image": str(img), "guess_mode": True}]
    kw = dict(height=64, width=64, steps=3, sampler="dpm++2m", conditions=cond)
    batch = pipe.sample_latents("a cat", seed=[4, 6], **kw)
    assert max_rel_err(batch[:1], pipe.sample_latents("a cat", seed=4, height=64, width=64, steps=3,
                                                      sampler="dpm++2m")) > 1e-3
    for b, s in enumerate((4, 6)):
        assert max_rel_err(batch[b:b + 1], pipe.sample_latents("a cat", seed=s, **kw)) <= TOL


# --- command line --------------------------------------------------------------------------------------------------

def test_cli_num_images_names_records_and_rerun(ref_pipe_dir, pipe, tmp_path, capsys):
    out = tmp_path / "cat.png"
    base = ["--model", ref_pipe_dir, "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
            "--sampler", "euler-a", "--quiet"]
    assert main(base + ["--seed", "4", "--num-images", "3", "--batch-size", "2", "--out", str(out)]) == 0
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["cat-4.png", "cat-5.png", "cat-6.png"]
    for s in (4, 5, 6):
        p = tmp_path / f"cat-{s}.png"
        rec = json.loads(Image.open(p).text["composer"])
        assert rec["seed"] == s and f"Seed: {s}," in Image.open(p).text["parameters"]
        api = pipe.generate("a cat", steps=2, height=64, width=64, seed=s, sampler="euler-a")
        assert np.abs(pixels(Image.open(p)) - pixels(api)).max() <= 1
    # --spec on one of them re-runs that one image (a single run with the API's conv path: its bits exactly)
    again = tmp_path / "again.png"
    assert main(["--model", ref_pipe_dir, "--spec", str(tmp_path / "cat-5.png"), "--out", str(again), "--quiet",
                 "--no-prepack"]) == 0
    api = pipe.generate("a cat", steps=2, height=64, width=64, seed=5, sampler="euler-a")
    assert (pixels(Image.open(again)) == pixels(api)).all() and json.loads(Image.open(again).text["composer"])["seed"] == 5
    # --seeds with ranges; one seed keeps --out as it is
    d = tmp_path / "s"
    assert main(base + ["--seeds", "2,7-8", "--out", str(d / "x.png")]) == 0
    assert sorted(os.listdir(d)) == ["x-2.png", "x-7.png", "x-8.png"]
    assert main(base + ["--seeds", "3", "--out", str(d / "one.png")]) == 0
    assert json.loads(Image.open(d / "one.png").text["composer"])["seed"] == 3
    assert "wrote" in capsys.readouterr().err


def test_cli_composition_num_images_with_debug_dirs(ref_pipe_dir, concepts, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(comp_spec(concepts, steps=2, seed=10).record() | {"model": None}))
    assert main(["--model", ref_pipe_dir, "--spec", str(spec), "--num-images", "2", "--out", str(tmp_path / "c.png"),
                 "--debug-dir", str(tmp_path / "dbg"), "--quiet"]) == 0
    for s in (10, 11):
        rec = json.loads(Image.open(tmp_path / f"c-{s}.png").text["composer"])
        assert rec["seed"] == s and rec["info"]["reinit"] and len(rec["regions"]) == 2
        assert (tmp_path / "dbg" / str(s) / "attention.png").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--seeds", "1,x"], "--seeds '1,x': 'x' is not an integer seed"),
    (["--seeds", "5-2"], "'5-2' is not an integer seed or a range"),
    (["--seeds", "1,1"], "listed twice"),
    (["--seed", "1", "--seeds", "2,3"], "give --seed or --seeds, not both"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--seeds", "1,2", "--num-images", "3"], "--seeds lists 2 seed"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--jobs", "j.jsonl", "--out-dir", "o", "--num-images", "2"], "do not apply to --jobs"),
])
def test_cli_bad_seed_flags_exit_2(argv, msg, capsys, tmp_path):
    out = tmp_path / "o.png"
    assert run(PROG, main, ["--prompt", "a cat", "--out", str(out), "--quiet"] + argv) == 2
    assert msg in capsys.readouterr().err and not out.exists()


# --- jobs ----------------------------------------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_jobs_batch_items_that_share_a_spec(ref_pipe_dir, concepts, tmp_path):
    pipe = composer.load(ref_pipe_dir)
    plain = {"prompt": "a photo", "height": 64, "width": 64, "steps": 2, "sampler": "euler-a"}
    comp = {"prompt": "a cat", "height": 64, "width": 64, "steps": 2,
            "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 0.5], "lora": concepts[0]}]}
    jp = _write(tmp_path / "jobs.jsonl", [{"name": "a", **plain, "seeds": "0-2"},
                                         {"name": "b", **plain, "seeds": [7]},    # same spec as "a": same batches
                                         {"name": "c", **comp, "seeds": [1, 2]}])
    s = run_jobs(pipe, jp, str(tmp_path / "batched"), quiet=True, batch_size=2)
    assert all(s[n]["done"] == k and s[n]["failed"] == 0 for n, k in (("a", 3), ("b", 1), ("c", 2)))
    one = run_jobs(pipe, jp, str(tmp_path / "single"), quiet=True, batch_size=1)
    assert sum(v["done"] for v in one.values()) == 6
    side = lambda root, n, seed: json.load(open(tmp_path / root / n / f"{seed}.json"))  # noqa: E731
    # a: 0, 1 | 2 + b's 7 (grouped across the two lines), c: 1, 2
    assert [side("batched", n, k)["batch"] for n, k in (("a", 0), ("a", 1), ("a", 2), ("b", 7), ("c", 1))] == [2] * 5
    for n, seeds in (("a", [0, 1, 2]), ("b", [7]), ("c", [1, 2])):
        for seed in seeds:
            got, ref = (pixels(Image.open(tmp_path / r / n / f"{seed}.png")) for r in ("batched", "single"))
            assert np.abs(got - ref).max() <= 1
            assert side("batched", n, seed)["spec"]["seed"] == seed and side("batched", n, seed)["info"]["seed"] == seed
            assert side("single", n, seed)["batch"] == 1
    direct = pipe.generate("a photo", height=64, width=64, steps=2, seed=7, sampler="euler-a")
    assert (pixels(Image.open(tmp_path / "single" / "b" / "7.png")) == pixels(direct)).all()


def test_jobs_failed_batch_is_retried_one_at_a_time(ref_pipe_dir, tmp_path, monkeypatch):
    import composer.batch as batch
    from composer.pipeline import NonFiniteError
    real, calls = batch.compose_latents, []

    def flaky(pipe, spec, seed=None, **kw):  # seed 1 "goes NaN", in a batch or alone
        calls.append(list(seed))
        if 1 in seed:
            raise NonFiniteError("latent became NaN/Inf at step 0")
        return real(pipe, spec, seed=seed, **kw)
    monkeypatch.setattr(batch, "compose_latents", flaky)
    pipe = composer.load(ref_pipe_dir)
    jp = _write(tmp_path / "jobs.jsonl", [{"name": "p", "prompt": "x", "height": 64, "width": 64, "steps": 1,
                                           "seeds": "0-2"}])
    logs = []
    s = run_jobs(pipe, jp, str(tmp_path / "o"), quiet=True, batch_size=4, log=logs.append)
    assert calls == [[0, 1, 2], [0], [1], [2]]
    assert s["p"]["done"] == 2 and s["p"]["failed"] == 1 and "retrying them one at a time" in logs[0]
    assert sorted(os.listdir(tmp_path / "o" / "p")) == ["0.json", "0.png", "2.json", "2.png"]
    rec = json.loads((tmp_path / "o" / "failures.jsonl").read_text())
    assert rec["seed"] == 1 and "NaN" in rec["error"]
