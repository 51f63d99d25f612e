"""LoRA-Composer: training-free multi-concept composition (arXiv 2403.11627; method.md is the spec).

``compose(pipe, spec) -> PIL.Image`` and ``compose_latents(pipe, spec) -> (latents, info)``. Per image:
latent re-initialisation (§9, one cond-only forward at t = timesteps[0]); then per step, while the
optimisation is active (i ≤ 25, no loss rise after i ≥ 5), one cond-only forward with gradients that stops
after the last analysis layer, the losses of §7 and one step z ← z − lr_i·∂L/∂z with
lr_i = 20·sqrt(linspace(1, 0.5, steps)[i]) (§8); then the CFG forward with region-aware injection (§4) and
concept isolation (§5), and the sampler step. Concepts are live adapters on one shared base model.

Several seeds of one spec (``seed=[...]`` or ``num_images=N``) run as one batch through every UNet pass: each image
keeps its own latent, re-initialisation, losses, latent steps and early stop, and equals the single run with its
seed (to the last bits batched matmuls round differently); ``batch_size`` caps the images per batch.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from PIL import Image
from .concepts import PSEUDO_WORD, bind_concept, select_tokens
from .conditions import build_conditions
from .debug import DebugRecorder
from .losses import box_cells, compute_losses, reinit_latents
from .pipeline import NonFiniteError, check_batch_size, chunks, expand_context
from .regions import RegionAttention
from .spec import (ComposeSpec, Region, check_compose_size, parse_region_string, resolve_box,  # noqa: F401 (API)
                   resolve_seeds)

log = logging.getLogger(__name__)

OFFICIAL_WEIGHTS = {"ce": 8.0, "fill": 2.0, "region": 10.0}  # the code's (method.md §7): the default
PAPER_WEIGHTS = {"ce": 1.0, "fill": 0.25, "region": 0.8}      # paper App. A


def _load_mask(path: str, h: int, w: int) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask image not found: {path}")
    im = Image.open(path).convert("L").resize((w, h), Image.BILINEAR)
    m = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    if not bool((m >= 0.5).any()):
        raise ValueError(f"mask {path} is empty (no pixel ≥ 0.5)")
    return m


def region_lora_name(path: str, scale: float) -> str:
    return f"region:{os.path.abspath(path)}:{scale}"


def _ensure_region_lora(pipe, path: str, scale: float, strict: bool = True) -> str:
    """Attach a concept LoRA as a region adapter (kept across calls: batches reuse it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"region LoRA file not found: {path}")
    ap, name = os.path.abspath(path), region_lora_name(path, scale)
    for other, lora in list(pipe.loras.loras.items()):
        if os.path.abspath(lora.path) == ap and other != name and not other.startswith(("background:", "global:")):
            pipe.unload_lora(other)  # same file at another scale or mode: reload as a region adapter
    if name not in pipe.loras.loras:
        pipe.load_lora(path, scale, name=name, mode="region", strict=strict)
    return name


def warn_if_no_concept(pipe, spec) -> bool:
    """A composition whose regions have no concept at all (no LoRA named, none bound by pseudo-words or trigger
    words) is layout control only: say so rather than run silently. Returns True when it warned."""
    if any(r.lora for r in spec.regions) or spec.loras:
        return False
    words = {w for r in spec.regions for w in PSEUDO_WORD.findall(r.prompt)}
    if words & set(pipe.loras.concepts):
        return False
    log.warning("the spec has %d region(s) but no concept LoRA (no region names a 'lora', no --lora was given and "
                "no region prompt uses a loaded pseudo-word): each region gets its prompt through the base model "
                "only", len(spec.regions))
    return True


