"""Scripted runs at scale: ``python -m composer.sample --jobs jobs.jsonl --out-dir DIR``.

- Each line of the jobs file is a composition spec (composer/spec.py; a spec without regions is plain
  text-to-image) plus an optional ``name`` and ``seeds`` (a list, an int, or a range such as "0-49"); relative
  paths resolve against the jobs file's folder. The whole file is validated before the first image (fields,
  sizes with the rule of the item's kind, samplers, seeds, that every named file exists, that every pseudo-word is
  defined by a LoRA the item uses); a bad line is an error naming the line.
- Outputs: ``DIR/<name>/<seed>.png`` and a JSON sidecar (the resolved spec with the model and every LoRA by
  name and sha256, versions, timing, peak memory), written atomically (temporary file, then rename). An item is
  complete when both exist, so rerunning the same command resumes; completed outputs are never rewritten, and a
  temporary file a killed run left behind is removed. A failing item does not stop the batch: it goes to ``DIR/failures.jsonl`` and the
  exit status is non-zero at the end.
- The base model is loaded once; concept LoRAs stay loaded as region adapters and encoded prompts are cached,
  both within a memory budget (least recently used evicted first).
- Items whose specs differ only in the seed (the seeds of one job, or of job lines that are otherwise the same) run
  as one batch of at most ``batch_size`` images through the model (``compose_latents(..., seed=[...])``), each
  image equal to its single run and written with its own record; the sidecar's ``seconds`` is the image's share
  of its batch and ``batch`` the number of images in it. If a batch fails, its items are retried one at a time, so
  one failing seed does not fail the others.
- Under ``torchrun`` the (job, seed) items are sharded deterministically (item i -> rank i mod world), each rank
  on its own device (LOCAL_RANK); torch.distributed is used only for rank/world, a final barrier and a gathered
  summary (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import re
import resource
import sys
import time
from collections import OrderedDict

import torch

from . import __version__
from .io import save_json, save_png
from .spec import ComposeSpec
from .compose import compose_latents, region_lora_name
from .lora import read_lora
from .pipeline import chunks

DEFAULT_BATCH_SIZE = 4  # images per batch through the model (--batch-size)

_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass
class Job:
    name: str
    seeds: list
    spec: object  # ComposeSpec
    line: int


def parse_seeds(v, where: str) -> list:
    if isinstance(v, bool):
        raise ValueError(f"{where}: 'seeds' must be a list of ints, an int or a range 'A-B'")
    if isinstance(v, int):
        return [v]
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v)
        if not m or int(m[2]) < int(m[1]):
            raise ValueError(f"{where}: seeds range {v!r} must look like '0-49' (start <= end)")
        return list(range(int(m[1]), int(m[2]) + 1))
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        if len(set(v)) != len(v):
            raise ValueError(f"{where}: duplicate seeds in {v}")
        return list(v)
    raise ValueError(f"{where}: 'seeds' must be a non-empty list of ints, an int or a range 'A-B', got {v!r}")


def read_jobs(path: str) -> list:
    if not os.path.exists(path):
        raise FileNotFoundError(f"jobs file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    jobs, names = [], set()
    with open(path, encoding="utf-8") as f:
        for ln, text in enumerate(f, 1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            where = f"{path} line {ln}"
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object")
            name = d.get("name", f"job{len(jobs):03d}")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"{where}: name {name!r} must use only letters, digits, '.', '_' and '-'")
            if name in names:
                raise ValueError(f"{where}: duplicate job name {name!r}")
            names.add(name)
            spec = ComposeSpec.from_dict(d, where=where, base_dir=base)
            seeds = parse_seeds(d["seeds"], where) if "seeds" in d else [spec.seed]
            jobs.append(Job(name, seeds, spec, ln))
    if not jobs:
        raise ValueError(f"{path}: no jobs (empty file)")
    return jobs


def validate_jobs(pipe, jobs, extra_loras=()):
    """What can only be checked against the model and the files, for every job, before the first image: each
    named file exists and is a LoRA composer reads, and every pseudo-word of every prompt is defined by a LoRA
    the item uses (or one already loaded)."""
    words_of: dict = {}
    for job in jobs:
        where = f"line {job.line} (job {job.name!r})"
        spec = job.spec
        spec.check_files(where)
        files = [e["path"] for e in list(spec.loras) + list(extra_loras)] + [r.lora for r in spec.regions if r.lora]
        files += [spec.background_lora] if spec.background_lora else []
        known = set(pipe.loras.concepts)
        for f in files:
            if f not in words_of:
                try:
                    words_of[f] = set(read_lora(f).embeddings)
                except (ValueError, OSError) as e:
                    raise ValueError(f"{where}: {e}") from None
            known |= words_of[f]
        texts = [spec.prompt, spec.negative_prompt] + [t for r in spec.regions for t in (r.prompt, r.negative_prompt)]
        for t in texts:
            for w in re.findall(r"<[^<>\s]+>", t):
                if w not in known and w not in ("<|startoftext|>", "<|endoftext|>"):
                    raise ValueError(f"{where}: prompt {t!r} names pseudo-word {w} that none of its LoRAs defines "
                                     f"(its LoRAs: {[os.path.basename(f) for f in files] or 'none'})")


def items_of(jobs) -> list:
    """All (job index, seed) items, in file order: the deterministic order that sharding slices."""
    return [(j, s) for j, job in enumerate(jobs) for s in job.seeds]


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def versions() -> dict:
    return {"composer": __version__, "torch": torch.__version__, "python": platform.python_version()}


class LoRACache:
    """Keeps region LoRAs loaded across jobs; evicts the least recently used beyond ``budget_mb``."""

    def __init__(self, pipe, budget_mb: float):
        self.pipe, self.budget = pipe, budget_mb * 2**20
        self.order: OrderedDict = OrderedDict()

    def touch(self, spec):
        need = {region_lora_name(r.lora, r.scale) for r in spec.regions if r.lora} | \
            ({region_lora_name(e["path"], e["scale"]) for e in spec.loras} if spec.regions else set())
        for n in need:
            self.order.pop(n, None)
            self.order[n] = True
        loaded = [n for n in self.order if n in self.pipe.loras.loras]
        size = lambda n: sum(a.nbytes() for l in self.pipe.loras.live.get(n, []) for a in [l.adapters.get(n)] if a)
        total = sum(size(n) for n in loaded)
        for n in list(self.order):
            if total <= self.budget:
                break
            if n in need or n not in self.pipe.loras.loras:
                continue
            total -= size(n)
            self.pipe.unload_lora(n)
            del self.order[n]


def _remove_stray_temporaries(folder: str, seed: int):
    """A killed run may leave ``.<seed>.png.*.tmp`` / ``.<seed>.json.*.tmp`` (composer/io.py); this rank owns the
    item, so no other process is writing them."""
    for pat in (f".{seed}.png.*.tmp", f".{seed}.json.*.tmp"):
        for f in glob.glob(os.path.join(glob.escape(folder), pat)):
            os.remove(f)


def spec_key(spec) -> str:
    """The spec with its seed left out: items with the same key differ only in the seed (one batch)."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(spec, seed=0)), sort_keys=True, default=str)


