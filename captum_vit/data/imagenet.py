"""ImageNet (ILSVRC 2012 CLS-LOC) validation images with their ground-truth boxes.

Two layouts are accepted under ``root`` (the data folder may also sit one level down, in
``ILSVRC/``, as in the Kaggle download):

(a) class folders: ``Data/CLS-LOC/val/<wnid>/*.JPEG`` with one Pascal-VOC style XML per image in
    the flat ``Annotations/CLS-LOC/val/<image id>.xml``.
(b) flat folder: ``Data/CLS-LOC/val/*.JPEG`` with ``LOC_val_solution.csv`` beside ``Data`` (or in
    ``root``), columns ``ImageId,PredictionString``, the string being repeated
    ``wnid xmin ymin xmax ymax`` groups, one row per image.

Labels
------
The class index is the position of the wnid in the canonical sorted list of the 1000 ImageNet-1k
wnids (:data:`IMAGENET_WNIDS`, shipped as ``imagenet_wnids.txt``, the same list as timm's), the
numbering the 1000-class models are trained with, whatever folders or csv rows exist: a subset
of the validation set keeps its labels, and no file-system listing order enters a label.
``LOC_synset_mapping.txt``, when present, is only checked: a wnid in it outside the 1000 is an
error. A class folder or csv row naming a wnid outside the 1000 is a :class:`DatasetFileError`
naming it (or, with ``on_error="skip"``, its images are skipped and counted).

In the class-folder layout only folders named like a wnid (``n`` + 8 digits) are class folders.
Hidden folders (``.ipynb_checkpoints``) and ``__MACOSX`` are ignored; other folders are ignored
with a warning naming them. A wnid folder that is a symbolic link back to the data folder (or
above it) is refused rather than followed, and an image id found in two class folders is refused
(its label would be a guess). Images are ordered by image id in both layouts, so both give the
same samples.

The label of an image is its class folder (a) or the wnid of its csv row (b, which must name one
class); its boxes are all annotated boxes of that class (the metric takes their union).
Annotation coordinates are used as written.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .boxes import AnnotatedImageDataset, Box, DatasetFileError, Record, check_box, parse_voc_xml

__all__ = ["IMAGENET_WNIDS", "ImageNetVal"]

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_CSV = "LOC_val_solution.csv"
_MAPPING = "LOC_synset_mapping.txt"
_DATA = os.path.join("Data", "CLS-LOC", "val")
_ANN = os.path.join("Annotations", "CLS-LOC", "val")
_WNID = re.compile(r"n[0-9]{8}\Z")
# archive debris, ignored without a warning (hidden folders are too)
_JUNK_DIRS = ("__MACOSX",)


def _load_wnids() -> Tuple[str, ...]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_wnids.txt")
    with open(path) as f:
        wnids = tuple(line.strip() for line in f if line.strip())
    # a damaged copy would renumber every label; refuse it at import instead
    if len(wnids) != 1000 or list(wnids) != sorted(set(wnids)) or not all(_WNID.match(w) for w in wnids):
        raise RuntimeError(f"{path} is damaged: expected the 1000 sorted, distinct ImageNet-1k wnids; reinstall "
                           "captum-vit")
    return wnids


#: The 1000 ImageNet-1k wnids in label order (sorted); ``IMAGENET_WNIDS[label]`` is a label's wnid.
IMAGENET_WNIDS: Tuple[str, ...] = _load_wnids()
_INDEX: Dict[str, int] = {w: i for i, w in enumerate(IMAGENET_WNIDS)}
#: one row of LOC_val_solution.csv: the wnid and the boxes
Row = Tuple[str, Tuple[Box, ...]]


def _check_mapping(mapping_path: str) -> None:
    # the mapping no longer numbers the classes, but one naming other classes means another dataset
    with open(mapping_path) as f:
        unknown = sorted({w for w in (line.split()[0] for line in f if line.strip()) if w not in _INDEX})
    if unknown:
        raise DatasetFileError(mapping_path, f"names {len(unknown)} wnid(s) outside the 1000 ImageNet-1k "
                                             f"classes ({unknown[:5]}); this is not ImageNet-1k's mapping")


def _unknown_wnid(wnid: str) -> str:
    return (f"{wnid} is not one of the 1000 ImageNet-1k classes (labels follow the canonical 1000-class index, "
            "captum_vit/data/imagenet_wnids.txt); remove it, or pass on_error='skip' to leave its images out")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith(".")


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _loops_back(path: str, data_dir: str) -> bool:
    """Whether the folder ``path`` resolves to ``data_dir`` or one of its parents."""
    target, here = os.path.realpath(path), os.path.realpath(data_dir)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


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
        classes (list of str): the 1000 ImageNet-1k wnids, sorted (:data:`IMAGENET_WNIDS`);
            ``classes[label]`` is a sample's wnid, whichever classes the folder holds.
        num_classes (int): 1000, whatever subset the folder holds: labels index the 1000 classes,
            so a model head needs 1000 outputs.
        layout (str): ``"folders"`` or ``"csv"``.
        ignored_dirs (list of str): folders of the data folder that were not read as classes.
        skipped (list of (str, str)): ``(file, reason)`` of every sample left out.

    Examples::

        >>> ds = ImageNetVal("/data/imagenet")
        >>> sample = ds[0]
        >>> sample["image"].shape      # torch.Size([3, 224, 224])
        >>> ds.classes[sample["label"]]  # the image's wnid
        >>> sample["boxes"]             # LongTensor[K, 4], inclusive, in the 224 x 224 input
    """

    num_classes = len(IMAGENET_WNIDS)

    # the preprocessing options every annotated dataset takes (AnnotatedImageDataset's)
    def __init__(self, root: str, input_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),  # noqa: PLR0913
                 std: Sequence[float] = (0.5, 0.5, 0.5), transform: str = "squash", crop_pct: float = 0.875,
                 interpolation: str = "bilinear", on_error: str = "raise", verify_images: bool = False) -> None:
        super().__init__(input_size, mean, std, transform, crop_pct, interpolation, on_error, verify_images)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageNet root {self.root} does not exist (expected {_DATA} under it)")
        self.classes = list(IMAGENET_WNIDS)
        base = self._find_base()
        data_dir = os.path.join(base, _DATA)
        entries = sorted(os.listdir(data_dir))
        class_dirs, self.ignored_dirs = self._class_dirs(data_dir, entries)
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
            records = self._folder_records(data_dir, ann_dir, class_dirs)
        elif flat_images:
            self.layout = "csv"
            csv_path = self._find_file(base, _CSV)
            if csv_path is None:
                raise FileNotFoundError(f"flat image folder {data_dir} found but no {_CSV} in {self.root} or {base}"
                                        f" (or use class folders <wnid>/*.JPEG with {_ANN}/*.xml)")
            records = self._csv_records(data_dir, flat_images, csv_path, self._find_file(base, _MAPPING))
        else:
            ignored = f" (folders not read as classes: {self.ignored_dirs})" if self.ignored_dirs else ""
            raise FileNotFoundError(f"no images in {data_dir}{ignored}: expected <wnid>/*.JPEG with {_ANN}/*.xml, "
                                    f"or *.JPEG with {_CSV}")
        self._finish_init(records)

    @staticmethod
    def _class_dirs(data_dir: str, entries: List[str]) -> Tuple[List[str], List[str]]:
        """``(wnid-named folders, other folders)`` of the data folder, both sorted."""
        wnid_dirs, ignored, unexpected = [], [], []
        for name in entries:
            if not os.path.isdir(os.path.join(data_dir, name)):  # False for a broken or self-looping link
                continue
            if _WNID.match(name):
                wnid_dirs.append(name)
                continue
            ignored.append(name)
            if not name.startswith(".") and name not in _JUNK_DIRS:
                unexpected.append(name)
        if unexpected:
            warnings.warn(f"ImageNetVal: ignoring folders of {data_dir} that are not ImageNet wnids (n + 8 digits): "
                          f"{unexpected}; move their images into <wnid>/ folders if they belong to the set",
                          UserWarning, stacklevel=3)
        return wnid_dirs, ignored

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

    def _folder_records(self, data_dir: str, ann_dir: str, class_dirs: List[str]) -> List[Record]:
        found: Dict[str, List[Tuple[str, str]]] = {}  # image id -> [(wnid, file name)]
        for wnid in class_dirs:
            folder = os.path.join(data_dir, wnid)
            if _loops_back(folder, data_dir):
                # listing it would read the data folder (or a parent) as one class
                self._fail(DatasetFileError(folder, f"symbolic link loop: it resolves to {os.path.realpath(folder)}, "
                                                    f"which holds {data_dir} itself; remove the link"))
                continue
            if wnid not in _INDEX:
                err = DatasetFileError(folder, _unknown_wnid(wnid))
                if self.on_error == "raise":
                    raise err
                # each image of an unknown class is a sample left out, counted as such
                self.skipped.extend((os.path.join(folder, name), err.reason)
                                    for name in sorted(os.listdir(folder)) if _is_image(name))
                continue
            for name in sorted(os.listdir(folder)):
                if _is_image(name):
                    found.setdefault(_stem(name), []).append((wnid, name))
        records = []
        for image_id in sorted(found):
            wnid, name = found[image_id][0]
            path = os.path.join(data_dir, wnid, name)
            xml = os.path.join(ann_dir, image_id + ".xml")
            try:
                if len(found[image_id]) > 1:
                    where = [os.path.join(w, n) for w, n in found[image_id]]
                    raise DatasetFileError(path, f"image id {image_id} is in several class folders {where}; its "
                                                 "label would be a guess: keep it in one")
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
            records.append(Record(path, _INDEX[wnid], boxes, size, xml))
        return records

    def _csv_records(self, data_dir: str, images: List[str], csv_path: str,
                     mapping_path: Optional[str]) -> List[Record]:
        if mapping_path is not None:
            _check_mapping(mapping_path)
        rows, bad_rows = self._read_solution(csv_path)
        records = []
        for name in sorted(images, key=lambda n: (_stem(n), n)):
            image_id, path = _stem(name), os.path.join(data_dir, name)
            try:
                if image_id in bad_rows:
                    raise bad_rows[image_id]
                if image_id not in rows:
                    raise DatasetFileError(path, f"no row for {image_id} in {csv_path}")
                wnid, boxes = rows[image_id]
            except DatasetFileError as e:
                self._fail(e)
                continue
            records.append(Record(path, _INDEX[wnid], boxes, None, csv_path))
        return records

    def _read_solution(self, csv_path: str) -> Tuple[Dict[str, Row], Dict[str, DatasetFileError]]:
        """``(rows, bad rows)`` of ``LOC_val_solution.csv`` by image id: ``(wnid, boxes)``, or the row's error."""
        rows: Dict[str, Row] = {}
        bad_rows: Dict[str, DatasetFileError] = {}
        first_line: Dict[str, int] = {}
        try:
            with open(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                    raise DatasetFileError(csv_path, f"expected columns ImageId,PredictionString, got "
                                                     f"{reader.fieldnames}")
                for line_no, row in enumerate(reader, start=2):
                    image_id = (row["ImageId"] or "").strip()
                    where = f"{csv_path} line {line_no} ({image_id})"
                    if image_id in first_line:
                        # which row is right cannot be told; the image is refused rather than labelled by the last
                        bad_rows[image_id] = DatasetFileError(
                            csv_path, f"{image_id} has two rows, lines {first_line[image_id]} and {line_no}; keep "
                                      "one row per image")
                        continue
                    first_line[image_id] = line_no
                    try:
                        rows[image_id] = self._parse_prediction(row["PredictionString"] or "", where)
                        if rows[image_id][0] not in _INDEX:
                            raise DatasetFileError(where, _unknown_wnid(rows[image_id][0]))
                    except DatasetFileError as e:
                        bad_rows[image_id] = e
        except OSError as e:
            raise DatasetFileError(csv_path, f"unreadable ({e})") from e
        except csv.Error as e:
            raise DatasetFileError(csv_path, f"malformed csv ({e})") from e
        return rows, bad_rows

    @staticmethod
    def _parse_prediction(text: str, where: str) -> Tuple[str, Tuple[Box, ...]]:
        tokens = text.split()
        if not tokens or len(tokens) % 5:
            raise DatasetFileError(where, f"PredictionString must be groups of 'wnid xmin ymin xmax ymax', "
                                          f"got {len(tokens)} tokens")
        wnids: Set[str] = set()
        boxes: List[Box] = []
        for k in range(0, len(tokens), 5):
            wnids.add(tokens[k])
            try:
                x0, y0, x1, y1 = (float(v) for v in tokens[k + 1:k + 5])
            except ValueError:
                raise DatasetFileError(where, f"non-numeric box {tokens[k + 1:k + 5]}") from None
            box = (x0, y0, x1, y1)
            check_box(box, where)
            boxes.append(box)
        if len(wnids) != 1:
            # validation images carry one label; a row naming several would make the label a guess
            raise DatasetFileError(where, f"boxes of several classes {sorted(wnids)}")
        return wnids.pop(), tuple(boxes)