@dataclass
class Prepared:
    """Everything static for one composition: region attention state, concept token positions, boxes (the loss
    form: fractional boxes, or free-form masks read on the analysis grid) and the global encodings."""
    ra: RegionAttention | None
    token_pos: list      # per region: sequence positions of its concept tokens in its tokenised prompt
    boxes: list
    cond: torch.Tensor
    uncond: torch.Tensor
    loss_boxes: list
    token_words: list    # per region: a label for each concept token (for info and debug output)
    tokens: list         # per region: the RegionTokens (positions, words, where they came from)


def prepare(pipe, spec: ComposeSpec, backend: str | None = None, strict: bool = True) -> Prepared:
    """Validate the spec, bind each region's concept and concept tokens (composer/concepts.py), encode every
    prompt; no sampling."""
    spec.check()
    H, W = spec.height, spec.width
    boxes, masks, adapters, tokens, pos_ctx, neg_ctx = [], [], [], [], [], []
    texts = [spec.prompt, spec.negative_prompt] + [t for r in spec.regions for t in (r.prompt, r.negative_prompt)]
    # concepts given globally (--lora / spec "loras") bind to the region whose prompt names them
    global_loras = [_ensure_region_lora(pipe, e["path"], e["scale"], strict) for e in spec.loras] if spec.regions else []
    for r in spec.regions:  # load explicitly named concepts before checking pseudo-words
        if r.lora:
            _ensure_region_lora(pipe, r.lora, r.scale, strict)
    pipe.check_pseudo_words(texts)
    for i, r in enumerate(spec.regions):
        if r.mask:
            m = _load_mask(r.mask, H, W)
            nz = (m >= 0.5).nonzero()
            boxes.append((nz[:, 0].min().item() / H, nz[:, 1].min().item() / W,
                          (nz[:, 0].max().item() + 1) / H, (nz[:, 1].max().item() + 1) / W))
            masks.append(m)
        else:
            boxes.append(resolve_box(list(r.box), H, W, i))
            masks.append(None)
        name = _ensure_region_lora(pipe, r.lora, r.scale, strict) if r.lora else bind_concept(pipe, r, i, global_loras)
        adapters.append(name)
        lora = pipe.loras.loras[name] if name else None
        tokens.append(select_tokens(pipe.tokenizer, r.prompt, explicit=r.tokens,
                                    pseudo_words=list(lora.embeddings) if lora else (),
                                    triggers=lora.triggers if lora else (), where=f"region {i}"))
        ad = (name,) if name else ()
        pos_ctx.append(pipe.encode_prompt([r.prompt], adapter=ad))
        neg_ctx.append(pipe.encode_prompt([r.negative_prompt], adapter=ad))
        h, w = H // 32, W // 32
        r0, c0, r1, c1 = box_cells(boxes[-1], h, w)
        if (r1 - r0) * (c1 - c0) < 5 and (spec.enhance or spec.isolate):
            log.warning("region %d covers %d cells of the %dx%d analysis grid: its top-k losses are 0", i,
                        max(0, r1 - r0) * max(0, c1 - c0), h, w)
    cond, uncond = pipe.encode_prompt([spec.prompt]), pipe.encode_prompt([spec.negative_prompt])
    ra, loss_boxes = None, []
    if spec.regions:
        isolate_mask = spec.isolate if spec.region_mask is None else spec.region_mask
        be = backend or pipe.region_backend
        ra = RegionAttention(boxes, masks, adapters, pos_ctx, neg_ctx, (H, W), isolate=isolate_mask, backend=be,
                             plain_backend="math" if be == "torch" else "sdpa", lora_scope=spec.lora_scope)
        ra.want_self_maps = spec.isolate if spec.region_loss is None else spec.region_loss
        h, w = ra.analysis_hw  # free-form masks are read on the grid; their bounding box carries the Gaussian
        loss_boxes = [ra.region_mask(r, h, w, pipe.device) if masks[r] is not None else boxes[r] for r in range(ra.n)]
    return Prepared(ra, [t.positions for t in tokens], boxes, cond, uncond, loss_boxes, [t.words for t in tokens],
                    tokens)


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


