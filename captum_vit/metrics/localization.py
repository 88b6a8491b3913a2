"""Weakly-supervised localization metrics (the AGCAM paper's localization protocol).

Everything here takes tensors (maps, masks, boxes) and knows nothing of
attribution methods. The protocol, per image, is::

    map [1, h, w] --upsample (bilinear, align_corners=False)--> [1, 224, 224]
        --min-max--> [0, 1] --strict "> threshold"--> binary mask
        --cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_NONE) + boundingRect-->
        boxes (x, y, x + w, y + h) --inclusive fill--> predicted box mask
    ground truth: union of the annotated boxes, same inclusive fill
    pixel accuracy, IoU, Dice, precision, recall with eps = 1e-5

Box convention: a box is ``(xmin, ymin, xmax, ymax)`` and covers the pixels
``mask[ymin:ymax + 1, xmin:xmax + 1]`` (inclusive bounds). Note that
``cv2.boundingRect`` returns a width ``w`` that counts pixels, so the box
``(x, y, x + w, y + h)`` of a contour, filled inclusively, is one pixel wider
and one pixel taller than the blob it came from. This reproduces the
published protocol (and its numbers) on purpose.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "METRIC_NAMES",
    "minmax_normalize",
    "upsample",
    "binarize",
    "contour_boxes",
    "boxes_to_mask",
    "scale_boxes",
    "localization_metrics",
    "predict_boxes",
    "evaluate_localization",
    "mean",
    "mass_inside",
    "instances_touched",
    "boxes_touch_instances",
]

#: Names (and order) of the per-image localization metrics.
METRIC_NAMES: Tuple[str, ...] = ("pixel_accuracy", "iou", "dice", "precision", "recall")

SizeLike = Union[int, Sequence[int]]


def _pair(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


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


def _as_bhw_mask(masks: Tensor) -> Tensor:
    """Accept [H, W], [B, H, W] or [B, 1, H, W] masks; return bool [B, H, W]."""
    if masks.dim() == 2:
        masks = masks[None]
    elif masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"expected one channel, got masks of shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    elif masks.dim() != 3:
        raise ValueError(f"expected masks of shape [H, W], [B, H, W] or [B, 1, H, W], got {tuple(masks.shape)}")
    return masks.bool()


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Min-max normalise each image's map to [0, 1].

    Args:
        maps (Tensor): maps of shape ``[B, ...]``; every sample is normalised
            over all its remaining dimensions.
        eps (float, optional): lower bound of the denominator ``max - min``,
            so that a constant map becomes all zeros instead of NaN.
            Default: 1e-12

    Returns:
        Tensor: floating tensor of the same shape, ``(m - min) / max(max - min, eps)``.
    """
    if not maps.is_floating_point():
        maps = maps.float()
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    return out.reshape(maps.shape)


def upsample(maps: Tensor, size: SizeLike = 224) -> Tensor:
    r"""Bilinearly resize maps (``align_corners=False``), as the protocol does.

    Args:
        maps (Tensor): ``[B, 1, h, w]``, ``[B, h, w]`` or ``[h, w]``.
        size (int or (int, int), optional): output ``H`` (and ``W``). Default: 224

    Returns:
        Tensor: ``[B, 1, H, W]`` float tensor.
    """
    maps = _as_b1hw(maps)
    if not maps.is_floating_point():
        maps = maps.float()
    return F.interpolate(maps, size=_pair(size), mode="bilinear", align_corners=False)


def binarize(maps: Tensor, threshold: float = 0.5) -> Tensor:
    r"""Strict threshold ``maps > threshold`` (a pixel equal to the threshold is off).

    Args:
        maps (Tensor): normalised maps, any shape.
        threshold (float, optional): Default: 0.5

    Returns:
        Tensor: bool tensor of the same shape.
    """
    return maps > threshold


def contour_boxes(binary_mask: Union[Tensor, np.ndarray]) -> Tensor:
    r"""One box per external contour of a binary mask, as the published protocol computes them.

    Uses ``cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)``
    (foreground 8-connected; blobs nested inside another blob's hole give no
    box of their own) and ``cv2.boundingRect`` -> ``(x, y, w, h)``, returned as
    ``(x, y, x + w, y + h)``. No area filter. Because ``w`` and ``h`` count
    pixels, filling such a box inclusively (``[y:y + h + 1, x:x + w + 1]``) covers
    one more column and row than the blob; this is the protocol's behaviour
    and is reproduced deliberately.

    Args:
        binary_mask (Tensor or ndarray): ``[H, W]`` (or ``[1, H, W]``) mask;
            non-zero is foreground.

    Returns:
        Tensor: ``LongTensor[n, 4]`` of ``(xmin, ymin, xmax, ymax)``, in
        OpenCV's contour order; ``n`` may be 0.
    """
    import cv2

    if isinstance(binary_mask, Tensor):
        arr = binary_mask.detach().cpu().numpy()
    else:
        arr = np.asarray(binary_mask)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"expected a single [H, W] mask, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr != 0, dtype=np.uint8)
    contours = cv2.findContours(arr, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[-2]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append((x, y, x + w, y + h))
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)


