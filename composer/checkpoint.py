"""Reading weight files safely and loading them strictly into our modules.

- ``.safetensors`` first: the library validates the container; we add clear messages (a renamed ``.ckpt``
  reads as "not a safetensors file", a short file as "truncated or corrupt"), a dtype allow-list and a
  finiteness check (formats.md §6).
- Pickles (``.ckpt``/``.pt``/``.pth``/``.bin``) only through ``torch.load(weights_only=True)`` (torch >= 2.10,
  which fixes the known bypasses), with zip member names checked and one stub class allow-listed (the
  pytorch_lightning ``ModelCheckpoint`` that real SD1 ``.ckpt`` files carry). Never an unsafe fallback.
- ``strict_load`` accounts for every key: a missing or unexpected key, or a shape mismatch, is an error
  naming the file, the key and both shapes; models are built on the meta device and weights are
  assigned, so loading needs about one copy of the weights.
"""
from __future__ import annotations

import json
import os
import re
import zipfile

import torch
import torch.nn as nn

from safetensors import SafetensorError
from safetensors.torch import safe_open
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file that cannot be used, with the file (and key) at fault in the message.

    ``hints`` maps a Python keyword named in the message (``"strict=False"``) to the command-line flag that does
    the same (``"--no-lora-strict"``); the CLIs print the flag (composer/cli.py)."""

    def __init__(self, message: str, hints: dict | None = None):
        super().__init__(message)
        self.hints = hints or {}


def _torch_version() -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


# --- pickles ---------------------------------------------------------------------------------------------

def _stub(module: str, name: str):
    """An empty class that stands in for a training-leftover class, so weights_only can rebuild it inertly."""
    cls = type(name, (), {"__module__": module, "__setstate__": lambda self, state: None})
    cls.__qualname__ = name
    return cls


_PICKLE_STUBS = [_stub("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]
_ZIP_MEMBER = re.compile(r"[^/]+/(data\.pkl|version|\.format_version|\.storage_alignment|byteorder|data/\d+|\.data/[\w.]+)")


def load_pickle(path: str) -> dict:
    """``torch.load(weights_only=True)`` with the allow-list; anything else is refused, never executed."""
    if _torch_version() < (2, 10):
        raise CheckpointError(f"{path}: reading pickled weights needs torch >= 2.10 (known weights_only bypasses "
                              f"before that); this is torch {torch.__version__}. Convert the file to .safetensors "
                              "elsewhere with `python -m weights_tools.convert`.")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            odd = [n for n in z.namelist() if not _ZIP_MEMBER.fullmatch(n)]
        if odd:
            raise CheckpointError(f"{path}: unexpected members in the torch zip archive: {odd[:5]}")
    try:
        with torch.serialization.safe_globals(_PICKLE_STUBS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError, RuntimeError on corrupt archives, ...
        msg = str(e).split("\n")[0] if "Unsupported" not in str(e) else \
            next((l for l in str(e).split("\n") if "Unsupported" in l or "GLOBAL" in l), str(e)[:200])
        raise CheckpointError(f"{path}: refused to load this pickle with weights_only=True (nothing in it was "
                              f"executed): {msg}") from None
    return obj


# --- safetensors ------------------------------------------------------------------------------------------

def load_safetensors(path: str, device: str = "cpu") -> tuple[dict, dict]:
    """-> (tensors, metadata). Errors say whether the file is not safetensors at all or is truncated."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short to be a .safetensors file (truncated or empty)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100_000_000 or n + 8 > size:
            first = b""
        else:
            header = f.read(n)
            first = header.lstrip(b" ")[:1]
    if n > 100_000_000 or (first != b"{" and n + 8 <= size):
        raise CheckpointError(f"{path}: not a safetensors file (bad header; a pickle or zip renamed to .safetensors?)")
    if n + 8 > size:
        raise CheckpointError(f"{path}: truncated or corrupt download (header says {n} bytes, file has {size})")
    try:
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated or corrupt download (tensor data ends at byte {8 + n + end}, "
                              f"file has {size})")
    try:
        out = {}
        with safe_open(path, framework="pt", device=device) as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        kind = "truncated or corrupt download" if "Incomplete" in str(e) or "InvalidHeader" in str(e) \
            else "corrupt safetensors file"
        raise CheckpointError(f"{path}: {kind} ({e})") from None
    return out, meta


# --- any weights file -------------------------------------------------------------------------------------

def unwrap(obj, path: str) -> dict:
    """Descend into ``state_dict`` (formats.md §1.1) and check we end on a flat {str: Tensor} dict."""
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, dict) and only and all(isinstance(v, torch.Tensor) for v in only.values()):
            obj = only
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries where weights were expected: {bad[:5]}")
    return obj


def read_weights(path: str) -> tuple[dict, dict]:
    """Any supported weights file -> (flat state dict, metadata)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return unwrap(load_pickle(path), path), {}
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, or a .ckpt/.pt/.pth/.bin pickle)")


def check_finite(sd: dict, source: str):
    bad = [k for k, v in sd.items() if v.dtype in FLOAT_DTYPES and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: non-finite (NaN/Inf) values in {len(bad)} tensor(s), e.g. {bad[:3]}")


def _diff_message(source, missing, unexpected, shapes):
    lines = [f"{source}: weights do not fit the model"]
    if missing:
        lines.append(f"  missing {len(missing)} key(s): {sorted(missing)[:8]}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): {sorted(unexpected)[:8]}")
    for k, (want, got) in list(shapes.items())[:8]:
        lines.append(f"  shape mismatch at {k}: model {tuple(want)} vs file {tuple(got)}")
    return "\n".join(lines)


ALIGNMENT = 64  # bytes: what torch's CPU allocator guarantees, and what vectorised CPU kernels assume


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy of it when its data is not on a 64-byte boundary.

    Tensors memory-mapped from a file start wherever the file's header left them (a safetensors header has
    any length), and CPU kernels (oneDNN, the vectorised GEMM and conv paths) take different code paths,
    with different rounding, depending on the address. Copying only the misaligned tensors keeps loading
    at about one copy of the weights while making results independent of the file's byte layout.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % ALIGNMENT:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def strict_load(model: nn.Module, sd: dict, source: str, *, dtype=None, device="cpu", names: dict | None = None):
    """Assign ``sd`` into a (meta-device) ``model``; every model key filled, every file key used.

    ``names`` optionally maps our key -> file key (the LDM table); errors are reported in file names.
    """
    names = names or {}
    want = {k: v.shape for k, v in model.state_dict().items()}
    file_key = {k: names.get(k, k) for k in want}
    missing = [file_key[k] for k in want if file_key[k] not in sd]
    used = set(file_key.values())
    unexpected = [k for k in sd if k not in used]
    shapes = {}
    out = {}
    for k, shape in want.items():
        fk = file_key[k]
        if fk not in sd:
            continue
        t = sd[fk]
        if t.shape != shape:
            if t.numel() == shape.numel() and t.ndim == 4 and len(shape) == 2:  # LDM VAE 1×1 conv -> Linear
                t = t.reshape(shape)
            else:
                shapes[fk] = (shape, t.shape)
                continue
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: {fk} has dtype {t.dtype}, expected a float tensor")
        out[k] = aligned(t.to(device=device, dtype=dtype or t.dtype))
    if missing or unexpected or shapes:
        raise CheckpointError(_diff_message(source, missing, unexpected, shapes))
    model.load_state_dict(out, strict=True, assign=True)
    return model


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