class LatentOptimiser:
    """Test-time latent optimisation (method.md §7-8), one part of each denoising step.

    While active, :meth:`step` runs one cond-only UNet forward with gradients on the UNet's input z_t (stopping
    after the last analysis layer), computes L = Σ_n Σ_c (L_ce + L_fill) + Σ_n L_region on the 1/32 maps, and
    takes one step z ← z − lr_i·∂L/∂z (skipped when L = 0). The step is taken on what the UNet sees, so one lr
    means the same change for every sampler (for DPM-Solver and DDIM the UNet input is the latent itself).

    The schedule is defined for any number of steps S and equals the official one at S = 50:
    - lr_i = lr·sqrt(linspace(1, 0.5, S)[i]);
    - the last optimised step is ``max_opt_step`` (default ⌊S/2⌋: 25 of 50, 4 of 8, 2 of 4);
    - it stops early, for good, after step i if L_i > L_{i−1} and i ≥ ⌈S/10⌉ (5 of 50, 1 below 11 steps).
    ``observer("optimise", ..., image=b)`` sees every step of every image. ``conditions``
    (composer/conditions.py): the image conditions active at the step join the loss pass, as in the CFG pass.

    ``images`` = B latents (a batch of seeds of one spec): every image has its own state (``active``, ``prev``,
    ``losses``, ``optimised_steps``: lists indexed by image) and its own early stop. The loss pass runs the
    images still active as one batch, and the step uses the gradient of the sum of their losses, which is each
    image's own gradient (nothing in the UNet mixes batch entries: attention, GroupNorm and LayerNorm are per
    sample); an image whose optimisation stopped is left out, so its latent is not changed again.
    """

    def __init__(self, pipe, prep: Prepared, spec: ComposeSpec, steps: int, observer=None, conditions=None,
                 images: int = 1):
        self.pipe, self.prep, self.spec, self.observer = pipe, prep, spec, observer
        self.conditions, self.steps, self.images = conditions, steps, images
        ra = prep.ra
        self.region_loss = ra.want_self_maps
        self.weights = OFFICIAL_WEIGHTS if spec.loss_weights == "official" else PAPER_WEIGHTS
        self.lrs = spec.lr * np.sqrt(np.linspace(1.0, 0.5, steps))
        self.last_step = last_optimised_step(spec, steps)
        self.rise_from = math.ceil(steps / 10)
        self.layers, self.last_layer = _analysis_layers(pipe.unet)
        on = bool((spec.enhance and any(prep.token_pos)) or self.region_loss)
        self.active = [on] * images          # per image: still optimising
        self.prev = [1000.0] * images        # per image: the loss of its previous optimised step
        self.last = None                     # per image: this step's loss (None where not optimised); None: none
        self.losses = [[] for _ in range(images)]
        self.optimised_steps = [0] * images

    def maps(self, z, t, grad: bool, i: int = 0) -> list:
        """Cond-only forward of z [k, 4, h, w] at step i with region attention storing the analysis maps (and the
        conditions active at step i); -> per image of z, (per-region cross maps, self map)."""
        ra, k = self.prep.ra, z.shape[0]
        ra.for_batch(("cond",), store=True, images=k)
        cond = expand_context(self.prep.cond, k)
        with torch.set_grad_enabled(grad):
            zin = z.to(self.pipe.dtype)
            sc = self.conditions.at(i, self.steps) if self.conditions is not None else None
            kw = sc.residuals(zin, t, cond, cfg=False) if sc is not None else {}
            self.pipe.unet(zin, t, cond, regions=ra, stop_after_layer=self.last_layer, **kw)
            maps = ra.batch_maps()
            return [ra.aggregated_maps(b, maps) for b in range(k)]

    def loss(self, cross, smap):
        """One image's loss from its maps -> (L, terms)."""
        spec, w = self.spec, self.weights
        terms = compute_losses(cross, self.prep.token_pos, self.prep.loss_boxes,
                               smap.float() if self.region_loss else None, enhance=spec.enhance,
                               gaussian=spec.gaussian, fill=spec.fill, region=self.region_loss)
        zero = cross[0].sum() * 0.0
        # the terms carry the official weights (8, 2, 10); rescale them for the paper's
        loss = (w["ce"] / OFFICIAL_WEIGHTS["ce"]) * sum(terms.ce, zero) \
            + (w["fill"] / OFFICIAL_WEIGHTS["fill"]) * (sum(terms.fill_x, zero) + sum(terms.fill_y, zero)) \
            + (w["region"] / OFFICIAL_WEIGHTS["region"]) * sum(terms.region, zero)
        return loss, terms

    def step(self, i: int, t, x: torch.Tensor, sch) -> torch.Tensor:
        """x [B, 4, h, w] (B = ``images``) -> x with each active image's latent step taken."""
        self.last = None
        act = [b for b in range(self.images) if self.active[b]]
        if not act:
            return x
        if x.shape[0] != self.images:
            raise ValueError(f"the optimiser was built for {self.images} image(s), the latent has {x.shape[0]}")
        c = float(sch.scale_model_input(i, torch.ones(())))  # UNet input = c·x (1 for DPM-Solver and DDIM)
        with torch.enable_grad():
            z = (c * (x if len(act) == self.images else x[act])).detach().requires_grad_(True)  # [k, 4, h, w]
            per = self.maps(z, t, True, i)
            losses = [self.loss(cross, smap)[0] for cross, smap in per]
        values = [l.detach().item() for l in losses]
        for b, v in zip(act, values):
            if not math.isfinite(v):
                raise NonFiniteError(f"composition loss became {v} at step {i}"
                                     + (f" (image {b} of the batch)" if self.images > 1 else ""))
        moved = [j for j, (l, v) in enumerate(zip(losses, values)) if v > 0 and l.requires_grad]
        out = x
        if moved:
            grad, = torch.autograd.grad(sum(losses[j] for j in moved), z)  # row j: image act[j]'s own gradient
            new = ((z - float(self.lrs[i]) * grad) / c).detach()
            if len(moved) == self.images:
                out = new
            else:  # only the images that moved change; the others keep their latent exactly
                out = x.clone()
                for j in moved:
                    out[act[j]] = new[j]
        self.last = [None] * self.images
        for j, b in enumerate(act):
            v = values[j]
            if self.observer is not None:
                self.observer("optimise", i=i, t=t, z_before=x[b:b + 1], z_after=out[b:b + 1], loss=v,
                              lr=float(self.lrs[i]), cross=per[j][0], prep=self.prep, image=b)
            self.last[b] = v
            self.losses[b].append(v)
            self.optimised_steps[b] = i + 1
            if (v > self.prev[b] and i >= self.rise_from) or i >= self.last_step:
                self.active[b] = False
            else:
                self.prev[b] = v
        return out


