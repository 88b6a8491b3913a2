r"""Perturbation metrics: LeRF / MoRF curves, ABPC, and deletion / insertion.

Everything here takes tensors (images, maps, labels) and a callable
``model_fn(images) -> logits``; it knows nothing of attribution methods.

ABPC protocol, per image (all images are used, none excluded)::

    map [1, h, w] --upsample (bilinear, align_corners=False)--> [1, H, W]
        --min-max--> [0, 1] --rank the H*W pixels-->
    for s in 0.0, 0.1, ..., 1.0 (11 points), k = int(H * W * s):
        MoRF: the k highest-ranked pixels set to ``value`` (all channels)
        LeRF: the k lowest-ranked pixels set to ``value`` (all channels)
        score = softmax(model_fn(perturbed))[label]
    AUC = plain mean of the 11 scores (not trapezoidal)
    ABPC = AUC_LeRF - AUC_MoRF      (22 forward evaluations per image)

``value = 0`` is mid-grey for a model whose inputs are normalised by
``(x - mean) / std``.

Ties: pixels are ordered by a stable sort of the min-max map (rounded to
multiples of 1e-9, so that interpolation rounding does not split pixels that
are equal in exact arithmetic), so pixels of equal value keep raster order
(row-major, lowest flat index first) in *both* directions: MoRF removes the
lowest-index pixel of a tied group first, and so does LeRF. A constant map
therefore removes pixels in raster order for both curves, and its ABPC is
exactly 0.

All perturbed copies of a call are generated lazily and evaluated in chunks
of ``batch_size`` images, so the number of ``model_fn`` calls is
``ceil(copies / batch_size)`` and memory stays bounded by one chunk.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .localization import _as_b1hw, minmax_normalize, upsample

__all__ = [
    "ABPC_FRACTIONS",
    "pixel_ranks",
    "perturbation_curves",
    "abpc",
    "gaussian_blur",
    "deletion_insertion",
]

#: The 11 fractions of the ABPC protocol: 0.0, 0.1, ..., 1.0.
ABPC_FRACTIONS: Tuple[float, ...] = tuple(i / 10 for i in range(11))

# Rank scores are min-max normalised to [0, 1] and rounded to this many steps per unit before sorting.
_RANK_RESOLUTION = 1e9

ModelFn = Callable[[Tensor], Tensor]
LabelsLike = Union[int, Sequence[int], Tensor]
ValueLike = Union[float, Tensor]


def _labels(labels: LabelsLike, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{batch} images but {t.numel()} labels")
    return t


def _check_images(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")


def pixel_ranks(maps: Tensor, size: Tuple[int, int], descending: bool = True) -> Tensor:
    r"""Position of every pixel in the removal order of the upsampled, min-max normalised map.

    Maps are min-max normalised per image and upsampled to ``size``
    (bilinear, ``align_corners=False``); this orders pixels as the min-max
    normalised upsampled map does, and a constant map stays exactly constant.
    The scores, computed in float64, are rounded to multiples of ``1e-9``
    so that pixels equal in exact arithmetic tie whatever the interpolation's
    rounding; the ``H * W`` pixels are then sorted with a stable sort, so ties
    keep raster order (lowest flat index first) whichever the direction.

    Args:
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``).
        size ((int, int)): image ``(H, W)``.
        descending (bool, optional): True ranks the most relevant pixel first
            (MoRF), False the least relevant first (LeRF). Default: True

    Returns:
        Tensor: ``LongTensor[B, H * W]``; entry ``[b, i]`` is the rank (0 = first
        removed) of pixel ``i`` (row-major) of image ``b``. Removing ``k`` pixels
        means removing those with ``rank < k``.
    """
    # Normalising on the grid first keeps a constant map exactly constant after interpolation (a constant
    # interpolated in floating point comes back with rounding noise, which the ranking would amplify); the
    # ranking is that of the min-max normalised upsampled map, as interpolation is affine-equivariant.
    scores = upsample(minmax_normalize(_as_b1hw(maps).double()), size).flatten(1)
    # Pixels equal in exact arithmetic (e.g. border rows interpolated from one clamped source row) can come
    # back a rounding error apart, and which way depends on the kernel and the device. Quantising the [0, 1]
    # scores far above float64 rounding but below any meaningful difference makes them tie exactly.
    scores = torch.round(scores * _RANK_RESOLUTION)
    order = torch.sort(scores, dim=1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def _baseline_like(images: Tensor, value: ValueLike) -> Tensor:
    base = torch.as_tensor(value, dtype=images.dtype, device=images.device)
    try:
        return base.expand_as(images)
    except RuntimeError as err:
        raise ValueError(
            f"value of shape {tuple(base.shape)} does not broadcast to images {tuple(images.shape)}"
        ) from err


@torch.no_grad()
def _score_copies(
    model_fn: ModelFn,
    images: Tensor,
    baseline: Tensor,
    labels: Tensor,
    ranks: Tensor,
    copies: Tuple[Tensor, Tensor, Tensor, Tensor],
    batch_size: int,
) -> Tensor:
    """Target probability of each described copy, evaluated ``batch_size`` copies per forward.

    ``copies`` is ``(image_idx, rank_idx, ks, insert)``: copy ``j`` is image ``image_idx[j]`` where the pixels with
    ``ranks[rank_idx[j], image_idx[j]] < ks[j]`` come from the image and the
    rest from the baseline if ``insert[j]``, and the other way round otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    image_idx, rank_idx, ks, insert = copies
    _, c, h, w = images.shape
    out = torch.empty(image_idx.numel(), dtype=torch.float64, device=images.device)
    for start in range(0, image_idx.numel(), batch_size):
        sl = slice(start, start + batch_size)
        b = image_idx[sl]
        chosen = (ranks[rank_idx[sl], b] < ks[sl, None]).reshape(-1, 1, h, w)
        # deletion puts the baseline on the chosen pixels; insertion keeps only them
        from_baseline = chosen ^ insert[sl].reshape(-1, 1, 1, 1)
        batch = torch.where(from_baseline, baseline[b], images[b])
        logits = model_fn(batch)
        probs = torch.softmax(logits.double(), dim=-1)
        out[sl] = probs.gather(1, labels[b][:, None])[:, 0]
    return out


