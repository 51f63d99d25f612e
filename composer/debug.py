"""--debug-dir output, built from the composition observer (composer/compose.py):

- ``layout.png``: the image with each region's box outlined in its colour and numbered inside the box, plus a
  legend strip below the image with the number, prompt, LoRA and concept tokens of every region;
- ``attention.png``: one labelled tile per (step, region, concept token): the token's cross-attention map on the
  1/32 analysis grid (head- and layer-averaged, what L_ce reads), its region's box outlined, the caption
  "step S · region R · token"; rows are the recorded steps ("reinit" first);
- ``loss.png`` and ``losses.json``: the loss per optimised step.
PIL only.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_path, save_json
from .spec import resolve_box

COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (210, 245, 60)]
TILE, CAPTION, LEGEND_LINE = 128, 28, 14


def label_rects(spec, d, font) -> list:
    """Per region: (its box [x0, y0, x1, y1] in pixels or None for a mask, the rectangle of its number tag). The
    tag sits in the box's top-left corner, moved down past the tags of earlier regions it would overlap, and
    always inside its own box (clipped to it when the box is tiny)."""
    H, W = spec.height, spec.width
    out, placed = [], []
    for i, r in enumerate(spec.regions):
        if r.box is None:
            out.append((None, None))
            continue
        t, l, b, rr = resolve_box(list(r.box), H, W, i)
        box = [l * W, t * H, rr * W - 1, b * H - 1]
        tw, th = d.textlength(str(i + 1), font=font) + 4, 12
        x0, y0 = box[0] + 2, box[1] + 2
        while any(x0 < p[2] and p[0] < x0 + tw and y0 < p[3] and p[1] < y0 + th for p in placed) \
                and y0 + 2 * th < box[3]:
            y0 += th + 1
        tag = [x0, y0, min(x0 + tw, box[2] - 1), min(y0 + th, box[3] - 1)]
        placed.append(tag)
        out.append((box, tag))
    return out


def _font():
    return ImageFont.load_default()


def _heat(a: np.ndarray, size) -> Image.Image:
    a = (a - a.min()) / (np.ptp(a) + 1e-12)
    rgb = np.stack([np.clip(1.5 * a, 0, 1), np.clip(1.5 * a - 0.5, 0, 1), np.clip(0.6 - a, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)


def _plot(values, size=(480, 240)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pad = 40
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
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def _fit(d, text: str, width: int, font) -> str:
    """Truncate ``text`` with an ellipsis so it fits ``width`` pixels."""
    if d.textlength(text, font=font) <= width:
        return text
    while text and d.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


class DebugRecorder:
    """An observer for compose_latents: keeps the concept-token maps of the re-initialisation and of the chosen
    optimisation steps (small: the 1/32 grid), then writes the debug folder."""

    def __init__(self, steps=(0, 10, 25)):
        self.steps = set(steps)
        self.maps: dict = {}   # row label -> [(region, token index, [h, w] array)]
        self.token_words: list = []  # per region, the label of each concept token

    def __call__(self, event, **d):
        prep = d["prep"]
        self.token_words = prep.token_words
        if event == "reinit":
            self.maps["reinit"] = [(r, ti, m.cpu().numpy()) for r, ms in zip(d["regions"], d["maps"])
                                   for ti, m in enumerate(ms)]
        elif event == "optimise" and d["i"] in self.steps:
            self.maps[f"step {d['i']}"] = [(r, ti, c[:, :, p].detach().float().cpu().numpy())
                                           for r, c in enumerate(d["cross"])
                                           for ti, p in enumerate(prep.token_pos[r])]

    def write(self, folder: str, image, spec, info: dict, pipe=None):
        os.makedirs(folder, exist_ok=True)
        font = _font()
        _save(self.layout(image, spec, pipe, font), os.path.join(folder, "layout.png"))
        if self.maps:
            _save(self.sheet(spec, pipe, font), os.path.join(folder, "attention.png"))
        _save(_plot(info.get("loss", [])), os.path.join(folder, "loss.png"))
        save_json(info, os.path.join(folder, "losses.json"))

    def layout(self, image, spec, pipe, font) -> Image.Image:
        H, W = spec.height, spec.width
        n = len(spec.regions)
        canvas = Image.new("RGB", (W, H + 8 + LEGEND_LINE * max(n, 1)), "white")
        canvas.paste(image.convert("RGB"), (0, 0))
        d = ImageDraw.Draw(canvas)
        for i, (r, (box, tag)) in enumerate(zip(spec.regions, label_rects(spec, d, font))):
            c = COLORS[i % len(COLORS)]
            if box is not None:
                d.rectangle(box, outline=c, width=2)
                d.rectangle(tag, fill=c)  # the number sits inside its own box
                d.text((tag[0] + 2, tag[1]), str(i + 1), fill="white", font=font)
            lora = os.path.basename(r.lora) if r.lora else "no LoRA"
            y = H + 6 + LEGEND_LINE * i
            d.rectangle([4, y, 12, y + 8], fill=c)
            d.text((16, y - 2), _fit(d, f"{i + 1}: {r.prompt}  [{lora}]", W - 20, font), fill=(0, 0, 0), font=font)
        return canvas

    def sheet(self, spec, pipe, font) -> Image.Image:
        rows = list(self.maps.items())
        cols = max(len(v) for _, v in rows)
        sheet = Image.new("RGB", (cols * (TILE + 4) + 4, len(rows) * (TILE + CAPTION + 4) + 4), "white")
        d = ImageDraw.Draw(sheet)
        for ri, (label, tiles) in enumerate(rows):
            for ci, (reg, ti, a) in enumerate(tiles):
                x0, y0 = 4 + ci * (TILE + 4), 4 + ri * (TILE + CAPTION + 4)
                h, w = a.shape
                scale = TILE / max(h, w)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                sheet.paste(_heat(a, size), (x0, y0))
                r = spec.regions[reg]
                if r.box is not None:  # the region's box on the heatmap
                    t, l, b, rr = resolve_box(list(r.box), spec.height, spec.width, reg)
                    d.rectangle([x0 + l * size[0], y0 + t * size[1], x0 + rr * size[0] - 1, y0 + b * size[1] - 1],
                                outline=COLORS[reg % len(COLORS)], width=2)
                words = self.token_words[reg] if reg < len(self.token_words) else []
                name = words[ti] if ti < len(words) else f"token {ti + 1}"
                d.text((x0, y0 + size[1] + 2), _fit(d, f"{label} · region {reg + 1}", TILE, font), fill=(0, 0, 0),
                       font=font)
                d.text((x0, y0 + size[1] + 14), _fit(d, name, TILE, font), fill=COLORS[reg % len(COLORS)], font=font)
        return sheet

