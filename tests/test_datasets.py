"""Real-image datasets on tiny fixture trees written in each dataset's own file formats.

Expected boxes are computed by hand from the rules: squash maps a coordinate v to
int(v / original_size * S) per axis, clipped to [0, S - 1]; ImageNet class indices are the wnids'
positions in the canonical (sorted) 1000-class list.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from captum_vit.data import (
    VOC_CLASSES,
    CUBTest,
    DatasetFileError,
    ImageNetVal,
    VOCSingleClass,
    collate_annotated,
)

S = 32  # small input size keeps the tests fast; the rules do not depend on it


def _write_image(path, size, seed, fmt="JPEG"):
    w, h = size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, fmt)


def _write_corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def _voc_xml(path, size, objects, bad_field=False):
    w, h = size
    objs = []
    for name, (x0, y0, x1, y1), *rest in objects:
        difficult = rest[0] if rest else 0
        xmin = "abc" if bad_field else str(x0)
        objs.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
                    f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"<annotation><filename>x</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{''.join(objs)}</annotation>")


# ------------------------------------------------------------------------------------------- ImageNet
# three real ImageNet-1k wnids, canonical indices 2, 5 and 9 (under 10, the tiny test models' head)
WNID_2, WNID_5, WNID_9 = "n01484850", "n01496331", "n01518878"
# (image id, wnid, (w, h), boxes of its class, boxes of another class present in the XML only)
IMNET = [
    ("ILSVRC2012_val_00000001", WNID_9, (100, 50), [(10, 5, 59, 39), (70, 0, 99, 49)], [(0, 0, 5, 5)]),
    ("ILSVRC2012_val_00000002", WNID_2, (64, 80), [(0, 0, 63, 79)], []),
    ("ILSVRC2012_val_00000003", WNID_5, (30, 30), [(3, 4, 30, 25)], []),
]
# hand-computed at S = 32
IMNET_EXPECTED = {
    "ILSVRC2012_val_00000001": (9, [[3, 3, 18, 24], [22, 0, 31, 31]]),
    "ILSVRC2012_val_00000002": (2, [[0, 0, 31, 31]]),
    "ILSVRC2012_val_00000003": (5, [[3, 4, 31, 26]]),  # xmax = width -> 32 -> clipped to 31
}


def _imagenet_folders(root, extra=()):
    """Layout (a); class folders created in reverse-sorted order so that listing order cannot give labels."""
    data = os.path.join(root, "Data", "CLS-LOC", "val")
    ann = os.path.join(root, "Annotations", "CLS-LOC", "val")
    os.makedirs(ann, exist_ok=True)
    for k, (iid, wnid, size, boxes, others) in enumerate(IMNET):
        _write_image(os.path.join(data, wnid, iid + ".JPEG"), size, seed=k)
        _voc_xml(os.path.join(ann, iid + ".xml"), size, [(wnid, b) for b in boxes] + [("n00000042", b)
                                                                                         for b in others])
    for iid, wnid, kind in extra:
        img = os.path.join(data, wnid, iid + ".JPEG")
        if kind == "corrupt":
            _write_corrupt(img)
            _voc_xml(os.path.join(ann, iid + ".xml"), (20, 20), [(wnid, (1, 1, 5, 5))])
        elif kind == "bad_xml":
            _write_image(img, (20, 20), seed=99)
            _voc_xml(os.path.join(ann, iid + ".xml"), (20, 20), [(wnid, (1, 1, 5, 5))], bad_field=True)
        elif kind == "size_mismatch":
            _write_image(img, (20, 20), seed=98)
            _voc_xml(os.path.join(ann, iid + ".xml"), (40, 20), [(wnid, (1, 1, 5, 5))])
    return root


def _imagenet_csv(src_root, root, mapping=None):
    """Layout (b) from the same image bytes, csv rows in reverse order."""
    data = os.path.join(root, "Data", "CLS-LOC", "val")
    os.makedirs(data)
    rows = []
    for iid, wnid, _, boxes, _ in reversed(IMNET):
        shutil.copyfile(os.path.join(src_root, "Data", "CLS-LOC", "val", wnid, iid + ".JPEG"),
                        os.path.join(data, iid + ".JPEG"))
        rows.append(f"{iid}," + " ".join(f"{wnid} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes) + " ")
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if mapping is not None:
        with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
            f.write("".join(f"{w} some name, other name\n" for w in mapping))
    return root


def _check_imagenet(ds):
    assert len(ds.classes) == ds.num_classes == 1000
    assert [ds.classes.index(w) for w in (WNID_2, WNID_5, WNID_9)] == [2, 5, 9]
    assert len(ds) == 3
    for k in range(3):
        s = ds[k]
        iid = os.path.splitext(os.path.basename(s["path"]))[0]
        label, boxes = IMNET_EXPECTED[iid]
        assert s["label"] == label
        assert s["boxes"].dtype == torch.int64
        assert s["boxes"].tolist() == boxes
        assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
        assert s["orig_size"] == next(size for i, _, size, _, _ in IMNET if i == iid)


def test_imagenet_folders_sorted_wnids_and_scaled_boxes(tmp_path):
    ds = ImageNetVal(_imagenet_folders(str(tmp_path)), input_size=S)
    assert ds.layout == "folders"
    _check_imagenet(ds)
    # samples ordered by image id
    assert [os.path.basename(ds[k]["path"]) for k in range(3)] == [i + ".JPEG" for i, *_ in IMNET]


def test_imagenet_layouts_give_identical_samples(tmp_path):
    a = ImageNetVal(_imagenet_folders(str(tmp_path / "a")), input_size=S)
    b = ImageNetVal(_imagenet_csv(str(tmp_path / "a"), str(tmp_path / "b")), input_size=S)
    # a synset mapping listing the same wnids in another order must not change the labels
    c = ImageNetVal(_imagenet_csv(str(tmp_path / "a"), str(tmp_path / "c"),
                                  mapping=[WNID_9, WNID_2, WNID_5]), input_size=S)
    assert b.layout == c.layout == "csv"
    _check_imagenet(b)
    for other in (b, c):
        assert other.classes == a.classes
        for k in range(len(a)):
            sa, so = a[k], other[k]
            assert torch.equal(sa["image"], so["image"])
            assert torch.equal(sa["boxes"], so["boxes"])
            assert (sa["label"], sa["orig_size"], sa["index"]) == (so["label"], so["orig_size"], so["index"])


def test_imagenet_mapping_file_does_not_renumber_the_classes(tmp_path):
    src = _imagenet_folders(str(tmp_path / "a"))
    # a mapping naming one more class, in its own order: the canonical 1000-class index still numbers them
    ds = ImageNetVal(_imagenet_csv(src, str(tmp_path / "b"), mapping=[WNID_9, "n01440764", WNID_2, WNID_5]),
                     input_size=S)
    assert len(ds.classes) == 1000 and ds.classes[0] == "n01440764"
    assert [ds[k]["label"] for k in range(3)] == [9, 2, 5]


def test_imagenet_kaggle_nesting(tmp_path):
    src = _imagenet_folders(str(tmp_path / "a"))
    root = tmp_path / "kaggle"
    _imagenet_csv(src, str(root / "ILSVRC"))
    shutil.move(str(root / "ILSVRC" / "LOC_val_solution.csv"), str(root / "LOC_val_solution.csv"))
    _check_imagenet(ImageNetVal(str(root), input_size=S))


def test_resize_crop_moves_boxes_and_matches_torchvision(tmp_path):
    ds = ImageNetVal(_imagenet_folders(str(tmp_path)), input_size=S, transform="resize_crop", crop_pct=0.5)
    s = ds[0]  # 100 x 50: shorter side -> floor(32 / 0.5) = 64, so 128 x 64; crop window at (48, 16)
    # (10, 5, 59, 39) -> (12 - 48, 6 - 16, 75 - 48, 49 - 16) = (-36, -10, 27, 33) -> clipped (0, 0, 27, 31);
    # (70, 0, 99, 49) -> xmin 89 - 48 = 41 > 31: wholly outside the window, dropped
    assert s["boxes"].tolist() == [[0, 0, 27, 31]]
    transforms = pytest.importorskip("torchvision.transforms")
    ref = transforms.Compose([transforms.Resize(64, interpolation=transforms.InterpolationMode.BILINEAR),
                              transforms.CenterCrop(S), transforms.ToTensor(),
                              transforms.Normalize([0.5] * 3, [0.5] * 3)])
    with Image.open(s["path"]) as im:
        expected = ref(im.convert("RGB"))
    assert torch.allclose(s["image"], expected, atol=1e-6)
    # squash is a plain PIL bilinear resize to S x S
    sq = ImageNetVal(str(tmp_path), input_size=S)[0]
    with Image.open(s["path"]) as im:
        arr = np.asarray(im.convert("RGB").resize((S, S), Image.BILINEAR), dtype=np.float32) / 255.0
    assert torch.allclose(sq["image"], (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5, atol=1e-6)


def test_imagenet_corrupt_image_raises_or_is_skipped(tmp_path):
    root = _imagenet_folders(str(tmp_path), extra=[("ILSVRC2012_val_00000004", WNID_5, "corrupt")])
    ds = ImageNetVal(root, input_size=S)
    assert len(ds) == 4
    with pytest.raises(DatasetFileError, match="ILSVRC2012_val_00000004.JPEG"):
        ds[3]
    lazy = ImageNetVal(root, input_size=S, on_error="skip")
    batch = collate_annotated([lazy[k] for k in range(len(lazy))])
    assert batch["image"].shape == (3, 3, S, S) and batch["label"].tolist() == [9, 2, 5]
    assert len(lazy.skipped) == 1 and lazy.skipped[0][0].endswith("ILSVRC2012_val_00000004.JPEG")
    eager = ImageNetVal(root, input_size=S, on_error="skip", verify_images=True)
    assert len(eager) == 3 and len(eager.skipped) == 1
    _check_imagenet(eager)


def test_imagenet_malformed_annotation_raises_or_is_skipped(tmp_path):
    root = _imagenet_folders(str(tmp_path), extra=[("ILSVRC2012_val_00000005", WNID_2, "bad_xml")])
    with pytest.raises(DatasetFileError, match=r"ILSVRC2012_val_00000005\.xml.*xmin"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    _check_imagenet(ds)
    assert [os.path.basename(p) for p, _ in ds.skipped] == ["ILSVRC2012_val_00000005.xml"]


def test_imagenet_annotation_size_must_match_image(tmp_path):
    root = _imagenet_folders(str(tmp_path), extra=[("ILSVRC2012_val_00000006", WNID_2, "size_mismatch")])
    ds = ImageNetVal(root, input_size=S)
    with pytest.raises(DatasetFileError, match="40x20"):
        ds[3]


def test_imagenet_bad_csv_row(tmp_path):
    root = _imagenet_csv(_imagenet_folders(str(tmp_path / "a")), str(tmp_path / "b"))
    with open(os.path.join(root, "LOC_val_solution.csv"), "a") as f:
        f.write(f"ILSVRC2012_val_00000007,{WNID_2} 1 2 3\n")
    _write_image(os.path.join(root, "Data", "CLS-LOC", "val", "ILSVRC2012_val_00000007.JPEG"), (10, 10), 5)
    with pytest.raises(DatasetFileError, match="ILSVRC2012_val_00000007"):
        ImageNetVal(root, input_size=S)
    ds = ImageNetVal(root, input_size=S, on_error="skip")
    assert len(ds) == 3 and len(ds.skipped) == 1


def test_imagenet_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data"):
        ImageNetVal(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageNetVal(str(tmp_path))
    os.makedirs(tmp_path / "Data" / "CLS-LOC" / "val")
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageNetVal(str(tmp_path))
    _write_image(str(tmp_path / "Data" / "CLS-LOC" / "val" / "x.JPEG"), (8, 8), 0)
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageNetVal(str(tmp_path))
    os.makedirs(tmp_path / "Data" / "CLS-LOC" / "val" / WNID_2)
    with pytest.raises(ValueError, match="one layout"):
        ImageNetVal(str(tmp_path))


# ------------------------------------------------------------------------------------------- VOC
def _voc(root, unknown_class=False):
    base = os.path.join(root, "VOC2012")
    objects = {
        "2012_000001": ((60, 40), [("cat", (1, 1, 30, 20)), ("cat", (31, 10, 60, 40), 1)]),
        "2012_000002": ((50, 50), [("cat", (1, 1, 10, 10)), ("dog", (20, 20, 40, 40))]),
        "2012_000003": ((40, 80), [("dog", (5, 10, 35, 70))]),
        "2012_000004": ((40, 40), [("bird", (5, 5, 10, 10))]),  # not in val.txt
        "2012_000005": ((40, 40), []),  # no object: not single-class
    }
    if unknown_class:
        objects["2012_000006"] = ((40, 40), [("unicorn", (5, 5, 10, 10))])
    for k, (iid, (size, objs)) in enumerate(objects.items()):
        _write_image(os.path.join(base, "JPEGImages", iid + ".jpg"), size, seed=10 + k)
        _voc_xml(os.path.join(base, "Annotations", iid + ".xml"), size, objs)
    os.makedirs(os.path.join(base, "ImageSets", "Main"))
    val = [i for i in objects if i != "2012_000004"]
    with open(os.path.join(base, "ImageSets", "Main", "val.txt"), "w") as f:
        f.write("\n".join(val) + "\n")
    return root


def test_voc_single_class_filter_and_boxes(tmp_path):
    ds = VOCSingleClass(_voc(str(tmp_path)), input_size=S)
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor" and len(VOC_CLASSES) == 20
    assert VOC_CLASSES == sorted(VOC_CLASSES)
    assert len(ds) == 2 and sorted(ds.multi_class) == ["2012_000002", "2012_000005"]
    a, b = ds[0], ds[1]
    assert (a["label"], b["label"]) == (VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")) == (7, 11)
    # 60 x 40: (1, 1, 30, 20) -> (0, 0, 16, 16); (31, 10, 60, 40) -> (16, 8, 32 -> 31, 32 -> 31)
    assert a["boxes"].tolist() == [[0, 0, 16, 16], [16, 8, 31, 31]]
    # 40 x 80: (5, 10, 35, 70) -> (4, 4, 28, 28)
    assert b["boxes"].tolist() == [[4, 4, 28, 28]]
    # the VOC<year> folder itself is accepted as root
    assert len(VOCSingleClass(str(tmp_path / "VOC2012"), input_size=S)) == 2


def test_voc_errors(tmp_path):
    root = _voc(str(tmp_path), unknown_class=True)
    with pytest.raises(DatasetFileError, match=r"2012_000006\.xml.*unicorn"):
        VOCSingleClass(root, input_size=S)
    ds = VOCSingleClass(root, input_size=S, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        VOCSingleClass(root, split="test")
    with pytest.raises(FileNotFoundError, match="VOC2007"):
        VOCSingleClass(str(tmp_path / "nope"), year="2007")


# ------------------------------------------------------------------------------------------- CUB
def _cub(root, bad_box=False, corrupt=False):
    base = os.path.join(root, "CUB_200_2011")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    # id: (relative path, class id, is_train, (w, h), (x, y, width, height))
    items = {
        1: (f"{classes[0]}/a_1.jpg", 1, 1, (50, 50), (1.0, 2.0, 10.0, 10.0)),
        2: (f"{classes[2]}/c_2.jpg", 3, 0, (60, 40), (10.0, 5.0, 30.0, 20.0)),
        3: (f"{classes[1]}/b_3.jpg", 2, 0, (40, 40), (0.0, 0.0, 39.5, 40.0)),
        10: (f"{classes[0]}/a_10.jpg", 1, 0, (30, 30), (2.0, 2.0, 4.0, 4.0)),
    }
    for k, (rel, _, _, size, _) in items.items():
        path = os.path.join(base, "images", *rel.split("/"))
        if corrupt and k == 10:
            _write_corrupt(path)
        else:
            _write_image(path, size, seed=20 + k)

    def table(name, rows):
        with open(os.path.join(base, name), "w") as f:
            f.write("".join(" ".join(str(v) for v in r) + "\n" for r in rows))

    order = [10, 3, 1, 2]  # lists need not be sorted
    table("images.txt", [(k, items[k][0]) for k in order])
    table("image_class_labels.txt", [(k, items[k][1]) for k in order])
    table("train_test_split.txt", [(k, items[k][2]) for k in order])
    table("bounding_boxes.txt", [(k, *(("x1.0", 1, 1, 1) if bad_box and k == 3 else items[k][4])) for k in order])
    table("classes.txt", [(i + 1, c) for i, c in enumerate(classes)])
    return root


def test_cub_test_split_labels_and_boxes(tmp_path):
    ds = CUBTest(_cub(str(tmp_path)), input_size=S)
    assert ds.classes[2] == "003.Sooty_Albatross"
    assert len(ds) == 3  # id 1 is a training image
    s2, s3, s10 = ds[0], ds[1], ds[2]  # numeric id order
    assert [os.path.basename(s["path"]) for s in (s2, s3, s10)] == ["c_2.jpg", "b_3.jpg", "a_10.jpg"]
    assert (s2["label"], s3["label"], s10["label"]) == (2, 1, 0)
    # 60 x 40, (10, 5, 30, 20) -> (10, 5, 40, 25) -> (int 5.33, 4, int 21.3, 20)
    assert s2["boxes"].tolist() == [[5, 4, 21, 20]]
    # 40 x 40, (0, 0, 39.5, 40) -> (0, 0, 39.5, 40) -> (0, 0, int 31.6, 32 -> 31)
    assert s3["boxes"].tolist() == [[0, 0, 31, 31]]
    # 30 x 30, (2, 2, 4, 4) -> (2, 2, 6, 6) -> (int 2.13, 2, int 6.4, 6)
    assert s10["boxes"].tolist() == [[2, 2, 6, 6]]
    # the CUB_200_2011 folder itself is accepted as root
    assert len(CUBTest(str(tmp_path / "CUB_200_2011"), input_size=S)) == 3


def test_cub_train_split(tmp_path):
    root = _cub(str(tmp_path))
    ds = CUBTest(root, input_size=S, split="train")
    assert len(ds) == 1  # only id 1 has flag 1
    s1 = ds[0]
    assert os.path.basename(s1["path"]) == "a_1.jpg" and s1["label"] == 0
    # 50 x 50, (1, 2, 10, 10) -> (1, 2, 11, 12) -> (int 0.64, int 1.28, int 7.04, int 7.68)
    assert s1["boxes"].tolist() == [[0, 1, 7, 7]]
    assert len(CUBTest(root, input_size=S, split="test")) == 3  # the default
    with pytest.raises(ValueError, match="split"):
        CUBTest(root, split="val")


def test_cub_errors(tmp_path):
    root = _cub(str(tmp_path / "a"), bad_box=True)
    with pytest.raises(DatasetFileError, match=r"bounding_boxes\.txt.*id 3"):
        CUBTest(root, input_size=S)
    ds = CUBTest(root, input_size=S, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    corrupt = CUBTest(_cub(str(tmp_path / "b"), corrupt=True), input_size=S, on_error="skip", verify_images=True)
    assert len(corrupt) == 2 and corrupt.skipped[0][0].endswith("a_10.jpg")
    os.remove(tmp_path / "b" / "CUB_200_2011" / "train_test_split.txt")
    with pytest.raises(FileNotFoundError, match="missing: train_test_split.txt"):
        CUBTest(str(tmp_path / "b"))


def test_dataloader_batches(tmp_path):
    ds = CUBTest(_cub(str(tmp_path)), input_size=S)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_annotated)))
    assert batch["image"].shape == (3, 3, S, S)
    assert batch["label"].tolist() == [2, 1, 0] and batch["index"].tolist() == [0, 1, 2]
    assert len(batch["boxes"]) == 3 and batch["orig_size"][0] == (60, 40)
