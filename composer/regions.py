"""The attention of a LoRA-Composer pass, passed explicitly to ``UNet.forward(..., regions=...)``.

- ``cross_attention`` (every attn2, method.md §4): base query; slot 0 = the global prompt through the base
  K/V; slot r+1 = region r's prompt (encoded by concept r's text encoder, layer-wise) through concept r's
  K/V adapters; background pixels keep the global output, a pixel in boxes S gets mean_{r∈S} to_out_r(a_r),
  with each concept's ``to_out`` LoRA delta fused into the kernel (``kernels.regional_cross_attention_lora``).
- ``self_attention`` (every attn1, §5): the isolation rule, when ``isolate`` is on.
- With ``store`` on, the analysis layers (1/32 of the image) also record what the losses read (§6): per
  region the head-averaged softmax over its own tokens for every pixel [R, N, L], and the head-averaged
  masked self-attention [N, N]. Only these small maps are kept; other layers run the fused path.
- ``lora_scope="all"`` (beyond the paper, whose concept LoRAs act only in attn2 K/V/out): ``lora`` is a
  :class:`RegionLoRA` that every adapter-capable layer of the UNet receives, so each concept's whole LoRA
  (attn1 q/k/v/out, attn2 q, feed-forward, proj_in/out, LoCon convolutions in resnets and resamplers) applies
  only on its region's tokens/pixels at each level, in the same single UNet pass.
The base weights are shared: concepts differ only by their adapters (no per-concept UNet copies).

Several images of one spec (a batch of seeds) share this state: the boxes, masks and region prompts are the
spec's, so only the batch layout changes. ``for_batch(halves, images=B)`` sets it to [half_0 × B; half_1 × B]
(the CFG pass: [uncond × B; cond × B]; the loss pass: cond × B), and the stored maps keep one entry per image
(:meth:`RegionAttention.aggregated_maps` reads image b's). Nothing mixes images: attention, GroupNorm and
LayerNorm are all per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

from .attention import attention, merge_heads, split_heads
from .losses import box_mask


class RegionLoRA:
    """Each region's LoRA confined to its region: ``y = base(x) + Σ_r w_r ⊙ Δ_r(x)`` with w_r(p) = 1/C(p) for the
    C(p) regions covering p at that layer's resolution (overlaps averaged, as in injection), 0 elsewhere.

    Layouts (documented for a future fused kernel): token layers get x [B, N, C_in] and the level's (h, w); the
    weights are [R, N] (fp32), and for each region its nonzero token indices I_r are cached, so the delta is
    computed only there: gather x[:, I_r] -> [B, |I_r|, C_in], low-rank (down [r, C_in], up [C_out, r]) ->
    [B, |I_r|, C_out], scaled by w_r[I_r] and scatter-added into y. Convolutions compute their (low-rank, so
    cheap) delta on the whole map at the output resolution and multiply by w_r [h_out, w_out].
    """

    def __init__(self, ra: "RegionAttention", adapters):
        self.ra, self.adapters = ra, adapters
        self._w, self._idx = {}, {}

    def weights(self, h: int, w: int, device) -> torch.Tensor:
        """[R, h·w] fp32: 1/C(p) on the region's pixels, 0 elsewhere."""
        key = (h, w, str(device))
        if key not in self._w:
            m = torch.stack([self.ra.region_mask(r, h, w, device).flatten() for r in range(self.ra.n)])
            self._w[key] = m / m.sum(0, keepdim=True).clamp(min=1)
            self._idx[key] = [m[r].nonzero().flatten() for r in range(self.ra.n)]
        return self._w[key]

    def add_linear(self, layer, x, y, hw):
        """Token layer: x [B, N, C_in], y [B, N, C_out] at level hw."""
        wts = self.weights(*hw, x.device)
        for r, name in enumerate(self.adapters):
            a = layer.adapters.get(name) if name else None
            idx = self._idx[(*hw, str(x.device))][r]
            if a is None or len(idx) == 0:
                continue
            d = layer.delta(x[:, idx], a) * wts[r, idx][None, :, None].to(x.dtype)
            y = y.index_add(1, idx, d)
        return y

    def add_conv(self, layer, x, y):
        """Spatial layer: y [B, C_out, h, w] (the output resolution sets the mask)."""
        h, w = y.shape[-2:]
        wts = None
        for r, name in enumerate(self.adapters):
            a = layer.adapters.get(name) if name else None
            if a is None:
                continue
            wts = self.weights(h, w, x.device) if wts is None else wts
            if not bool(self._idx[(h, w, str(x.device))][r].numel()):
                continue
            y = y + layer.delta(x, a) * wts[r].view(1, 1, h, w).to(y.dtype)
        return y

    def add_spatial(self, layer, v, y):
        """A per-sample vector layer whose output is broadcast over a map (a resnet's time_emb_proj): v [B, C_in]
        -> y [B, C_out, h, w] + Σ_r w_r ⊙ Δ_r(v)."""
        h, w = y.shape[-2:]
        for r, name in enumerate(self.adapters):
            a = layer.adapters.get(name) if name else None
            if a is None:
                continue
            wts = self.weights(h, w, y.device)
            y = y + layer.delta(v, a)[:, :, None, None] * wts[r].view(1, 1, h, w).to(y.dtype)
        return y

    def at(self, hw):
        """This scope bound to a token level, for the Linear layers of a transformer block."""
        return _LevelScope(self, tuple(hw))


