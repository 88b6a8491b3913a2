"""Shared machinery of the annotated real-image datasets (ImageNet val, PASCAL VOC, CUB-200-2011).

Each dataset parses its annotations once, at construction, into a list of
:class:`Record` (image path, label, boxes in original pixel coordinates) and
:class:`AnnotatedImageDataset` turns a record into a sample dict::

    {"image": FloatTensor[3, S, S],   # normalised by mean/std
     "label": int,
     "boxes": LongTensor[K, 4],       # (xmin, ymin, xmax, ymax), inclusive, in the S x S input's pixels
     "path": str,
     "orig_size": (width, height),    # of the image file as decoded
     "index": int}

Box convention (the one the localization metrics use): box ``(xmin, ymin, xmax, ymax)`` covers
``mask[ymin:ymax + 1, xmin:xmax + 1]``.

Preprocessing (:class:`Preprocess`)
-----------------------------------
``"squash"`` (default, the weakly-supervised localization protocol): the RGB image is resized to
``S x S`` with PIL bilinear filtering (no crop, aspect ratio not kept); every box coordinate
becomes ``int(v / original_size * S)`` (x by the width, y by the height, ``int`` truncates), then
is clipped to ``[0, S - 1]``. The clip changes no filled mask: a coordinate equal to ``S`` only
ever addresses the pixel row/column past the image.

``"resize_crop"`` (timm's evaluation transform): the shorter side is resized to
``floor(S / crop_pct)`` and the longer one to ``int(that * long / short)``, then the centre
``S x S`` window is cut out, its top-left corner at ``int(round((new - S) / 2))`` per axis. Boxes
follow the same map: ``int(v / original_size * new_size) - offset`` per axis, clipped to
``[0, S - 1]``; a box lying wholly outside the window is dropped (a sample may then carry no box).

Errors
------
A file that cannot be read, or an annotation that cannot be trusted, raises
:class:`DatasetFileError` naming the file (``on_error="raise"``, the default). With
``on_error="skip"`` the sample is left out instead and ``(path, reason)`` is appended to
``dataset.skipped``. Annotation problems are found at construction, so those samples never get an
index. A corrupt image is only found when it is decoded: :meth:`AnnotatedImageDataset.__getitem__`
then returns ``None`` (which :func:`collate_annotated` drops) unless ``verify_images=True``
decoded every image at construction, which keeps indices dense at the price of one full pass.

Among the annotations refused: a size or coordinate that is not finite, and a box lying wholly
outside its image (``xmin >= width``, ``ymin >= height``, ``xmax < 0`` or ``ymax < 0``), which
the scaling would drop, leaving the sample scored against no ground truth. Where the annotation
states the image size (the XML formats) that check runs at construction; otherwise (ImageNet's
csv, CUB) when the image is decoded, like a corrupt image.

Images are decoded by :func:`captum_vit.data.images.decode_image`: 16-bit images are scaled to
8 bits (``v / 257``) and float images read as ``[0, 1]``, never clipped by PIL's RGB conversion.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .images import DatasetFileError, decode_image

__all__ = [
    "AnnotatedImageDataset",
    "DatasetFileError",
    "Preprocess",
    "Record",
    "check_box_in_image",
    "collate_annotated",
    "load_rgb",
    "parse_voc_xml",
]

Box = Tuple[float, float, float, float]

_ON_ERROR = ("raise", "skip")
_TRANSFORMS = ("squash", "resize_crop")
# plain ints, as the legacy Image.BILINEAR etc. are: the dataset description records str(resample)
_INTERPOLATION = {"bilinear": int(Image.Resampling.BILINEAR), "bicubic": int(Image.Resampling.BICUBIC),
                  "nearest": int(Image.Resampling.NEAREST)}


@dataclass(frozen=True)
class Record:
    """One image as the annotations describe it.

    Attributes:
        path: image file.
        label: class index.
        boxes: boxes of that class, ``(xmin, ymin, xmax, ymax)`` in original pixel coordinates.
        annotated_size: ``(width, height)`` stated by the annotation, checked against the decoded
            image (a mismatch would scale the boxes wrongly), or ``None`` where the format has none.
        source: the annotation file, named in errors.
    """

    path: str
    label: int
    boxes: Tuple[Box, ...]
    annotated_size: Optional[Tuple[int, int]] = None
    source: str = ""


def parse_voc_xml(path: str) -> Tuple[Tuple[int, int], List[Tuple[str, Box]]]:
    """Read a PASCAL-VOC style annotation (also ImageNet's).

    Args:
        path: the ``.xml`` file.

    Returns:
        ``((width, height), [(name, (xmin, ymin, xmax, ymax)), ...])`` with one entry per
        ``<object>``, boxes as floats, as written.

    Raises:
        DatasetFileError: unparsable XML, a missing or non-numeric field, a size that is not a
            finite number >= 1, or a box that is not finite or has ``xmin > xmax`` or
            ``ymin > ymax``.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetFileError(path, f"unreadable annotation ({e})") from e

    def number(node: Optional[ET.Element], tag: str) -> float:
        text = node.findtext(tag) if node is not None else None
        try:
            return float(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DatasetFileError(path, f"missing or non-numeric <{tag}>") from None

    size = root.find("size")
    w, h = number(size, "width"), number(size, "height")
    if not (math.isfinite(w) and math.isfinite(h)) or w < 1 or h < 1:
        raise DatasetFileError(path, f"image size {w}x{h} is not a finite number of pixels >= 1")
    objects: List[Tuple[str, Box]] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetFileError(path, "an <object> without <name>")
        bb = obj.find("bndbox")
        box = (number(bb, "xmin"), number(bb, "ymin"), number(bb, "xmax"), number(bb, "ymax"))
        check_box(box, path)
        objects.append((name, box))
    return (int(w), int(h)), objects


def check_box(box: Sequence[float], source: str) -> None:
    """Refuse a box that is not finite or has ``xmin > xmax`` / ``ymin > ymax``."""
    if not all(math.isfinite(v) for v in box):
        raise DatasetFileError(source, f"non-finite box {tuple(box)}")
    if box[0] > box[2] or box[1] > box[3]:
        raise DatasetFileError(source, f"box {tuple(box)} has min > max")


def check_box_in_image(box: Sequence[float], size: Tuple[int, int], source: str,
                       annotation: Optional[str] = None) -> None:
    """Refuse a box that covers no pixel of a ``size = (width, height)`` image.

    Such a box would vanish in the scaling and leave a sample scored against empty ground truth.
    A box only partly outside is kept (the scaling clips it); ``xmax == width`` is inside (VOC
    numbers pixels from 1). ``source`` is the file the error names; ``annotation``, when given, the
    file the box was read from.
    """
    w, h = size
    if box[0] >= w or box[1] >= h or box[2] < 0 or box[3] < 0:
        origin = f" (from {annotation})" if annotation else ""
        raise DatasetFileError(source, f"box {tuple(box)}{origin} lies wholly outside the {w}x{h} image (it would be "
                                       "scored as a sample without ground truth); fix or drop that annotation")


class Preprocess:
    """Resize (squash or resize + centre crop) and normalise a PIL image, and move boxes with it.

    Args:
        input_size: side ``S`` of the square model input.
        mean, std: per-channel normalisation of the ``[0, 1]`` image.
        transform: ``"squash"`` or ``"resize_crop"`` (see the module docstring).
        crop_pct: ``resize_crop`` only: fraction of the resized shorter side kept by the crop.
        interpolation: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``.
    """

    def __init__(self, input_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), transform: str = "squash", crop_pct: float = 0.875,
                 interpolation: str = "bilinear") -> None:
        if transform not in _TRANSFORMS:
            raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if not 0.0 < crop_pct <= 1.0:
            # a larger crop than the resized image would need padding, which boxes cannot follow honestly
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if int(input_size) <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = int(input_size)
        self.transform = transform
        self.crop_pct = float(crop_pct)
        self.resample = _INTERPOLATION[interpolation]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def geometry(self, orig_size: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """``((resized_w, resized_h), (left, top))`` of the crop window for an image of ``orig_size``."""
        s = self.input_size
        if self.transform == "squash":
            return (s, s), (0, 0)
        w, h = orig_size
        short_target = int(math.floor(s / self.crop_pct))
        # the shorter side gets the target, the longer one is scaled and truncated, as torchvision's Resize(int)
        if w <= h:
            new_w, new_h = short_target, int(short_target * h / w)
        else:
            new_w, new_h = int(short_target * w / h), short_target
        return (new_w, new_h), (int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0)))

    def image(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised ``FloatTensor[3, S, S]``."""
        (new_w, new_h), (left, top) = self.geometry(img.size)
        out = img.resize((new_w, new_h), self.resample)
        if (new_w, new_h) != (self.input_size, self.input_size):
            out = out.crop((left, top, left + self.input_size, top + self.input_size))
        x = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def boxes(self, boxes: Sequence[Box], orig_size: Tuple[int, int]) -> torch.Tensor:
        """Original-pixel boxes -> ``LongTensor[K, 4]`` in input pixels (rules in the module docstring)."""
        (new_w, new_h), (left, top) = self.geometry(orig_size)
        w, h = orig_size
        last = self.input_size - 1
        out = []
        for xmin, ymin, xmax, ymax in boxes:
            # v / original * new in that order and int() truncation: the protocol's formula, bit for bit
            b = [int(xmin / w * new_w) - left, int(ymin / h * new_h) - top,
                 int(xmax / w * new_w) - left, int(ymax / h * new_h) - top]
            if b[2] < 0 or b[3] < 0 or b[0] > last or b[1] > last:
                continue
            out.append([min(max(v, 0), last) for v in b])
        return torch.tensor(out, dtype=torch.int64).reshape(-1, 4)


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully as 8-bit RGB, naming the file on failure.

    16-bit and float images are scaled, not clipped: see :func:`captum_vit.data.images.decode_image`,
    the one decoding rule of the package.
    """
    return decode_image(path)


class AnnotatedImageDataset(torch.utils.data.Dataset):
    """Base of the real-image datasets: records in, sample dicts out (see the module docstring).

    Subclasses parse their annotation files into ``records`` and call :meth:`_finish_init`.

    Args:
        input_size, mean, std, transform, crop_pct, interpolation: see :class:`Preprocess`.
        on_error: ``"raise"`` (default) or ``"skip"``.
        verify_images: decode every image at construction, so that with ``on_error="skip"`` corrupt
            images are skipped before indices are assigned.

    Subclasses set ``classes`` (``classes[label]`` names a label) and ``num_classes``, the number
    of classes labels index into (labels lie in ``0..num_classes - 1``), so that a model whose
    head has fewer outputs can be refused before any compute.
    """

    classes: List[str]
    num_classes: int

    def __init__(self, input_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), transform: str = "squash", crop_pct: float = 0.875,
                 interpolation: str = "bilinear", on_error: str = "raise", verify_images: bool = False) -> None:
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        self.preprocess = Preprocess(input_size, mean, std, transform, crop_pct, interpolation)
        self.on_error = on_error
        self.verify_images = bool(verify_images)
        self.records: List[Record] = []
        self.skipped: List[Tuple[str, str]] = []

    def _fail(self, err: DatasetFileError) -> None:
        """Raise, or record the skip, according to ``on_error``."""
        if self.on_error == "raise":
            raise err
        self.skipped.append((err.path, err.reason))

    def _finish_init(self, records: List[Record]) -> None:
        sized = []
        for rec in records:
            # where the annotation states the image size its boxes are checked now, before indices are given
            if rec.annotated_size is not None:
                try:
                    for box in rec.boxes:
                        check_box_in_image(box, rec.annotated_size, rec.source or rec.path)
                except DatasetFileError as e:
                    self._fail(e)
                    continue
            sized.append(rec)
        records = sized
        if self.verify_images:
            kept = []
            for rec in records:
                try:
                    self._checked_image(rec)
                except DatasetFileError as e:
                    self._fail(e)
                    continue
                kept.append(rec)
            records = kept
        self.records = records

    def _checked_image(self, rec: Record) -> Image.Image:
        img = load_rgb(rec.path)
        if rec.annotated_size is not None and tuple(img.size) != tuple(rec.annotated_size):
            # the boxes were drawn on an image of the annotated size: scaling them by another would misplace them
            raise DatasetFileError(rec.source or rec.path, f"annotation says size {rec.annotated_size[0]}x"
                                   f"{rec.annotated_size[1]} but {rec.path} is {img.size[0]}x{img.size[1]}")
        for box in rec.boxes:
            # without an annotated size the decoded image is the only size the box can be checked against
            check_box_in_image(box, img.size, rec.path, rec.source or None)
        return img

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[Dict[str, object]]:
        if index < 0:
            index += len(self.records)
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        rec = self.records[index]
        try:
            img = self._checked_image(rec)
        except DatasetFileError as e:
            self._fail(e)
            return None
        return {
            "image": self.preprocess.image(img),
            "label": rec.label,
            "boxes": self.preprocess.boxes(rec.boxes, img.size),
            "path": rec.path,
            "orig_size": (int(img.size[0]), int(img.size[1])),
            "index": index,
        }


def collate_annotated(batch: List[Optional[Dict[str, object]]]) -> Dict[str, object]:
    """DataLoader collate for the real-image datasets.

    Drops ``None`` (samples skipped with ``on_error="skip"``), stacks ``image`` / ``label`` /
    ``index`` and keeps ``boxes`` / ``path`` / ``orig_size`` as lists (their lengths vary).
    """
    items = [b for b in batch if b is not None]
    if not items:
        return {"image": torch.zeros(0, 3, 0, 0), "label": torch.zeros(0, dtype=torch.int64),
                "index": torch.zeros(0, dtype=torch.int64), "boxes": [], "path": [], "orig_size": []}
    return {
        "image": torch.stack([b["image"] for b in items]),  # type: ignore[misc]
        "label": torch.tensor([b["label"] for b in items], dtype=torch.int64),
        "index": torch.tensor([b["index"] for b in items], dtype=torch.int64),
        "boxes": [b["boxes"] for b in items],
        "path": [b["path"] for b in items],
        "orig_size": [b["orig_size"] for b in items],
    }


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a directory, else ``FileNotFoundError`` saying what was expected there."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected directory {path} does not exist")
    return path
