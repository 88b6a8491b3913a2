r"""Per-map diagnostics of how an explanation fails: texture collapse, diffusion, insensitivity.

Each diagnostic is one formula on tensors (maps on the patch grid, masks,
probabilities); none knows which method made the map. Every function is
batch-first and returns ``Tensor[B]`` values (float64), never NaN.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from .localization import _as_b1hw, _as_bhw_mask, minmax_normalize, upsample

__all__ = [
    "texture_collapse",
    "map_entropy",
    "mass_outside",
    "diffusion",
    "spearman",
    "remove_top_patches",
    "insensitivity",
]


def texture_collapse(maps: Tensor) -> Tensor:
    r"""Share of a map's spectral energy at high spatial frequencies.

    With ``m`` the ``gh x gw`` patch-grid map, ``m0 = m - mean(m)`` and
    ``P(u, v) = |FFT2(m0)(u, v)|^2``, the frequency of bin ``(u, v)`` in cycles
    per grid cell is ``(fy, fx) = (fftfreq(gh)[u], fftfreq(gw)[v])`` (each in
    ``[-1/2, 1/2)``), its radius ``rho = sqrt(fy^2 + fx^2)``, and the Nyquist
    radius ``1/2``::

        texture_collapse = sum_{rho > 1/4} P / sum P

    i.e. the energy strictly above half the Nyquist radius. A checkerboard
    (all energy at ``(1/2, 1/2)``) scores 1, a smooth blob close to 0. A
    constant map has no energy and scores 0.

    Args:
        maps (Tensor): maps ``[B, 1, gh, gw]`` (or ``[B, gh, gw]``) on the patch grid.

    Returns:
        Tensor: float64 ``Tensor[B]`` in [0, 1].
    """
    m = _as_b1hw(maps)[:, 0].double()
    gh, gw = m.shape[-2:]
    m0 = m - m.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(m0).abs() ** 2
    fy = torch.fft.fftfreq(gh, dtype=torch.float64, device=m.device)
    fx = torch.fft.fftfreq(gw, dtype=torch.float64, device=m.device)
    rho = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    high = (rho > 0.25).to(power.dtype)
    total = power.sum(dim=(-2, -1))
    upper = (power * high).sum(dim=(-2, -1))
    # a constant map has no spectrum at all; 0 says "no texture" rather than NaN
    return torch.where(total > 0, upper / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def _distribution(maps: Tensor) -> Tensor:
    """Min-max map normalised to sum 1 over its cells; a constant map becomes uniform."""
    m = minmax_normalize(maps.double()).flatten(1)
    total = m.sum(dim=1, keepdim=True)
    uniform = torch.full_like(m, 1.0 / m.shape[1])
    return torch.where(total > 0, m / total.clamp_min(torch.finfo(m.dtype).tiny), uniform)


def map_entropy(maps: Tensor) -> Tensor:
    r"""Normalised entropy of a map taken as a distribution over its grid cells.

    With ``m`` the min-max normalised map and ``p = m / sum(m)`` over the
    ``N = gh * gw`` cells::

        map_entropy = -sum_i p_i log p_i / log N      (0 log 0 = 0)

    0 for a map concentrated on one cell, 1 for a uniform one. A constant map
    (all zeros after min-max) is taken as uniform and scores 1: it singles
    nothing out. A single-cell grid (``N = 1``) scores 0.

    Args:
        maps (Tensor): maps ``[B, 1, gh, gw]`` (or ``[B, gh, gw]``).

    Returns:
        Tensor: float64 ``Tensor[B]`` in [0, 1].
    """
    p = _distribution(_as_b1hw(maps))
    n = p.shape[1]
    if n == 1:
        return torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return -plogp.sum(dim=1) / math.log(n)


def mass_outside(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Fraction of a map's mass outside a ground-truth mask.

    The map is upsampled to the mask size (bilinear, ``align_corners=False``)
    and min-max normalised, as in the localization protocol; with ``m`` that
    map::

        mass_outside = sum(m * (1 - mask)) / sum(m)

    A constant map (all zeros after min-max) is taken as uniform, so it scores
    the fraction of the image outside the mask.

    Args:
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``).
        masks (Tensor): bool masks ``[B, H, W]`` (or ``[B, 1, H, W]``).

    Returns:
        Tensor: float64 ``Tensor[B]`` in [0, 1].
    """
    masks = _as_bhw_mask(masks)
    m = minmax_normalize(upsample(_as_b1hw(maps).double(), tuple(masks.shape[-2:])))
    p = _distribution(m)
    outside = (~masks.to(p.device)).flatten(1).to(p.dtype)
    return (p * outside).sum(dim=1)


