"""LoRA files of every common format -> one canonical form -> merged weights or live adapters.

Formats (formats.md §3):
- kohya / A1111 (``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; LoCon convs and
  ``lora_mid``), scale alpha / rank (no alpha: 1). LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``) too.
- diffusers / PEFT (``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder.…``; scale lora_alpha / r
  from the file's ``lora_adapter_metadata`` or a raw PEFT ``adapter_config.json``; the old attn-procs
  ``…processor.to_q_lora.down.weight`` and ``lora_linear_layer`` spellings).
- Mix-of-Show ED-LoRA ``.pth`` (``{'params': {'new_concept_embedding', 'text_encoder', 'unet'}}``, both the
  ``.lora_down`` and ``_lora.down`` key styles), scale a bare alpha (default 1.0), plus layer-wise
  pseudo-word embeddings [16, C] (method.md §1, §3).

Stage 1 (``read_lora``) groups a file's tensors by source module and role without a model; stage 2
(``resolve``) matches each module to a layer of the loaded model through one table of every spelling
(diffusers and LDM paths), checks shapes, and computes the scale. Nothing is silently dropped: an
unmatched key is an error (or, on request, a warning that lists it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from . import convert
from .checkpoint import CheckpointError, load_pickle, load_safetensors
from .clip import CLIPTextConfig, CLIPTextModel
from .io import save_safetensors
from .layers import Adapter, Conv2d, lora_layers
from .unet import UNet, UNetConfig

log = logging.getLogger(__name__)

# (regex on the key's tail, role). Order matters: longer spellings first.
_ROLES = [
    (r"\.lora_down\.weight", "down"), (r"\.lora_up\.weight", "up"), (r"\.lora_mid\.weight", "mid"),
    (r"\.lora_A(?:\.default)?\.weight", "down"), (r"\.lora_B(?:\.default)?\.weight", "up"),
    (r"\.lora_A", "down"), (r"\.lora_B", "up"),
    (r"\.lora_linear_layer\.down\.weight", "down"), (r"\.lora_linear_layer\.up\.weight", "up"),
    (r"\.lora\.down\.weight", "down"), (r"\.lora\.up\.weight", "up"),
    (r"_lora\.down\.weight", "down"), (r"_lora\.up\.weight", "up"),
    (r"\.alpha", "alpha"),
    (r"\.(hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2)", None),
    (r"\.(lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)", None),
]
_REFUSED = {r"\.dora_scale": "DoRA (dora_scale)", r"\.diff(_b)?": "full-weight diff (diff/diff_b)",
            r"\.(w_norm|b_norm)": "norm-weight LyCORIS (w_norm/b_norm)", r"\.(a1|a2|b1|b2)\.weight": "GLoRA",
            r"\.oft_\w+": "OFT/BOFT", r"\.(oft_blocks|rescale)": "OFT/BOFT"}
_ROLE_RE = [(re.compile(f"(.+?){pat}$"), role) for pat, role in _ROLES]
_REFUSED_RE = [(re.compile(f".+{pat}$"), name) for pat, name in _REFUSED.items()]

CONVERT_KINDS = ("edlora2st", "kohya2peft", "peft2kohya")


@dataclass
class RawLoRA:
    """A LoRA file grouped by source module: {(namespace, module name): {role: tensor}}."""
    path: str
    kind: str
    modules: dict
    embeddings: dict = field(default_factory=dict)   # ED-LoRA pseudo-word -> [n_layers, C]
    metadata: dict = field(default_factory=dict)
    bare_alpha: float | None = None                   # ED-LoRA: scale = alpha, no division by rank


@dataclass
class LoRAModule:
    model: str          # "unet" | "text_encoder"
    path: str           # our module path
    source: str         # the file's module name, for reports
    adapter: Adapter    # factors with the scale folded into up (or a dense ΔW), fp32
    rank: int
    scale: float


@dataclass
class LoRA:
    path: str
    kind: str
    modules: list
    embeddings: dict
    unmatched: list
    triggers: list = field(default_factory=list)  # trigger words recorded in the file's metadata
    trigger_source: str | None = None

    def report(self) -> str:
        by = {}
        for m in self.modules:
            by[m.model] = by.get(m.model, 0) + 1
        s = f"{os.path.basename(self.path)}: {self.kind}, " + ", ".join(f"{n} {k} modules" for k, n in by.items())
        if self.embeddings:
            s += f", concept tokens {sorted(self.embeddings)}"
        if self.unmatched:
            s += f"; {len(self.unmatched)} unmatched: {self.unmatched[:5]}"
        return s


# --- stage 1: read and group -----------------------------------------------------------------------------

def detect_lora_format(sd: dict) -> str | None:
    keys = list(sd)
    if any(k.startswith("params.new_concept_embedding.") or k.startswith(("params.unet.", "params.text_encoder."))
           for k in keys):
        return "edlora"
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return "kohya-sdxl"
    if any(re.search(r"\.(hada_|lokr_)", k) for k in keys):
        return "lycoris"
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any(".lora_A" in k or ".lora_B" in k for k in keys):
        return "peft"
    if any(re.search(r"(_lora\.(down|up)\.weight|\.processor\.|lora_linear_layer)", k) for k in keys):
        return "diffusers-old"
    return None


def _group(sd: dict, path: str, namespace_of) -> dict:
    mods: dict = {}
    for k, v in sd.items():
        for rx, name in _REFUSED_RE:
            if rx.fullmatch(k):
                raise CheckpointError(f"{path}: {name} LoRA keys (e.g. {k!r}) are not supported")
        for rx, role in _ROLE_RE:
            m = rx.fullmatch(k)
            if m:
                mod = m[1]
                role = role or k[len(mod) + 1:]
                ns, name = namespace_of(mod)
                if name.endswith((".to_out", "_to_out")):  # old attn-procs spelling: to_out_lora -> to_out.0
                    name += ".0" if name.endswith(".to_out") else "_0"
                mods.setdefault((ns, name), {})[role] = v
                break
        else:
            raise CheckpointError(f"{path}: key {k!r} is not a LoRA tensor of any known format")
    return mods


def _ns_prefixed(mod: str):
    """Namespace and module name for kohya / PEFT / diffusers spellings."""
    mod = mod.replace(".processor.", ".")
    if mod.startswith("base_model.model."):
        mod = mod[len("base_model.model."):]
    for pre, ns in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("unet.", "unet"),
                    ("text_encoder.", "text_encoder")):
        if mod.startswith(pre):
            return ns, mod[len(pre):]
    return "?", mod


def read_lora(path: str) -> RawLoRA:
    """Read any supported LoRA file (no model needed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    meta = {}
    if path.endswith(".safetensors"):
        sd, meta = load_safetensors(path)
    elif path.endswith((".pth", ".pt", ".ckpt", ".bin")):
        obj = load_pickle(path)
        if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
            return _read_edlora(obj["params"], path, {})
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a LoRA file (expected a dict of tensors or an ED-LoRA 'params' dict, "
                                  f"found {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else ''})")
        sd = obj
    else:
        raise CheckpointError(f"{path}: unknown LoRA file type (expected .safetensors or .pth/.pt/.bin)")
    kind = detect_lora_format(sd)
    if kind == "kohya-sdxl":
        raise CheckpointError(f"{path}: an SDXL LoRA (lora_te1_/lora_te2_ keys): not for SD1.x")
    if kind == "edlora":
        return _read_edlora(_unflatten_edlora(sd), path, meta)
    if kind is None:
        raise CheckpointError(f"{path}: no LoRA keys found (not a kohya, PEFT, diffusers or ED-LoRA file)")
    if path.endswith("adapter_model.safetensors") or path.endswith("adapter_model.bin"):
        cfg = os.path.join(os.path.dirname(path), "adapter_config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                meta = {**meta, "peft_config": f.read()}
    return RawLoRA(path, kind, _group(sd, path, _ns_prefixed), metadata=meta)


def _unflatten_edlora(sd: dict) -> dict:
    params: dict = {"new_concept_embedding": {}, "text_encoder": {}, "unet": {}}
    for k, v in sd.items():
        _, ns, rest = k.split(".", 2)
        params.setdefault(ns, {})[rest] = v
    return params


def _read_edlora(params: dict, path: str, meta: dict) -> RawLoRA:
    unknown = set(params) - {"new_concept_embedding", "text_encoder", "unet"}
    if unknown:
        raise CheckpointError(f"{path}: unexpected ED-LoRA sections {sorted(unknown)}")
    emb = params.get("new_concept_embedding") or {}
    for w, e in emb.items():
        if not isinstance(e, torch.Tensor) or e.ndim != 2:
            raise CheckpointError(f"{path}: concept embedding {w!r} must be a [layers, C] tensor")
    mods: dict = {}
    for ns in ("text_encoder", "unet"):
        sd = params.get(ns) or {}
        if any(not k.endswith(("down.weight", "up.weight")) for k in sd):
            bad = next(k for k in sd if not k.endswith(("down.weight", "up.weight")))
            raise CheckpointError(f"{path}: {ns} holds {bad!r}, not a LoRA factor: a pre-merged full model "
                                  "(e.g. LoRA-Composer's combined_model_.pth) is not a LoRA; load it as a model")
        mods.update(_group(sd, path, lambda m, ns=ns: (ns, m)))
    alpha = float(meta.get("alpha", 1.0)) if meta else 1.0
    return RawLoRA(path, "edlora", mods, embeddings=dict(emb), metadata=meta, bare_alpha=alpha)


# --- stage 2: match to a model -------------------------------------------------------------------------

def target_table(unet, text_encoder) -> dict:
    """{(namespace, spelling): (model, path, layer)} for every adapter-capable layer, all spellings."""
    table = {}
    for path, layer in lora_layers(unet).items():
        for s in {path, path.replace(".", "_")}:
            table[("unet", s)] = ("unet", path, layer)
        try:
            ldm = convert.unet_key_to_ldm(path + ".weight", unet.cfg.layers_per_block, unet.cfg.attention_levels)
            table[("unet", ldm[: -len(".weight")].replace(".", "_"))] = ("unet", path, layer)
        except KeyError:
            pass
    for path, layer in lora_layers(text_encoder).items():
        short = path[len("text_model."):]
        for s in {path, short, path.replace(".", "_"), short.replace(".", "_")}:
            table[("text_encoder", s)] = ("text_encoder", path, layer)
    return table


def _peft_scale(meta: dict, ns: str, path: str, rank: int) -> float | None:
    cfg = None
    if "lora_adapter_metadata" in meta:
        full = json.loads(meta["lora_adapter_metadata"])
        pre = ns + "."
        cfg = {k[len(pre):]: v for k, v in full.items() if k.startswith(pre)} or \
              (full if "lora_alpha" in full else None)
    elif "peft_config" in meta:
        cfg = json.loads(meta["peft_config"])
    if not cfg or cfg.get("lora_alpha") is None:
        return None
    alpha = cfg["lora_alpha"]
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", path):
            alpha = a
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _fit(t: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """Reshape a factor between Linear [a, b] and 1×1 conv [a, b, 1, 1] forms when that is all that differs."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.numel() == math.prod(shape) and t.shape[:2] == tuple(shape[:2]):
        return t.reshape(shape)
    return None


def _lycoris_delta(roles: dict, wshape: tuple, alpha):
    """Dense ΔW for LoHa / LoKr (formats.md §3.3), before the user multiplier."""
    def mat(a, b, t=None):
        if t is not None:  # CP decomposition (LyCORIS rebuild)
            return torch.einsum("ijkl,jr,ip->prkl", t, b, a)
        return a.flatten(1) @ b.flatten(1) if a.ndim > 2 or b.ndim > 2 else a @ b
    if "hada_w1_a" in roles:
        r = roles["hada_w1_b"].shape[0]
        d = mat(roles["hada_w1_a"], roles["hada_w1_b"], roles.get("hada_t1")) * \
            mat(roles["hada_w2_a"], roles["hada_w2_b"], roles.get("hada_t2"))
        scale = (alpha / r) if alpha is not None else 1.0
        return d.reshape(wshape) * scale, r, scale
    w1 = roles["lokr_w1"] if "lokr_w1" in roles else roles["lokr_w1_a"] @ roles["lokr_w1_b"]
    if "lokr_w2" in roles:
        w2 = roles["lokr_w2"]
    elif "lokr_t2" in roles:
        w2 = torch.einsum("ijkl,ip,jr->prkl", roles["lokr_t2"], roles["lokr_w2_a"], roles["lokr_w2_b"])
    else:
        w2 = roles["lokr_w2_a"] @ roles["lokr_w2_b"]
    r = roles["lokr_w1_b"].shape[0] if "lokr_w1_b" in roles else (roles["lokr_w2_b"].shape[0] if "lokr_w2_b" in roles else None)
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    d = torch.kron(w1, w2).reshape(wshape)
    scale = (alpha / r) if (alpha is not None and r) else 1.0
    return d * scale, r or 0, scale


def resolve(raw: RawLoRA, table: dict, *, multiplier: float = 1.0, strict: bool = True,
            check_shapes: bool = True) -> LoRA:
    """Match grouped modules to layers, check shapes, compute scales; -> canonical LoRA (fp32 factors).
    ``check_shapes=False`` only renames (format conversion against SD1.5's module table)."""
    modules, unmatched = [], []
    for (ns, name), roles in raw.modules.items():
        hit = table.get((ns, name))
        if hit is None and ns == "?":
            hit = table.get(("unet", name)) or table.get(("text_encoder", name))
        if hit is None:
            unmatched.append(f"{ns}:{name}" if ns != "?" else name)
            continue
        model, path, layer = hit
        w = layer.weight
        roles = {k: v.float() for k, v in roles.items()}
        alpha = roles.pop("alpha", None)
        alpha = float(alpha) if alpha is not None else None
        if any(k.startswith(("hada_", "lokr_")) for k in roles):
            if not check_shapes:
                raise CheckpointError(f"{raw.path}: {name} is LoHa/LoKr; only plain LoRA/LoCon convert")
            d, rank, scale = _lycoris_delta(roles, tuple(w.shape), alpha)
            modules.append(LoRAModule(model, path, name, Adapter(None, None, dense=d * multiplier), rank, scale))
            continue
        if "down" not in roles or "up" not in roles:
            raise CheckpointError(f"{raw.path}: module {name!r} has {sorted(roles)} but needs both down and up factors")
        down, up, mid = roles["down"], roles["up"], roles.get("mid")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise CheckpointError(f"{raw.path}: rank mismatch at {name!r}: down {tuple(down.shape)} has rank {rank}, "
                                  f"up {tuple(up.shape)} has {up.shape[1]}")
        conv = isinstance(layer, Conv2d)
        k = tuple(w.shape[2:]) if conv else ()
        if mid is not None:
            want_d, want_m, want_u = (rank, w.shape[1], 1, 1), (rank, rank, *k), (w.shape[0], rank, 1, 1)
        else:
            want_d, want_m, want_u = ((rank, w.shape[1], *k) if conv else (rank, w.shape[1])), None, \
                                     ((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank))
        if check_shapes:
            d2, u2 = _fit(down, want_d), _fit(up, want_u)
            m2 = _fit(mid, want_m) if mid is not None else None
        else:
            d2, u2, m2 = down, up, mid
        if d2 is None or u2 is None or (mid is not None and m2 is None):
            bad, got, want = (("down", down, want_d) if d2 is None else ("up", up, want_u) if u2 is None else ("mid", mid, want_m))
            raise CheckpointError(f"{raw.path}: shape mismatch at {name!r}.{bad}: file {tuple(got.shape)} vs model "
                                  f"{model}.{path} {tuple(w.shape)} (expects {tuple(want)}); "
                                  "a LoRA for another base model (SD2.x/SDXL)?")
        if raw.bare_alpha is not None:
            scale = raw.bare_alpha
        elif raw.kind == "peft" and alpha is None:
            scale = _peft_scale(raw.metadata, model, path, rank)
            scale = 1.0 if scale is None else scale
        else:
            scale = (alpha / rank) if alpha else 1.0
        modules.append(LoRAModule(model, path, name, Adapter(d2, u2 * (scale * multiplier), m2), rank, scale))
    if unmatched and strict:
        raise CheckpointError(f"{raw.path}: {len(unmatched)} LoRA module(s) match no layer of the loaded model, e.g. "
                              f"{unmatched[:5]} (strict=False loads the rest with a warning)",
                              hints={"strict=False": "--no-lora-strict"})
    if unmatched:
        log.warning("%s: %d unmatched LoRA module(s) ignored: %s", raw.path, len(unmatched), unmatched)
    if not modules and not raw.embeddings:
        raise CheckpointError(f"{raw.path}: no LoRA module matched the loaded model")
    triggers, source = trigger_words(raw.metadata)
    return LoRA(raw.path, raw.kind, modules, dict(raw.embeddings), unmatched, triggers, source)


def delta_weight(a: Adapter, wshape: tuple) -> torch.Tensor:
    """ΔW in fp32 from an adapter (scale already folded in)."""
    if a.dense is not None:
        return a.dense.float().reshape(wshape)
    down, up = a.down.float(), a.up.float()
    if a.mid is not None:  # Tucker: ΔW[o,i] = Σ up[o,a] mid[a,b] down[b,i]
        return torch.einsum("oa,abhw,bi->oihw", up.flatten(1), a.mid.float(), down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(wshape)


# --- applying -----------------------------------------------------------------------------------------

class LoRASet:
    """What a Pipeline has loaded: merged LoRAs (with the original weights kept for an exact unmerge),
    live adapters, and ED-LoRA concept embeddings."""

    def __init__(self):
        self.merged: dict = {}      # name -> {layer: original weight}
        self.live: dict = {}        # name -> [layers]
        self.loras: dict = {}       # name -> LoRA
        self.concepts: dict = {}    # pseudo-word -> (lora name, [L, C] tensor)

    def merge(self, name: str, lora: LoRA, layers: dict):
        saved = {}
        try:
            with torch.no_grad():
                for m in lora.modules:
                    layer = layers[(m.model, m.path)]
                    if layer not in saved:
                        saved[layer] = layer.weight.detach().clone()
                    d = delta_weight(m.adapter, tuple(layer.weight.shape))
                    layer.weight.copy_((layer.weight.float() + d.to(layer.weight.device)).to(layer.weight.dtype))
        except Exception:
            self._restore(saved)
            raise
        self.merged[name] = saved

    def _restore(self, saved: dict):
        with torch.no_grad():
            for layer, w in saved.items():
                layer.weight.copy_(w)

    def attach(self, name: str, lora: LoRA, layers: dict, *, activate: bool):
        touched = []
        for m in lora.modules:
            layer = layers[(m.model, m.path)]
            w = layer.weight
            cast = lambda t: None if t is None else t.to(device=w.device, dtype=w.dtype)
            a = m.adapter
            layer.adapters[name] = Adapter(cast(a.down), cast(a.up), cast(a.mid), cast(a.dense))
            if activate:
                layer.active = layer.active + (name,)
            touched.append(layer)
        self.live[name] = touched

    def remove(self, name: str):
        if name in self.merged:
            self._restore(self.merged.pop(name))
        for layer in self.live.pop(name, []):
            layer.adapters.pop(name, None)
            layer.active = tuple(n for n in layer.active if n != name)
        self.loras.pop(name, None)
        for w in [w for w, (n, _) in self.concepts.items() if n == name]:
            del self.concepts[w]


_TRIGGER_KEYS = ("modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "trigger", "activation text",
                 "activation_text", "ss_trigger_words")


def trigger_words(metadata: dict) -> tuple[list, str | None]:
    """A community LoRA's trigger words from its safetensors metadata -> (words, where they came from).

    In order: an explicit field (``modelspec.trigger_phrase``, or a ``trigger``/``activation text`` style key; a
    comma-separated list), else kohya's training metadata ``ss_tag_frequency`` ({dataset: {tag: count}}): the
    most frequent tags (a trigger word is in every caption, so it has the top count; ties are all kept, at most 5).
    """
    lower = {k.lower(): v for k, v in (metadata or {}).items()}
    for key in _TRIGGER_KEYS:
        v = lower.get(key)
        if isinstance(v, str) and v.strip():
            try:  # some tools store a JSON list
                parsed = json.loads(v)
                words = [str(w) for w in parsed] if isinstance(parsed, list) else [v]
            except json.JSONDecodeError:
                words = [v]
            words = [w.strip() for x in words for w in x.split(",") if w.strip()]
            if words:
                return words, key
    freq = lower.get("ss_tag_frequency")
    if isinstance(freq, str) and freq.strip():
        try:
            data = json.loads(freq)
        except json.JSONDecodeError:
            return [], None
        counts: dict = {}
        for tags in (data.values() if isinstance(data, dict) else ()):
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[tag.strip()] = counts.get(tag.strip(), 0) + n
        if counts:
            top = max(counts.values())
            return sorted((t for t, n in counts.items() if n == top and t), key=lambda t: (-len(t), t))[:5], \
                "ss_tag_frequency"
    return [], None


def describe_lora(path: str) -> str:
    """Human summary for weights_tools.inspect: format, targets, ranks, alphas, concept tokens."""
    raw = read_lora(path)
    lines = [f" format: {raw.kind}"]
    by_ns: dict = {}
    for (ns, name), roles in raw.modules.items():
        by_ns.setdefault(ns, []).append((name, roles))
    for ns, mods in by_ns.items():
        ranks = sorted({int(r["down"].shape[0]) for _, r in mods if "down" in r})
        alphas = sorted({round(float(r["alpha"]), 4) for _, r in mods if "alpha" in r})
        kinds = sorted({"conv" if r.get("down", torch.zeros(1, 1)).ndim == 4 else "linear" for _, r in mods})
        lines.append(f" {ns}: {len(mods)} modules ({'/'.join(kinds)}), ranks {ranks}"
                     + (f", alphas {alphas}" if alphas else "") + f", e.g. {mods[0][0]}")
    if raw.bare_alpha is not None:
        lines.append(f" scale: bare alpha {raw.bare_alpha} (ED-LoRA: no division by rank)")
    if "lora_adapter_metadata" in raw.metadata or "peft_config" in raw.metadata:
        lines.append(" PEFT config present (lora_alpha / r from metadata)")
    if raw.embeddings:
        lines.append(" concept tokens: " + ", ".join(f"{w} {tuple(e.shape)}" for w, e in raw.embeddings.items()))
    words, source = trigger_words(raw.metadata)
    if words:
        lines.append(f" trigger words: {', '.join(repr(w) for w in words)} (from {source})")
    elif raw.kind != "edlora":
        lines.append(" trigger words: none recorded in the file's metadata")
    return "\n".join(lines)


# --- conversions (weights_tools.convert) ----------------------------------------------------------------

def _sd15_table():
    with torch.device("meta"):
        return target_table(UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig()))


def convert_lora_cli(kind: str, src: str, dst: str):
    """edlora2st: an ED-LoRA .pth -> its safetensors form (everything kept). kohya2peft / peft2kohya: rename
    between conventions, every module and the file's metadata kept; a file with something the target cannot carry
    (ED-LoRA pseudo-word embeddings, LoHa/LoKr/Tucker factors) is refused, naming it."""
    raw = read_lora(src)
    if kind == "edlora2st":
        if raw.kind != "edlora":
            raise CheckpointError(f"{src}: edlora2st needs an ED-LoRA file, this is {raw.kind}")
        params = _load_edlora_params(src)
        out = {f"params.{ns}.{k}": v.contiguous() for ns, d in params.items() for k, v in d.items()}
        meta = {"format": "pt", "edlora": "1", "alpha": str(raw.bare_alpha),
                "tokens": json.dumps(sorted(raw.embeddings))}
        save_safetensors(out, dst, meta)
        return
    if raw.embeddings:
        raise CheckpointError(f"{src}: an ED-LoRA with pseudo-word embeddings {sorted(raw.embeddings)}; a "
                              f"{'PEFT' if kind == 'kohya2peft' else 'kohya'} file cannot carry them (nor the bare "
                              "alpha scale). Use edlora2st to convert it to safetensors instead")
    want = {"kohya2peft": ("kohya", "lycoris", "diffusers-old"), "peft2kohya": ("peft", "diffusers-old")}[kind]
    if raw.kind not in want:
        raise CheckpointError(f"{src}: {kind} reads {' / '.join(want)} files, this is {raw.kind}")
    lora = resolve(raw, _sd15_table(), check_shapes=False)
    out = {}
    for m in lora.modules:
        a = m.adapter
        if a.dense is not None or a.mid is not None:
            raise CheckpointError(f"{src}: {m.source} is LoHa/LoKr/Tucker; only plain LoRA/LoCon convert")
        if kind == "kohya2peft":
            base = f"{m.model}.{m.path}"
            out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = a.down, a.up  # scale folded into B
        else:
            base = ("lora_unet_" if m.model == "unet" else "lora_te_") + m.path.replace(".", "_")
            out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = a.down, a.up
            out[base + ".alpha"] = torch.tensor(float(m.rank))  # alpha = rank: scale 1, already folded
    n_in = sum(len([r for r in roles if r != "alpha"]) for roles in raw.modules.values())
    n_out = sum(1 for k in out if not k.endswith(".alpha"))
    if n_out != n_in:  # every factor of the source must be in the output
        raise CheckpointError(f"{src}: {n_in} LoRA factors in, {n_out} out: refusing an incomplete conversion")
    meta = {k: v for k, v in raw.metadata.items() if k not in ("lora_adapter_metadata", "peft_config")}
    meta.update({"format": "pt", "converted_from": os.path.basename(src), "converted_by": f"weights_tools {kind}"})
    save_safetensors({k: v.contiguous() for k, v in out.items()}, dst, meta)


def _load_edlora_params(src: str) -> dict:
    if src.endswith(".safetensors"):
        return _unflatten_edlora(load_safetensors(src)[0])
    return load_pickle(src)["params"]