def last_optimised_step(spec: ComposeSpec, steps: int) -> int:
    """The spec's ``max_opt_step``, or half the steps (the official 25 of 50)."""
    return spec.max_opt_step if spec.max_opt_step is not None else steps // 2


def reinitialise(pipe, prep: Prepared, sch, z: torch.Tensor, observer=None, conditions=None) -> torch.Tensor:
    """Latent re-initialisation (method.md §9) of the unit noise z [B, 4, h, w], each image on its own: one
    cond-only forward (the B images as one batch) at t = timesteps[0] (UNet input: the first step's,
    scale_model_input(0, z·init_noise_sigma)) with region attention and the image conditions of step 0; per image
    and region, the noise patch under the window where its tokens' (unsmoothed) maps are strongest is copied into
    its box; then the image's latent is restored to its own mean and std (the loop multiplies by
    init_noise_sigma). ``observer("reinit", ..., image=b)`` sees each image."""
    ra, k = prep.ra, z.shape[0]
    _, last = _analysis_layers(pipe.unet)
    ra.for_batch(("cond",), store=True, images=k)
    cond = expand_context(prep.cond, k)
    with torch.no_grad():
        t0, zin = sch.timesteps[0], sch.scale_model_input(0, z * sch.init_noise_sigma).to(pipe.dtype)
        sc = conditions.at(0, len(sch.timesteps)) if conditions is not None else None
        kw = sc.residuals(zin, t0, cond, cfg=False) if sc is not None else {}
        pipe.unet(zin, t0, cond, regions=ra, stop_after_layer=last, **kw)
        maps = ra.batch_maps()
    outs = []
    for b in range(k):
        cross, _ = ra.aggregated_maps(b, maps)
        x = z[b:b + 1]
        sel = [(i, [cross[i][:, :, p].float() for p in prep.token_pos[i]]) for i in range(ra.n) if prep.token_pos[i]]
        out = reinit_latents(x, [m for _, m in sel], [prep.loss_boxes[i] for i, _ in sel], ra.analysis_hw)
        if observer is not None:
            observer("reinit", z_before=x, z_after=out, maps=[m for _, m in sel], regions=[i for i, _ in sel],
                     prep=prep, image=b)
        outs.append(out)
    return torch.cat(outs) if k > 1 else outs[0]


