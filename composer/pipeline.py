"""The Pipeline: UNet + text encoder + VAE + tokenizer + scheduler config, and the one denoising loop.

``generate`` reproduces diffusers' ``StableDiffusionPipeline`` for the same seed: the initial latent is
``torch.randn((1, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))``, CFG runs as one
batch [uncond, cond] with ``eps = u + g·(c − u)`` (Ho & Salimans 2022), latents stay fp32 between steps,
and every step's latent is checked for NaN/Inf (formats.md §7).

Several seeds run as one batch (``seed=[...]`` or ``num_images=N``): image b has its own initial latent from its own
CPU generator (what a single run with that seed draws) and stochastic samplers draw its noise from that generator
alone, so image b of a batch is the single run with seed b (up to the last bits batched matmuls may round
differently). The CFG batch is then [uncond × B; cond × B]; ``batch_size`` caps the images per UNet batch.

:meth:`Pipeline.denoise` is the only sampler loop: plain generation calls it bare; composition
(composer/compose.py) passes the region attention and the latent optimiser as explicit, optional parts of
each step, so a change to sampling is made once.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch
from PIL import Image

from .attention import REGION_BACKEND, check_backend
from .checkpoint import CheckpointError
from .io import file_sha256
from .layers import lora_layers
from .lora import LoRASet, read_lora, resolve, target_table
from .schedulers import SchedulerConfig, make_sampler
from .spec import check_size, resolve_seeds
from .vae import auto_tile

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def expand_context(context: torch.Tensor, n: int) -> torch.Tensor:
    """A CFG context for one image, [N, 77, C] or per layer [L, N, 77, C] (N = 2: [uncond; cond], or 1: cond),
    -> the same for n images, each row repeated n times in place: [uncond × n; cond × n] ([N·n, 77, C]), the
    layout :meth:`Pipeline.eps` splits into halves."""
    return context if n == 1 else context.repeat_interleave(n, dim=context.ndim - 3)


def check_batch_size(batch_size):
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"'batch_size' must be an integer >= 1 (or None: all images in one batch), got {batch_size!r}")


def chunks(seeds: list, batch_size: int | None) -> list:
    """Seeds in groups of at most ``batch_size`` (None: one group), in order."""
    check_batch_size(batch_size)
    n = batch_size or len(seeds)
    return [seeds[i:i + n] for i in range(0, len(seeds), n)]


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> PIL images (diffusers' rounding: (x/2 + 0.5).clamp(0, 1) · 255, round)."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


class Pipeline:
    def __init__(self, unet, text_encoder, vae, tokenizer, scheduler_config: SchedulerConfig, *,
                 dtype=torch.float32, device=torch.device("cpu"), attention: str = "sdpa", source: dict | None = None):
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        self.scheduler_config = scheduler_config
        self.dtype, self.device = dtype, torch.device(device)
        self.attention = check_backend(attention)
        self.source = source or {"name": "in-memory"}  # what the model was loaded from (name, path, sha256)
        for m in (unet, text_encoder, vae):
            m.requires_grad_(False)
        self.loras = LoRASet()
        self.base_vocab = text_encoder.cfg.vocab_size
        # encoded-prompt cache for batches (composer/batch.py); 0 disables it. Cleared whenever LoRAs change.
        self.prompt_cache_mb = 0.0
        self._prompt_cache: dict = {}
        # T2I-Adapters and ControlNets by (kind, file), loaded on first use (composer/conditions.py)
        self.condition_models: dict = {}

    def model_record(self) -> dict:
        """What the model is, for image metadata: name and path, plus the sha256 of a single file (A1111's
        "Model hash" is its first 10 hex digits)."""
        rec = {k: v for k, v in self.source.items() if k in ("name", "path")}
        if self.source.get("kind") == "single file":
            rec["sha256"] = file_sha256(self.source["path"])
        return rec

    # --- attention backend -------------------------------------------------------------------------------

    @property
    def region_backend(self) -> str:
        """The kernels/ backend for LoRA-Composer's masked attention that goes with :attr:`attention`."""
        return REGION_BACKEND[self.attention]

    def set_attention(self, backend: str):
        """Switch every model's attention backend (and with it the region kernels)."""
        self.attention = check_backend(backend)
        for m in (self.unet, self.text_encoder, self.vae, *self.condition_models.values()):
            for mod in m.modules():
                if hasattr(mod, "backend") and isinstance(mod.backend, str):
                    mod.backend = backend

    # --- LoRAs ------------------------------------------------------------------------------------------------

    def _layers(self):
        return {**{("unet", p): l for p, l in lora_layers(self.unet).items()},
                **{("text_encoder", p): l for p, l in lora_layers(self.text_encoder).items()}}

    def load_lora(self, path, scale: float = 1.0, name: str | None = None, *, mode: str = "merge",
                  strict: bool = True):
        """Load a LoRA of any supported format (composer/lora.py).

        mode ``"merge"``: W ← W + scale·ΔW in fp32 (``unload_lora`` restores W bit-exactly);
        ``"live"``: base weights untouched, the adapter runs in every forward;
        ``"region"``: attached but only used where a call selects it (LoRA-Composer's per-region concepts).
        ED-LoRA pseudo-words become usable in prompts. Returns the canonical LoRA (``.report()``).
        """
        if mode not in ("merge", "live", "region"):
            raise ValueError(f"mode must be 'merge', 'live' or 'region', got {mode!r}")
        name = name or os.path.splitext(os.path.basename(str(path)))[0]
        if name in self.loras.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; pass name=... or unload it first")
        raw = read_lora(path)
        lora = resolve(raw, target_table(self.unet, self.text_encoder), multiplier=scale, strict=strict)
        n_layers = len(self.unet.transformer_blocks())
        for word, emb in lora.embeddings.items():
            if word in self.loras.concepts:
                raise CheckpointError(f"{path}: pseudo-word {word!r} is already defined by LoRA "
                                      f"{self.loras.concepts[word][0]!r}")
            if tuple(emb.shape) != (n_layers, self.text_encoder.cfg.hidden_size):
                raise CheckpointError(f"{path}: embedding of {word!r} has shape {tuple(emb.shape)}, the model needs "
                                      f"({n_layers}, {self.text_encoder.cfg.hidden_size}) (one row per cross-attention layer)")
        layers = self._layers()
        if mode == "merge":
            self.loras.merge(name, lora, layers)
        else:
            self.loras.attach(name, lora, layers, activate=(mode == "live"))
        self.loras.loras[name] = lora
        if lora.embeddings:
            self.tokenizer.add_tokens(list(lora.embeddings))
            for word, emb in lora.embeddings.items():
                self.loras.concepts[word] = (name, emb.to(self.device, self.dtype))
        self._prompt_cache.clear()
        log.info("loaded %s", lora.report())
        return lora

    def unload_lora(self, name: str):
        if name not in self.loras.loras:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loras.loras)})")
        self.loras.remove(name)
        self._prompt_cache.clear()

    # --- building blocks --------------------------------------------------------------------------------

    def check_pseudo_words(self, prompts):
        for p in prompts:
            for w in re.findall(r"<[^<>\s]+>", p):
                if w not in self.loras.concepts and w not in ("<|startoftext|>", "<|endoftext|>"):
                    raise ValueError(f"prompt {p!r} names pseudo-word {w} that no loaded LoRA defines "
                                     f"(loaded: {sorted(self.loras.concepts) or 'none'})")

    @torch.no_grad()
    def encode_prompt(self, prompts, adapter=None) -> torch.Tensor:
        """list of prompts -> context [B, 77, C], or [L, B, 77, C] (one per cross-attention layer) when a prompt
        uses ED-LoRA pseudo-words: encoding l substitutes row l of each pseudo-word's embedding (method.md §3);
        the L passes run as one batch. ``adapter`` selects a live/region LoRA of the text encoder."""
        if isinstance(prompts, str):
            prompts = [prompts]
        key = (tuple(prompts), adapter if not isinstance(adapter, list) else tuple(adapter))
        if self.prompt_cache_mb and key in self._prompt_cache:
            hit = self._prompt_cache.pop(key)
            self._prompt_cache[key] = hit  # most recently used last
            return hit
        out = self._encode(prompts, adapter)
        if self.prompt_cache_mb:
            self._prompt_cache[key] = out
            budget = self.prompt_cache_mb * 2**20
            while sum(t.numel() * t.element_size() for t in self._prompt_cache.values()) > budget and len(self._prompt_cache) > 1:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return out

    def _encode(self, prompts, adapter):
        self.check_pseudo_words(prompts)
        ids = self.tokenizer(prompts).to(self.device)
        pseudo = ids >= self.base_vocab
        if not pseudo.any():
            return self.text_encoder(ids, adapter=adapter)
        L = len(self.unet.transformer_blocks())
        emb = self.text_encoder.embed(ids.clamp(max=self.base_vocab - 1))  # [B, 77, C]
        b, n, c = emb.shape
        embs = emb[None].repeat(L, 1, 1, 1)  # [L, B, 77, C]
        words = [self.tokenizer.tok.id_to_token(int(i)) for i in ids[pseudo]]
        rows = torch.stack([self.loras.concepts[w][1] for w in words])  # [P, L, C]
        embs[:, pseudo] = rows.transpose(0, 1).to(embs.dtype)
        out = self.text_encoder(inputs_embeds=embs.reshape(L * b, n, c), adapter=adapter)
        return out.reshape(L, b, n, -1)

    def initial_latent(self, seed: int, height: int, width: int) -> tuple:
        """(N(0, I) noise [1, 4, H/8, W/8], the generator it came from: later noise draws continue it)."""
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32).to(self.device), g

    def initial_latents(self, seeds, height: int, width: int) -> tuple:
        """(noise [B, 4, H/8, W/8], [B generators]): image b is exactly ``initial_latent(seeds[b], ...)``, one CPU
        generator per seed (its later draws continue it, see :meth:`denoise`)."""
        pairs = [self.initial_latent(s, height, width) for s in seeds]
        return torch.cat([p[0] for p in pairs]), [p[1] for p in pairs]

    def eps(self, x, t, context, guidance, conditions=None, **unet_kw):
        """One CFG evaluation: context is [uncond; cond] (2B) when guidance > 1, else cond only.
        context is [N, 77, C] or per layer [L, N, 77, C]. ``conditions``: this step's image conditions
        (composer/conditions.py ``StepConditions``), applied to the whole batch, so to both CFG halves."""
        cfg = context.shape[-3] == 2 * x.shape[0]
        xin = (torch.cat([x, x]) if cfg else x).to(self.dtype)
        if conditions is not None:
            unet_kw = {**unet_kw, **conditions.residuals(xin, t, context, cfg=cfg)}
        e = self.unet(xin, t, context, **unet_kw).float()
        if cfg:
            u, c = e.chunk(2)
            return u + guidance * (c - u)
        return e

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (VAE in its own dtype, fp32 by default).

        ``tile``: None (default) tiles automatically, only above 768² pixels of area (composer/vae.py ``auto_tile``:
        tiles of at most 64 latent cells = 512 px); 0 never tiles; N > 0 decodes overlapping tiles of at most N×N
        latent cells, blended with linear ramps over ``overlap`` cells (default N // 4). Tiling bounds the decoder's
        memory by the tile but changes the image slightly (per-tile GroupNorm and attention; composer/vae.py)."""
        vdtype = next(self.vae.parameters()).dtype
        if tile is None:
            tile = auto_tile(*latents.shape[-2:])
        img = self.vae.decode(latents.to(vdtype) / self.vae.scaling_factor, tile=tile, overlap=overlap)
        if not torch.isfinite(img).all():
            if vdtype != torch.float32:
                log.warning("VAE produced NaN/Inf in %s; retrying in fp32", vdtype)
                self.vae.float()
                img = self.vae.decode(latents.float() / self.vae.scaling_factor, tile=tile, overlap=overlap)
                self.vae.to(vdtype)
            if not torch.isfinite(img).all():
                raise NonFiniteError("VAE decode produced NaN/Inf (a bug or broken weights)")
        return img.float()

    def decode_images(self, latents: torch.Tensor, batch_size: int | None = None, tile: int | None = None) -> list:
        """Latents [B, 4, h, w] -> B PIL images, decoded in groups of at most ``batch_size`` (the VAE's memory);
        ``tile`` as in :meth:`decode`."""
        return [im for g in chunks(list(range(latents.shape[0])), batch_size)
                for im in to_pil(self.decode(latents[g[0]:g[-1] + 1], tile=tile))]

    # --- the denoising loop --------------------------------------------------------------------------------

    def make_sampler(self, name: str, steps: int, *, eta: float | None = None, schedule: str = "current"):
        """``schedule="official"`` gives DPM-Solver++ with diffusers 0.14's timesteps and final step (method.md §10)."""
        final = "official" if schedule == "official" and name == "dpm++2m" else "zero"
        return make_sampler(name, self.scheduler_config, steps, eta=eta, final=final)

    def denoise(self, noise, sch, context, guidance: float, *, generator=None, regions=None, optimiser=None,
                conditions=None, callback=None):
        """The one sampler loop. ``noise`` [B, 4, h, w] ~ N(0, I) (fp32) is the seeded initial latent (possibly
        re-initialised); the loop starts from noise·init_noise_sigma. ``context`` is [uncond; cond] when
        guidance > 1, else cond only (either may be per layer, [L, N, 77, C]); for B images it is
        [uncond × B; cond × B] (:func:`expand_context`). ``generator``: one generator, or a list of B, one per image
        (stochastic samplers then draw each image's noise from its own).

        Optional parts of each step, in order:
        - ``optimiser``: ``optimiser.step(i, t, x, sch) -> x`` updates the latent before the CFG pass
          (LoRA-Composer's test-time optimisation, method.md §7-8) and reports each image's loss in
          ``optimiser.last`` (a list, None for an image it did not optimise at this step; None when none);
        - ``regions``: the region attention state (composer/regions.py) used by the CFG pass (§4, §5);
        - ``conditions``: T2I-Adapters / ControlNets (composer/conditions.py ``Conditions``), those active at step i
          applied in the CFG pass (the optimiser applies them in its loss pass).
        The UNet sees ``sch.scale_model_input(i, x)`` at ``sch.timesteps[i]`` (fractional for σ-interpolated
        schedules). ``callback(i, n, **info)`` is called after every step.
        """
        x = noise * sch.init_noise_sigma
        n = len(sch.timesteps)
        for i, t in enumerate(sch.timesteps):
            post = {}
            if optimiser is not None:
                x = optimiser.step(i, t, x, sch)
                if optimiser.last is not None:
                    post["loss"] = " ".join(f"{v:.3f}" for v in optimiser.last if v is not None)
            with torch.no_grad():
                kw = {}
                if regions is not None:
                    kw["regions"] = regions.for_batch(("uncond", "cond") if context.shape[-3] == 2 * x.shape[0]
                                                      else ("cond",), store=False, images=x.shape[0])
                if conditions is not None:
                    kw["conditions"] = conditions.at(i, n)
                e = self.eps(sch.scale_model_input(i, x), t, context, guidance, **kw)
                x = sch.step(i, e, x, generator=generator)
            if not torch.isfinite(x).all():
                raise NonFiniteError(f"latent became NaN/Inf at step {i} (t={float(t):g})")
            if callback is not None:
                callback(i, n, **post)
        return x

    @torch.no_grad()
    def sample_latents(self, prompt: str, *, negative_prompt: str = "", height: int = 512, width: int = 512,
                       steps: int = 50, guidance: float = 7.5, seed=0, num_images: int | None = None,
                       batch_size: int | None = None, sampler: str = "ddim", eta: float | None = None,
                       conditions=None, callback=None) -> torch.Tensor:
        """-> latents [B, 4, H/8, W/8], one per seed, in order.

        ``seed``: an int, or a list of ints (one image each); ``num_images=N`` with an int seed s runs seeds
        s, s+1, …, s+N-1. Image b equals the single run with its seed. ``batch_size`` caps the images per UNet
        batch (None: all at once); the seeds are run in consecutive groups of that size, each with a fresh
        sampler. ``conditions``: a list of T2I-Adapter / ControlNet entries ({"kind", "model", "image", "weight",
        "start", "end", "guess_mode", ...}, composer/conditions.py), or a built ``Conditions``; they apply to every
        image. ``callback(i, n)`` is called after every step of every group."""
        check_size(height, width)
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        seeds, _ = resolve_seeds(seed, num_images)
        groups = chunks(seeds, batch_size)
        if conditions is not None and not hasattr(conditions, "at"):
            from .conditions import build_conditions
            conditions = build_conditions(self, conditions, height, width, where="generate")
        ctx = self.encode_prompt([negative_prompt, prompt] if guidance > 1.0 else [prompt])
        out = []
        for group in groups:
            sch = self.make_sampler(sampler, steps, eta=eta)  # multistep samplers keep state: one per group
            noise, gens = self.initial_latents(group, height, width)
            out.append(self.denoise(noise, sch, expand_context(ctx, len(group)), guidance,
                                    generator=gens if len(group) > 1 else gens[0], conditions=conditions,
                                    callback=callback))
        return torch.cat(out) if len(out) > 1 else out[0]

    def generate(self, prompt: str, **kw):
        """Text to image (optionally with image ``conditions``); keywords as in :meth:`sample_latents`, plus
        ``vae_tile`` (as ``tile`` in :meth:`decode`). Returns a PIL image for an int ``seed`` without ``num_images``,
        else a list of PIL images, one per seed (even for one)."""
        _, several = resolve_seeds(kw.get("seed", 0), kw.get("num_images"))
        tile = kw.pop("vae_tile", None)
        lat = self.sample_latents(prompt, **kw)
        images = self.decode_images(lat, kw.get("batch_size"), tile=tile)
        return images if several else images[0]

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.unet.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        for m in self.condition_models.values():
            m.to(device=device, dtype=dtype)
        return self
