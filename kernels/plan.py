"""Layout plans for the fused kernels: the region-major token order and, per tile size, the lists of key tiles
(self-attention) or prompt slots (cross-attention) each block must visit. Pure PyTorch (no Triton import).

A layout (one level's ``token_regions``) is static for every step and layer of a pass, so plans are built once
and cached by the wrappers. Nothing here is N×N: the tile tables are [P, N/BM, N/BN] int8.

Sorting (kernels.md §3): tokens are ordered by their bitmask value, so background (0) comes first and each
single box, and each overlap set, is one contiguous run. Exact, because SD1.5 attention has no positional
term; the kernels read and write rows through ``perm`` (sorted position -> token), so no gathered copy of
q, k, v or o is ever made.

Tile lists follow FlexAttention's ``kv_indices`` / ``full_kv_indices`` scheme: for each query block, the key
tiles that need the label rule ("partial") and those that do not ("full"), so the kernels' loops have no
branch in them (Triton only software-pipelines branch-free loops). ``idx[p, a, :cnt[p, a, 0]]`` are the full
tiles of block a, ``idx[p, a, cnt[p, a, 0]:cnt[p, a, 1]]`` the partial ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import popcount


def region_ids(r: torch.Tensor) -> torch.Tensor:
    """Compact labels, int32: 0 background, r+1 for a token only in box r, -1 for an overlap token.

    The isolation rule (method.md §5) on these: allowed <=> id_q = 0 or id_k = 0 or (id_q = id_k > 0)."""
    pc = popcount(r)
    single = popcount(r - 1) + 1  # index of the one set bit, +1 (only read where pc == 1)
    return torch.where(pc == 1, single, torch.where(pc == 0, torch.zeros_like(r), torch.full_like(r, -1))).to(torch.int32)


def blocked_rows(r: torch.Tensor) -> torch.Tensor:
    """[P, N] bool: overlap tokens at a level with no background. Their isolation row allows no key at all; the
    official −1e6 bias, read in fp32, then puts their softmax on the minimum-cost keys (method.md §5). The fused
    kernels return 0 there and the wrappers compute exactly these rows densely (segmented.blocked_rows_attention)."""
    pc = popcount(r)
    return (pc > 1) & ~(pc == 0).any(-1, keepdim=True)


def _as_rows(r: torch.Tensor) -> torch.Tensor:
    return (r if r.ndim == 2 else r[None]).to(torch.int64)


def _pad(x: torch.Tensor, block: int) -> torch.Tensor:
    """Pad the last dim to a multiple of block by repeating the last value (keeps per-block statistics)."""
    n = x.shape[-1]
    pad = -n % block
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1) if pad else x


def _lists(status: torch.Tensor):
    """status [P, A, Bt] int8 (0 skip, 1 partial, 2 full) -> idx [P, A, M] int32 (full first, then partial, in
    increasing order within each kind) and cnt [P, A, 2] int32 (number of full, number of full + partial)."""
    order = torch.argsort((2 - status).to(torch.int8), dim=-1, stable=True)
    n_full = (status == 2).sum(-1)
    n_all = (status > 0).sum(-1)
    m = max(int(n_all.max()), 1)
    idx = order[..., :m].to(torch.int32).contiguous()
    return idx, torch.stack([n_full, n_all], -1).to(torch.int32).contiguous()


@dataclass(frozen=True)
class TileLists:
    idx: torch.Tensor  # [P, A, M] int32
    cnt: torch.Tensor  # [P, A, 2] int32


@dataclass(frozen=True)
class Layout:
    """One level's token order. P = 1 when every batch element shares the layout (``token_regions`` [N])."""
    perm: torch.Tensor  # [P, N] int32, sorted position -> token index
    reg: torch.Tensor  # [P, N] int64 bitmasks in sorted order
    ids: torch.Tensor  # [P, N] int32 compact labels in sorted order
    inv_cnt: torch.Tensor  # [P, N] fp32, 1 / max(1, number of boxes): the cross-attention mean weight
    blocked: tuple  # ((p, token indices LongTensor), ...) rows for the dense fix-up; empty almost always
    n_regions: int

    @property
    def n(self) -> int:
        return self.perm.shape[1]