def boxes_to_mask(boxes: Union[Tensor, Sequence[Sequence[int]]], size: SizeLike = 224) -> Tensor:
    r"""Union of boxes as a mask, each filled inclusively ``[ymin:ymax + 1, xmin:xmax + 1]``.

    Coordinates beyond the image are clipped by the slicing (a contour box may
    end at ``W`` or ``H``, one past the last pixel).

    Args:
        boxes (Tensor or sequence): ``[n, 4]`` boxes ``(xmin, ymin, xmax, ymax)``.
        size (int or (int, int), optional): mask ``H`` (and ``W``). Default: 224

    Returns:
        Tensor: bool ``[H, W]`` mask (all False when there is no box).
    """
    h, w = _pair(size)
    mask = torch.zeros(h, w, dtype=torch.bool)
    b = torch.as_tensor(boxes).reshape(-1, 4).tolist()
    for xmin, ymin, xmax, ymax in b:
        x0, y0 = max(int(xmin), 0), max(int(ymin), 0)
        mask[y0:int(ymax) + 1, x0:int(xmax) + 1] = True
    return mask


def scale_boxes(boxes: Union[Tensor, Sequence[Sequence[float]]], orig_size: SizeLike,
                size: SizeLike = 224) -> Tensor:
    r"""Rescale ground-truth boxes from the original image to the model input, as the protocol does.

    Each coordinate becomes ``int(v / original_size * size)`` (x by the
    width, y by the height; ``int`` truncates), computed in float64 like Python.

    Args:
        boxes (Tensor or sequence): ``[n, 4]`` boxes ``(xmin, ymin, xmax, ymax)``
            in original pixel coordinates.
        orig_size (int or (int, int)): original ``(height, width)``
            (torch order; an int means square).
        size (int or (int, int), optional): target ``(height, width)``. Default: 224

    Returns:
        Tensor: ``LongTensor[n, 4]``.
    """
    oh, ow = _pair(orig_size)
    th, tw = _pair(size)
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    scale = torch.tensor([tw, th, tw, th], dtype=torch.float64)
    denom = torch.tensor([ow, oh, ow, oh], dtype=torch.float64)
    # (v / original) * target in that order, then truncation toward zero, as int() does
    return torch.trunc(b / denom * scale).to(torch.int64)


def localization_metrics(pred_mask: Tensor, gt_mask: Tensor, eps: float = 1e-5) -> Dict[str, Tensor]:
    r"""Per-image pixel accuracy, IoU, Dice, precision and recall of binary masks.

    With TP, FP, FN, TN counted over each image's pixels::

        pixel_accuracy = (TP + TN + eps) / (TP + TN + FP + FN + eps)
        iou            = (TP + eps) / (TP + FP + FN + eps)
        dice           = (2 TP + eps) / (2 TP + FP + FN + eps)
        precision      = (TP + eps) / (TP + FP + eps)
        recall         = (TP + eps) / (TP + FN + eps)

    Args:
        pred_mask (Tensor): predicted masks ``[B, H, W]`` (or ``[H, W]``, or ``[B, 1, H, W]``).
        gt_mask (Tensor): ground-truth masks of the same shape.
        eps (float, optional): smoothing constant. Default: 1e-5

    Returns:
        dict[str, Tensor]: ``{name: float64 Tensor[B]}`` for the names in :data:`METRIC_NAMES`.
    """
    pred = _as_bhw_mask(pred_mask)
    gt = _as_bhw_mask(gt_mask).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask {tuple(pred.shape)} and gt_mask {tuple(gt.shape)} differ in shape")
    pred = pred.flatten(1)
    gt = gt.flatten(1)
    tp = (pred & gt).sum(1).double()
    fp = (pred & ~gt).sum(1).double()
    fn = (~pred & gt).sum(1).double()
    tn = (~pred & ~gt).sum(1).double()
    return {
        "pixel_accuracy": (tp + tn + eps) / (tp + tn + fp + fn + eps),
        "iou": (tp + eps) / (tp + fp + fn + eps),
        "dice": (2 * tp + eps) / (2 * tp + fp + fn + eps),
        "precision": (tp + eps) / (tp + fp + eps),
        "recall": (tp + eps) / (tp + fn + eps),
    }


def predict_boxes(maps: Tensor, threshold: float = 0.5, size: SizeLike = 224) -> List[Tensor]:
    r"""Boxes of the thresholded maps: upsample -> min-max -> ``> threshold`` -> contour boxes.

    Args:
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``), any scale.
        threshold (float, optional): strict threshold on the min-max map. Default: 0.5
        size (int or (int, int), optional): evaluation resolution. Default: 224

    Returns:
        list[Tensor]: ``B`` tensors ``LongTensor[n_i, 4]`` (see :func:`contour_boxes`).
    """
    binary = binarize(minmax_normalize(upsample(maps, size)), threshold)[:, 0].cpu()
    return [contour_boxes(m) for m in binary]


