"""LoRA-Composer: training-free multi-concept composition (arXiv 2403.11627; method.md is the spec).

``compose(pipe, spec) -> PIL.Image`` and ``compose_latents(pipe, spec) -> (latents, info)``. Per image:
latent re-initialisation (§9, one cond-only forward at t = timesteps[0]); then per step, while the
optimisation is active (i ≤ 25, no loss rise after i ≥ 5), one cond-only forward with gradients that stops
after the last analysis layer, the losses of §7 and one step z ← z − lr_i·∂L/∂z with
lr_i = 20·sqrt(linspace(1, 0.5, steps)[i]) (§8); then the CFG forward with region-aware injection (§4) and
concept isolation (§5), and the sampler step. Concepts are live adapters on one shared base model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .losses import box_cells, compute_losses, reinit_latents
from .pipeline import NonFiniteError, to_pil
from .regions import RegionAttention
from .schedulers import DPMSolverPP2M, make_sampler

log = logging.getLogger(__name__)

MAX_REGIONS = 32
PAPER_WEIGHTS = {"ce": 1.0, "fill": 0.25, "region": 0.8}  # paper App. A; the code's 8 / 2 / 10 are the default


@dataclass
class Region:
    prompt: str
    negative_prompt: str = ""
    box: list | None = None     # [top, left, bottom, right]: pixels, or fractions when every value is ≤ 1
    mask: str | None = None     # a mask image (white = region), beyond the paper
    lora: str | None = None     # the concept's LoRA; None: picked by the pseudo-word in the prompt
    scale: float = 1.0


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
    eta: float = 0.0
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
    loss_weights: str = "official"    # or "paper"
    schedule: str = "current"         # "official": diffusers 0.14 DPM-Solver++ timesteps and final step
    lr: float = 20.0
    max_opt_step: int = 25
    model: str | None = None
    tokenizer: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "ComposeSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known - {"name", "seeds"})
        if bad:
            raise ValueError(f"{where}: unknown field(s) {bad}; known: {sorted(known)}")
        kw = {k: v for k, v in d.items() if k in known}
        regs = kw.pop("regions", []) or []
        if not isinstance(regs, list):
            raise ValueError(f"{where}: 'regions' must be a list")
        rknown = {f.name for f in fields(Region)}
        out = []
        for i, r in enumerate(regs):
            if isinstance(r, Region):
                out.append(r)
                continue
            if not isinstance(r, dict) or "prompt" not in r:
                raise ValueError(f"{where}: region {i} must be an object with at least a 'prompt'")
            rb = sorted(set(r) - rknown)
            if rb:
                raise ValueError(f"{where}: region {i}: unknown field(s) {rb}; known: {sorted(rknown)}")
            out.append(Region(**r))
        spec = cls(**kw, regions=out)
        for name, typ in (("height", int), ("width", int), ("steps", int), ("seed", int)):
            if not isinstance(getattr(spec, name), typ) or isinstance(getattr(spec, name), bool):
                raise ValueError(f"{where}: '{name}' must be an integer, got {getattr(spec, name)!r}")
        if spec.loss_weights not in ("official", "paper"):
            raise ValueError(f"{where}: loss_weights must be 'official' or 'paper'")
        if spec.schedule not in ("current", "official"):
            raise ValueError(f"{where}: schedule must be 'current' or 'official'")
        return spec

    @classmethod
    def from_file(cls, path: str) -> "ComposeSpec":
        if not os.path.exists(path):
            raise FileNotFoundError(f"spec file not found: {path}")
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
        return cls.from_dict(data, where=path)


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
    return regions


def resolve_box(box, h: int, w: int, i: int) -> tuple:
    """-> fractional (y0, x0, y1, x1), validated. A trailing "px" forces pixel units."""
    force_px = len(box) == 5 and box[4] == "px"
    vals = box[:4] if force_px else box
    if len(vals) != 4 or not all(isinstance(v, (int, float)) for v in vals):
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


def check_compose_size(height: int, width: int):
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 32:
            near = max(32, int(round(v / 32)) * 32) if isinstance(v, (int, float)) and v > 0 else 32
            raise ValueError(f"{name}={v}: composition needs a multiple of 32 (its losses read a 1/32 grid); "
                             f"nearest valid: {near}")


def _load_mask(path: str, h: int, w: int) -> torch.Tensor:
    from PIL import Image
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask image not found: {path}")
    im = Image.open(path).convert("L").resize((w, h), Image.BILINEAR)
    m = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    if not bool((m >= 0.5).any()):
        raise ValueError(f"mask {path} is empty (no pixel ≥ 0.5)")
    return m


def _ensure_region_lora(pipe, path: str, scale: float) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"region LoRA file not found: {path}")
    ap = os.path.abspath(path)
    for name, lora in list(pipe.loras.loras.items()):
        if os.path.abspath(lora.path) == ap:
            if name == f"region:{ap}:{scale}":
                return name
            pipe.unload_lora(name)  # same file at another scale or mode: reload as a region adapter
    name = f"region:{ap}:{scale}"
    pipe.load_lora(path, scale, name=name, mode="region")
    return name


@dataclass
class Prepared:
    ra: RegionAttention | None
    token_pos: list
    boxes: list
    cond: torch.Tensor
    uncond: torch.Tensor


def prepare(pipe, spec: ComposeSpec, backend: str | None = None) -> Prepared:
    """Validate the spec, bind concepts, encode every prompt; no sampling."""
    from .attention import REGION_BACKEND
    check_compose_size(spec.height, spec.width)
    if len(spec.regions) > MAX_REGIONS:
        raise ValueError(f"{len(spec.regions)} regions given; at most {MAX_REGIONS} are supported")
    H, W = spec.height, spec.width
    boxes, masks, adapters, token_pos, pos_ctx, neg_ctx = [], [], [], [], [], []
    texts = [spec.prompt, spec.negative_prompt] + [t for r in spec.regions for t in (r.prompt, r.negative_prompt)]
    for r in spec.regions:  # load explicitly named concepts before checking pseudo-words
        if r.lora:
            _ensure_region_lora(pipe, r.lora, r.scale)
    pipe.check_pseudo_words(texts)
    for i, r in enumerate(spec.regions):
        if r.mask:
            m = _load_mask(r.mask, H, W)
            nz = (m >= 0.5).nonzero()
            boxes.append((nz[:, 0].min().item() / H, nz[:, 1].min().item() / W,
                          (nz[:, 0].max().item() + 1) / H, (nz[:, 1].max().item() + 1) / W))
            masks.append(m)
        else:
            if r.box is None:
                raise ValueError(f"region {i}: give a box [top, left, bottom, right] or a mask image")
            boxes.append(resolve_box(list(r.box), H, W, i))
            masks.append(None)
        name = _ensure_region_lora(pipe, r.lora, r.scale) if r.lora else None
        words = re.findall(r"<[^<>\s]+>", r.prompt)
        if name is None:
            owners = sorted({pipe.loras.concepts[w][0] for w in words if w in pipe.loras.concepts})
            if len(owners) > 1:
                raise ValueError(f"region {i}: its prompt names pseudo-words of several concepts {owners}; "
                                 "give the region's 'lora' explicitly")
            name = owners[0] if owners else None
        adapters.append(name)
        # token positions of the concept's pseudo-words in the tokenised prompt (not whitespace split, §16)
        pos = []
        if name is not None:
            ids = pipe.tokenizer([r.prompt])[0].tolist()
            for w in pipe.loras.loras[name].embeddings:
                tid = pipe.tokenizer.tok.token_to_id(w)
                if tid in ids:
                    pos.append(ids.index(tid))
        token_pos.append(pos)
        ad = (name,) if name else ()
        pos_ctx.append(pipe.encode_prompt([r.prompt], adapter=ad))
        neg_ctx.append(pipe.encode_prompt([r.negative_prompt], adapter=ad))
        h, w = H // 32, W // 32
        r0, c0, r1, c1 = box_cells(boxes[-1], h, w)
        if (r1 - r0) * (c1 - c0) < 5 and (spec.enhance or spec.isolate):
            log.warning("region %d covers %d cells of the %dx%d analysis grid: its top-k losses are 0", i,
                        max(0, r1 - r0) * max(0, c1 - c0), h, w)
    cond, uncond = pipe.encode_prompt([spec.prompt]), pipe.encode_prompt([spec.negative_prompt])
    ra = None
    if spec.regions:
        isolate_mask = spec.isolate if spec.region_mask is None else spec.region_mask
        be = backend or REGION_BACKEND.get(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.backend, "auto")
        ra = RegionAttention(boxes, masks, adapters, pos_ctx, neg_ctx, (H, W), isolate=isolate_mask, backend=be,
                             plain_backend="math" if be == "torch" else "sdpa")
        ra.want_self_maps = spec.isolate if spec.region_loss is None else spec.region_loss
    return Prepared(ra, token_pos, boxes, cond, uncond)


def _cat_ctx(a, b):
    """CFG batch of two contexts, either of which may be per layer [L, 1, 77, C]."""
    if a.ndim == 4 or b.ndim == 4:
        L = a.shape[0] if a.ndim == 4 else b.shape[0]
        a = a if a.ndim == 4 else a[None].expand(L, *a.shape)
        b = b if b.ndim == 4 else b[None].expand(L, *b.shape)
        return torch.cat([a, b], 1)
    return torch.cat([a, b])


def _analysis_layers(unet):
    """Indices l of the transformer layers on the 1/32 grid (latent/4: 5 layers in SD1.5, mid excluded) and
    the last of them, where the loss pass may stop (method.md §1, §15)."""
    ls, l, n = [], 0, len(unet.down_blocks)
    for i, b in enumerate(unet.down_blocks):
        for _ in (b.attentions if b.has_attention else ()):
            if i == 2:
                ls.append(l)
            l += 1
    l += len(unet.mid_block.attentions)
    for j, b in enumerate(unet.up_blocks):
        for _ in (b.attentions if b.has_attention else ()):
            if n - 1 - j == 2:
                ls.append(l)
            l += 1
    return ls, max(ls)


def compose_latents(pipe, spec: ComposeSpec, *, callback=None, debug: dict | None = None, backend=None):
    """-> (latents [1, 4, H/8, W/8], info dict with the loss per optimised step)."""
    if isinstance(spec, dict):
        spec = ComposeSpec.from_dict(spec)
    bg_name = None
    if spec.background_lora:
        bg_name = f"background:{os.path.abspath(spec.background_lora)}"
        if bg_name not in pipe.loras.loras:
            pipe.load_lora(spec.background_lora, spec.background_scale, name=bg_name, mode="merge")
    try:
        return _compose(pipe, spec, callback, debug, backend)
    finally:
        if bg_name:
            pipe.unload_lora(bg_name)


def _compose(pipe, spec, callback, debug, backend):
    prep = prepare(pipe, spec, backend)
    H, W = spec.height, spec.width
    if spec.sampler == "dpm++2m" and spec.schedule == "official":
        sch = DPMSolverPP2M(pipe.scheduler_config, spec.steps, final="official")
    else:
        sch = make_sampler(spec.sampler, pipe.scheduler_config, spec.steps, eta=spec.eta)
    x, g = pipe.initial_latent(spec.seed, H, W)
    ra = prep.ra
    cfg = spec.guidance > 1.0
    ctx = _cat_ctx(prep.uncond, prep.cond) if cfg else prep.cond
    region_loss = ra is not None and ra.want_self_maps
    has_tokens = any(prep.token_pos)
    optimise = ra is not None and ((spec.enhance and has_tokens) or region_loss)
    layers, last = _analysis_layers(pipe.unet)
    weights = {"ce": 8.0, "fill": 2.0, "region": 10.0} if spec.loss_weights == "official" else PAPER_WEIGHTS
    info = {"loss": [], "optimised_steps": 0, "reinit": False}
    if ra is not None:  # free-form masks are read on the grid; their bounding box carries the Gaussian
        h, w = ra.analysis_hw
        loss_boxes = [ra.region_mask(r, h, w, x.device) if ra.masks[r] is not None else prep.boxes[r]
                      for r in range(ra.n)]

    def maps_pass(z, t, grad: bool):
        ra.for_batch(("cond",), store=True)
        with torch.set_grad_enabled(grad):
            pipe.unet(z.to(pipe.dtype), int(t), prep.cond, regions=ra, stop_after_layer=last)
        return ra.aggregated_maps()

    if ra is not None and spec.reinit and has_tokens:  # §9
        with torch.no_grad():
            cross, _ = maps_pass(x, sch.timesteps[0], False)
        sel = [(i, [cross[i][:, :, p].float() for p in prep.token_pos[i]]) for i in range(ra.n) if prep.token_pos[i]]
        x = reinit_latents(x, [m for _, m in sel], [loss_boxes[i] for i, _ in sel], ra.analysis_hw)
        info["reinit"] = True
        if debug is not None:
            debug.setdefault("maps", {})["reinit"] = [[m.cpu() for m in ms] for _, ms in sel]

    lrs = spec.lr * np.sqrt(np.linspace(1.0, 0.5, spec.steps))
    prev, stopped = 1000.0, not optimise
    for i, t in enumerate(sch.timesteps):
        loss_val = None
        if not stopped:  # §7-8: one gradient step on the latent
            z = x.detach().requires_grad_(True)
            cross, smap = maps_pass(z, t, True)
            terms = compute_losses(cross, prep.token_pos, loss_boxes, smap.float() if region_loss else None,
                                   enhance=spec.enhance, gaussian=spec.gaussian, fill=spec.fill, region=region_loss)
            zero = torch.zeros((), device=x.device)
            loss = (weights["ce"] / 8.0) * sum(terms.ce, zero) \
                + (weights["fill"] / 2.0) * (sum(terms.fill_x, zero) + sum(terms.fill_y, zero)) \
                + (weights["region"] / 10.0) * sum(terms.region, zero)
            loss_val = loss.detach().item()
            if loss_val > 0 and loss.requires_grad:
                grad, = torch.autograd.grad(loss, z)
                x = (z - float(lrs[i]) * grad).detach()
            if not math.isfinite(loss_val):
                raise NonFiniteError(f"composition loss became {loss_val} at step {i}")
            info["loss"].append(loss_val)
            info["optimised_steps"] = i + 1
            if debug is not None and i in debug.get("steps", ()):
                debug.setdefault("maps", {})[i] = [[cross[r][:, :, p].detach().float().cpu() for p in prep.token_pos[r]]
                                                   for r in range(ra.n)]
            if (loss_val > prev and i >= 5) or i >= spec.max_opt_step:
                stopped = True
            else:
                prev = loss_val
            del cross, smap, terms, loss, z
        with torch.no_grad():
            kw = {}
            if ra is not None:
                ra.for_batch(("uncond", "cond") if cfg else ("cond",), store=False)
                kw["regions"] = ra
            e = pipe.eps(x, int(t), ctx, spec.guidance, **kw)
            x = sch.step(i, e, x, generator=g)
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"latent became NaN/Inf at step {i} (t={int(t)})")
        if callback is not None:
            callback(i, len(sch.timesteps), **({"loss": f"{loss_val:.3f}"} if loss_val is not None else {}))
    return x, info


def compose(pipe, spec, *, callback=None, debug_dir: str | None = None, backend=None):
    """Compose the spec's concepts into one image (PIL). ``debug_dir`` writes the box layout, per-concept
    cross-attention heatmaps at the analysis resolution and the loss curve."""
    if isinstance(spec, dict):
        spec = ComposeSpec.from_dict(spec)
    debug = {"steps": {0, 10, 25}} if debug_dir else None
    lat, info = compose_latents(pipe, spec, callback=callback, debug=debug, backend=backend)
    img = to_pil(pipe.decode(lat))[0]
    if debug_dir:
        from .debug import write_debug
        write_debug(debug_dir, img, spec, info, debug)
    return img
