"""The losses and latent re-initialisation reproduce the official implementation's numbers
(tests/data/method_vectors, computed with LoRA-Composer's own functions)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from composer.losses import box_cells, box_gaussian, compute_losses, reinit_latents, smoothing_kernel
from conftest import METHOD_VECTORS

CASES = ["anime_2concepts", "anime_5concepts", "real_2concepts", "overlap_small"]


@pytest.fixture(scope="module")
def cases():
    p = METHOD_VECTORS / "cases.json"
    if not p.exists():
        pytest.fail(f"method vectors missing: {p}")
    return json.loads(p.read_text())


@pytest.mark.parametrize("name", CASES)
def test_losses_match_official(cases, name):
    c = cases[name]
    t = load_file(str(METHOD_VECTORS / f"{name}.safetensors"))
    n = len(c["boxes_fraction"])
    maps = [t[f"cross_map_{i}"] for i in range(n)]
    pos = [[i + 1 for i in idx] for idx in c["token_index_after_dropping_bos"]]  # index after BOS -> position
    terms = compute_losses(maps, pos, c["boxes_fraction"], t["self_map"])
    e = c["expected"]
    close = lambda got, want: torch.testing.assert_close(torch.stack([torch.as_tensor(g) for g in got]).float(),
                                                         torch.tensor(want), rtol=1e-5, atol=1e-5)
    close(terms.fg_topk_mean, e["fg_topk_mean_per_token"])
    close(terms.ce, e["ce_loss_per_token"])
    close(terms.fill_x, e["fill_loss_x_per_token"])
    close(terms.fill_y, e["fill_loss_y_per_token"])
    close(terms.region, e["region_loss_per_region"])
    assert terms.total.item() == pytest.approx(e["total_loss"], rel=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_reinit_matches_official(cases, name):
    c = cases[name]
    t = load_file(str(METHOD_VECTORS / f"{name}.safetensors"))
    n = len(c["boxes_fraction"])
    maps = [[t[f"cross_map_{i}"][:, :, j + 1] for j in c["token_index_after_dropping_bos"][i]] for i in range(n)]
    out = reinit_latents(t["z"], maps, c["boxes_fraction"], c["analysis_hw"])
    torch.testing.assert_close(out, t["z_reinit"], rtol=1e-5, atol=1e-5)


def test_hand_computed_pieces():
    assert torch.allclose(smoothing_kernel()[1], torch.tensor([0.2119, 0.5761, 0.2119]) * 0.5761, atol=1e-4)
    g = box_gaussian(3, 3)
    assert g[1, 1] == 1.0 and g[0, 1] == pytest.approx(0.6065, abs=1e-4) and g[0, 0] == pytest.approx(0.3679, abs=1e-4)
    # worked example of method.md §4: "2real" region 1 at 24×32 and 96×128
    box = (10 / 768, 10 / 1024, 767 / 768, 310 / 1024)
    assert box_cells(box, 24, 32) == (1, 1, 23, 9)
    assert box_cells(box, 96, 128) == (2, 2, 95, 38)


def test_losses_on_a_constructed_map():
    """A map that is 1 exactly on the box: L_ce = 8·(1 − top-k mean of G), L_fill = 0; S with all mass
    leaving the box gives L_region = 10·(top-k mean)."""
    h = w = 8
    box = (0.25, 0.25, 0.75, 0.75)  # cells 2..5 × 2..5, |M| = 16, k = 3
    a = torch.zeros(h, w, 77)
    a[2:6, 2:6, 5] = 1.0
    terms = compute_losses([a], [[5]], [box], None, smooth_maps=False, region=False)
    g = box_gaussian(4, 4).flatten().topk(3)[0].mean()
    assert terms.ce[0].item() == pytest.approx(8 * (1 - g.item()), rel=1e-6)
    assert terms.fill_x[0].item() == 0 and terms.fill_y[0].item() == 0
    s = torch.zeros(64, 64)
    inside = [r * 8 + c for r in range(2, 6) for c in range(2, 6)]
    s[inside[0], 0], s[inside[1], 1], s[inside[2], 2], s[inside[3], 3] = 0.9, 0.6, 0.3, 0.1
    t2 = compute_losses([a], [[5]], [box], s, enhance=False)
    assert t2.region[0].item() == pytest.approx(10 * (0.9 + 0.6 + 0.3) / 3, rel=1e-6)


def test_tiny_box_k_zero_gives_zero_not_nan():
    a = torch.rand(8, 8, 77, requires_grad=True)
    box = (0.0, 0.0, 0.25, 0.25)  # 2×2 cells: k = floor(0.8) = 0
    terms = compute_losses([a], [[1, 2]], [box], torch.rand(64, 64))
    assert all(x.item() == 0 for x in terms.ce + terms.region)
    assert torch.isfinite(terms.total)
