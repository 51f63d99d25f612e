"""Image conditions for generation and composition: T2I-Adapters (as the official LoRA-Composer code uses them,
method.md §10) and ControlNets (as the rest of the ecosystem does), each with a global weight and per-region
weights, several summed.

A spec entry (``ComposeSpec.conditions``; ``--condition KIND:MODEL:IMAGE[:WEIGHT]`` on the command line)::

    {"kind": "t2i-adapter" | "controlnet", "model": PATH, "image": PATH, "weight": 1.0,
     "regions": {"0": 0.8, "1": 0.0}, "start": 0.0, "end": 1.0,
     "guess_mode": false,            # ControlNet only
     "preprocess": null | "canny", "canny": [100, 200]}

**Weights** (the official ``region_*_adaptor_weight`` rule, ``multi_lora_sample.py``): on every feature grid the
map is ``weight`` everywhere, and each listed region's cells are *set* to that region's weight (absolute, not
multiplied by ``weight``); a region's cells on a grid are the ones composer's regions use (the ceil/floor box
rule of method.md §4, or a mask area-averaged and thresholded at 0.5). Where listed regions overlap, the higher
region index wins (the official code lets the later entry of its string win; an index order keeps the rule
independent of how a spec file orders its keys). Unlisted regions and the background keep ``weight``. A
T2I-Adapter's four feature maps are multiplied by their level's map; a ControlNet's 13 residuals by theirs (after
the guess-mode scales). Several conditions are summed: adapter features into one list per level, ControlNet
residuals into one per skip.

**Steps.** Condition k is used at step i of n when ``start <= i/n`` and ``(i+1)/n <= end`` (diffusers'
``control_guidance_start/end`` rule), in every UNet pass of that step: both CFG halves (an adapter's features are
the same for both; a ControlNet runs on the [uncond; cond] batch, or in guess mode on the cond half only, the
uncond half getting zeros, as diffusers), and in a composition also the loss pass and the re-initialisation
forward (step 0). The condition is refreshed at every step (the official code stops refreshing it once its latent
optimisation stops; that quirk is not copied).

**Images** are used as given (no pose/depth detectors are shipped), in [0, 1]: converted to the model's channels
(1: grayscale, 3: RGB), resized to the image size with a warning when they differ (Lanczos, as diffusers), 16-bit
PNGs scaled by 1/65535. ``preprocess: "canny"`` runs the small Canny edge detector below first.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import CheckpointError

log = logging.getLogger(__name__)

KINDS = ("t2i-adapter", "controlnet")
PREPROCESSORS = ("canny",)
_FIELDS = {"kind", "model", "image", "weight", "regions", "start", "end", "guess_mode", "preprocess", "canny"}


# --- spec entries ------------------------------------------------------------------------------------------------

def _number(v, where, name):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
        raise ValueError(f"{where}: '{name}' must be a number, got {v!r}")
    return float(v)


def condition_entry(e, where: str = "spec", i: int = 0) -> dict:
    """Validate and normalise one ``conditions`` entry (paths already resolved) -> a dict with every field."""
    w = f"{where}: conditions[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{w} must be an object {{kind, model, image, ...}}, got {e!r}")
    bad = sorted(set(e) - _FIELDS)
    if bad:
        raise ValueError(f"{w}: unknown field(s) {bad}; known: {sorted(_FIELDS)}")
    kind = e.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{w}.kind: unknown kind {kind!r}; expected one of {list(KINDS)}")
    for name in ("model", "image"):
        v = e.get(name)
        if v is None or (isinstance(v, str) and not v):
            raise ValueError(f"{w}: '{name}' is required (a path)")
        if name == "model" and not isinstance(v, str):
            raise ValueError(f"{w}.model must be a path, got {type(v).__name__}")
        if name == "image" and not isinstance(v, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(f"{w}.image must be a path (or, from Python, a PIL image, array or tensor), got "
                             f"{type(v).__name__}")
    weight = _number(e.get("weight", 1.0), w, "weight")
    start, end = _number(e.get("start", 0.0), w, "start"), _number(e.get("end", 1.0), w, "end")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{w}: need 0 <= start < end <= 1, got start={start:g}, end={end:g}")
    regs = e.get("regions") or {}
    if not isinstance(regs, dict):
        raise ValueError(f"{w}.regions must be an object {{region index: weight}}, got {regs!r}")
    regions = {}
    for k, v in regs.items():
        if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit())):
            raise ValueError(f"{w}.regions: key {k!r} is not a region index (0, 1, ...)")
        regions[int(k)] = _number(v, f"{w}.regions", str(k))
    gm = e.get("guess_mode", False)
    if not isinstance(gm, bool):
        raise ValueError(f"{w}.guess_mode must be true or false, got {gm!r}")
    if gm and kind != "controlnet":
        raise ValueError(f"{w}.guess_mode applies to a ControlNet only")
    pre = e.get("preprocess")
    if pre is not None and pre not in PREPROCESSORS:
        raise ValueError(f"{w}.preprocess: unknown preprocessor {pre!r}; expected one of {list(PREPROCESSORS)} or null")
    thr = e.get("canny", [100, 200])
    if not (isinstance(thr, (list, tuple)) and len(thr) == 2 and
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in thr) and 0 <= thr[0] <= thr[1]):
        raise ValueError(f"{w}.canny must be [low, high] thresholds with 0 <= low <= high, got {thr!r}")
    return {"kind": kind, "model": e["model"], "image": e["image"], "weight": weight, "regions": regions,
            "start": start, "end": end, "guess_mode": gm, "preprocess": pre, "canny": [float(x) for x in thr]}


def parse_condition_arg(arg: str) -> dict:
    """``KIND[+canny]:MODEL:IMAGE[:WEIGHT]`` (the ``--condition`` flag) -> a spec entry."""
    parts = arg.split(":")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise ValueError(f"--condition {arg!r}: expected KIND:MODEL:IMAGE[:WEIGHT] (KIND: {' or '.join(KINDS)}, "
                         "optionally KIND+canny to detect edges first)")
    kind, _, pre = parts[0].partition("+")
    e = {"kind": kind, "model": parts[1], "image": parts[2]}
    if pre:
        e["preprocess"] = pre
    if len(parts) == 4:
        try:
            e["weight"] = float(parts[3])
        except ValueError:
            raise ValueError(f"--condition {arg!r}: weight {parts[3]!r} is not a number") from None
    return condition_entry(e, "--condition", 0)


# --- images ------------------------------------------------------------------------------------------------------

def canny(image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny edges (Canny 1986) of an image: white 1-pixel edges on black, a grayscale PIL image.

    As OpenCV's ``Canny(img, low, high)`` with its defaults (no blur, 3×3 Sobel, L1 magnitude |gx| + |gy|):
    gradient on the 8-bit grayscale image (borders replicated); non-maximum suppression along the gradient
    direction quantised to 0/45/90/135°; hysteresis: pixels ≥ high are edges, pixels ≥ low are edges when
    8-connected to one."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    g = np.asarray(im.convert("L"), dtype=np.float32)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(gx) + np.abs(gy)
    m = np.pad(mag, 1)
    ang = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = np.select([(ang < 22.5) | (ang >= 157.5), ang < 67.5, ang < 112.5], [0, 1, 2], 3)
    # neighbours along the gradient (rows grow downwards): 0: left/right, 1: 45° (gy/gx > 0: down-right, up-left),
    # 2: up/down, 3: 135° (down-left, up-right)
    H, W = g.shape
    c = m[1:-1, 1:-1]
    nb = {0: (m[1:-1, :-2], m[1:-1, 2:]), 1: (m[:-2, :-2], m[2:, 2:]), 2: (m[:-2, 1:-1], m[2:, 1:-1]),
          3: (m[2:, :-2], m[:-2, 2:])}
    keep = np.zeros((H, W), bool)
    for s, (a, b) in nb.items():
        # ">" on one side, ">=" on the other: a plateau keeps one pixel, not two
        keep |= (sector == s) & (c > a) & (c >= b)
    cand = keep & (mag >= low)
    edges = cand & (mag >= high)
    stack = list(zip(*np.nonzero(edges)))
    while stack:  # hysteresis: grow the strong edges through 8-connected candidates
        y, x = stack.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W and cand[yy, xx] and not edges[yy, xx]:
                    edges[yy, xx] = True
                    stack.append((yy, xx))
    return Image.fromarray(edges.astype(np.uint8) * 255, mode="L")


def _resize_warning(where, got, want):
    log.warning("%s: image is %dx%d, the output is %dx%d: resized (Lanczos)", where, got[1], got[0], want[1], want[0])


def load_condition_image(src, channels: int, height: int, width: int, where: str = "condition",
                         preprocess: str | None = None, thresholds=(100.0, 200.0)) -> torch.Tensor:
    """A path, PIL image, array ([H, W] / [H, W, C], uint8 or float in [0, 1]) or tensor ([C, H, W] / [1, C, H, W]
    in [0, 1]) -> [1, channels, height, width] float32 in [0, 1]."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}.image: file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                src = im.copy()
        except (OSError, Image.UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"{where}.image: {path} is not a readable image ({e})") from None
    if isinstance(src, torch.Tensor):
        t = src.detach().float().cpu()
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(f"{where}.image: a tensor must be [C, H, W] or [1, C, H, W], got {tuple(src.shape)}")
        if preprocess:
            src = Image.fromarray((t[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8).squeeze(-1))
        else:
            return _fit_tensor(t, channels, height, width, where)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"{where}.image: an array must be [H, W] or [H, W, C] with C in 1/3/4, got {a.shape}")
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        t = torch.from_numpy(a[..., None] if a.ndim == 2 else a[..., :3] if a.shape[-1] == 4 else a).permute(2, 0, 1)
        if preprocess:
            src = Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8).squeeze(-1))
        else:
            return _fit_tensor(t[None], channels, height, width, where)
    if not isinstance(src, Image.Image):
        raise ValueError(f"{where}.image: expected a path, PIL image, array or tensor, got {type(src).__name__}")
    im = src
    if preprocess == "canny":
        im = canny(im if im.mode in ("L", "RGB") else im.convert("RGB"), *thresholds)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (depth maps): keep the precision
        a = np.asarray(im, dtype=np.float32) / 65535.0
        t = torch.from_numpy(a)[None, None]
        if a.max() > 1.0:
            raise ValueError(f"{where}.image: 32-bit integer image with values above 65535")
        if (im.height, im.width) != (height, width):
            _resize_warning(where, (im.height, im.width), (height, width))
            t = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return t.expand(1, channels, height, width).contiguous()
    if im.mode in ("F",):
        raise ValueError(f"{where}.image: floating-point image mode 'F': save it as an 8- or 16-bit image")
    im = im.convert("L" if channels == 1 else "RGB")
    if (im.height, im.width) != (height, width):
        _resize_warning(where, (im.height, im.width), (height, width))
        im = im.resize((width, height), Image.LANCZOS)
    a = np.asarray(im).astype(np.float32) / 255.0
    t = torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)[None]
    if channels not in (1, 3):
        raise ValueError(f"{where}: the model takes {channels}-channel images; only 1 (grayscale) or 3 (RGB) can be "
                         "made from an image file")
    return t.contiguous()


