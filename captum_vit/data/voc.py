"""PASCAL VOC single-class images with their boxes.

Layout under ``root`` (a ``VOCdevkit`` folder, or the ``VOC<year>`` folder itself)::

    VOC<year>/ImageSets/Main/<split>.txt   one image id per line
    VOC<year>/JPEGImages/<id>.jpg
    VOC<year>/Annotations/<id>.xml

Only single-class images are kept: every ``<object>`` of the image (``difficult`` ones included)
names the same class; images without objects are left out too. The label indexes the 20 VOC
classes in their standard (alphabetical) order, and the boxes are all boxes of the image
(``difficult`` ones included). Coordinates are used as written (VOC numbers pixels from 1, so a
box may reach the image width; the scaling clips it).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

from .boxes import AnnotatedImageDataset, DatasetFileError, Record, parse_voc_xml

__all__ = ["VOC_CLASSES", "VOCSingleClass"]

VOC_CLASSES: List[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


class VOCSingleClass(AnnotatedImageDataset):
    r"""PASCAL VOC images whose objects all belong to one class.

    Args:
        root (str): ``VOCdevkit`` folder (holding ``VOC<year>``) or the ``VOC<year>`` folder.
        year (str, optional): Default: ``"2012"``
        split (str, optional): image set in ``ImageSets/Main``. Default: ``"val"``
        input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images: as
            for :class:`captum_vit.data.ImageNetVal`.

    Attributes:
        classes (list of str): the 20 VOC classes, ``classes[label]``.
        num_classes (int): 20, whatever the split holds: labels index the 20 classes, so a model
            head needs at least 20 outputs.
        multi_class (list of str): ids left out for holding several classes (or none).
        skipped (list of (str, str)): ``(file, reason)`` of every sample left out for an error.
    """

    classes = VOC_CLASSES
    num_classes = len(VOC_CLASSES)

    # the preprocessing options every annotated dataset takes (AnnotatedImageDataset's), plus year and split
    def __init__(self, root: str, year: str = "2012", split: str = "val", input_size: int = 224,  # noqa: PLR0913
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 transform: str = "squash", crop_pct: float = 0.875, interpolation: str = "bilinear",
                 on_error: str = "raise", verify_images: bool = False) -> None:
        super().__init__(input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images)
        self.root = os.fspath(root)
        folder = f"VOC{year}"
        candidates = [os.path.join(self.root, folder), self.root]
        base = next((c for c in candidates if os.path.isdir(os.path.join(c, "Annotations"))), None)
        list_rel = os.path.join("ImageSets", "Main", f"{split}.txt")
        if base is None or not os.path.isfile(os.path.join(base, list_rel)):
            raise FileNotFoundError(
                f"no PASCAL VOC {year} '{split}' set under {self.root}: expected {folder}/{list_rel}, "
                f"{folder}/JPEGImages/<id>.jpg and {folder}/Annotations/<id>.xml")
        self.base = base
        list_path = os.path.join(base, list_rel)
        with open(list_path) as f:
            # a line may carry a second column (the per-class lists do); the id is the first token
            ids = [line.split()[0] for line in f if line.strip()]
        index = {c: i for i, c in enumerate(VOC_CLASSES)}
        self.multi_class: List[str] = []
        records = []
        seen: Dict[str, int] = {}
        for line_no, image_id in enumerate(ids, start=1):
            xml = os.path.join(base, "Annotations", image_id + ".xml")
            path = os.path.join(base, "JPEGImages", image_id + ".jpg")
            try:
                if image_id in seen:
                    # a repeated id would weigh that image twice in every mean
                    raise DatasetFileError(list_path, f"id {image_id} listed twice (entries {seen[image_id]} and "
                                                      f"{line_no}); keep one line per image")
                seen[image_id] = line_no
                if not os.path.isfile(xml):
                    raise DatasetFileError(xml, f"missing annotation for {image_id} listed in {list_path}")
                size, objects = parse_voc_xml(xml)
                names = {n for n, _ in objects}
                unknown = sorted(names - set(index))
                if unknown:
                    raise DatasetFileError(xml, f"unknown class(es) {unknown}; expected VOC classes")
            except DatasetFileError as e:
                self._fail(e)
                continue
            if len(names) != 1:
                self.multi_class.append(image_id)
                continue
            (name,) = names
            records.append(Record(path, index[name], tuple(b for _, b in objects), size, xml))
        self._finish_init(records)