def evaluate_localization(
    maps: Tensor,
    gt_boxes_list: Union[Tensor, Sequence[Tensor]],
    threshold: float = 0.5,
    size: SizeLike = 224,
    eps: float = 1e-5,
    return_boxes: bool = False,
):
    r"""Per-image localization metrics of the protocol in the module docstring.

    For each image: upsample the map to ``size`` (bilinear,
    ``align_corners=False``), min-max normalise, binarise with ``> threshold``,
    take one box per external contour, fill the boxes inclusively into a mask,
    and compare it with the union of the ground-truth boxes (same fill) by
    :func:`localization_metrics`.

    Args:
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``).
        gt_boxes_list (sequence of Tensor or Tensor): per image ``[n_i, 4]``
            ground-truth boxes ``(xmin, ymin, xmax, ymax)`` (inclusive) already
            in ``size`` coordinates (see :func:`scale_boxes`), or a ``[B, n, 4]`` tensor.
        threshold (float, optional): Default: 0.5
        size (int or (int, int), optional): evaluation resolution. Default: 224
        eps (float, optional): metric smoothing constant. Default: 1e-5
        return_boxes (bool, optional): also return the predicted boxes. Default: False

    Returns:
        dict[str, Tensor] with ``Tensor[B]`` per metric name; with
        ``return_boxes=True`` the pair ``(metrics, pred_boxes)`` where
        ``pred_boxes`` is a list of ``LongTensor[n_i, 4]``.
    """
    maps = _as_b1hw(maps)
    if len(gt_boxes_list) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(gt_boxes_list)} ground-truth box sets")
    pred_boxes = predict_boxes(maps, threshold=threshold, size=size)
    pred_mask = torch.stack([boxes_to_mask(b, size) for b in pred_boxes])
    gt_mask = torch.stack([boxes_to_mask(b, size) for b in gt_boxes_list])
    metrics = localization_metrics(pred_mask, gt_mask, eps=eps)
    return (metrics, pred_boxes) if return_boxes else metrics


def mean(per_image: Dict[str, Union[Tensor, Sequence[float]]]) -> Dict[str, float]:
    r"""Average per-image metrics over images.

    Args:
        per_image (dict): ``{name: Tensor[B] or list of floats}``; several
            batches may be concatenated first (lists of tensors are accepted).

    Returns:
        dict[str, float]: the means (NaN for an empty set of images).
    """
    out = {}
    for k, v in per_image.items():
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor):
            v = torch.cat([t.reshape(-1) for t in v])
        t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        out[k] = float(t.mean()) if t.numel() else float("nan")
    return out


def mass_inside(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Fraction of each map's mass that falls inside a mask.

    The map is upsampled to the mask size (bilinear, ``align_corners=False``)
    and min-max normalised first, as in the localization protocol, so the
    result is ``sum(m * mask) / sum(m)`` with ``m`` in [0, 1]. A constant map
    (all zeros after normalisation) gives 0.

    Args:
        maps (Tensor): raw maps ``[B, 1, h, w]`` (or ``[B, h, w]``).
        masks (Tensor): bool masks ``[B, H, W]`` (or ``[B, 1, H, W]``).

    Returns:
        Tensor: ``Tensor[B]`` of fractions in [0, 1].
    """
    masks = _as_bhw_mask(masks)
    m = minmax_normalize(upsample(maps, tuple(masks.shape[-2:])))[:, 0]
    masks = masks.to(m.device)
    total = m.flatten(1).sum(1)
    inside = (m * masks).flatten(1).sum(1)
    return inside / total.clamp_min(torch.finfo(m.dtype).tiny)


def instances_touched(pred_boxes: Union[Tensor, Sequence[Sequence[int]]], instance_masks: Tensor) -> Tensor:
    r"""Which instance masks intersect at least one predicted box (inclusive fill).

    Args:
        pred_boxes (Tensor): ``[m, 4]`` predicted boxes ``(xmin, ymin, xmax, ymax)``.
        instance_masks (Tensor): bool ``[n, H, W]`` masks, one per instance.

    Returns:
        Tensor: bool ``Tensor[n]``.
    """
    instance_masks = _as_bhw_mask(instance_masks)
    covered = boxes_to_mask(pred_boxes, tuple(instance_masks.shape[-2:])).to(instance_masks.device)
    # a mask meets some box iff it meets the union of the boxes
    return (instance_masks & covered).flatten(1).any(1)


def boxes_touch_instances(pred_boxes: Union[Tensor, Sequence[Sequence[int]]], instance_masks: Tensor) -> bool:
    r"""Whether every instance mask intersects at least one predicted box.

    Used in the multi-instance report: with several objects of the target
    class, does the thresholded map reach all of them? (A single box that
    spans all instances also counts; compare the number of boxes if that
    matters.)

    Args:
        pred_boxes (Tensor): ``[m, 4]`` predicted boxes.
        instance_masks (Tensor): bool ``[n, H, W]`` instance masks.

    Returns:
        bool: True when all ``n`` instances are touched (vacuously True for ``n = 0``).
    """
    return bool(instances_touched(pred_boxes, instance_masks).all())
