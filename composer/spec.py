"""The composition spec: what one image (or one job of a batch) asks for, read from JSON, YAML, a composer PNG,
a dict or the official region string, and validated before anything runs.

A spec without regions is plain text-to-image. Paths in a spec file (``model``, ``tokenizer``, ``regions[].lora``,
``regions[].mask``, ``background_lora``, ``conditions[].model``, ``conditions[].image``) are resolved relative to
the spec file's folder. Resolution order for
every field: the defaults of the model < the spec < an explicit command-line flag.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace

from . import __version__
from .conditions import condition_entry
from .io import file_sha256, read_png_spec
from .schedulers import SAMPLERS
log = logging.getLogger(__name__)

MAX_REGIONS = 32
LORA_SCOPES = ("cross", "all")
TOKEN_SOURCES = ("explicit", "pseudo-words", "trigger", "content")


@dataclass
class Region:
    prompt: str
    negative_prompt: str = ""
    box: list | None = None     # [top, left, bottom, right]: pixels, or fractions when every value is ≤ 1
    mask: str | None = None     # a mask image (white = region), beyond the paper
    lora: str | None = None     # the concept's LoRA file; None: the pseudo-word's owner, or no LoRA at all
    scale: float = 1.0
    tokens: list | None = None  # concept tokens for L_ce / L_fill / re-init: words or phrases of the prompt


@dataclass
class ComposeSpec:
    prompt: str = ""
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    sampler: str = "dpm++2m"
    eta: float | None = None   # DDIM's eta (default 0), TCD's gamma (default 0.3)
    regions: list = field(default_factory=list)
    enhance: bool = True        # L_ce + L_fill (and the Gaussian weighting)
    isolate: bool = True        # self-attention region mask + L_region
    reinit: bool = True         # latent re-initialisation
    gaussian: bool = True
    fill: bool = True
    region_mask: bool | None = None   # default: isolate
    region_loss: bool | None = None   # default: isolate
    background_lora: str | None = None
    background_scale: float = 1.0
    lora_scope: str = "cross"         # "cross": concept LoRAs in attn2 K/V/out only (the paper); "all": every layer
    loss_weights: str = "official"    # or "paper"
    schedule: str = "current"         # "official": diffusers 0.14 DPM-Solver++ timesteps and final step
    lr: float = 20.0
    max_opt_step: int | None = None   # the last optimised step; default half the steps (the official 25 of 50)
    loras: list = field(default_factory=list)  # [{"path", "scale"}]: merged for text-to-image; in a composition
    #                                            each binds to the region whose prompt has its pseudo-words
    # T2I-Adapters / ControlNets: [{"kind", "model", "image", "weight", "regions", "start", "end", ...}]
    # (composer/conditions.py), for text-to-image and composition alike
    conditions: list = field(default_factory=list)
    # VAE decode in tiles of at most this many latent cells (composer/vae.py decode_tiled): None automatic (tiled
    # only above 768² pixels of area), 0 never; tiling bounds the decoder's memory and changes the image slightly
    vae_tile: int | None = None
    model: str | None = None
    tokenizer: str | None = None

    @property
    def composing(self) -> bool:
        return bool(self.regions)

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec", base_dir: str | None = None) -> "ComposeSpec":
        """Build and validate. ``base_dir``: the folder relative paths in ``d`` are resolved against."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        d = resolve_paths(d, base_dir, where)
        known = {f.name for f in fields(cls)}
        extra = {"name", "seeds", "version", "info", "job", "seconds"}  # batch fields and record-only fields
        bad = sorted(set(d) - known - extra)
        if bad:
            raise ValueError(f"{where}: unknown field(s) {bad}; known: {sorted(known)}")
        kw = {k: v for k, v in d.items() if k in known}
        regs = kw.pop("regions", []) or []
        rknown = {f.name for f in fields(Region)}
        out = []
        for i, r in enumerate(regs):
            if isinstance(r, Region):
                out.append(r)
                continue
            rb = sorted(set(r) - rknown)
            if rb:
                raise ValueError(f"{where}: region {i}: unknown field(s) {rb}; known: {sorted(rknown)}")
            out.append(Region(**r))
        kw["loras"] = [_lora_entry(e, where, i) for i, e in enumerate(kw.get("loras") or [])]
        if not isinstance(kw.get("conditions") or [], list):
            raise ValueError(f"{where}: 'conditions' must be a list of {{kind, model, image, ...}} objects")
        kw["conditions"] = list(kw.get("conditions") or [])
        spec = cls(**kw, regions=out)
        spec.check(where)
        return spec

    def check(self, where: str = "spec"):
        """Field-level validation (types, enums, sizes); files are checked by :meth:`check_files`."""
        for name in ("height", "width", "steps", "seed", "max_opt_step", "vae_tile"):
            v = getattr(self, name)
            if not (v is None and name in ("max_opt_step", "vae_tile")) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{where}: '{name}' must be an integer, got {v!r}")
        if self.vae_tile is not None and self.vae_tile < 0:
            raise ValueError(f"{where}: 'vae_tile' must be ≥ 0 latent cells (0: never tile), got {self.vae_tile}")
        for name in ("guidance", "eta", "lr", "background_scale"):
            v = getattr(self, name)
            if not (v is None and name == "eta") and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ValueError(f"{where}: '{name}' must be a number, got {v!r}")
        if self.steps < 1:
            raise ValueError(f"{where}: 'steps' must be at least 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{where}: unknown sampler {self.sampler!r}; expected one of {list(SAMPLERS)}")
        if self.loss_weights not in ("official", "paper"):
            raise ValueError(f"{where}: loss_weights must be 'official' or 'paper', got {self.loss_weights!r}")
        if self.schedule not in ("current", "official"):
            raise ValueError(f"{where}: schedule must be 'current' or 'official', got {self.schedule!r}")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"{where}: lora_scope must be one of {list(LORA_SCOPES)}, got {self.lora_scope!r}")
        if len(self.regions) > MAX_REGIONS:
            raise ValueError(f"{where}: {len(self.regions)} regions given; at most {MAX_REGIONS} are supported")
        try:
            if self.regions:
                check_compose_size(self.height, self.width)
            else:
                check_size(self.height, self.width)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for i, r in enumerate(self.regions):
            if r.box is None and r.mask is None:
                raise ValueError(f"{where}: region {i}: give a box [top, left, bottom, right] or a mask image")
            if r.box is not None:
                try:
                    resolve_box(list(r.box), self.height, self.width, i)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            if r.tokens is not None and (not isinstance(r.tokens, list) or not r.tokens or
                                         not all(isinstance(t, str) and t.strip() for t in r.tokens)):
                raise ValueError(f"{where}: region {i}: 'tokens' must be a non-empty list of words of its prompt, "
                                 f"got {r.tokens!r}")
        # condition entries are normalised here (idempotent), so every way of building a spec validates them
        self.conditions = [condition_entry(e, where, i) for i, e in enumerate(self.conditions)]
        for i, c in enumerate(self.conditions):
            bad = [r for r in c["regions"] if r >= len(self.regions)]
            if bad:
                raise ValueError(f"{where}: conditions[{i}].regions: region {bad[0]} does not exist (the spec has "
                                 f"{len(self.regions)} region(s))")

    def check_files(self, where: str = "spec"):
        """Every file the spec names exists (run before the first image of a batch)."""
        paths = [("background_lora", self.background_lora)] + \
                [(f"loras[{i}]", e["path"]) for i, e in enumerate(self.loras)] + \
                [(f"regions[{i}].{k}", getattr(r, k)) for i, r in enumerate(self.regions) for k in ("lora", "mask")] + \
                [(f"conditions[{i}].{k}", c[k]) for i, c in enumerate(self.conditions) for k in ("model", "image")
                 if isinstance(c[k], (str, os.PathLike))]
        for name, p in paths:
            if p is not None and not os.path.exists(p):
                raise FileNotFoundError(f"{where}: {name} file not found: {p}")

    @classmethod
    def from_file(cls, path: str) -> "ComposeSpec":
        """JSON, YAML (with PyYAML) or a composer PNG (its ``composer`` metadata chunk: re-runs that image)."""
        return cls.from_dict(load_spec_data(path), where=os.fspath(path))

    # --- records (PNG metadata, batch sidecars) -----------------------------------------------------------

    def record(self, model: dict | None = None) -> dict:
        """The resolved spec as stored with an image: file references as {name, path, sha256}; a plain
        text-to-image spec carries no composition fields."""
        d = asdict(self)
        ref = lambda p: None if p is None else {"name": os.path.basename(p), "path": os.path.abspath(p),
                                                "sha256": file_sha256(p)}
        d["loras"] = [{**ref(e["path"]), "scale": e["scale"]} for e in self.loras]
        d["conditions"] = [_condition_record(c) for c in self.conditions]
        if not self.regions:
            keep = ("prompt", "negative_prompt", "height", "width", "steps", "guidance", "seed", "sampler", "eta",
                    "loras", "conditions", "vae_tile")
            d = {k: d[k] for k in keep}
        else:
            d["background_lora"] = ref(self.background_lora)
            for r in d["regions"]:
                r["lora"] = ref(r["lora"])
                if r["mask"] is not None:
                    r["mask"] = os.path.abspath(r["mask"])
            d = {k: v for k, v in d.items() if v is not None}
            d["regions"] = [{k: v for k, v in r.items() if v is not None} for r in d["regions"]]
        d.pop("tokenizer", None)
        d["model"] = model or ({"name": os.path.basename(self.model), "path": os.path.abspath(self.model)}
                               if self.model else None)
        d["version"] = __version__
        return d