def _counts(fractions: Sequence[float], n_pixels: int) -> Tensor:
    ks = []
    for s in fractions:
        if not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {s}")
        ks.append(int(n_pixels * float(s)))
    return torch.tensor(ks, dtype=torch.long)


def _curves(
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    labels: LabelsLike,
    ks: Tensor,
    directions: Sequence[Tuple[bool, bool]],
    baseline: Tensor,
    batch_size: int,
) -> Tensor:
    """Scores ``[len(directions), B, len(ks)]``; a direction is ``(descending, insert)``."""
    _check_images(images)
    maps = _as_b1hw(maps).to(images.device)
    bsz, _, h, w = images.shape
    if maps.shape[0] != bsz:
        raise ValueError(f"{bsz} images but {maps.shape[0]} maps")
    target = _labels(labels, bsz, images.device)
    descending_needed = sorted({d for d, _ in directions}, reverse=True)
    tables = {d: pixel_ranks(maps, (h, w), descending=d) for d in descending_needed}
    ranks = torch.stack([tables[d] for d in descending_needed])
    table_of = {d: i for i, d in enumerate(descending_needed)}

    n_dir, n_k = len(directions), ks.numel()
    dev = images.device
    # copy order: direction-major, then image, then fraction
    dir_idx = torch.arange(n_dir, device=dev).repeat_interleave(bsz * n_k)
    image_idx = torch.arange(bsz, device=dev).repeat_interleave(n_k).repeat(n_dir)
    k_all = ks.to(dev).repeat(n_dir * bsz)
    rank_of_dir = torch.tensor([table_of[d] for d, _ in directions], dtype=torch.long, device=dev)
    insert_of_dir = torch.tensor([ins for _, ins in directions], dtype=torch.bool, device=dev)
    scores = _score_copies(
        model_fn, images, baseline, target, ranks, (image_idx, rank_of_dir[dir_idx], k_all, insert_of_dir[dir_idx]),
        batch_size,
    )
    return scores.reshape(n_dir, bsz, n_k)