def compose_latents(pipe, spec: ComposeSpec, *, seed=None, num_images: int | None = None,
                    batch_size: int | None = None, callback=None, observer=None, backend=None, strict: bool = True):
    """-> (latents [1, 4, H/8, W/8], info) for the spec's seed, or, with ``seed`` a list or ``num_images`` given,
    (latents [B, 4, H/8, W/8], [info per image]) in seed order.

    ``seed`` (an int or a list of ints) replaces the spec's; ``num_images=N`` runs seeds s, s+1, …, s+N-1 from
    the seed s (the spec's unless given). The images run as one batch (at most ``batch_size`` per batch; None:
    all), each equal to the single run with its seed. An info is {"seed", "loss": the loss per optimised step,
    "optimised_steps", "reinit", "regions": each region's concept and tokens}.

    A spec without regions is plain text-to-image (its ``loras`` merged for the call). ``observer(event, **data)``
    (optional) sees the re-initialisation ("reinit": z_before, z_after, maps) and every optimisation step
    ("optimise": i, t, z_before, z_after, loss, lr, cross maps) of every image (``image``: its index in the
    seeds, ``seed``; tensors are that image's, [1, ...]); composer/debug.py builds its heatmaps from it, and
    tests read the latent steps through it. ``strict=False`` loads LoRAs whose keys partly match no layer.
    """
    if isinstance(spec, dict):
        spec = ComposeSpec.from_dict(spec)
    seeds, several = resolve_seeds(spec.seed if seed is None else seed, num_images)
    check_batch_size(batch_size)
    merged = []  # LoRAs merged into the model for this call only, unmerged (bit-exactly) afterwards
    try:
        if spec.background_lora:
            merged.append(_merge_for_call(pipe, "background", spec.background_lora, spec.background_scale, strict))
        if not spec.regions:
            merged += [_merge_for_call(pipe, "global", e["path"], e["scale"], strict) for e in spec.loras]
        lat, infos = _compose(pipe, spec, seeds, batch_size, callback, observer, backend, strict)
    finally:
        for name in reversed(merged):
            if name in pipe.loras.loras:
                pipe.unload_lora(name)
    return (lat, infos) if several else (lat, infos[0])


def _merge_for_call(pipe, kind, path, scale, strict):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} LoRA file not found: {path}")
    name = f"{kind}:{os.path.abspath(path)}:{scale}"
    if name not in pipe.loras.loras:
        pipe.load_lora(path, scale, name=name, mode="merge", strict=strict)
    return name


