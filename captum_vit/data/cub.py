"""CUB-200-2011 images (test split by default) with their bounding boxes.

Layout under ``root`` (the ``CUB_200_2011`` folder, or a folder holding it), every list keyed by
the image id in its first column::

    images.txt               <id> <relative path under images/>
    image_class_labels.txt   <id> <class id, 1..200>
    train_test_split.txt     <id> <1 = train, 0 = test>
    bounding_boxes.txt       <id> <x> <y> <width> <height>   (floats, x/y = top-left corner)
    classes.txt              <class id> <name>
    images/<relative path>

Only the images of one split are used: test (split flag 0, the default) or train (flag 1, for
fine-tuning a classifier head); ``label = class id - 1``. A box becomes
``(x, y, x + width, y + height)``, taken as inclusive bounds like the other datasets' boxes: the
annotation does not say whether its far edge is inside, and this reading keeps the whole
annotated area (at most one extra original pixel per side) before the scaling truncates.

An ``images.txt`` path must stay under ``images/``: an absolute path or a ``..`` component is an
annotation error (raised, or skipped and counted with ``on_error="skip"``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

from .boxes import AnnotatedImageDataset, DatasetFileError, Record, check_box

__all__ = ["CUBTest"]

# flag of each split in train_test_split.txt
_SPLIT_FLAGS = {"train": "1", "test": "0"}
_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


def _read_table(path: str, width: int) -> Dict[str, List[str]]:
    """``{first column: other columns}`` of a whitespace-separated list; ``width`` columns after the id."""
    out: Dict[str, List[str]] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.strip().split(maxsplit=width)
            if not parts:
                continue
            if len(parts) != width + 1:
                raise DatasetFileError(path, f"line {line_no}: expected {width + 1} columns, got {line.strip()!r}")
            if parts[0] in out:
                raise DatasetFileError(path, f"line {line_no}: id {parts[0]} repeated")
            out[parts[0]] = parts[1:]
    return out


class CUBTest(AnnotatedImageDataset):
    r"""CUB-200-2011 test (or train) split with one box per image.

    Args:
        root (str): the ``CUB_200_2011`` folder or its parent.
        split (str, optional): ``"test"`` (flag 0 in ``train_test_split.txt``) or ``"train"``
            (flag 1). Default: ``"test"``
        input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images: as
            for :class:`captum_vit.data.ImageNetVal`.

    Attributes:
        classes (list of str): class names in class-id order, ``classes[label]``.
        num_classes (int): ``len(classes)``, 200 on CUB-200-2011: labels lie in
            ``0..num_classes - 1``, so a model head needs at least this many outputs.
        skipped (list of (str, str)): ``(file, reason)`` of every sample left out.
    """

    # the preprocessing options every annotated dataset takes (AnnotatedImageDataset's), plus the split
    def __init__(self, root: str, input_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),  # noqa: PLR0913
                 std: Sequence[float] = (0.5, 0.5, 0.5), transform: str = "squash", crop_pct: float = 0.875,
                 interpolation: str = "bilinear", on_error: str = "raise", verify_images: bool = False,
                 split: str = "test") -> None:
        if split not in _SPLIT_FLAGS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_FLAGS)}, got {split!r}")
        super().__init__(input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images)
        self.root = os.fspath(root)
        base = next((c for c in (self.root, os.path.join(self.root, "CUB_200_2011"))
                     if os.path.isfile(os.path.join(c, "images.txt"))), None)
        missing = [f for f in _FILES if base is None or not os.path.isfile(os.path.join(base, f))]
        if base is None or missing:
            raise FileNotFoundError(f"no CUB-200-2011 under {self.root}: expected {', '.join(_FILES)} and images/ "
                                    f"in it or in CUB_200_2011/ (missing: {', '.join(missing)})")
        self.base = base
        p = {f: os.path.join(base, f) for f in _FILES}
        # the lists are read whole: a malformed list taints every sample, so it always raises
        tables = {f: _read_table(p[f], 4 if f == "bounding_boxes.txt" else 1) for f in _FILES[:4]}
        self.classes = _read_classes(p["classes.txt"])
        self.num_classes = len(self.classes)

        records = []
        flags = tables["train_test_split.txt"]
        for image_id in sorted(flags, key=_id_key):
            flag = flags[image_id][0]
            if flag not in ("0", "1"):
                self._fail(DatasetFileError(p["train_test_split.txt"], f"id {image_id}: flag {flag!r} is not 0 or 1"))
                continue
            if flag != _SPLIT_FLAGS[split]:
                continue
            try:
                records.append(self._record(image_id, split, p, tables))
            except DatasetFileError as e:
                self._fail(e)
        self._finish_init(records)

    def _record(self, image_id: str, split: str, p: Dict[str, str], tables: Dict[str, Dict[str, List[str]]]) -> Record:
        """The record of one image of the split from the lists; a :class:`DatasetFileError` names what is wrong."""
        images, labels, boxes = tables["images.txt"], tables["image_class_labels.txt"], tables["bounding_boxes.txt"]
        for name in ("images.txt", "image_class_labels.txt", "bounding_boxes.txt"):
            if image_id not in tables[name]:
                raise DatasetFileError(p[name], f"no entry for {split} image id {image_id}")
        try:
            label = int(labels[image_id][0]) - 1
        except ValueError:
            raise DatasetFileError(p["image_class_labels.txt"], f"id {image_id}: non-integer class") from None
        if not 0 <= label < len(self.classes):
            raise DatasetFileError(p["image_class_labels.txt"],
                                   f"id {image_id}: class {label + 1} not in 1..{len(self.classes)}")
        try:
            x, y, w, h = (float(v) for v in boxes[image_id])
        except ValueError:
            raise DatasetFileError(p["bounding_boxes.txt"], f"id {image_id}: non-numeric box") from None
        if w < 0 or h < 0:
            raise DatasetFileError(p["bounding_boxes.txt"], f"id {image_id}: negative width/height")
        box = (x, y, x + w, y + h)
        check_box(box, p["bounding_boxes.txt"])
        rel = images[image_id][0].strip()
        # the list uses '/' whatever the OS; split it rather than trust the separator
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in parts or ":" in parts[0]:
            # a path that climbs out would read an image of another dataset (or any file) as this one
            raise DatasetFileError(p["images.txt"], f"id {image_id}: path {rel!r} points outside images/; "
                                                    "give a path relative to images/ without '..'")
        path = os.path.join(self.base, "images", *[q for q in parts if q not in ("", ".")])
        return Record(path, label, (box,), None, p["bounding_boxes.txt"])


def _read_classes(path: str) -> List[str]:
    """Class names in id order from ``classes.txt``, whose ids must be 1..N without gaps."""
    class_rows = _read_table(path, 1)
    try:
        class_ids = sorted(int(k) for k in class_rows)
    except ValueError:
        raise DatasetFileError(path, "non-integer class id") from None
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DatasetFileError(path, "class ids must be 1..N without gaps")
    return [class_rows[str(k)][0].strip() for k in class_ids]


def _id_key(image_id: str):
    """Numeric order for numeric ids (the lists' own), string order otherwise."""
    return (0, int(image_id), "") if image_id.isdigit() else (1, 0, image_id)