class _LevelScope:
    def __init__(self, scope: RegionLoRA, hw):
        self.scope, self.hw = scope, hw

    def add_linear(self, layer, x, y):
        return self.scope.add_linear(layer, x, y, self.hw)

    def add_conv(self, layer, x, y):
        return self.scope.add_conv(layer, x, y)


class RegionAttention:
    def __init__(self, boxes, masks, adapters, pos_ctx, neg_ctx, image_hw, *, isolate=True, backend="auto",
                 plain_backend="sdpa", lora_scope: str = "cross"):
        """boxes: per region fractional (y0, x0, y1, x1) (or None with a mask); masks: per region [H, W] tensor
        in [0, 1] or None; adapters: per region the concept adapter name (or None: base K/V);
        pos_ctx / neg_ctx: per region [L, 1, 77, C] or [1, 77, C] encodings (positive / negative)."""
        self.boxes, self.masks, self.adapters = boxes, masks, adapters
        self.pos_ctx, self.neg_ctx = pos_ctx, neg_ctx
        self.H, self.W = image_hw
        self.analysis_hw = (self.H // 32, self.W // 32)
        self.isolate, self.backend, self.plain_backend = isolate, backend, plain_backend
        self.halves = ("uncond", "cond")
        self.images = 1  # images per half of the batch (for_batch)
        self.store = False
        self.want_self_maps = isolate  # L_region reads S; set by the caller when the region loss is on
        self.cross_maps, self.self_maps = {}, {}
        self._tr, self._any, self._lora = {}, {}, {}
        self.lora = RegionLoRA(self, adapters) if lora_scope == "all" else None

    @property
    def n(self) -> int:
        return len(self.boxes)

    # --- static per level ------------------------------------------------------------------------------------

    def region_mask(self, r: int, h: int, w: int, device) -> torch.Tensor:
        if self.masks[r] is not None:  # free-form mask: area average to the level, threshold 0.5
            m = F.interpolate(self.masks[r][None, None].float(), size=(h, w), mode="area")[0, 0]
            return (m >= 0.5).float().to(device)
        return box_mask(self.boxes[r], h, w, device)

    def token_regions(self, hw, device) -> torch.Tensor:
        """int64 [h·w] bitmasks for this level (cached: static for all steps and layers)."""
        key = (hw, str(device))
        if key not in self._tr:
            h, w = hw
            tr = torch.zeros(h * w, dtype=torch.int64, device=device)
            for r in range(self.n):
                tr |= self.region_mask(r, h, w, device).flatten().long() << r
            self._tr[key] = tr
            self._any[key] = bool(tr.any())  # one host sync per level, not per layer call
        return self._tr[key]

    def out_lora(self, attn, dtype, device):
        """to_out LoRA factors of each concept: down [R, rank, C], up [R, C, rank] (zeros where absent)."""
        key = (attn.layer_index, dtype)
        if key not in self._lora:
            lin = attn.to_out[0]
            ads = [lin.adapters.get(a) if a else None for a in self.adapters]
            if all(a is None for a in ads):
                self._lora[key] = None
            else:
                if any(a is not None and a.dense is not None for a in ads):
                    self._lora[key] = "dense"  # LoHa/LoKr: no low-rank factors to fuse; the exact unfused path runs
                    return self._lora[key]
                rank = max(a.down.shape[0] for a in ads if a is not None)
                c_out, c_in = lin.weight.shape
                down = torch.zeros(self.n, rank, c_in, dtype=dtype, device=device)
                up = torch.zeros(self.n, c_out, rank, dtype=dtype, device=device)
                for r, a in enumerate(ads):
                    if a is not None:
                        down[r, : a.down.shape[0]] = a.down.to(dtype)
                        up[r, :, : a.up.shape[1]] = a.up.to(dtype)
                self._lora[key] = (down, up)
        return self._lora[key]

    def for_batch(self, halves, store=False, images: int = 1):
        """The layout of the next UNet pass: ``halves`` in order ("uncond", "cond"), each ``images`` entries long
        (one per image of a batch of seeds); ``store`` records the analysis maps (the loss pass)."""
        self.halves, self.store, self.images = tuple(halves), store, int(images)
        self.cross_maps, self.self_maps = {}, {}
        return self

    def _region_context(self, r: int, layer: int) -> torch.Tensor:
        parts = []
        for half in self.halves:
            c = self.pos_ctx[r] if half == "cond" else self.neg_ctx[r]
            c = c[layer] if c.ndim == 4 else c  # [1, 77, C]
            parts.append(c.expand(self.images, -1, -1) if self.images > 1 else c)
        return torch.cat(parts)  # [len(halves) · images, 77, C]

    # --- the two attention calls --------------------------------------------------------------------------

    def self_attention(self, attn, x, hw):
        sc = self.lora.at(hw) if self.lora is not None else None
        q, k, v = (split_heads(p(x, scope=sc), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        tr = self.token_regions(hw, x.device)
        boxed = self._any[(tuple(hw), str(x.device))]
        if self.store and self.want_self_maps and tuple(hw) == self.analysis_hw:
            o, p = kernels.isolated_self_attention_ref(q, k, v, tr if self.isolate else torch.zeros_like(tr),
                                                       return_probs=True)
            self.self_maps[attn.layer_index] = p.mean(1)  # [B, N, N], head-averaged, masked when isolating
        elif not self.isolate or not boxed:
            o = attention(q, k, v, backend=self.plain_backend)
        else:
            o = kernels.isolated_self_attention(q, k, v, tr, backend=self.backend)
        return attn.to_out[0](merge_heads(o), scope=sc)

    def cross_attention(self, attn, x, context, hw):
        heads, l = attn.heads, attn.layer_index
        # the base query (concept to_q LoRAs are not used, §4), or with lora_scope="all" each region's to_q LoRA on
        # its own pixels
        q = split_heads(attn.to_q(x, scope=self.lora.at(hw) if self.lora is not None else None), heads)
        ks, vs = [attn.to_k(context)], [attn.to_v(context)]
        for r in range(self.n):
            c = self._region_context(r, l).to(x.dtype)
            a = (self.adapters[r],) if self.adapters[r] else ()
            ks.append(attn.to_k(c, adapter=a))
            vs.append(attn.to_v(c, adapter=a))
        k = torch.stack([split_heads(t, heads) for t in ks], 2)  # [B, H, 1+R, L, D]
        v = torch.stack([split_heads(t, heads) for t in vs], 2)
        tr = self.token_regions(hw, x.device)
        lora = self.out_lora(attn, x.dtype, x.device)
        analysis = self.store and tuple(hw) == self.analysis_hw
        backend = "torch" if analysis else self.backend
        if analysis:  # per-region softmax over its own tokens, for every pixel, head-averaged (§6)
            s = torch.einsum("bhnd,bhrld->bhrnl", q.float(), k[:, :, 1:].float()) * q.shape[-1] ** -0.5
            self.cross_maps[l] = s.softmax(-1).mean(1)  # [B, R, N, L]
        if lora is None:
            o = kernels.regional_cross_attention(q, k, v, tr, backend=backend)
            return attn.to_out[0](merge_heads(o))
        if lora == "dense":
            return self._cross_unfused(attn, q, k, v, tr)
        down, up = lora
        o, z = kernels.regional_cross_attention_lora(q, k, v, tr, down, backend=backend)
        return attn.to_out[0](merge_heads(o)) + torch.einsum("bnrk,rck->bnc", z, up)

    def _cross_unfused(self, attn, q, k, v, tr):
        """The exact formula of §4 slot by slot, for concepts whose to_out delta is dense (LoHa/LoKr): each region's
        softmax attention over its own tokens, through its own to_out, averaged over the regions covering a pixel;
        the global output on the background."""
        bits = torch.arange(self.n, device=tr.device)
        act = torch.cat([(tr == 0)[None], ((tr[None] >> bits[:, None]) & 1).bool()]).to(q.dtype)  # [1+R, N]
        w = act / act.sum(0, keepdim=True)
        out = 0
        for s in range(self.n + 1):
            if not bool(act[s].any()):
                continue
            o = attention(q, k[:, :, s], v[:, :, s], backend=self.plain_backend)
            name = self.adapters[s - 1] if s else None
            out = out + attn.to_out[0](merge_heads(o), adapter=(name,) if name else ()) * w[s][None, :, None]
        return out

    # --- what the losses read --------------------------------------------------------------------------------

    def batch_maps(self):
        """Layer-averaged maps of the last stored pass for its whole batch: (cross [B, R, N, L], self [B, N, N] or
        None)."""
        if not self.cross_maps:
            raise RuntimeError("no analysis-layer maps were stored (image too small for a 1/32 grid?)")
        cm = torch.stack(list(self.cross_maps.values())).mean(0)
        sm = torch.stack(list(self.self_maps.values())).mean(0) if self.self_maps else None
        return cm, sm

    def aggregated_maps(self, image: int = 0, maps=None):
        """Layer-averaged maps of image ``image`` (batch entry) of the last stored pass: (per region [h, w, L],
        [N, N] or None). ``maps``: a :meth:`batch_maps` result to slice (computed once for a batch)."""
        h, w = self.analysis_hw
        cm, sm = maps if maps is not None else self.batch_maps()
        cross = [cm[image, r].reshape(h, w, -1) for r in range(self.n)]
        return cross, (sm[image] if sm is not None else None)
