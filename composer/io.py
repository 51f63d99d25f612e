"""Writing outputs so that nothing half-written is ever left behind, and the image metadata format.

Every file composer writes goes to a temporary name in the destination folder first and is renamed into place
(``os.replace`` is atomic on one filesystem), so an interrupted or failed run leaves either the old file or the
new one. Files get the permissions of an ordinary new file under the user's umask (0644 by default).

PNG metadata: the ``parameters`` text chunk is written the way AUTOMATIC1111's web UI writes it, so image
browsers and sites that read A1111 metadata show it::

    a cat and a dog in a garden
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 4, Size: 512x512, Model hash: 6ce0161689, Model: v1-5,
    Lora hashes: "cat: 1a2b3c4d5e6f, dog: 0f9e8d7c6b5a", Regions: 2, Region 1: "a <cat1> <cat2> | box 0 0 512 256",
    Region 2: "...", Version: composer 0.1.0

(one line after ``Negative prompt``; values that contain a comma are JSON-quoted, as A1111 does). A second chunk,
``composer``, holds the whole resolved spec as JSON; ``python -m composer.sample --spec image.png`` re-runs it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

PNG_SPEC_CHUNK = "composer"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any error removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None):
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_json(obj, path: str):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, default=str)


_HASHES: dict = {}


def file_sha256(path: str) -> str:
    """sha256 of a file (hex), cached per (path, size, mtime) so a batch hashes each model once."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# --- PNG metadata -------------------------------------------------------------------------------------------

SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "dpm++2m-karras": "DPM++ 2M Karras", "euler": "Euler",
                 "euler-a": "Euler a", "lcm": "LCM", "tcd": "TCD"}


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s) if ("," in s or ":" in s or "\n" in s or '"' in s) else s


def a1111_parameters(p: dict) -> str:
    """The A1111 ``parameters`` text for a resolved spec dict (see the module docstring)."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", SAMPLER_NAMES.get(p.get("sampler"), p.get("sampler"))),
              ("CFG scale", p.get("guidance")), ("Seed", p.get("seed")),
              ("Size", f"{p.get('width')}x{p.get('height')}")]
    model = p.get("model") or {}
    if model.get("sha256"):
        fields.append(("Model hash", model["sha256"][:10]))
    if model.get("name"):
        fields.append(("Model", model["name"]))
    loras = [l for l in p.get("loras", []) if l.get("sha256")]
    for r in p.get("regions", []):
        if isinstance(r.get("lora"), dict) and r["lora"].get("sha256"):
            loras.append(r["lora"])
    if p.get("background_lora") and isinstance(p["background_lora"], dict):
        loras.append(p["background_lora"])
    if loras:
        seen = dict.fromkeys(f"{l['name']}: {l['sha256'][:12]}" for l in loras)
        fields.append(("Lora hashes", ", ".join(seen)))
    regions = p.get("regions") or []
    if regions:
        fields.append(("Regions", len(regions)))
        for i, r in enumerate(regions, 1):
            box = r.get("box")
            where = f"box {' '.join(f'{v:g}' for v in box[:4])}" if box else "mask"
            fields.append((f"Region {i}", f"{r.get('prompt', '')} | {where}"))
    fields.append(("Version", f"composer {p.get('version', '')}".strip()))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image, path: str, params: dict | None = None):
    """Atomic PNG write; ``params`` (a resolved spec dict) goes into the A1111 ``parameters`` chunk and, whole,
    into the ``composer`` chunk."""
    info = PngInfo()
    if params is not None:
        info.add_text("parameters", a1111_parameters(params))
        info.add_text(PNG_SPEC_CHUNK, json.dumps(params, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_spec(path: str) -> dict:
    """The resolved spec stored in a composer PNG's ``composer`` chunk."""
    with Image.open(path) as im:
        text = im.text.get(PNG_SPEC_CHUNK) if hasattr(im, "text") else None
    if text is None:
        raise ValueError(f"{path}: this PNG has no '{PNG_SPEC_CHUNK}' metadata chunk (not written by composer, or "
                         "the metadata was stripped), so it cannot be re-run")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the '{PNG_SPEC_CHUNK}' chunk is not valid JSON ({e.msg})") from None