def _compose(pipe, spec, seeds, batch_size, callback, observer, backend, strict):
    """Prepare once (prompts, regions, conditions), then run the seeds in groups of ``batch_size``, each group one
    batch with a fresh sampler -> (latents [len(seeds), 4, h, w], [info per seed])."""
    prep = prepare(pipe, spec, backend, strict)
    cfg = spec.guidance > 1.0
    ctx = _cat_ctx(prep.uncond, prep.cond) if cfg else prep.cond  # one image's [uncond; cond]
    regions = [{"lora": prep.ra.adapters[i] and os.path.basename(pipe.loras.loras[prep.ra.adapters[i]].path),
                **t.record()} for i, t in enumerate(prep.tokens)] if prep.ra is not None else []
    conds = build_conditions(pipe, spec.conditions, spec.height, spec.width, n_regions=len(spec.regions),
                             region_mask=prep.ra.region_mask if prep.ra is not None else None)
    lats, infos, done = [], [], 0
    for group in chunks(seeds, batch_size):
        B = len(group)
        obs = None
        if observer is not None:  # the group's image index -> the call's, plus the seed
            obs = (lambda ev, _off=done, _g=group, **d:
                   observer(ev, **{**d, "image": _off + d["image"], "seed": _g[d["image"]]}))
        sch = pipe.make_sampler(spec.sampler, spec.steps, eta=spec.eta, schedule=spec.schedule)
        x, gens = pipe.initial_latents(group, spec.height, spec.width)
        opt, reinit = None, False
        if prep.ra is not None:
            if spec.reinit and any(prep.token_pos):
                x = reinitialise(pipe, prep, sch, x, obs, conds)
                reinit = True
            opt = LatentOptimiser(pipe, prep, spec, len(sch.timesteps), obs, conds, images=B)
        x = pipe.denoise(x, sch, expand_context(ctx, B), spec.guidance, generator=gens if B > 1 else gens[0],
                         regions=prep.ra, optimiser=opt, conditions=conds, callback=callback)
        lats.append(x)
        for b, s in enumerate(group):
            infos.append({"seed": s, "loss": opt.losses[b] if opt is not None else [],
                          "optimised_steps": opt.optimised_steps[b] if opt is not None else 0, "reinit": reinit,
                          "regions": copy.deepcopy(regions)})
        done += B
    return (torch.cat(lats) if len(lats) > 1 else lats[0]), infos


def compose(pipe, spec, *, seed=None, num_images: int | None = None, batch_size: int | None = None, callback=None,
            debug_dir: str | None = None, backend=None, strict: bool = True, return_info: bool = False):
    """Compose the spec's concepts into one image (PIL; with ``return_info``, (image, info)), or, with ``seed`` a
    list or ``num_images`` (as in :func:`compose_latents`), into one image per seed (a list; with ``return_info``,
    (images, infos)). ``debug_dir`` writes the box layout, labelled cross-attention heatmaps of every concept token
    at the analysis resolution, and the loss curve (for several seeds: in ``debug_dir/<seed>/``)."""
    if isinstance(spec, dict):
        spec = ComposeSpec.from_dict(spec)
    seeds, several = resolve_seeds(spec.seed if seed is None else seed, num_images)
    recs, obs = None, None
    if debug_dir:
        recs = [DebugRecorder(steps=(0, spec.steps // 5, last_optimised_step(spec, spec.steps))) for _ in seeds]
        obs = lambda ev, **d: recs[d["image"]](ev, **d)  # noqa: E731
    lat, info = compose_latents(pipe, spec, seed=seeds if several else seeds[0], batch_size=batch_size,
                                callback=callback, observer=obs, backend=backend, strict=strict)
    infos = info if several else [info]
    images = pipe.decode_images(lat, batch_size, tile=spec.vae_tile)
    if debug_dir:
        for s, rec, img, inf in zip(seeds, recs, images, infos):
            rec.write(os.path.join(debug_dir, str(s)) if several else debug_dir, img, spec, inf, pipe)
    if several:
        return (images, infos) if return_info else images
    return (images[0], infos[0]) if return_info else images[0]
