"""Overlays and figures for attribution maps, and the bridge to ``captum.attr.visualization``.

Figures use matplotlib's Agg canvas directly (no ``pyplot`` state, no display needed).
Boxes follow the package convention ``(xmin, ymin, xmax, ymax)`` with inclusive bounds and are
drawn around the pixels they cover.
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from captum_vit.metrics.localization import minmax_normalize, upsample

__all__ = ["overlay", "save_overlay", "gallery", "to_captum_hwc", "colorize", "denormalise", "overlay_stems"]

ArrayLike = Union[Tensor, np.ndarray]


def _to_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _image_hwc_uint8(image: ArrayLike) -> np.ndarray:
    img = _to_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))  # CHW -> HWC
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    return np.ascontiguousarray(img)


def _cam_to_size(cam: ArrayLike, size: Tuple[int, int]) -> np.ndarray:
    """Squeeze a map to 2-D, resize bilinearly (align_corners=False) and min-max it to [0, 1]."""
    t = torch.as_tensor(_to_numpy(cam)).detach().float().squeeze()
    if t.dim() != 2:
        raise ValueError(f"expected a single 2-D map, got shape {tuple(t.shape)}")
    return minmax_normalize(upsample(t, size))[0, 0].numpy()


def denormalise(x: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    r"""Undo a model's input normalisation: a ``[3, H, W]`` image tensor back to a uint8 picture.

    ``x * std + mean`` per channel in float32, clipped to [0, 1], scaled to 255 and rounded
    half to even (``torch.round``).

    Args:
        x (Tensor or ndarray): one normalised image ``[3, H, W]``, on any device.
        mean (sequence of float): the per-channel mean it was normalised with (a data config's ``mean``).
        std (sequence of float): the per-channel standard deviation (a data config's ``std``).

    Returns:
        ndarray: ``[H, W, 3]`` uint8 image.
    """
    x = torch.as_tensor(x).detach().cpu().float()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def overlay_stems(images: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """One distinct output stem per image, in order: the file's stem, then ``_2``, ``_3``, ... on repeats.

    Compared case-insensitively, so that two overlays never overwrite each other on a
    case-insensitive file system either. ``export/agcam_ort.py`` keeps a copy of this rule (it
    cannot import the package), so the command line and the kit name the same files alike.
    """
    used, stems = set(), []
    for path in images:
        base = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        stem, k = base, 1
        while stem.casefold() in used:
            k += 1
            stem = f"{base}_{k}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def colorize(cam_01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    r"""Map values in [0, 1] to RGB with a matplotlib colormap.

    Args:
        cam_01 (ndarray): ``[H, W]`` values in [0, 1].
        cmap (str, optional): matplotlib colormap name. Default: ``"jet"``

    Returns:
        ndarray: ``[H, W, 3]`` float array in [0, 1].
    """
    import matplotlib

    return matplotlib.colormaps[cmap](np.clip(cam_01, 0.0, 1.0))[..., :3]


def overlay(image_uint8_hwc: ArrayLike, cam_2d: ArrayLike, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    r"""Blend a heat map over an image.

    The map is upsampled to the image (bilinear, ``align_corners=False``),
    min-max normalised, coloured with ``cmap`` and blended as
    ``(1 - alpha) * image + alpha * heat``.

    Args:
        image_uint8_hwc (ndarray or Tensor): ``[H, W, 3]`` (or ``[H, W]``) uint8 image.
        cam_2d (ndarray or Tensor): the map, ``[h, w]`` (singleton dimensions are squeezed,
            so ``[1, h, w]`` and ``[1, 1, h, w]`` work too).
        alpha (float, optional): weight of the heat map. Default: 0.5
        cmap (str, optional): matplotlib colormap name. Default: ``"jet"``

    Returns:
        ndarray: ``[H, W, 3]`` uint8 image.
    """
    img = _image_hwc_uint8(image_uint8_hwc)
    cam = _cam_to_size(cam_2d, img.shape[:2])
    heat = colorize(cam, cmap) * 255.0
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_overlay(path: str, image_uint8_hwc: ArrayLike, cam_2d: ArrayLike, alpha: float = 0.5,
                 cmap: str = "jet") -> np.ndarray:
    r"""Write :func:`overlay` to an image file (format from the extension).

    Args:
        path (str): output file, e.g. ``"cam.png"``; parent folders are created.
        image_uint8_hwc, cam_2d, alpha, cmap: as in :func:`overlay`.

    Returns:
        ndarray: the overlay that was written.
    """
    from PIL import Image

    out = overlay(image_uint8_hwc, cam_2d, alpha=alpha, cmap=cmap)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    Image.fromarray(out).save(path)
    return out


def _draw_boxes(ax, boxes, color: str, lw: float = 1.5) -> None:
    from matplotlib.patches import Rectangle

    if boxes is None:
        return
    for xmin, ymin, xmax, ymax in torch.as_tensor(boxes).reshape(-1, 4).tolist():
        # inclusive pixel bounds: the rectangle runs around the outer edges of the covered pixels
        ax.add_patch(Rectangle((xmin - 0.5, ymin - 0.5), xmax - xmin + 1, ymax - ymin + 1,
                               fill=False, edgecolor=color, linewidth=lw))


# the public figure: what to draw (images, boxes, maps) and how, all drawing options keywords with defaults
def gallery(  # noqa: PLR0913
    path: str,
    images_uint8: Union[Sequence[ArrayLike], ArrayLike],
    gt_boxes: Optional[Sequence[ArrayLike]],
    maps_by_method: Mapping[str, Union[Tensor, Sequence[ArrayLike]]],
    pred_boxes_by_method: Optional[Mapping[str, Sequence[ArrayLike]]] = None,
    titles: Optional[Sequence[str]] = None,
    threshold: Optional[float] = 0.5,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_inches: float = 2.2,
    dpi: int = 100,
) -> str:
    r"""Save a grid figure: one row per image, the image with its ground-truth boxes (green), then
    one column per method with its overlay and predicted contour boxes (red).

    Args:
        path (str): output PNG path; parent folders are created.
        images_uint8 (sequence or Tensor): ``B`` images ``[H, W, 3]`` uint8 (a ``[B, H, W, 3]``
            tensor works too).
        gt_boxes (sequence of Tensor, optional): per image ``[n, 4]`` ground-truth boxes
            (inclusive), drawn in green; ``None`` draws none.
        maps_by_method (dict): method name -> maps ``[B, 1, h, w]`` (or a sequence of ``B``
            2-D maps). Column order follows the dict.
        pred_boxes_by_method (dict, optional): method name -> per image ``[m, 4]`` boxes drawn in
            red. If ``None`` and ``threshold`` is not ``None``, they are computed with the
            localization protocol (:func:`captum_vit.metrics.predict_boxes` at the image size).
            Default: None
        titles (sequence of str, optional): one label per row, shown over the image column.
        threshold (float, optional): threshold for computing predicted boxes; ``None`` draws no
            predicted boxes unless given. Default: 0.5
        alpha (float, optional): overlay weight. Default: 0.5
        cmap (str, optional): colormap. Default: ``"jet"``
        cell_inches (float, optional): size of one panel. Default: 2.2
        dpi (int, optional): resolution. Default: 100

    Returns:
        str: ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(images_uint8, (Tensor, np.ndarray)) and _to_numpy(images_uint8).ndim == 4:
        images = [_image_hwc_uint8(im) for im in _to_numpy(images_uint8)]
    else:
        images = [_image_hwc_uint8(im) for im in images_uint8]
    n = len(images)
    methods = list(maps_by_method)
    for name in methods:
        if len(maps_by_method[name]) < n:
            raise ValueError(f"method {name!r} has {len(maps_by_method[name])} maps for {n} images")
    if pred_boxes_by_method is None and threshold is not None and methods:
        from captum_vit.metrics.localization import predict_boxes

        pred_boxes_by_method = {}
        for name in methods:
            boxes = []
            for i, im in enumerate(images):
                m = torch.as_tensor(_to_numpy(maps_by_method[name][i])).float().squeeze()
                boxes.extend(predict_boxes(m[None, None], threshold=threshold, size=im.shape[:2]))
            pred_boxes_by_method[name] = boxes

    cols = 1 + len(methods)
    fig = Figure(figsize=(cell_inches * cols, cell_inches * max(n, 1) + 0.3), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(n, 1), cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for i, im in enumerate(images):
        ax = axes[i, 0]
        ax.imshow(im, interpolation="nearest")
        _draw_boxes(ax, None if gt_boxes is None else gt_boxes[i], "lime")
        ax.set_title(titles[i] if titles is not None else "image", fontsize=8)
        for j, name in enumerate(methods, start=1):
            ax = axes[i, j]
            ax.imshow(overlay(im, maps_by_method[name][i], alpha=alpha, cmap=cmap), interpolation="nearest")
            if pred_boxes_by_method is not None and name in pred_boxes_by_method:
                _draw_boxes(ax, pred_boxes_by_method[name][i], "red")
            ax.set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xlim(-0.5, images[0].shape[1] - 0.5 if images else 0.5)
        ax.set_ylim(images[0].shape[0] - 0.5 if images else 0.5, -0.5)
    fig.tight_layout(pad=0.3)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def to_captum_hwc(attributions: Tensor, size: Optional[Tuple[int, int]] = None) -> List[np.ndarray]:
    r"""Convert ``[B, 1, h, w]`` maps to what ``captum.attr.visualization.visualize_image_attr``
    expects: one ``[H, W, 1]`` numpy array per image.

    Maps are upsampled bilinearly (``align_corners=False``) to ``size`` and keep their sign and
    scale (Captum normalises them itself). Use ``sign="positive"`` for non-negative maps such as
    AGCAM and ``sign="all"`` for signed ones such as CDAM.

    Args:
        attributions (Tensor): ``[B, 1, h, w]`` (or ``[B, h, w]``) maps.
        size (tuple of int, optional): output ``(H, W)``; ``None`` keeps ``(h, w)``.

    Returns:
        list[ndarray]: ``B`` float arrays ``[H, W, 1]``.

    Examples::

        >>> from captum.attr import visualization as viz
        >>> hwc = to_captum_hwc(agcam.attribute(x, target=3), size=(224, 224))
        >>> fig, ax = viz.visualize_image_attr(hwc[0], image_uint8_hwc, method="blended_heat_map",
        ...                                    sign="positive", use_pyplot=False)
    """
    a = attributions.detach()
    if a.dim() == 3:
        a = a[:, None]
    if a.dim() != 4 or a.shape[1] != 1:
        raise ValueError(f"expected [B, 1, h, w] attributions, got {tuple(attributions.shape)}")
    a = a.float()
    if size is not None and tuple(size) != tuple(a.shape[-2:]):
        a = F.interpolate(a, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return [np.ascontiguousarray(m.permute(1, 2, 0).cpu().numpy()) for m in a]
