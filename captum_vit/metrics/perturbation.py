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
    ABPC = AUC_LeRF - AUC_MoRF

``value = 0`` is mid-grey for a model whose inputs are normalised by
``(x - mean) / std``.

Ties: pixels are ordered by a stable sort of the min-max map (rounded to
multiples of 1e-9, so that interpolation rounding does not split pixels that
are equal in exact arithmetic), so pixels of equal value keep raster order
(row-major, lowest flat index first) in *both* directions: MoRF removes the
lowest-index pixel of a tied group first, and so does LeRF. A constant map
therefore removes pixels in raster order for both curves, and its ABPC is
exactly 0.

Of the 22 points per image two are copies shared by both curves, so
:func:`abpc` evaluates each distinct copy once: 18 MoRF / LeRF copies per
image, the unperturbed image once per image (its point is both curves' first;
not at all when the caller passes its ``logits``), and the all-``value``
image (both curves' last) once per call, or once per image when ``value``
varies over the batch. That is ``19 * B + 1`` forward evaluations for ``B``
images (``18 * B + 1`` with ``logits``) instead of ``22 * B``, with the same
numbers to the last bit.

All copies of a call, shared ones included, are generated lazily in one
stream and evaluated in ``ceil(copies / batch_size)`` ``model_fn`` calls of
near-equal size (at most ``batch_size``, differing by at most one), so memory
stays bounded by one chunk. A row's logits can differ in the last bit with
the number of rows in its call (a ViT on CPU scores a row alone or in a
small call unlike in a call of 16 or more); a shared copy evaluated in a
call of its own, or a tiny tail call, would change the scores' last bits.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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


def _shared_over_batch(baseline: Tensor) -> bool:
    """Whether every image of the call has the same baseline (a ``value`` without a batch dimension > 1)."""
    # _baseline_like expands: a value broadcast over the batch has stride 0 there
    return baseline.shape[0] == 1 or baseline.stride(0) == 0


def _chunks(n: int, batch_size: int) -> List[slice]:
    """``ceil(n / batch_size)`` consecutive slices covering ``range(n)``, their sizes differing by at most 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    calls = -(-n // batch_size)
    bounds = [i * n // calls for i in range(calls + 1)] if calls else [0]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def _score_copies(
    model_fn: ModelFn,
    images: Tensor,
    baseline: Tensor,
    ranks: Tensor,
    copies: Tuple[Tensor, Tensor, Tensor, Tensor],
    picks: Tuple[Tensor, Tensor],
    batch_size: int,
    keep: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Target probabilities of the described copies, in ``ceil(copies / batch_size)`` near-equal forwards.

    ``copies`` is ``(image_idx, rank_idx, ks, insert)``: copy ``j`` is image ``image_idx[j]`` where the pixels with
    ``ranks[rank_idx[j], image_idx[j]] < ks[j]`` come from the image and the
    rest from the baseline if ``insert[j]``, and the other way round otherwise.
    ``picks`` is ``(copy, label)``: pick ``p`` is ``softmax(logits of copy[p])[label[p]]``, so that one copy
    can be scored for several labels. Returns the picks' float64 probabilities and the logits of the first
    ``keep`` copies.
    """
    image_idx, rank_idx, ks, insert = copies
    pick_copy, pick_label = picks
    _, c, h, w = images.shape
    out = torch.empty(pick_copy.numel(), dtype=torch.float64, device=images.device)
    kept = []
    # near-equal chunks: a row's logits can depend in the last bit on the call's size, and a tiny tail
    # call would score its rows unlike the rest
    for sl in _chunks(image_idx.numel(), batch_size):
        b = image_idx[sl]
        chosen = (ranks[rank_idx[sl], b] < ks[sl, None]).reshape(-1, 1, h, w)
        # deletion puts the baseline on the chosen pixels; insertion keeps only them
        from_baseline = chosen ^ insert[sl].reshape(-1, 1, 1, 1)
        batch = torch.where(from_baseline, baseline[b], images[b])
        logits = model_fn(batch)
        if sl.start < keep:
            kept.append(logits[: min(sl.stop, keep) - sl.start])
        probs = torch.softmax(logits.double(), dim=-1)
        here = (pick_copy >= sl.start) & (pick_copy < sl.stop)
        out[here] = probs[pick_copy[here] - sl.start].gather(1, pick_label[here][:, None])[:, 0]
    return out, (torch.cat(kept) if kept else images.new_empty((0, 0)))


def _counts(fractions: Sequence[float], n_pixels: int) -> Tensor:
    ks = []
    for s in fractions:
        if not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {s}")
        ks.append(int(n_pixels * float(s)))
    return torch.tensor(ks, dtype=torch.long)


def _prepare(images: Tensor, maps: Tensor, labels: LabelsLike) -> Tuple[Tensor, Tensor]:
    """The maps ``[B, 1, h, w]`` on the images' device and the labels ``LongTensor[B]``, both checked."""
    _check_images(images)
    maps = _as_b1hw(maps).to(images.device)
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {maps.shape[0]} maps")
    return maps, _labels(labels, images.shape[0], images.device)


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
    """Scores ``[len(directions), B, len(ks)]``, one copy per point; a direction is ``(descending, insert)``."""
    maps, target = _prepare(images, maps, labels)
    bsz, _, h, w = images.shape
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
    copies = (image_idx, rank_of_dir[dir_idx], k_all, insert_of_dir[dir_idx])
    picks = (torch.arange(image_idx.numel(), device=dev), target[image_idx])
    scores, _ = _score_copies(model_fn, images, baseline, ranks, copies, picks, batch_size)
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


def abpc(  # noqa: PLR0913 - the metric's inputs and options, all but the first four keywords with defaults
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    labels: LabelsLike,
    fractions: Sequence[float] = ABPC_FRACTIONS,
    value: ValueLike = 0.0,
    batch_size: int = 64,
    logits: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    r"""Area between the LeRF and MoRF perturbation curves, per image.

    ``auc_morf`` and ``auc_lerf`` are the **plain means** of the curve points
    (not trapezoidal areas) and ``abpc = auc_lerf - auc_morf``; higher is
    better (removing what the map calls relevant hurts more than removing what
    it calls irrelevant).

    Each distinct copy is evaluated once: the MoRF and LeRF copies of the
    fractions strictly between 0 and ``H * W`` pixels (18 per image with the
    default fractions), the unperturbed image once per image (its point is
    both curves' first), and the all-``value`` image once per call (once per
    image when ``value`` varies over the batch), which every image scores for
    its own label. With the default fractions that is ``18 * B + B + 1``
    evaluations, ``18 * B + 1`` with ``logits``. They all go through one
    stream of ``ceil(copies / batch_size)`` ``model_fn`` calls of near-equal
    size: a row's logits can differ in the last bit with the number of rows
    in its call, so a shared copy evaluated in a call of its own, or a tiny
    tail call, could change the scores' last bits.

    Args:
        model_fn (Callable): images ``[n, C, H, W]`` -> logits ``[n, classes]``.
        images (Tensor): ``[B, C, H, W]`` normalised model inputs.
        maps (Tensor): raw maps ``[B, 1, h, w]`` for the scored classes.
        labels (int, sequence or Tensor): the class scored per image (the
            ground-truth class in the protocol).
        fractions (sequence of float, optional): fractions of pixels removed,
            each in [0, 1], in any order, repeats allowed. Default: 0.0, 0.1, ..., 1.0
        value (float or Tensor, optional): removed pixels' value, a scalar or
            a tensor that broadcasts to ``images`` (``[C, 1, 1]``, or
            ``[B, C, H, W]`` for one baseline per image). Default: 0.0
        batch_size (int, optional): copies per ``model_fn`` call, at most. Default: 64
        logits (Tensor, optional): ``model_fn(images)``, ``[B, classes]``, when
            the caller has it (e.g. the ``"logits"`` of an earlier call on the
            same images): the unperturbed images are then not evaluated. For
            equal numbers they must be ``model_fn``'s own logits, not another
            forward's. Default: None

    Returns:
        dict[str, Tensor]: float64 ``Tensor[B]`` for ``"auc_lerf"``,
        ``"auc_morf"`` and ``"abpc"``; ``[B, len(fractions)]`` for
        ``"lerf_curve"`` and ``"morf_curve"``; ``"logits"``: the unperturbed
        images' logits ``[B, classes]`` used (``logits`` itself when given,
        else computed, whichever ``fractions``).

    Examples::

        >>> out = abpc(model, images, maps, labels)
        >>> out["abpc"].mean()
        >>> again = abpc(model, images, other_maps, labels, logits=out["logits"])
    """
    maps, target = _prepare(images, maps, labels)
    bsz, _, h, w = images.shape
    n_pixels = h * w
    dev = images.device
    ks = _counts(fractions, n_pixels).to(dev)
    baseline = _baseline_like(images, value)
    if logits is not None and (logits.dim() != 2 or logits.shape[0] != bsz):
        raise ValueError(f"logits must be model_fn(images) of shape [B, classes] = [{bsz}, classes], "
                         f"got {tuple(logits.shape)}")
    ranks = torch.stack([pixel_ranks(maps, (h, w), descending=True), pixel_ranks(maps, (h, w), descending=False)])

    # the distinct copies, in stream order: the clean images (unless given), the MoRF then the LeRF copies of
    # every interior count (image-major), the all-baseline image(s)
    interior = torch.unique(ks[(ks > 0) & (ks < n_pixels)])
    n_clean = bsz if logits is None else 0
    n_in = 2 * bsz * interior.numel()
    n_base = 0 if not bool((ks == n_pixels).any()) else 1 if _shared_over_batch(baseline) else bsz
    every = torch.arange(bsz, device=dev)
    per_image = every.repeat_interleave(interior.numel()).repeat(2)
    image_idx = torch.cat([every[:n_clean], per_image, every[:n_base]])
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    rank_idx = torch.cat([zero.expand(n_clean), torch.arange(2, device=dev).repeat_interleave(n_in // 2),
                          zero.expand(n_base)])
    k_idx = torch.cat([zero.expand(n_clean), interior.repeat(2 * bsz), (zero + n_pixels).expand(n_base)])
    insert = torch.zeros(image_idx.numel(), dtype=torch.bool, device=dev)
    # one pick per copy and label; a shared baseline copy is picked by every image for its own label
    base_picks = every if n_base else every[:0]
    base_copy = n_clean + n_in + (base_picks if n_base == bsz else base_picks * 0)
    pick_copy = torch.cat([torch.arange(n_clean + n_in, device=dev), base_copy])
    pick_label = torch.cat([target[image_idx[: n_clean + n_in]], target[base_picks]])
    probs, kept = _score_copies(model_fn, images, baseline, ranks, (image_idx, rank_idx, k_idx, insert),
                                (pick_copy, pick_label), batch_size, keep=n_clean)

    if logits is None:
        logits, p_clean = kept, probs[:bsz]
    else:
        p_clean = torch.softmax(logits.double(), dim=-1).gather(1, target[:, None])[:, 0]
    p_in = probs[n_clean:n_clean + n_in].reshape(2, bsz, -1)
    p_base = probs[n_clean + n_in:] if n_base else torch.full_like(p_clean, math.nan)
    # point table [direction, image, (0 removed, all removed, interior counts...)], read per fraction
    points = torch.cat([p_clean.expand(2, bsz)[..., None], p_base.expand(2, bsz)[..., None], p_in], dim=2)
    column = torch.where(ks == 0, 0, torch.where(ks == n_pixels, 1, 2 + torch.searchsorted(interior, ks)))
    morf, lerf = points[:, :, column]
    auc_morf = morf.mean(dim=1)
    auc_lerf = lerf.mean(dim=1)
    return {
        "auc_lerf": auc_lerf,
        "auc_morf": auc_morf,
        "abpc": auc_lerf - auc_morf,
        "lerf_curve": lerf,
        "morf_curve": morf,
        "logits": logits,
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
