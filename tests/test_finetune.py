"""The VOC / CUB head fine-tuning recipe on tiny fixture trees in the datasets' own file formats.

A random-init timm ``test_vit`` at ``--img-size 32`` (a 2 x 2 patch grid) keeps every run to a
fraction of a second; the fixtures' two classes are solid colours, so a few steps must lower the loss.
"""

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tools import finetune_heads

TINY = ["--model", "test_vit", "--img-size", "32", "--workers", "0", "--threads", "1", "--batch-size", "4"]
COLOURS = [(220, 30, 30), (30, 30, 220)]  # class 0 red, class 1 blue


def _solid(path, colour, size, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, "JPEG")


def _voc(root, n_train=8, n_val=4):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    names = ["cat", "dog"]  # VOC classes 7 and 11
    ids = {"train": [f"2008_{i:06d}" for i in range(n_train)],
           "val": [f"2009_{i:06d}" for i in range(n_val)]}
    for split, split_ids in ids.items():
        for k, image_id in enumerate(split_ids):
            c = k % 2
            w, h = 48 + 8 * c, 40
            _solid(os.path.join(base, "JPEGImages", image_id + ".jpg"), COLOURS[c], (w, h), seed=k)
            os.makedirs(os.path.join(base, "Annotations"), exist_ok=True)
            with open(os.path.join(base, "Annotations", image_id + ".xml"), "w") as f:
                f.write(f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
                        f"<height>{h}</height><depth>3</depth></size><object><name>{names[c]}</name>"
                        f"<difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>30</xmax>"
                        f"<ymax>35</ymax></bndbox></object></annotation>")
        os.makedirs(os.path.join(base, "ImageSets", "Main"), exist_ok=True)
        with open(os.path.join(base, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in split_ids))
    return os.path.join(root, "VOCdevkit")


def _cub(root, n=12):
    base = os.path.join(root, "CUB_200_2011")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i in range(1, n + 1):
        c = i % 2
        rel = f"{classes[c]}/bird_{i}.jpg"
        _solid(os.path.join(base, "images", *rel.split("/")), COLOURS[c], (40, 36), seed=i)
        rows["images.txt"].append(f"{i} {rel}")
        rows["image_class_labels.txt"].append(f"{i} {c + 1}")
        rows["train_test_split.txt"].append(f"{i} {int(i <= n - 4)}")  # the last 4 are test images
        rows["bounding_boxes.txt"].append(f"{i} 1.0 2.0 20.0 15.5")
    rows["classes.txt"] = [f"{k + 1} {name}" for k, name in enumerate(classes)]
    for name, lines in rows.items():
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return base


@pytest.mark.parametrize("dataset", ["voc", "cub"])
def test_one_step_writes_loadable_checkpoint_and_json(tmp_path, dataset):
    root = _voc(str(tmp_path)) if dataset == "voc" else _cub(str(tmp_path))
    out = tmp_path / "out"
    cfg = finetune_heads.main(["--dataset", dataset, "--root", root, "--out", str(out), "--max-steps", "1", *TINY])
    n_classes = 20 if dataset == "voc" else 2  # VOC keeps its 20 classes; the CUB fixture lists 2
    state = torch.load(out / "model.pth", weights_only=True)
    model = timm.create_model("test_vit", num_classes=n_classes, img_size=32)
    model.load_state_dict(state)
    assert model.get_classifier().out_features == n_classes
    saved = json.loads((out / "model.json").read_text())
    assert saved == json.loads(json.dumps(cfg))
    for key in ("args", "classes", "final_train_accuracy", "final_val_accuracy", "data", "losses", "history"):
        assert key in saved
    assert saved["steps"] == 1 and len(saved["losses"]) == 1
    assert len(saved["classes"]) == n_classes
    assert saved["args"]["dataset"] == dataset and saved["args"]["max_steps"] == 1
    assert len(saved["data"]["fingerprint"]) == 64
    assert (saved["data"]["train_images"], saved["data"]["val_images"]) == (8, 4)
    assert 0.0 <= saved["final_val_accuracy"] <= 1.0
    assert (out / "train_log.txt").is_file()


def test_fingerprint_follows_the_data(tmp_path):
    root = _cub(str(tmp_path))
    first = finetune_heads.data_fingerprint(dict(zip(("train", "test"), finetune_heads.load_datasets("cub", root, 32))))
    again = finetune_heads.data_fingerprint(dict(zip(("train", "test"), finetune_heads.load_datasets("cub", root, 32))))
    assert first == again
    path = os.path.join(root, "train_test_split.txt")
    lines = open(path).read().splitlines()
    lines[0] = lines[0].split()[0] + " 0"  # image 1 moves to the test split
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    moved = finetune_heads.data_fingerprint(dict(zip(("train", "test"), finetune_heads.load_datasets("cub", root, 32))))
    assert moved != first


def test_loss_decreases_on_separable_colours(tmp_path):
    root = _voc(str(tmp_path))
    cfg = finetune_heads.main(["--dataset", "voc", "--root", root, "--out", str(tmp_path / "out"),
                               "--max-steps", "20", "--epochs", "20", "--lr", "1e-3", *TINY])
    losses = cfg["losses"]
    assert len(losses) == 20 and cfg["steps"] == 20
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert cfg["final_val_accuracy"] >= 0.75  # solid red vs solid blue: held-out images too
    assert [h["epoch"] for h in cfg["history"]] == list(range(1, 11))  # 8 images / batch 4: 2 steps per epoch


def test_freeze_backbone_changes_only_the_head(tmp_path):
    root = _cub(str(tmp_path))
    ckpt = tmp_path / "backbone.pth"
    torch.manual_seed(1)
    start = timm.create_model("test_vit", img_size=32)
    torch.save(start.state_dict(), ckpt)  # with its 1000-class head, which the recipe drops
    out = tmp_path / "out"
    finetune_heads.main(["--dataset", "cub", "--root", root, "--out", str(out), "--max-steps", "2",
                         "--freeze-backbone", "--checkpoint", str(ckpt), "--lr", "1e-2", *TINY])
    tuned = torch.load(out / "model.pth", weights_only=True)
    for k, v in start.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(tuned[k], v), k
    assert tuned["head.weight"].shape == (2, start.embed_dim)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "other.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), ckpt)
    with pytest.raises(ValueError, match="does not fit"):
        finetune_heads.build_model("test_vit", 2, checkpoint=str(ckpt), img_size=32)


def test_cosine_schedule_ends_at_min_lr():
    lrs = [finetune_heads.cosine_lr(s, 10, 1e-3, 1e-5, 2) for s in range(11)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
