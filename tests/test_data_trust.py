"""Inputs the datasets must not silently misread: label numbering, stray folders, untrustworthy
annotations, and image files whose values PIL's ``convert("RGB")`` would clip."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from captum_vit.data import (
    CLASSES,
    CUBTest,
    DatasetFileError,
    ImageNetVal,
    ShapesDataset,
    VOCSingleClass,
    collate_annotated,
)
from captum_vit.data.boxes import load_rgb
from helpers import S, _cub, _imagenet_csv, _imagenet_folders, _voc, _voc_xml, _write_image


def _mode(path):
    with Image.open(path) as im:
        return im.mode


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timm_wnids():
    """The canonical ImageNet-1k wnid list, read from timm (an independent copy of the package's)."""
    import timm

    with open(os.path.join(os.path.dirname(timm.__file__), "data", "_info", "imagenet_synsets.txt")) as f:
        return [line.strip() for line in f if line.strip()]


WNIDS = _timm_wnids()


def _subset_tree(root, picks, extra_dirs=()):
    """Class-folder layout with one 20 x 20 image per class in ``picks`` (canonical indices)."""
    data = os.path.join(root, "Data", "CLS-LOC", "val")
    ann = os.path.join(root, "Annotations", "CLS-LOC", "val")
    os.makedirs(ann, exist_ok=True)
    for k, idx in enumerate(picks):
        iid = f"ILSVRC2012_val_{k + 1:08d}"
        _write_image(os.path.join(data, WNIDS[idx], iid + ".JPEG"), (20, 20), seed=k)
        _voc_xml(os.path.join(ann, iid + ".xml"), (20, 20), [(WNIDS[idx], (1, 1, 10, 10))])
    for d in extra_dirs:
        os.makedirs(os.path.join(data, d), exist_ok=True)
        _write_image(os.path.join(data, d, "ILSVRC2012_val_00000099.JPEG"), (20, 20), seed=99)
    return root, data


# ------------------------------------------------------------------------------------------- labels
def test_imagenet_subset_keeps_the_canonical_1000_class_labels(tmp_path):
    root, _ = _subset_tree(str(tmp_path), [417, 954])  # two classes of the 1000 only
    ds = ImageNetVal(root, input_size=S)
    assert ds.num_classes == 1000 and ds.classes == WNIDS
    assert [ds[k]["label"] for k in range(len(ds))] == [417, 954]
    assert [ds.classes[ds[k]["label"]] for k in range(len(ds))] == [WNIDS[417], WNIDS[954]]
    # the flat csv layout numbers them the same way, mapping file or not
    flat = tmp_path / "flat"
    data = flat / "Data" / "CLS-LOC" / "val"
    os.makedirs(data)
    rows = []
    for k, idx in enumerate([417, 954]):
        iid = f"ILSVRC2012_val_{k + 1:08d}"
        _write_image(str(data / (iid + ".JPEG")), (20, 20), seed=k)
        rows.append(f"{iid},{WNIDS[idx]} 1 1 10 10")
    (flat / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    csv_ds = ImageNetVal(str(flat), input_size=S)
    assert csv_ds.num_classes == 1000 and [csv_ds[k]["label"] for k in range(2)] == [417, 954]


def test_shipped_wnid_list_is_timms_and_ships_in_the_wheel():
    with open(os.path.join(ROOT, "captum_vit", "data", "imagenet_wnids.txt")) as f:
        shipped = [line.strip() for line in f if line.strip()]
    assert shipped == WNIDS and len(shipped) == 1000 and shipped == sorted(set(shipped))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["package-data"]["captum_vit.data"]
    assert "imagenet_wnids.txt" in data_files


def test_stray_folders_do_not_shift_labels(tmp_path):
    root, data = _subset_tree(str(tmp_path), [3, 7], extra_dirs=[".ipynb_checkpoints", "__MACOSX"])
    os.symlink(data, os.path.join(data, "loop"))  # a folder that contains itself
    os.symlink("self", os.path.join(data, "self"))  # a link to itself: not even a folder
    os.makedirs(os.path.join(data, "cats"))  # not a wnid and not debris: read as nothing, but said so
    with pytest.warns(UserWarning, match=r"not ImageNet wnids.*\['cats', 'loop'\]"):
        ds = ImageNetVal(root, input_size=S)
    assert ds.ignored_dirs == [".ipynb_checkpoints", "__MACOSX", "cats", "loop"]
    assert len(ds) == 2 and [ds[k]["label"] for k in range(2)] == [3, 7]
    assert not any("00000099" in r.path for r in ds.records)


def test_flat_layout_ignores_hidden_folders(tmp_path):
    src = _imagenet_folders(str(tmp_path / "a"))
    root = _imagenet_csv(src, str(tmp_path / "b"))
    os.makedirs(os.path.join(root, "Data", "CLS-LOC", "val", ".ipynb_checkpoints"))
    ds = ImageNetVal(root, input_size=S)  # today: "holds both class folders and images"
    assert ds.layout == "csv" and len(ds) == 3


def test_wnid_named_symlink_loop_is_refused(tmp_path):
    root, data = _subset_tree(str(tmp_path), [3])
    os.symlink(data, os.path.join(data, WNIDS[5]))
    with pytest.raises(DatasetFileError, match=WNIDS[5] + ".*loop"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert [ds[k]["label"] for k in range(len(ds))] == [3]
    assert len(ds.skipped) == 1 and ds.skipped[0][0].endswith(WNIDS[5])


def test_unknown_wnid_folder_is_named_or_skipped(tmp_path):
    root, data = _subset_tree(str(tmp_path), [3, 7], extra_dirs=["n00000042"])
    with pytest.raises(DatasetFileError, match="n00000042.*1000"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert [ds[k]["label"] for k in range(len(ds))] == [3, 7]
    assert len(ds.skipped) == 1 and "n00000042" in ds.skipped[0][0]


def test_unknown_wnid_in_csv_or_mapping_is_named(tmp_path):
    root = _imagenet_csv(_imagenet_folders(str(tmp_path / "a")), str(tmp_path / "b"))
    with open(os.path.join(root, "LOC_val_solution.csv"), "a") as f:
        f.write("ILSVRC2012_val_00000008,n00000042 1 1 5 5\n")
    _write_image(os.path.join(root, "Data", "CLS-LOC", "val", "ILSVRC2012_val_00000008.JPEG"), (10, 10), 5)
    with pytest.raises(DatasetFileError, match="n00000042"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert len(ds) == 3 and len(ds.skipped) == 1
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.write(f"{WNIDS[0]} tench\nn00000042 unicorn\n")
    with pytest.raises(DatasetFileError, match=r"LOC_synset_mapping\.txt.*n00000042"):
        ImageNetVal(root, input_size=S, on_error="skip")


def test_every_dataset_states_its_class_count(tmp_path):
    assert ImageNetVal(_imagenet_folders(str(tmp_path / "i")), input_size=S).num_classes == 1000
    assert VOCSingleClass(_voc(str(tmp_path / "v")), input_size=S).num_classes == 20
    cub = CUBTest(_cub(str(tmp_path / "c")), input_size=S)
    assert cub.num_classes == len(cub.classes) == 3  # the fixture's classes.txt has 3 rows (CUB-200: 200)
    assert ShapesDataset(size=1, image_size=32).num_classes == len(CLASSES) == 8


# ------------------------------------------------------------------------------------------- annotations
def test_duplicate_csv_row_is_not_silently_overridden(tmp_path):
    root = _imagenet_csv(_imagenet_folders(str(tmp_path / "a")), str(tmp_path / "b"))
    csv_path = os.path.join(root, "LOC_val_solution.csv")
    with open(csv_path, "a") as f:  # a second, different row for image 2
        f.write(f"ILSVRC2012_val_00000002,{WNIDS[0]} 1 1 5 5\n")
    with pytest.raises(DatasetFileError, match=r"LOC_val_solution\.csv.*ILSVRC2012_val_00000002.*lines 3 and 5"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    assert not any("00000002" in r.path for r in ds.records)


def test_box_wholly_outside_the_image_is_refused(tmp_path):
    # VOC: the size is in the XML, so the refusal comes at construction
    root = _voc(str(tmp_path / "v"))
    _voc_xml(os.path.join(root, "VOC2012", "Annotations", "2012_000003.xml"), (40, 80), [("dog", (45, 10, 60, 70))])
    with pytest.raises(DatasetFileError, match=r"2012_000003\.xml.*outside the 40x80 image"):
        VOCSingleClass(root, input_size=S)
    ds = VOCSingleClass(root, input_size=S, on_error="skip")
    assert len(ds) == 1 and ds.skipped[0][0].endswith("2012_000003.xml")
    # CUB: no size in the lists, so the image's decoded size decides
    croot = _cub(str(tmp_path / "c"))
    bb = os.path.join(croot, "CUB_200_2011", "bounding_boxes.txt")
    # image 3 is 40 x 40
    _write_lines(bb, [("3 41.0 0.0 5.0 5.0" if line.startswith("3 ") else line) for line in _lines(bb)])
    cub = CUBTest(croot, input_size=S)
    with pytest.raises(DatasetFileError, match=r"b_3\.jpg.*outside the 40x40 image"):
        cub[1]
    lazy = CUBTest(croot, input_size=S, on_error="skip")
    batch = collate_annotated([lazy[k] for k in range(len(lazy))])
    assert batch["label"].tolist() == [2, 0] and len(lazy.skipped) == 1
    eager = CUBTest(croot, input_size=S, on_error="skip", verify_images=True)
    assert len(eager) == 2 and len(eager.skipped) == 1


def test_cub_paths_cannot_leave_the_images_folder(tmp_path):
    for k, bad in enumerate(["../../outside.jpg", "/etc/hostname", "001.x/../../../outside.jpg"]):
        root = _cub(str(tmp_path / str(k)))
        _write_image(str(tmp_path / "outside.jpg"), (40, 40), seed=1)
        p = os.path.join(root, "CUB_200_2011", "images.txt")
        _write_lines(p, [(f"3 {bad}" if line.startswith("3 ") else line) for line in _lines(p)])
        with pytest.raises(DatasetFileError, match=r"images\.txt.*id 3.*outside images/"):
            CUBTest(root, input_size=S)
        ds = CUBTest(root, input_size=S, on_error="skip")
        assert len(ds) == 2 and len(ds.skipped) == 1


@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_non_finite_xml_size_is_a_named_error_and_skips(tmp_path, value):
    root = _voc(str(tmp_path))
    xml = os.path.join(root, "VOC2012", "Annotations", "2012_000003.xml")
    _voc_xml(xml, (value, 80), [("dog", (5, 10, 35, 70))])
    with pytest.raises(DatasetFileError, match=r"2012_000003\.xml.*size"):
        VOCSingleClass(root, input_size=S)
    ds = VOCSingleClass(root, input_size=S, on_error="skip")
    assert len(ds) == 1 and ds.skipped[0][0] == xml


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_coordinates_are_named_errors_and_skip(tmp_path, value):
    croot = _cub(str(tmp_path / "c"))
    bb = os.path.join(croot, "CUB_200_2011", "bounding_boxes.txt")
    _write_lines(bb, [(f"3 0.0 0.0 {value} 5.0" if line.startswith("3 ") else line) for line in _lines(bb)])
    with pytest.raises(DatasetFileError, match=r"bounding_boxes\.txt"):
        CUBTest(croot, input_size=S)
    assert len(CUBTest(croot, input_size=S, on_error="skip")) == 2
    root = _imagenet_csv(_imagenet_folders(str(tmp_path / "a")), str(tmp_path / "b"))
    with open(os.path.join(root, "LOC_val_solution.csv"), "a") as f:
        f.write(f"ILSVRC2012_val_00000009,{WNIDS[0]} 1 {value} 5 5\n")
    _write_image(os.path.join(root, "Data", "CLS-LOC", "val", "ILSVRC2012_val_00000009.JPEG"), (10, 10), 5)
    with pytest.raises(DatasetFileError, match="ILSVRC2012_val_00000009"):
        ImageNetVal(root, input_size=S)
    assert len(ImageNetVal(root, input_size=S, on_error="skip")) == 3


# ------------------------------------------------------------------------------------------- image decoding
def _ramp16(path):
    ramp = (np.arange(64, dtype=np.uint16) * 257 * 4).reshape(8, 8)  # 0 .. 64764, multiples of 257
    Image.fromarray(ramp).save(path)
    assert _mode(path) == "I;16"
    return ramp


def _cfg(side):
    # an identity transform at the image's own size, so the tensor shows the decoded values
    return {"input_size": (3, side, side), "interpolation": "bilinear", "mean": (0.0,) * 3, "std": (1.0,) * 3,
            "crop_pct": 1.0, "crop_mode": "squash"}


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    from captum_vit.models import preprocess_images

    path = str(tmp_path / "ramp16.png")
    ramp = _ramp16(path)
    want = (ramp // 257).astype(np.uint8)
    got = np.asarray(load_rgb(path))
    assert got.shape == (8, 8, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
    batch, pils = preprocess_images([path], _cfg(8))
    assert np.array_equal(np.asarray(pils[0])[..., 0], want)
    assert torch.allclose(batch[0], torch.from_numpy(want).float().div(255).expand(3, 8, 8), atol=1e-6)


def test_32bit_int_image_in_16bit_range_is_scaled(tmp_path):
    path = str(tmp_path / "i32.tiff")
    arr = (np.arange(16, dtype=np.int32) * 257 * 17).reshape(4, 4)  # 0 .. 65535
    Image.fromarray(arr).save(path)
    assert _mode(path) == "I"
    assert np.array_equal(np.asarray(load_rgb(path))[..., 1], (arr // 257).astype(np.uint8))
    Image.fromarray(arr * 2 - 5).save(path)
    with pytest.raises(DatasetFileError, match=r"i32\.tiff.*\[-5, 131065\]"):
        load_rgb(path)


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    from captum_vit.models import preprocess_images

    path = str(tmp_path / "f.tiff")
    arr = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(arr).save(path)
    assert _mode(path) == "F"
    want = np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(path))[..., 2], want)
    assert np.array_equal(np.asarray(preprocess_images([path], _cfg(4))[1][0])[..., 0], want)


@pytest.mark.parametrize("bad,message", [(2.5, r"\[0, 2.5\].*rescale"), (-0.5, r"\[-0.5, 1\]"),
                                         (np.nan, "non-finite"), (np.inf, "non-finite")])
def test_float_tiff_outside_0_1_is_refused(tmp_path, bad, message):
    from captum_vit.models import preprocess_images

    path = str(tmp_path / "bad.tiff")
    arr = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    arr[1, 2] = bad
    Image.fromarray(arr).save(path)
    with pytest.raises(DatasetFileError, match=r"bad\.tiff.*" + message):
        load_rgb(path)
    with pytest.raises(ValueError, match=r"bad\.tiff.*" + message):
        preprocess_images([path], _cfg(4))


def test_16bit_images_through_a_dataset(tmp_path):
    root, data = _subset_tree(str(tmp_path), [3])
    img = os.path.join(data, WNIDS[3], "ILSVRC2012_val_00000001.JPEG")
    # same name, PNG bytes: PIL reads the content, not the suffix
    Image.fromarray(np.full((20, 20), 257 * 100, dtype=np.uint16)).save(img, "PNG")
    ds = ImageNetVal(root, input_size=S, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert torch.allclose(ds[0]["image"], torch.full((3, S, S), 100 / 255), atol=1e-6)


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    from captum_vit.models import preprocess_images

    path = str(tmp_path / "big.png")
    _write_image(path, (64, 64), seed=0, fmt="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 x 100: PIL refuses
    with pytest.raises(DatasetFileError, match=r"big\.png.*too large.*MAX_IMAGE_PIXELS"):
        load_rgb(path)
    with pytest.raises(ValueError, match=r"big\.png.*too large"):
        preprocess_images([path], _cfg(64))


def test_voc_id_listed_twice_is_named_or_skipped(tmp_path):
    root = _voc(str(tmp_path))
    listing = os.path.join(root, "VOC2012", "ImageSets", "Main", "val.txt")
    _write_lines(listing, _lines(listing) + ["2012_000003"])
    with pytest.raises(DatasetFileError, match=r"val\.txt.*2012_000003 listed twice"):
        VOCSingleClass(root, input_size=S)
    ds = VOCSingleClass(root, input_size=S, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1  # the image is kept once, not weighed twice


def test_image_id_in_two_class_folders_is_refused(tmp_path):
    root, data = _subset_tree(str(tmp_path), [3, 7])
    # the same image also filed under another class (a copy or a second link): which label is right is unknown
    _write_image(os.path.join(data, WNIDS[7], "ILSVRC2012_val_00000001.JPEG"), (20, 20), seed=0)
    with pytest.raises(DatasetFileError, match=r"ILSVRC2012_val_00000001 is in several class folders"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert [ds[k]["label"] for k in range(len(ds))] == [7] and len(ds.skipped) == 1