def load_spec_data(path: str) -> dict:
    """A spec file as a dict with every path resolved: JSON, YAML, or the record in a composer PNG."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"spec file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".png"):
        return resolve_paths(read_png_spec(path), base, path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML specs need PyYAML (pip install pyyaml), or use JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec must be an object, got {type(data).__name__}")
    return resolve_paths(data, base, path)


_PATH_FIELDS = ("model", "tokenizer", "background_lora")


def resolve_paths(d: dict, base_dir: str | None, where: str) -> dict:
    """Path fields resolved against ``base_dir`` (the spec file's folder); recorded references
    ({name, path, sha256}, from a PNG or sidecar) found and their hashes checked. Returns a new dict."""
    def one(v, key):
        if v is None:
            return None
        if isinstance(v, dict):
            return _find_ref(v, base_dir, where, key)
        if not isinstance(v, str) or not v:
            raise ValueError(f"{where}: '{key}' must be a path string, got {v!r}")
        if base_dir and not os.path.isabs(v):
            return os.path.normpath(os.path.join(base_dir, v))
        return v
    d = {k: (one(v, k) if k in _PATH_FIELDS else v) for k, v in d.items()}
    if d.get("loras") is not None:
        if not isinstance(d["loras"], list):
            raise ValueError(f"{where}: 'loras' must be a list of paths or {{path, scale}} objects")
        d["loras"] = [{**e, "path": one(e, f"loras[{i}]") if "sha256" in e else one(e.get("path"), f"loras[{i}]")}
                      if isinstance(e, dict) else one(e, f"loras[{i}]") for i, e in enumerate(d["loras"])]
    regs = d.get("regions") or []
    if not isinstance(regs, list):
        raise ValueError(f"{where}: 'regions' must be a list")
    out = []
    for i, r in enumerate(regs):
        if isinstance(r, dict):
            if "prompt" not in r:
                raise ValueError(f"{where}: region {i} must be an object with at least a 'prompt'")
            r = {k: (one(v, f"regions[{i}].{k}") if k in ("lora", "mask") else v) for k, v in r.items()}
        elif not isinstance(r, Region):
            raise ValueError(f"{where}: region {i} must be an object with at least a 'prompt'")
        out.append(r)
    if "regions" in d:
        d["regions"] = out
    conds = d.get("conditions")
    if isinstance(conds, list):  # model and image paths; a PIL image or tensor given from Python stays as it is
        d["conditions"] = [{k: (one(v, f"conditions[{i}].{k}") if k in ("model", "image") and
                                isinstance(v, (str, dict)) else v) for k, v in c.items()}
                           if isinstance(c, dict) else c for i, c in enumerate(conds)]
    return d


def _condition_record(c: dict) -> dict:
    """A condition as recorded: model and image as {name, path, sha256} (a folder: name and path)."""
    def ref(p):
        if not isinstance(p, (str, os.PathLike)):
            return {"name": f"<in-memory {type(p).__name__}>"}
        p = os.fspath(p)
        r = {"name": os.path.basename(os.path.normpath(p)), "path": os.path.abspath(p)}
        return {**r, "sha256": file_sha256(p)} if os.path.isfile(p) else r
    out = {**c, "model": ref(c["model"]), "image": ref(c["image"]), "regions": {str(k): v for k, v in c["regions"].items()}}
    if out.get("preprocess") is None:
        out.pop("preprocess", None)
        out.pop("canny", None)
    return out


def _lora_entry(e, where, i) -> dict:
    """A global LoRA: "path", "path:scale", or {"path", "scale"} -> {"path", "scale"}."""
    if isinstance(e, str):
        path, sep, tail = e.rpartition(":")
        try:
            return {"path": path, "scale": float(tail)} if sep and path else {"path": e, "scale": 1.0}
        except ValueError:
            return {"path": e, "scale": 1.0}
    if isinstance(e, dict) and isinstance(e.get("path"), str):
        bad = sorted(set(e) - {"path", "scale", "name", "sha256"})
        if bad:
            raise ValueError(f"{where}: loras[{i}]: unknown field(s) {bad}")
        scale = e.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ValueError(f"{where}: loras[{i}]: 'scale' must be a number, got {scale!r}")
        return {"path": e["path"], "scale": float(scale)}
    raise ValueError(f"{where}: loras[{i}] must be a path or a {{path, scale}} object, got {e!r}")


def _find_ref(ref: dict, base_dir, where, key) -> str:
    if not isinstance(ref, dict) or "path" not in ref:
        raise ValueError(f"{where}: '{key}' must be a path or a {{name, path, sha256}} reference, got {ref!r}")
    cands = [ref["path"]] + ([os.path.join(base_dir, ref.get("name", ""))] if base_dir and ref.get("name") else [])
    for c in cands:
        if os.path.exists(c):
            if ref.get("sha256") and os.path.isfile(c) and file_sha256(c) != ref["sha256"]:
                raise ValueError(f"{where}: {key} {c} has sha256 {file_sha256(c)[:12]}…, the record says "
                                 f"{ref['sha256'][:12]}… (a different file)")
            return c
    raise FileNotFoundError(f"{where}: {key} {ref.get('name')!r} not found (looked at {cands})")


def parse_region_string(s: str) -> list:
    """The official ``[prompt]-*-[negative]-*-[top, left, bottom, right]|...`` (boxes in pixels; [] = whole image)."""
    regions = []
    for i, part in enumerate(p for p in s.split("|") if p.strip()):
        f = part.split("-*-")
        if len(f) != 3:
            raise ValueError(f"region string part {i} {part[:60]!r}: expected 3 fields separated by '-*-'")
        prompt, neg, box = (x.strip().strip("[]").strip() for x in f)
        if box:
            try:
                nums = [float(x) for x in box.split(",")]
            except ValueError:
                raise ValueError(f"region string part {i}: box {box!r} is not 4 numbers") from None
            if len(nums) != 4:
                raise ValueError(f"region string part {i}: box needs 4 numbers, got {len(nums)}")
            regions.append(Region(prompt, neg, box=nums + ["px"]))
        else:
            regions.append(Region(prompt, neg, box=[0.0, 0.0, 1.0, 1.0]))
    if not regions:
        raise ValueError("the region string holds no region")
    return regions


def resolve_box(box, h: int, w: int, i: int) -> tuple:
    """-> fractional (y0, x0, y1, x1), validated. A trailing "px" forces pixel units."""
    force_px = len(box) == 5 and box[4] == "px"
    vals = box[:4] if force_px else box
    if len(vals) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"region {i}: box must be 4 numbers [top, left, bottom, right], got {box!r}")
    t, l, b, r = (float(v) for v in vals)
    if force_px or max(t, l, b, r) > 1.0:
        if min(t, l) < 0 or b > h or r > w:
            raise ValueError(f"region {i}: box {list(vals)} lies outside the {h}×{w} image")
        t, l, b, r = t / h, l / w, b / h, r / w
    elif min(t, l, b, r) < 0:
        raise ValueError(f"region {i}: box {list(vals)} has negative coordinates")
    if b <= t or r <= l:
        raise ValueError(f"region {i}: box {list(vals)} is empty or inverted (need top < bottom and left < right)")
    return t, l, b, r


def _check_multiple(height, width, multiple: int, why: str):
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple:
            near = max(multiple, int(round(v / multiple)) * multiple) \
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else multiple
            raise ValueError(f"{name}={v} must be a positive multiple of {multiple}{why} (nearest valid: {near})")


def check_size(height: int, width: int):
    """Text to image: the VAE downsamples by 8."""
    _check_multiple(height, width, 8, "")


def check_compose_size(height: int, width: int):
    """Composition: its losses read a 1/32 grid."""
    _check_multiple(height, width, 32, " for composition (its losses read a 1/32 grid)")


def resolve_seeds(seed, num_images=None, where: str = "") -> tuple[list, bool]:
    """The seeds of one call -> (seeds, several): ``seed`` an int or a list of ints, ``num_images`` None or N >= 1.

    - an int with num_images N: seeds ``seed, seed+1, …, seed+N-1``;
    - a list: those seeds (num_images, if given, must equal its length);
    - an int alone: that one seed.
    ``several`` is whether the caller asked for a batch (a list, or num_images given), so the result is a list
    even for one image: the return type follows the call, not the count."""
    pre = f"{where}: " if where else ""
    if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1):
        raise ValueError(f"{pre}'num_images' must be an integer >= 1, got {num_images!r}")
    if isinstance(seed, (list, tuple)):
        bad = [s for s in seed if not isinstance(s, int) or isinstance(s, bool)]
        if not seed or bad:
            raise ValueError(f"{pre}'seed' must be an integer or a non-empty list of integers, got {list(seed)!r}")
        if len(set(seed)) != len(seed):
            raise ValueError(f"{pre}'seed': duplicate seeds in {list(seed)} (each image needs its own seed)")
        if num_images is not None and num_images != len(seed):
            raise ValueError(f"{pre}'seed' lists {len(seed)} seeds but 'num_images' is {num_images}: give the list "
                             "alone, or one seed with num_images")
        return [int(s) for s in seed], True
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{pre}'seed' must be an integer or a list of integers, got {seed!r}")
    if num_images is None:
        return [seed], False
    return list(range(seed, seed + num_images)), True


def with_overrides(spec: ComposeSpec, **over) -> ComposeSpec:
    """``spec`` with the given fields replaced (None values are ignored), re-validated."""
    spec = replace(spec, **{k: v for k, v in over.items() if v is not None})
    spec.check()
    return spec
