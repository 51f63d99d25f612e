"""--debug-dir output: the box layout over the image, per-concept cross-attention heatmaps on the analysis
grid at chosen steps, and the loss per optimised step (PNG, plus losses.json). PIL only."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (210, 245, 60)]


def _heat(a: np.ndarray, size) -> Image.Image:
    a = (a - a.min()) / (np.ptp(a) + 1e-12)
    rgb = np.stack([np.clip(1.5 * a, 0, 1), np.clip(1.5 * a - 0.5, 0, 1), np.clip(0.6 - a, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)


def _plot(values, size=(480, 240)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pad = 30
    d.rectangle([pad, 10, size[0] - 10, size[1] - pad], outline=(0, 0, 0))
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        n = max(len(values) - 1, 1)
        pts = [(pad + (size[0] - pad - 10) * i / n, size[1] - pad - (size[1] - pad - 10) * (v - lo) / span)
               for i, v in enumerate(values)]
        if len(pts) > 1:
            d.line(pts, fill=(0, 90, 200), width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(0, 90, 200))
        d.text((2, 10), f"{hi:.2f}", fill=(0, 0, 0))
        d.text((2, size[1] - pad - 10), f"{lo:.2f}", fill=(0, 0, 0))
    d.text((pad, size[1] - pad + 8), f"loss per optimised step (n={len(values)})", fill=(0, 0, 0))
    return im


def _save(im: Image.Image, path: str):
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)


def write_debug(folder: str, image, spec, info: dict, debug: dict):
    os.makedirs(folder, exist_ok=True)
    lay = image.convert("RGB").copy()
    d = ImageDraw.Draw(lay)
    H, W = spec.height, spec.width
    from .compose import resolve_box
    for i, r in enumerate(spec.regions):
        if r.box is None:
            continue
        t, l, b, rr = resolve_box(list(r.box), H, W, i)
        c = COLORS[i % len(COLORS)]
        d.rectangle([l * W, t * H, rr * W - 1, b * H - 1], outline=c, width=2)
        d.text((l * W + 4, t * H + 2), f"{i}: {r.prompt[:40]}", fill=c)
    _save(lay, os.path.join(folder, "layout.png"))
    for step, per_region in (debug.get("maps") or {}).items():
        for ri, maps in enumerate(per_region):
            for ti, m in enumerate(maps):
                a = m.numpy()
                _save(_heat(a, (a.shape[1] * 16, a.shape[0] * 16)),
                      os.path.join(folder, f"attn_{step if isinstance(step, str) else f'step{step:03d}'}_region{ri}_token{ti}.png"))
    _save(_plot(info.get("loss", [])), os.path.join(folder, "loss.png"))
    with open(os.path.join(folder, "losses.json"), "w") as f:
        json.dump(info, f, indent=1)
