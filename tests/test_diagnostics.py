"""Diagnostics against per-map numpy references written from their one-line definitions."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from captum_vit.metrics import (
    diffusion,
    insensitivity,
    map_entropy,
    mass_outside,
    remove_top_patches,
    spearman,
    texture_collapse,
)


def _ref_texture(m):
    m0 = m - m.mean()
    power = np.abs(np.fft.fft2(m0)) ** 2
    fy = np.fft.fftfreq(m.shape[0])
    fx = np.fft.fftfreq(m.shape[1])
    total = 0.0
    high = 0.0
    for u in range(m.shape[0]):
        for v in range(m.shape[1]):
            total += power[u, v]
            if math.hypot(fy[u], fx[v]) > 0.25:
                high += power[u, v]
    return high / total if total > 0 else 0.0


def _ref_entropy(m):
    rng = m.max() - m.min()
    m = (m - m.min()) / rng if rng > 0 else np.zeros_like(m)
    p = m.ravel() / m.sum() if m.sum() > 0 else np.full(m.size, 1.0 / m.size)
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(m.size)


def test_texture_collapse_checkerboard_vs_blob():
    yy, xx = np.mgrid[0:14, 0:14]
    checker = ((yy + xx) % 2).astype(np.float64)
    blob = np.exp(-((yy - 6.5) ** 2 + (xx - 6.5) ** 2) / (2 * 3.0**2))
    maps = torch.tensor(np.stack([checker, blob]))[:, None]
    got = texture_collapse(maps)
    assert got[0].item() == pytest.approx(1.0, abs=1e-12)
    assert got[1].item() < 0.01
    assert got[1].item() == pytest.approx(_ref_texture(blob), abs=1e-12)


@pytest.mark.parametrize("shape", [(14, 14), (7, 10), (5, 5)])
def test_texture_collapse_matches_reference(shape):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, *shape, generator=g, dtype=torch.float64)
    got = texture_collapse(maps)
    for b in range(3):
        assert got[b].item() == pytest.approx(_ref_texture(maps[b, 0].numpy()), rel=1e-10)


def test_texture_collapse_constant_map_is_zero():
    got = texture_collapse(torch.full((2, 1, 4, 6), 3.0))
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64))


def test_entropy_one_hot_uniform_and_reference():
    one_hot = torch.zeros(1, 1, 7, 7)
    one_hot[0, 0, 3, 2] = 5.0
    assert map_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-12)
    assert map_entropy(torch.full((1, 1, 7, 7), 0.3)).item() == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64)
    got = map_entropy(maps)
    for b in range(3):
        assert got[b].item() == pytest.approx(_ref_entropy(maps[b, 0].numpy()), rel=1e-10)


def test_mass_outside_and_constant_map():
    # map on a 2x2 grid upsampled to 4x4: with align_corners=False a 2x2 -> 4x4 map is interpolated
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    got = mass_outside(maps, masks)
    # reference: bilinear weights along each axis for 2 -> 4 are (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1)
    w = np.array([1.0, 0.75, 0.25, 0.0])  # weight of source index 0 per output index
    up = np.outer(w, w)  # source [[1, 0], [0, 0]]
    up = (up - up.min()) / (up.max() - up.min())
    inside = up[:2, :2].sum() / up.sum()
    assert got[0].item() == pytest.approx(1 - inside, rel=1e-6)
    # constant map counts as uniform: 12 of 16 pixels lie outside
    assert got[1].item() == pytest.approx(12 / 16, abs=1e-12)
    out = diffusion(maps, masks)
    assert set(out) == {"mass_outside", "entropy"}
    assert out["entropy"][1].item() == pytest.approx(1.0)
    assert not any(torch.isnan(v).any() for v in out.values())


def test_spearman_identical_reversed_and_reference():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 1, 4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spearman(a, a), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(spearman(a, -a), -torch.ones(3, dtype=torch.float64))
    b = torch.randint(0, 4, (3, 1, 4, 5), generator=g).double()  # ties
    got = spearman(a, b)
    for i in range(3):
        want = scipy.stats.spearmanr(a[i].numpy().ravel(), b[i].numpy().ravel()).statistic
        assert got[i].item() == pytest.approx(want, rel=1e-10)
    assert spearman(a, torch.ones_like(a)).eq(0).all()  # constant map: undefined, reported as 0


def test_remove_top_patches_reference():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 10, 13, generator=g)  # 5 x 6 grid at patch 2, one spare column
    maps = torch.randint(0, 5, (2, 1, 5, 6), generator=g).float()  # ties
    got = remove_top_patches(images, maps, patch_size=2, fraction=0.2, value=-1.0)
    for b in range(2):
        order = np.argsort(-maps[b, 0].numpy().ravel(), kind="stable")[: int(0.2 * 30)]
        want = images[b].numpy().copy()
        for cell in order:
            r, c = divmod(int(cell), 6)
            want[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = -1.0
        np.testing.assert_array_equal(got[b].numpy(), want)
    with pytest.raises(ValueError):
        remove_top_patches(images, maps[:, :, :4], patch_size=2)


def test_insensitivity_returns_spearman_and_drop():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 1, 3, 3, generator=g)
    out = insensitivity(maps, maps.clone(), torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(out["spearman"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out["prob_drop"], torch.tensor([0.7, 0.0], dtype=torch.float64))