def run_jobs(pipe, jobs_path: str, out_dir: str, *, rank: int = 0, world: int = 1, quiet: bool = False,
             cache_mb: float = 2048, log=print, extra_loras=(), jobs=None,
             batch_size: int | None = DEFAULT_BATCH_SIZE) -> dict:
    """Run (this rank's share of) a jobs file; returns the summary dict. Everything is validated first
    (:func:`read_jobs`, :func:`validate_jobs`). This rank's pending items are grouped by :func:`spec_key` (in the
    order each spec first appears) and run in batches of at most ``batch_size`` seeds (None: a whole group)."""
    jobs = jobs if jobs is not None else read_jobs(jobs_path)
    validate_jobs(pipe, jobs, extra_loras)
    os.makedirs(out_dir, exist_ok=True)
    mine = shard(items_of(jobs), rank, world)
    cache = LoRACache(pipe, cache_mb)
    pipe.prompt_cache_mb = cache_mb / 4
    summary = {job.name: {"done": 0, "skipped": 0, "failed": 0, "seconds": 0.0} for job in jobs}
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"batch[{rank}]" if world > 1 else "batch", unit="img", file=sys.stderr,
                   position=rank)
    model = pipe.model_record()

    def paths(j, seed):
        folder = os.path.join(out_dir, jobs[j].name)
        return folder, os.path.join(folder, f"{seed}.png"), os.path.join(folder, f"{seed}.json")

    def complete(j, seed):
        _, png, side = paths(j, seed)
        return os.path.exists(side) and os.path.exists(png)

    groups: OrderedDict = OrderedDict()  # spec key -> [(job index, seed, spec)]
    for j, seed in mine:
        job = jobs[j]
        folder, _, _ = paths(j, seed)
        if os.path.isdir(folder):
            _remove_stray_temporaries(folder, seed)
        if complete(j, seed):
            summary[job.name]["skipped"] += 1
            bar and bar.update(1)
            continue
        spec = dataclasses.replace(job.spec, seed=seed, loras=list(job.spec.loras) + list(extra_loras))
        groups.setdefault(spec_key(spec), []).append((j, seed, spec))

    def run_batch(items):
        """One batch of items sharing a spec: sample, decode, write each image's PNG and sidecar."""
        spec = items[0][2]
        if torch.cuda.is_available() and pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        t0 = time.perf_counter()
        cache.touch(spec)
        lat, infos = compose_latents(pipe, spec, seed=[s for _, s, _ in items])
        images = pipe.decode_images(lat, tile=spec.vae_tile)
        dt = (time.perf_counter() - t0) / len(items)  # each image's share of the batch
        mem = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if pipe.device.type == "cuda":
            mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated(pipe.device) / 2**20
        for (j, seed, one), image, info in zip(items, images, infos):
            job = jobs[j]
            folder, png, side = paths(j, seed)
            os.makedirs(folder, exist_ok=True)
            rec = {**one.record(model=model), "job": job.name}
            save_png(image, png, rec)
            save_json({"job": job.name, "seed": seed, "spec": rec, "versions": versions(), "seconds": dt,
                       "batch": len(items), "memory": mem, "info": info, "rank": rank, "device": str(pipe.device)},
                      side)
            summary[job.name]["done"] += 1
            summary[job.name]["seconds"] += dt
            bar and bar.update(1)

    def fail(j, seed, e):
        job = jobs[j]
        summary[job.name]["failed"] += 1
        rec = {"job": job.name, "seed": seed, "line": job.line, "rank": rank, "error": f"{type(e).__name__}: {e}"}
        with open(os.path.join(out_dir, "failures.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"composer: job {job.name!r} seed {seed} failed: {rec['error']}")
        bar and bar.update(1)

    for items in groups.values():
        for batch in chunks(items, batch_size):
            try:
                run_batch(batch)
            except Exception as e:  # one failing item never stops the batch
                if len(batch) == 1:
                    fail(batch[0][0], batch[0][1], e)
                    continue
                # retry one at a time, so a failure of one seed (or of writing one output) costs only that item
                log(f"composer: a batch of {len(batch)} images of job {jobs[batch[0][0]].name!r} failed "
                    f"({type(e).__name__}: {e}); retrying them one at a time")
                for it in batch:
                    if complete(it[0], it[1]):
                        continue
                    try:
                        run_batch([it])
                    except Exception as e1:
                        fail(it[0], it[1], e1)
    if bar:
        bar.close()
    return summary


def merge_summaries(parts: list) -> dict:
    out: dict = {}
    for p in parts:
        for name, s in p.items():
            o = out.setdefault(name, {"done": 0, "skipped": 0, "failed": 0, "seconds": 0.0})
            for k in o:
                o[k] += s[k]
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{'job':<24} {'done':>5} {'skipped':>8} {'failed':>7} {'s/img':>8}"]
    for name, s in summary.items():
        per = s["seconds"] / s["done"] if s["done"] else float("nan")
        lines.append(f"{name:<24} {s['done']:>5} {s['skipped']:>8} {s['failed']:>7} {per:>8.2f}")
    t = {k: sum(s[k] for s in summary.values()) for k in ("done", "skipped", "failed")}
    lines.append(f"{'total':<24} {t['done']:>5} {t['skipped']:>8} {t['failed']:>7}")
    return "\n".join(lines)


def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