def _fit_tensor(t, channels, height, width, where):
    if t.shape[1] != channels:
        raise ValueError(f"{where}.image: {t.shape[1]} channel(s), the model takes {channels}")
    if float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{where}.image: values must lie in [0, 1] (got {float(t.min()):g}..{float(t.max()):g})")
    if tuple(t.shape[-2:]) != (height, width):
        _resize_warning(where, tuple(t.shape[-2:]), (height, width))
        t = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return t.contiguous()


# --- models ------------------------------------------------------------------------------------------------------

def load_condition_model(pipe, kind: str, path: str, where: str = "condition"):
    """A T2I-Adapter or ControlNet for ``pipe``'s UNet, loaded once per (kind, file) and kept on the pipeline."""
    from .controlnet import load_controlnet
    from .t2i_adapter import load_t2i_adapter
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}.model: {kind} not found: {path}")
    key = (kind, os.path.abspath(path))
    if key in pipe.condition_models:
        return pipe.condition_models[key]
    ucfg = pipe.unet.cfg
    if kind == "t2i-adapter":
        model = load_t2i_adapter(path, levels=len(ucfg.block_out_channels), dtype=pipe.dtype, device=pipe.device)
        if tuple(model.cfg.feature_channels) != tuple(ucfg.block_out_channels):
            raise CheckpointError(f"{path}: T2I-Adapter features have {list(model.cfg.feature_channels)} channels, "
                                  f"the UNet's levels {list(ucfg.block_out_channels)} (an adapter for another base "
                                  "model?)")
    elif kind == "controlnet":
        model = load_controlnet(path, ucfg, dtype=pipe.dtype, device=pipe.device, backend=pipe.attention)
    else:
        raise ValueError(f"{where}.kind: unknown kind {kind!r}; expected one of {list(KINDS)}")
    pipe.condition_models[key] = model
    return model


