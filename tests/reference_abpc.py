"""The 22-copy ABPC of captum_vit before it scored each distinct copy once: the reference the new one must equal.

A verbatim copy of that ``abpc`` and its helpers (``_as_b1hw`` from ``captum_vit.metrics.localization``
included); it imports only public functions of the package (``minmax_normalize``, ``upsample``), so that
a change to the package's private helpers cannot change the reference with it. Every fraction scores one
copy per curve (0% and 100% removed included), and the copies are evaluated ``batch_size`` per call with
a tail call of what is left.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor

from captum_vit.metrics.localization import minmax_normalize, upsample

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


def _as_b1hw(maps: Tensor) -> Tensor:
    """Accept [h, w], [B, h, w] or [B, 1, h, w]; return [B, 1, h, w]."""
    if maps.dim() == 2:
        return maps[None, None]
    if maps.dim() == 3:
        return maps[:, None]
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"expected one channel, got maps of shape {tuple(maps.shape)}")
        return maps
    raise ValueError(f"expected maps of shape [h, w], [B, h, w] or [B, 1, h, w], got {tuple(maps.shape)}")


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
