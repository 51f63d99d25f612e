"""LoRA-Composer's concept-enhancement and region losses and latent re-initialisation (method.md §6, §7, §9).

All functions work on the 1/32 analysis grid (h, w) and follow the official implementation's arithmetic
(reproduced to ~1e-6 on ``tests/data/method_vectors``):
- box -> cells: rows ceil(y0·h) … floor(y1·h)−1, columns ceil(x0·w) … floor(x1·w)−1 (§4);
- Ã = 3×3 Gaussian smoothing (σ 0.5, Attend-and-Excite's exp(−((x−μ)/2σ)²), reflect padding);
- L_ce = 8·max(0, 1 − mean(top_k(Ã⊙M⊙G))) with k = floor(0.2·|M|) and G the box-local Gaussian;
- L_fill = 2·mean_j|max_i(Ã⊙M) − colind(M)| + 2·mean_i|max_j(Ã⊙M) − rowind(M)|;
- L_region = 10·mean(top_k(S[q ∈ M, k ∉ M])) on the masked self-attention S.
k = 0 (a box under 5 cells) makes the top-k terms 0, where the official code gets there through a NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CE_WEIGHT, FILL_WEIGHT, REGION_WEIGHT, TOPK_RATIO = 8.0, 2.0, 10.0, 0.2


def box_cells(box, h: int, w: int) -> tuple[int, int, int, int]:
    """Fractional (y0, x0, y1, x1) -> integer cell bounds [r0, r1) × [c0, c1) on an h×w grid."""
    y0, x0, y1, x1 = box
    return math.ceil(y0 * h), math.ceil(x0 * w), math.floor(y1 * h), math.floor(x1 * w)


def box_mask(box, h: int, w: int, device=None) -> torch.Tensor:
    r0, c0, r1, c1 = box_cells(box, h, w)
    m = torch.zeros(h, w, device=device)
    if r1 > r0 and c1 > c0:
        m[r0:r1, c0:c1] = 1.0
    return m


def smoothing_kernel(sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-((x / (2 * sigma)) ** 2))
    k1 = k1 / k1.sum()
    return k1[:, None] * k1[None, :]


def smooth(a: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """[h, w] -> [h, w], 3×3 Gaussian with reflect padding."""
    k = smoothing_kernel(sigma).to(a)
    return F.conv2d(F.pad(a[None, None], (1, 1, 1, 1), mode="reflect"), k[None, None])[0, 0]


def box_gaussian(bh: int, bw: int, device=None) -> torch.Tensor:
    """Peak-normalised Gaussian over linspace(−1, 1) on each box side, σ = 1."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, bh, device=device), torch.linspace(-1, 1, bw, device=device), indexing="ij")
    g = torch.exp(-(y ** 2 / 2.0 + x ** 2 / 2.0))
    return g / g.max()


def _topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or x.numel() == 0:
        return x.sum() * 0.0  # keeps the graph, contributes nothing
    return x.reshape(-1).topk(min(k, x.numel()))[0].mean()


@dataclass
class LossTerms:
    fg_topk_mean: list
    ce: list
    fill_x: list
    fill_y: list
    region: list

    @property
    def total(self) -> torch.Tensor:
        return sum(self.ce) + sum(self.fill_x) + sum(self.fill_y) + sum(self.region)


def token_terms(a: torch.Tensor, mask: torch.Tensor, cells, *, smooth_maps=True, gaussian=True, fill=True):
    """One token's map a [h, w] -> (fg top-k mean, L_ce, L_fill_x, L_fill_y)."""
    if smooth_maps:
        a = smooth(a)
    r0, c0, r1, c1 = cells
    k = int(mask.sum().item() * TOPK_RATIO)
    if gaussian:
        g = torch.zeros_like(mask)
        if r1 > r0 and c1 > c0:
            g[r0:r1, c0:c1] = box_gaussian(r1 - r0, c1 - c0, mask.device)
        fg = a * g
    else:
        fg = a * mask
    top = _topk_mean(fg, k)
    ce = CE_WEIGHT * torch.clamp(1.0 - top, min=0.0) if k > 0 else top * 0.0
    zero = a.sum() * 0.0
    if fill:
        am = a * mask
        fx = FILL_WEIGHT * (am.max(0).values - mask.max(0).values).abs().mean()
        fy = FILL_WEIGHT * (am.max(1).values - mask.max(1).values).abs().mean()
    else:
        fx = fy = zero
    return top, ce, fx, fy


def region_term(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_region for one region: S [hw, hw] (masked self-attention), mask [h, w]."""
    m = mask.reshape(-1) != 0
    k = int(mask.sum().item() * TOPK_RATIO)
    return REGION_WEIGHT * torch.clamp(_topk_mean(s[m][:, ~m], k), min=0.0)


def compute_losses(cross_maps, token_pos, boxes, self_map=None, *, enhance=True, gaussian=True, fill=True,
                   region=True, smooth_maps=True) -> LossTerms:
    """cross_maps: per region [h, w, 77] (head/layer-averaged softmax over that region's tokens);
    token_pos: per region the sequence positions of its pseudo-words; boxes: fractional (y0, x0, y1, x1);
    self_map: [hw, hw] masked self-attention (for L_region)."""
    terms = LossTerms([], [], [], [], [])
    for amap, pos, box in zip(cross_maps, token_pos, boxes):
        h, w = amap.shape[:2]
        mask = box_mask(box, h, w, amap.device) if not isinstance(box, torch.Tensor) else box
        cells = box_cells(box, h, w) if not isinstance(box, torch.Tensor) else _bbox_cells(box)
        if enhance:
            for p in pos:
                top, ce, fx, fy = token_terms(amap[:, :, p], mask, cells, smooth_maps=smooth_maps,
                                              gaussian=gaussian, fill=fill)
                terms.fg_topk_mean.append(top)
                terms.ce.append(ce)
                terms.fill_x.append(fx)
                terms.fill_y.append(fy)
        if region and self_map is not None:
            terms.region.append(region_term(self_map, mask))
    return terms


def _bbox_cells(mask: torch.Tensor):
    """Bounding box of a free-form mask on the grid (the Gaussian of L_ce spans it)."""
    nz = mask.nonzero()
    if len(nz) == 0:
        return 0, 0, 0, 0
    return int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1


def reinit_latents(z: torch.Tensor, token_maps, boxes, analysis_hw) -> torch.Tensor:
    """§9: per region, box-filter the (unsmoothed) maps of its two tokens, take the argmax window, copy that
    latent patch into the box; then restore z's scalar mean and std. token_maps: per region a list of [h, w]."""
    h, w = analysis_hw
    s = z.shape[-1] // w
    out = z.detach().clone()
    for maps, box in zip(token_maps, boxes):
        r0, c0, r1, c1 = box_cells(box, h, w) if not isinstance(box, torch.Tensor) else _bbox_cells(box)
        bh, bw = r1 - r0, c1 - c0
        if bh <= 0 or bw <= 0:
            continue
        ker = torch.ones(1, 1, bh, bw, dtype=maps[0].dtype, device=maps[0].device)
        score = sum(F.conv2d(m[None, None], ker) for m in maps)  # [1, 1, h-bh+1, w-bw+1]
        idx = int(score.flatten().argmax())
        ty, tx = divmod(idx, score.shape[-1])
        out[:, :, r0 * s:r1 * s, c0 * s:c1 * s] = z[:, :, ty * s:(ty + bh) * s, tx * s:(tx + bw) * s]
    return (out - out.mean()) / out.std() * z.std() + z.mean()