def model_channels(model) -> int:
    return model.control.conditioning_channels if hasattr(model, "control") else model.in_channels


# --- evaluation --------------------------------------------------------------------------------------------------

@dataclass
class Condition:
    """One resolved condition: its model, its image [1, c, H, W] in [0, 1] (model dtype/device) and its weights."""
    kind: str
    model: torch.nn.Module
    image: torch.Tensor
    weight: float = 1.0
    regions: dict = field(default_factory=dict)
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def active(self, i: int, n: int) -> bool:
        return not (i / n < self.start or (i + 1) / n > self.end)


class Conditions:
    """The conditions of one image. ``region_mask(r, h, w, device) -> [h, w]`` in {0, 1} gives region r's cells on a
    grid (composer/regions.py ``RegionAttention.region_mask``); None when there are no regions.

    Cached per image: each adapter's weighted features (they depend on the image only), each ControlNet's encoded
    hint and the weight maps; a ControlNet itself runs in every UNet call (it reads the latent)."""

    def __init__(self, items: list, region_mask=None):
        self.items, self.region_mask = list(items), region_mask
        self._maps, self._feats, self._hints = {}, {}, {}

    def __len__(self):
        return len(self.items)

    def weight_map(self, k: int, h: int, w: int, device):
        """Condition k's weight on an h×w grid: a number, or [1, 1, h, w] fp32 when it has region weights."""
        c = self.items[k]
        if not c.regions:
            return c.weight
        key = (k, h, w, str(device))
        if key not in self._maps:
            m = torch.full((h, w), c.weight, dtype=torch.float32, device=device)
            for r in sorted(c.regions):  # higher index last: it wins where boxes overlap
                m = torch.where(self.region_mask(r, h, w, device).bool(), torch.tensor(c.regions[r], device=device), m)
            self._maps[key] = m[None, None]
        return self._maps[key]

    def adapter_features(self, k: int) -> list:
        if k not in self._feats:
            c = self.items[k]
            with torch.no_grad():
                feats = c.model(c.image)
            self._feats[k] = [f * self._as(self.weight_map(k, *f.shape[-2:], f.device), f) for f in feats]
        return self._feats[k]

    def hint(self, k: int) -> torch.Tensor:
        if k not in self._hints:
            c = self.items[k]
            with torch.no_grad():
                self._hints[k] = c.model.embed_hint(c.image)
        return self._hints[k]

    @staticmethod
    def _as(m, like):
        return m.to(like.dtype) if isinstance(m, torch.Tensor) else m

    def controlnet_scales(self, k: int, shapes: list, device) -> list:
        c = self.items[k]
        if not c.regions:  # numbers, computed as diffusers computes them
            return c.model.residual_scales(c.weight, c.guess_mode)
        base = c.model.residual_scales(1.0, c.guess_mode)
        return [s * self.weight_map(k, h, w, device) for s, (h, w) in zip(base, shapes)]

    def at(self, i: int, n: int) -> "StepConditions | None":
        """The conditions active at step i of n, or None."""
        act = [k for k, c in enumerate(self.items) if c.active(i, n)]
        return StepConditions(self, act) if act else None