def diffusion(maps: Tensor, masks: Tensor) -> Dict[str, Tensor]:
    r"""How spread out a map is: its mass outside the object and its normalised entropy.

    Args:
        maps (Tensor): raw maps ``[B, 1, gh, gw]`` on the patch grid.
        masks (Tensor): bool ground-truth masks ``[B, H, W]``.

    Returns:
        dict[str, Tensor]: ``"mass_outside"`` (:func:`mass_outside`, at the mask
        resolution) and ``"entropy"`` (:func:`map_entropy`, on the grid), each
        float64 ``Tensor[B]``.
    """
    return {"mass_outside": mass_outside(maps, masks), "entropy": map_entropy(maps)}


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..N along dim 1, tied values sharing the mean of their ranks."""
    # pairwise counts: O(N^2) per map, small for patch grids (196 cells -> 38k comparisons)
    less = (x[:, None, :] < x[:, :, None]).sum(dim=2).to(torch.float64)
    equal = (x[:, None, :] == x[:, :, None]).sum(dim=2).to(torch.float64)
    return less + (equal + 1) / 2


def spearman(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    r"""Spearman rank correlation between two maps of each image, over grid cells.

    The Pearson correlation of the cells' average ranks (tied cells share the
    mean of their ranks). When either map is constant its ranks have no
    spread and the correlation is undefined; it is reported as 0.

    Args:
        maps_a (Tensor): ``[B, 1, gh, gw]`` (or ``[B, gh, gw]``).
        maps_b (Tensor): same shape.

    Returns:
        Tensor: float64 ``Tensor[B]`` in [-1, 1].
    """
    a = _as_b1hw(maps_a).flatten(1).double()
    b = _as_b1hw(maps_b).flatten(1).double().to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {tuple(maps_a.shape)} and {tuple(maps_b.shape)} differ")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = torch.sqrt((ra**2).sum(dim=1) * (rb**2).sum(dim=1))
    corr = (ra * rb).sum(dim=1) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, corr.clamp(-1.0, 1.0), torch.zeros_like(corr))


def remove_top_patches(
    images: Tensor,
    maps: Tensor,
    patch_size: int,
    fraction: float = 0.2,
    value: float = 0.0,
) -> Tensor:
    r"""Set each image's most relevant patches to ``value`` (all channels).

    The map must be on the patch grid ``(H // patch_size, W // patch_size)``.
    The ``k = int(fraction * gh * gw)`` cells with the highest values are
    removed; ties keep raster order (stable sort, lowest cell index first).
    Pixels beyond the last full patch (when ``H`` or ``W`` is not a multiple
    of ``patch_size``) are left alone.

    Args:
        images (Tensor): ``[B, C, H, W]`` normalised model inputs.
        maps (Tensor): raw maps ``[B, 1, gh, gw]`` (or ``[B, gh, gw]``).
        patch_size (int): the model's patch size in pixels.
        fraction (float, optional): share of patches removed, in [0, 1]. Default: 0.2
        value (float, optional): the removed pixels' value; 0 is mid-grey in
            normalised space. Default: 0.0

    Returns:
        Tensor: perturbed copy of ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    maps = _as_b1hw(maps)
    bsz, _, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    if maps.shape[0] != bsz or tuple(maps.shape[-2:]) != (gh, gw):
        raise ValueError(f"expected maps [{bsz}, 1, {gh}, {gw}] for patch size {patch_size}, "
                         f"got {tuple(maps.shape)}")
    k = int(fraction * gh * gw)
    order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
    removed = torch.zeros(bsz, gh * gw, dtype=torch.bool, device=maps.device)
    removed.scatter_(1, order[:, :k], True)
    cells = removed.reshape(bsz, 1, gh, gw).to(images.device)
    pixels = cells.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    full = torch.zeros(bsz, 1, h, w, dtype=torch.bool, device=images.device)
    full[:, :, : gh * patch_size, : gw * patch_size] = pixels
    return torch.where(full, torch.as_tensor(value, dtype=images.dtype, device=images.device), images)


def insensitivity(
    maps: Tensor,
    maps_removed: Tensor,
    probs: Tensor,
    probs_removed: Tensor,
) -> Dict[str, Tensor]:
    r"""Does the map notice when its own evidence is removed?

    The caller explains an image (``maps``, target probability ``probs``),
    removes its most relevant patches (:func:`remove_top_patches`, 20% in the
    usual setting) and explains the result for the same target
    (``maps_removed``, ``probs_removed``). Then::

        spearman  = Spearman(maps, maps_removed)     over grid cells
        prob_drop = probs - probs_removed

    A map that stays the same (Spearman near 1) while the probability drops a
    lot is insensitive to the evidence the model uses.

    Args:
        maps (Tensor): ``[B, 1, gh, gw]`` maps of the original images.
        maps_removed (Tensor): maps of the perturbed images, same shape.
        probs (Tensor): ``Tensor[B]`` target probabilities on the originals.
        probs_removed (Tensor): ``Tensor[B]`` target probabilities after removal.

    Returns:
        dict[str, Tensor]: float64 ``Tensor[B]`` for ``"spearman"`` and ``"prob_drop"``.
    """
    rho = spearman(maps, maps_removed)
    drop = torch.as_tensor(probs, dtype=torch.float64).reshape(-1) - torch.as_tensor(
        probs_removed, dtype=torch.float64
    ).reshape(-1)
    if drop.numel() != rho.numel():
        raise ValueError(f"{rho.numel()} maps but {drop.numel()} probabilities")
    return {"spearman": rho, "prob_drop": drop.to(rho.device)}
