"""python -m composer.evaluate --results DIR --refs REFDIR --clip CLIP_DIR — the paper's CLIP metrics (method.md §14).

For every image of a batch (``DIR/<job>/<seed>.png`` + sidecar, as written by ``--jobs``) and every region of
its spec, the region's pixel box is cropped and embedded with CLIP (ViT-B/32 in the paper):
- I = max(cos(crop, ref), 0) against the concept's reference images, both the corrected mean over all
  references (``I``) and the official script's effective variant, the first reference only (``I_first``);
- T = CLIPScore 2.5·max(cos(crop, text), 0) against "A photo depicts a {class}".
Concept of a region = its LoRA file's stem; references in ``REFDIR/<concept>/`` (images, sorted by name) and
its class word in ``REFDIR/<concept>/class.txt`` (default: the concept name). Scores are averaged per concept,
then per setting (= job), as the paper does. Output: a CSV per image/region and a markdown summary.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

from PIL import Image
from .cli import run
from .clip_model import CLIPModel, preprocess
from .io import atomic_path
from .spec import resolve_box
from .tokenizer import CLIPTokenizer

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def scores(img: torch.Tensor, refs: torch.Tensor, text: torch.Tensor) -> dict:
    """img [P], refs [n, P], text [P] (unnormalised features) -> I (mean over refs), I_first, T."""
    f = lambda x: x / x.norm(dim=-1, keepdim=True)
    i, r, t = f(img.float()), f(refs.float()), f(text.float())
    cos_r = (r @ i).clamp(min=0)
    return {"I": cos_r.mean().item(), "I_first": cos_r[0].item(), "T": 2.5 * max((t @ i).item(), 0.0)}


def concept_of(region: dict) -> str:
    lora = region.get("lora")
    if isinstance(lora, dict):  # a recorded reference {name, path, sha256}
        lora = lora.get("name") or lora.get("path")
    if lora:
        return os.path.splitext(os.path.basename(lora))[0]
    words = [w.strip("<>").rstrip("0123456789") for w in region.get("prompt", "").split() if w.startswith("<")]
    return words[0] if words else "unknown"


def summarize(rows: list) -> dict:
    """{setting: {concept: {I, I_first, T}}} means, then per-setting means and the overall mean of settings."""
    per: dict = {}
    for r in rows:
        per.setdefault(r["job"], {}).setdefault(r["concept"], []).append(r)
    out = {"settings": {}}
    for job, concepts in per.items():
        cm = {c: {k: sum(x[k] for x in xs) / len(xs) for k in ("I", "I_first", "T")} for c, xs in concepts.items()}
        out["settings"][job] = {"concepts": cm, **{k: sum(v[k] for v in cm.values()) / len(cm) for k in ("I", "I_first", "T")}}
    s = out["settings"].values()
    out.update({k: sum(v[k] for v in s) / len(s) for k in ("I", "I_first", "T")} if s else {})
    return out


def markdown(summary: dict) -> str:
    lines = ["| setting | concepts | I (all refs) | I (first ref, official) | T (CLIPScore) |", "|---|---|---|---|---|"]
    for job, v in summary["settings"].items():
        lines.append(f"| {job} | {len(v['concepts'])} | {v['I']:.4f} | {v['I_first']:.4f} | {v['T']:.4f} |")
    if summary["settings"]:
        lines.append(f"| **mean** | | **{summary['I']:.4f}** | **{summary['I_first']:.4f}** | **{summary['T']:.4f}** |")
    return "\n".join(lines) + "\n"


def evaluate(results: str, refs: str, clip_path: str, *, device="cpu", batch=32, tokenizer=None):
    model = CLIPModel.load(clip_path, device=device)
    tok = CLIPTokenizer.from_file(tokenizer or clip_path)

    @torch.no_grad()
    def embed_images(ims):
        return torch.cat([model.image_features(preprocess(ims[i:i + batch]).to(device)) for i in range(0, len(ims), batch)])

    ref_cache, text_cache, rows = {}, {}, []
    for job in sorted(os.listdir(results)):
        jd = os.path.join(results, job)
        if not os.path.isdir(jd):
            continue
        for fn in sorted(os.listdir(jd), key=lambda x: (len(x), x)):
            if not fn.endswith(".json"):
                continue
            side = json.load(open(os.path.join(jd, fn)))
            png = os.path.join(jd, fn[:-5] + ".png")
            if not os.path.exists(png):
                continue
            spec = side["spec"]
            img = Image.open(png).convert("RGB")
            H, W = spec["height"], spec["width"]
            for ri, reg in enumerate(spec.get("regions") or []):
                c = concept_of(reg)
                if c not in ref_cache:
                    d = os.path.join(refs, c)
                    files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXT)) if os.path.isdir(d) else []
                    if not files:
                        raise FileNotFoundError(f"no reference images for concept {c!r} in {d}")
                    ref_cache[c] = embed_images([Image.open(os.path.join(d, f)) for f in files])
                    cls = open(os.path.join(d, "class.txt")).read().strip() if os.path.exists(os.path.join(d, "class.txt")) else c
                    ids = tok([f"A photo depicts a {cls}"]).to(device)
                    with torch.no_grad():
                        text_cache[c] = (cls, model.text_features(ids)[0])
                t, l, b, r = resolve_box(list(reg["box"]), H, W, ri) if reg.get("box") else (0, 0, 1, 1)
                crop = img.crop((round(l * W), round(t * H), round(r * W), round(b * H)))
                s = scores(embed_images([crop])[0], ref_cache[c], text_cache[c][1])
                rows.append({"job": job, "seed": side.get("seed"), "region": ri, "concept": c,
                             "class": text_cache[c][0], **s})
    return rows, summarize(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m composer.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="the --out-dir of a --jobs run")
    ap.add_argument("--refs", required=True, help="REFDIR/<concept>/ reference images (+ class.txt)")
    ap.add_argument("--clip", required=True, help="a transformers CLIPModel folder (e.g. clip-vit-base-patch32)")
    ap.add_argument("--tokenizer", help="tokenizer files (default: the CLIP folder's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="output prefix (default: RESULTS/clip_scores)")
    a = ap.parse_args(argv)
    for flag, path in (("--results", a.results), ("--refs", a.refs), ("--clip", a.clip)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: the path does not exist")
        if flag != "--clip" and not os.path.isdir(path):
            raise NotADirectoryError(f"{flag} {path}: not a folder")
    rows, summary = evaluate(a.results, a.refs, a.clip, device=a.device, tokenizer=a.tokenizer)
    prefix = a.out or os.path.join(a.results, "clip_scores")
    with atomic_path(prefix + ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["job", "seed", "region", "concept", "class", "I", "I_first", "T"])
            w.writeheader()
            w.writerows(rows)
    md = markdown(summary)
    with atomic_path(prefix + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write(md)
    print(md)
    print(f"wrote {prefix}.csv and {prefix}.md ({len(rows)} region crops)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run("python -m composer.evaluate", main))