def layout(token_regions: torch.Tensor) -> Layout:
    r = _as_rows(token_regions)
    perm = torch.argsort(r, dim=1, stable=True)
    rs = r.gather(1, perm)
    blk = blocked_rows(r)
    blocked = tuple((p, blk[p].nonzero().flatten()) for p in range(r.shape[0]) if bool(blk[p].any()))
    return Layout(perm=perm.to(torch.int32).contiguous(), reg=rs.contiguous(), ids=region_ids(rs).contiguous(),
                  inv_cnt=(1.0 / popcount(rs).clamp(min=1).float()).contiguous(), blocked=blocked,
                  n_regions=int(r.max()).bit_length())


def _block_stats(lay: Layout, block: int):
    """Per block of `block` sorted tokens: uniform label?, its label, any background?, which single boxes
    ([P, nb, R] bool)."""
    p, n = lay.ids.shape
    ids = _pad(lay.ids, block).view(p, -1, block)
    lo, hi = ids.min(-1).values, ids.max(-1).values
    r = max(lay.n_regions, 1)
    bits = torch.arange(r, device=ids.device, dtype=torch.int32)
    onehot = (ids[..., None] == bits + 1).any(2)  # [P, nb, R]
    return lo == hi, lo, (ids == 0).any(-1), onehot


def self_tiles(lay: Layout, bm: int, bn: int) -> torch.Tensor:
    """Tile status [P, N/bm, N/bn] int8 for the isolation rule: 0 no allowed pair, 2 every pair allowed, 1 apply
    the rule. Blocks that run past N are never "full", so unmasked loops need no bounds checks."""
    n = lay.n
    uq, lq, bgq, oq = _block_stats(lay, bm)
    uk, lk, bgk, ok = _block_stats(lay, bn)
    share = torch.einsum("par,pbr->pab", oq.float(), ok.float()) > 0  # a single box present on both sides
    some = bgq[:, :, None] | bgk[:, None, :] | share
    full = ((uq & (lq == 0))[:, :, None] | (uk & (lk == 0))[:, None, :]
            | ((uq & (lq > 0))[:, :, None] & uk[:, None, :] & (lq[:, :, None] == lk[:, None, :])))
    if n % bm:
        full[:, -1, :] = False
    if n % bn:
        full[:, :, -1] = False
    return torch.where(full, 2, torch.where(some, 1, 0)).to(torch.int8)


def self_lists(lay: Layout, bm: int, bn: int) -> tuple[TileLists, TileLists]:
    """(per query block: its key tiles, per key block: its query blocks) for tile size bm × bn."""
    st = self_tiles(lay, bm, bn)
    return TileLists(*_lists(st)), TileLists(*_lists(st.transpose(1, 2)))


def cross_active(lay: Layout, slots: int, bm: int) -> torch.Tensor:
    """[P, N/bm, slots] bool: does any query of the block attend slot s (0 = global prompt for background
    queries, r+1 = region r's prompt)?"""
    p, n = lay.reg.shape
    reg = lay.reg
    act = torch.cat([(reg == 0)[..., None], ((reg[..., None] >> torch.arange(slots - 1, device=reg.device)) & 1) > 0], -1)
    pad = -n % bm
    if pad:
        act = torch.cat([act, act.new_zeros(p, pad, slots)], 1)
    return act.view(p, -1, bm, slots).any(2)


def cross_lists(lay: Layout, slots: int, bm: int) -> tuple[TileLists, TileLists]:
    """(per query block: its active slots, per slot: its query blocks). No "full" entries: the per-row slot mask
    is two integer ops, so cnt[..., 0] is 0."""
    st = cross_active(lay, slots, bm).to(torch.int8)
    return TileLists(*_lists(st)), TileLists(*_lists(st.transpose(1, 2)))


def empty_rows(like: torch.Tensor, d: int, dtype=None) -> torch.Tensor:
    """[B, H, N, d] in `like`'s memory order: [B, N, H, d] memory when `like` is a head-split view of
    [B, N, H·D] (as the UNet makes them), so merging heads afterwards is free. Shared by the kernels and by the
    fake implementations of the registered operators (their strides must agree)."""
    b, h, n, _ = like.shape
    dtype = dtype or like.dtype
    if h > 1 and n > 1 and like.stride(1) < like.stride(2):
        return torch.empty(b, n, h, d, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(b, h, n, d, device=like.device, dtype=dtype)