class StepConditions:
    def __init__(self, conds: Conditions, active: list):
        self.conds, self.active = conds, active

    def residuals(self, x: torch.Tensor, t, context, cfg: bool) -> dict:
        """The UNet keywords for one call: x [N, 4, h, w] the UNet's input ([uncond; cond] when ``cfg``), context
        [N, 77, C] or per layer [L, N, 77, C] -> {intrablock_residuals, down_residuals, mid_residual} (those used)."""
        conds, kw = self.conds, {}
        n = x.shape[0]
        ads = [k for k in self.active if conds.items[k].kind == "t2i-adapter"]
        if ads:
            feats = None
            for k in ads:
                f = conds.adapter_features(k)
                feats = list(f) if feats is None else [a + b for a, b in zip(feats, f)]
            kw["intrablock_residuals"] = [f.to(x.dtype).expand(n, -1, -1, -1) for f in feats]
        down = mid = None
        for k in (k for k in self.active if conds.items[k].kind == "controlnet"):
            c = conds.items[k]
            hint = conds.hint(k).to(x.dtype)
            xs, ctx = x, context
            if cfg and c.guess_mode:  # the cond half only; the uncond half gets nothing (diffusers' guess mode)
                xs, ctx = x[n // 2:], context.narrow(context.ndim - 3, n // 2, n // 2)
            shapes = _residual_shapes(c.model, xs)
            scales = [conds._as(s, x) for s in conds.controlnet_scales(k, shapes, x.device)]
            d, m = c.model(xs, t, ctx, hint=hint, conditioning_scale=scales)
            if xs is not x:
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is not None:
            kw["down_residuals"], kw["mid_residual"] = down, mid
        return kw


def _residual_shapes(model, x) -> list:
    """(h, w) of each ControlNet residual for an input x [B, 4, h, w]: conv_in's size, then each level's, every
    downsampler rounding up (stride-2 3×3 convs with padding 1)."""
    h, w = x.shape[-2:]
    cfg = model.cfg
    out = [(h, w)]
    for i in range(len(cfg.block_out_channels)):
        out += [(h, w)] * cfg.layers_per_block
        if i < len(cfg.block_out_channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
    return out + [(h, w)]


def build_conditions(pipe, entries, height: int, width: int, *, region_mask=None, n_regions: int = 0,
                     where: str = "spec") -> Conditions | None:
    """Spec entries (see the module docstring) -> :class:`Conditions` for one image of height×width, or None."""
    if not entries:
        return None
    items = []
    for i, e in enumerate(entries):
        e = condition_entry(e, where, i)
        w = f"{where}: conditions[{i}]"
        bad = [r for r in e["regions"] if r >= n_regions]
        if bad:
            raise ValueError(f"{w}.regions: region {bad[0]} does not exist (the spec has {n_regions} region(s))")
        model = load_condition_model(pipe, e["kind"], e["model"], w)
        img = load_condition_image(e["image"], model_channels(model), height, width, w, e["preprocess"], e["canny"])
        items.append(Condition(e["kind"], model, img.to(pipe.device, pipe.dtype), e["weight"], e["regions"],
                               e["start"], e["end"], e["guess_mode"]))
    return Conditions(items, region_mask)
