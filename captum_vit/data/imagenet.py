"""ImageNet (ILSVRC 2012 CLS-LOC) validation images with their ground-truth boxes.

Two layouts are accepted under ``root`` (the data folder may also sit one level down, in
``ILSVRC/``, as in the Kaggle download):

(a) class folders: ``Data/CLS-LOC/val/<wnid>/*.JPEG`` with one Pascal-VOC style XML per image in
    the flat ``Annotations/CLS-LOC/val/<image id>.xml``. Classes are the folder names.
(b) flat folder: ``Data/CLS-LOC/val/*.JPEG`` with ``LOC_val_solution.csv`` beside ``Data`` (or in
    ``root``), columns ``ImageId,PredictionString``, the string being repeated
    ``wnid xmin ymin xmax ymax`` groups. Classes are the wnids of ``LOC_synset_mapping.txt``
    (first token of each line) when that file is present, else the distinct wnids of the csv.

The class index is the position of the wnid in the **sorted** class list (Python string order,
which for ``n`` + 8-digit wnids is the numeric order the 1000-class models are trained with), so
no file-system listing order or path separator enters a label. Without a mapping file, layout (b)
only numbers the classes that occur, which equals the 1000-class numbering only on the full
validation set. Images are ordered by image id in both layouts, so both give the same samples.

The label of an image is its class folder (a) or the wnid of its csv row (b, which must name one
class); its boxes are all annotated boxes of that class (the metric takes their union).
Annotation coordinates are used as written.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .boxes import AnnotatedImageDataset, Box, DatasetFileError, Record, check_box, parse_voc_xml

__all__ = ["ImageNetVal"]

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_CSV = "LOC_val_solution.csv"
_MAPPING = "LOC_synset_mapping.txt"
_DATA = os.path.join("Data", "CLS-LOC", "val")
_ANN = os.path.join("Annotations", "CLS-LOC", "val")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith(".")


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


class ImageNetVal(AnnotatedImageDataset):
    r"""ImageNet validation set with boxes, for weakly-supervised localization.

    Args:
        root (str): folder holding ``Data/CLS-LOC/val`` (or ``ILSVRC/Data/CLS-LOC/val``) and the
            annotations of one of the two layouts of the module docstring.
        input_size (int, optional): side of the square model input. Default: 224
        mean, std (sequence of float, optional): normalisation. Default: 0.5 each
        transform (str, optional): ``"squash"`` (default) or ``"resize_crop"``; box rules in
            :mod:`captum_vit.data.boxes`.
        crop_pct (float, optional): ``resize_crop`` only. Default: 0.875
        interpolation (str, optional): ``"bilinear"`` (default), ``"bicubic"``, ``"nearest"``.
        on_error (str, optional): ``"raise"`` (default) or ``"skip"`` (see ``skipped``).
        verify_images (bool, optional): decode every image at construction. Default: False

    Attributes:
        classes (list of str): sorted wnids; ``classes[label]`` is a sample's wnid.
        layout (str): ``"folders"`` or ``"csv"``.
        skipped (list of (str, str)): ``(file, reason)`` of every sample left out.

    Examples::

        >>> ds = ImageNetVal("/data/imagenet")
        >>> sample = ds[0]
        >>> sample["image"].shape      # torch.Size([3, 224, 224])
        >>> ds.classes[sample["label"]]  # the image's wnid
        >>> sample["boxes"]             # LongTensor[K, 4], inclusive, in the 224 x 224 input
    """

    def __init__(self, root: str, input_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), transform: str = "squash", crop_pct: float = 0.875,
                 interpolation: str = "bilinear", on_error: str = "raise", verify_images: bool = False) -> None:
        super().__init__(input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageNet root {self.root} does not exist (expected {_DATA} under it)")
        base = self._find_base()
        data_dir = os.path.join(base, _DATA)
        entries = sorted(os.listdir(data_dir))
        class_dirs = [e for e in entries if os.path.isdir(os.path.join(data_dir, e))]
        flat_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(data_dir, e))]
        if class_dirs and flat_images:
            raise ValueError(f"{data_dir} holds both class folders and images; expected one layout: "
                             f"<wnid>/*.JPEG with {_ANN}/*.xml, or *.JPEG with {_CSV}")
        if class_dirs:
            self.layout = "folders"
            ann_dir = os.path.join(base, _ANN)
            if not os.path.isdir(ann_dir):
                raise FileNotFoundError(f"class-folder layout found in {data_dir} but the annotation folder "
                                        f"{ann_dir} (one <image id>.xml per image) does not exist")
            self.classes = sorted(class_dirs)
            records = self._folder_records(data_dir, ann_dir)
        elif flat_images:
            self.layout = "csv"
            csv_path = self._find_file(base, _CSV)
            if csv_path is None:
                raise FileNotFoundError(f"flat image folder {data_dir} found but no {_CSV} in {self.root} or {base}"
                                        f" (or use class folders <wnid>/*.JPEG with {_ANN}/*.xml)")
            records = self._csv_records(data_dir, flat_images, csv_path, self._find_file(base, _MAPPING))
        else:
            raise FileNotFoundError(f"no images in {data_dir}: expected <wnid>/*.JPEG with {_ANN}/*.xml, "
                                    f"or *.JPEG with {_CSV}")
        self._finish_init(records)

    def _find_base(self) -> str:
        for base in (self.root, os.path.join(self.root, "ILSVRC")):
            if os.path.isdir(os.path.join(base, _DATA)):
                return base
        raise FileNotFoundError(
            f"no ImageNet validation folder under {self.root}: expected {_DATA} (or ILSVRC/{_DATA}) holding "
            f"either <wnid>/*.JPEG with {_ANN}/*.xml, or *.JPEG with {_CSV}")

    def _find_file(self, base: str, name: str) -> Optional[str]:
        for folder in dict.fromkeys((self.root, base)):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                return p
        return None

    def _folder_records(self, data_dir: str, ann_dir: str) -> List[Record]:
        index = {w: i for i, w in enumerate(self.classes)}
        found: List[Tuple[str, str, str]] = []  # (image id, wnid, file name)
        for wnid in self.classes:
            for name in sorted(os.listdir(os.path.join(data_dir, wnid))):
                if _is_image(name):
                    found.append((_stem(name), wnid, name))
        records = []
        for image_id, wnid, name in sorted(found):
            path = os.path.join(data_dir, wnid, name)
            xml = os.path.join(ann_dir, image_id + ".xml")
            try:
                if not os.path.isfile(xml):
                    raise DatasetFileError(path, f"no annotation {xml}")
                size, objects = parse_voc_xml(xml)
                boxes = tuple(box for obj_name, box in objects if obj_name == wnid)
                if not boxes:
                    names = sorted({n for n, _ in objects})
                    raise DatasetFileError(xml, f"no box of the image's class {wnid} (objects: {names})")
            except DatasetFileError as e:
                self._fail(e)
                continue
            records.append(Record(path, index[wnid], boxes, size, xml))
        return records

    def _csv_records(self, data_dir: str, images: List[str], csv_path: str,
                     mapping_path: Optional[str]) -> List[Record]:
        rows: Dict[str, Tuple[str, Tuple[Box, ...]]] = {}
        bad_rows: Dict[str, DatasetFileError] = {}
        try:
            with open(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                    raise DatasetFileError(csv_path, f"expected columns ImageId,PredictionString, got "
                                                     f"{reader.fieldnames}")
                for line_no, row in enumerate(reader, start=2):
                    image_id = (row["ImageId"] or "").strip()
                    where = f"{csv_path} line {line_no} ({image_id})"
                    try:
                        rows[image_id] = self._parse_prediction(row["PredictionString"] or "", where)
                    except DatasetFileError as e:
                        bad_rows[image_id] = e
        except OSError as e:
            raise DatasetFileError(csv_path, f"unreadable ({e})") from e
        except csv.Error as e:
            raise DatasetFileError(csv_path, f"malformed csv ({e})") from e

        if mapping_path is not None:
            with open(mapping_path) as f:
                wnids = [line.split()[0] for line in f if line.strip()]
        else:
            wnids = [w for w, _ in rows.values()]
        self.classes = sorted(set(wnids))
        index = {w: i for i, w in enumerate(self.classes)}

        records = []
        for name in sorted(images, key=lambda n: (_stem(n), n)):
            image_id, path = _stem(name), os.path.join(data_dir, name)
            try:
                if image_id in bad_rows:
                    raise bad_rows[image_id]
                if image_id not in rows:
                    raise DatasetFileError(path, f"no row for {image_id} in {csv_path}")
                wnid, boxes = rows[image_id]
                if wnid not in index:
                    raise DatasetFileError(csv_path, f"{image_id}: class {wnid} is not in {mapping_path}")
            except DatasetFileError as e:
                self._fail(e)
                continue
            records.append(Record(path, index[wnid], boxes, None, csv_path))
        return records

    @staticmethod
    def _parse_prediction(text: str, where: str) -> Tuple[str, Tuple[Box, ...]]:
        tokens = text.split()
        if not tokens or len(tokens) % 5:
            raise DatasetFileError(where, f"PredictionString must be groups of 'wnid xmin ymin xmax ymax', "
                                          f"got {len(tokens)} tokens")
        wnids, boxes = set(), []
        for k in range(0, len(tokens), 5):
            wnids.add(tokens[k])
            try:
                box = tuple(float(v) for v in tokens[k + 1:k + 5])
            except ValueError:
                raise DatasetFileError(where, f"non-numeric box {tokens[k + 1:k + 5]}") from None
            check_box(box, where)
            boxes.append(box)
        if len(wnids) != 1:
            # validation images carry one label; a row naming several would make the label a guess
            raise DatasetFileError(where, f"boxes of several classes {sorted(wnids)}")
        return wnids.pop(), tuple(boxes)  # type: ignore[return-value]