def perturbation_curves(
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    labels: LabelsLike,
    fractions: Sequence[float] = ABPC_FRACTIONS,
    order: str = "morf",
    value: ValueLike = 0.0,
    batch_size: int = 64,
) -> Tensor:
    r"""Target probability as pixels are removed in the order of the map (MoRF or LeRF).

    For each fraction ``s``, ``k = int(H * W * s)`` pixels are set to ``value``
    in all channels: the ``k`` most relevant for ``order="morf"``, the ``k``
    least relevant for ``order="lerf"``, relevance being the min-max
    normalised map upsampled to the image size (bilinear,
    ``align_corners=False``); ties keep raster order (see the module docstring).
    The score is ``softmax(model_fn(perturbed))[label]``.

    Args:
        model_fn (Callable): maps images ``[n, C, H, W]`` to logits ``[n, classes]``;
            called under ``torch.no_grad()``.
        images (Tensor): model inputs ``[B, C, H, W]`` (already normalised).
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``), any scale or sign.
        labels (int, sequence or Tensor): the class scored, per image (or one for all).
        fractions (sequence of float, optional): fractions of pixels removed,
            each in [0, 1]. Default: 0.0, 0.1, ..., 1.0
        order (str, optional): ``"morf"`` (most relevant first) or ``"lerf"``
            (least relevant first). Default: ``"morf"``
        value (float or Tensor, optional): the removed pixels' value, a scalar
            or a tensor that broadcasts to ``images`` (e.g. ``[C, 1, 1]``).
            0 is mid-grey in normalised space. Default: 0.0
        batch_size (int, optional): perturbed copies per ``model_fn`` call. Default: 64

    Returns:
        Tensor: float64 ``[B, len(fractions)]`` probabilities.

    Examples::

        >>> curves = perturbation_curves(model, images, maps, labels, order="lerf")
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    _check_images(images)
    ks = _counts(fractions, images.shape[-2] * images.shape[-1])
    baseline = _baseline_like(images, value)
    return _curves(model_fn, images, maps, labels, ks, [(order == "morf", False)], baseline, batch_size)[0]


def abpc(
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    labels: LabelsLike,
    fractions: Sequence[float] = ABPC_FRACTIONS,
    value: ValueLike = 0.0,
    batch_size: int = 64,
) -> Dict[str, Tensor]:
    r"""Area between the LeRF and MoRF perturbation curves, per image.

    ``auc_morf`` and ``auc_lerf`` are the **plain means** of the curve points
    (not trapezoidal areas) and ``abpc = auc_lerf - auc_morf``; higher is
    better (removing what the map calls relevant hurts more than removing what
    it calls irrelevant). The MoRF and LeRF copies of all images are evaluated
    together, ``batch_size`` per call: ``2 * len(fractions)`` forward
    evaluations per image (22 with the default fractions).

    Args:
        model_fn (Callable): images ``[n, C, H, W]`` -> logits ``[n, classes]``.
        images (Tensor): ``[B, C, H, W]`` normalised model inputs.
        maps (Tensor): raw maps ``[B, 1, h, w]`` for the scored classes.
        labels (int, sequence or Tensor): the class scored per image (the
            ground-truth class in the protocol).
        fractions (sequence of float, optional): Default: 0.0, 0.1, ..., 1.0
        value (float or Tensor, optional): removed pixels' value. Default: 0.0
        batch_size (int, optional): copies per ``model_fn`` call. Default: 64

    Returns:
        dict[str, Tensor]: float64 ``Tensor[B]`` for ``"auc_lerf"``,
        ``"auc_morf"`` and ``"abpc"``; ``[B, len(fractions)]`` for
        ``"lerf_curve"`` and ``"morf_curve"``.

    Examples::

        >>> out = abpc(model, images, maps, labels)
        >>> out["abpc"].mean()
    """
    _check_images(images)
    ks = _counts(fractions, images.shape[-2] * images.shape[-1])
    baseline = _baseline_like(images, value)
    morf, lerf = _curves(model_fn, images, maps, labels, ks, [(True, False), (False, False)], baseline, batch_size)
    auc_morf = morf.mean(dim=1)
    auc_lerf = lerf.mean(dim=1)
    return {
        "auc_lerf": auc_lerf,
        "auc_morf": auc_morf,
        "abpc": auc_lerf - auc_morf,
        "lerf_curve": lerf,
        "morf_curve": morf,
    }


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    r"""Separable Gaussian blur of every channel, borders replicated.

    The kernel has radius ``ceil(3 * sigma)`` and weights
    ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1. Replicate padding keeps
    the image's own colours at the border instead of darkening it toward 0.

    Args:
        images (Tensor): ``[B, C, H, W]``.
        sigma (float): standard deviation in pixels; 0 returns a copy.

    Returns:
        Tensor: blurred ``[B, C, H, W]``.
    """
    _check_images(images)
    if sigma < 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    if sigma == 0:
        return images.clone()
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def _deletion_baseline(
    images: Tensor,
    baseline: str,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    sigma: float,
) -> Tensor:
    if baseline == "grey":
        return torch.zeros_like(images)
    if baseline == "black":
        if mean is None or std is None:
            raise ValueError("baseline='black' needs the normalisation's mean and std")
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
        return _baseline_like(images, (0.0 - m) / s)
    if baseline == "blur":
        return gaussian_blur(images, sigma)
    raise ValueError(f"baseline must be 'black', 'grey' or 'blur', got {baseline!r}")


# the public metric: the model, the images and their maps, and the curve's options, all keywords with defaults
def deletion_insertion(  # noqa: PLR0913
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    labels: LabelsLike,
    steps: int = 20,
    baseline: str = "blur",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    sigma: float = 5.0,
    batch_size: int = 64,
) -> Dict[str, Tensor]:
    r"""Deletion and insertion curves with trapezoidal areas under them.

    Pixels are ranked most relevant first (as MoRF, same ties). With
    ``k_i = int(H * W * i / steps)`` for ``i = 0, ..., steps``:

    - deletion point ``i``: the image with its ``k_i`` most relevant pixels
      replaced by the baseline's (from the image toward the baseline);
    - insertion point ``i``: the baseline with the image's ``k_i`` most
      relevant pixels put back (from the baseline toward the image).

    Each point is the target's softmax probability; the area is the
    trapezoidal rule over the removed fraction ``i / steps`` in [0, 1]:
    ``sum_i (p_i + p_{i+1}) / (2 * steps)``. Low deletion and high insertion
    areas are good.

    Baselines: ``"black"`` is a 0 pixel after normalisation,
    ``(0 - mean) / std`` per channel; ``"grey"`` is 0 in normalised space;
    ``"blur"`` is :func:`gaussian_blur` of the image with ``sigma``.

    Args:
        model_fn (Callable): images ``[n, C, H, W]`` -> logits ``[n, classes]``.
        images (Tensor): ``[B, C, H, W]`` normalised model inputs.
        maps (Tensor): raw maps ``[B, 1, h, w]``.
        labels (int, sequence or Tensor): the class scored per image.
        steps (int, optional): number of intervals; ``steps + 1`` points per
            curve. Default: 20
        baseline (str, optional): ``"black"``, ``"grey"`` or ``"blur"``. Default: ``"blur"``
        mean (sequence of float, optional): per-channel normalisation mean,
            required for ``"black"``.
        std (sequence of float, optional): per-channel normalisation std,
            required for ``"black"``.
        sigma (float, optional): blur standard deviation in pixels. Default: 5.0
        batch_size (int, optional): copies per ``model_fn`` call. Default: 64

    Returns:
        dict[str, Tensor]: float64 ``Tensor[B]`` for ``"deletion"`` and
        ``"insertion"`` (the areas); ``[B, steps + 1]`` for
        ``"deletion_curve"`` and ``"insertion_curve"``.

    Examples::

        >>> out = deletion_insertion(model, images, maps, labels, baseline="black",
        ...                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    """
    _check_images(images)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    n_pixels = images.shape[-2] * images.shape[-1]
    ks = torch.tensor([int(n_pixels * i / steps) for i in range(steps + 1)], dtype=torch.long)
    base = _deletion_baseline(images, baseline, mean, std, sigma)
    deletion, insertion = _curves(model_fn, images, maps, labels, ks, [(True, False), (True, True)], base, batch_size)

    def trapezoid(curve: Tensor) -> Tensor:
        return ((curve[:, 1:] + curve[:, :-1]) / 2).sum(dim=1) / steps

    return {
        "deletion": trapezoid(deletion),
        "insertion": trapezoid(insertion),
        "deletion_curve": deletion,
        "insertion_curve": insertion,
    }
