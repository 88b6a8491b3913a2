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
from helpers import (
    IMNET,
    IMNET_EXPECTED,
    WNID_2,
    WNID_5,
    WNID_9,
    S,
    _cub,
    _imagenet_csv,
    _imagenet_folders,
    _voc,
    _write_image,
)

# The fixture trees (ImageNet's two layouts, VOC, CUB) are built by helpers.py: test_data_trust.py,
# the runner's and the store's tests build the same ones.


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
