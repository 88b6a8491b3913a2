import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from captum_vit.data import CLASSES, ShapesDataset, collate, generate

_HASH_SNIPPET = (
    "import hashlib; from captum_vit.data import ShapesDataset; "
    "d = ShapesDataset(split={split!r}, seed={seed}, size=8); h = hashlib.sha256(); "
    "[h.update(d[i]['image_uint8'].tobytes()) for i in range(8)]; print(h.hexdigest())"
)


def _hash_in_subprocess(split, seed):
    out = subprocess.run([sys.executable, "-c", _HASH_SNIPPET.format(split=split, seed=seed)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _hash_here(split, seed):
    d = ShapesDataset(split=split, seed=seed, size=8)
    h = hashlib.sha256()
    for i in range(8):
        h.update(d[i]["image_uint8"].tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_deterministic_across_processes():
    a = _hash_in_subprocess("single", 3)
    b = _hash_in_subprocess("single", 3)
    assert a == b == _hash_here("single", 3)
    assert _hash_in_subprocess("pairs", 3) == _hash_here("pairs", 3)


def test_seeds_and_splits_differ():
    assert _hash_here("single", 0) != _hash_here("single", 1)
    assert _hash_here("single", 0) != _hash_here("pairs", 0)
    d = ShapesDataset(seed=0, size=4)
    assert not np.array_equal(d[0]["image_uint8"], d[1]["image_uint8"])
    # item i does not depend on the dataset length
    assert np.array_equal(ShapesDataset(seed=0, size=10)[3]["image_uint8"], d[3]["image_uint8"])


def _check_item(it, split):
    img = it["image"]
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, 224, 224)
    assert float(img.min()) >= -1.0 - 1e-6 and float(img.max()) <= 1.0 + 1e-6
    u8 = np.asarray(it["image_uint8"])
    assert u8.dtype == np.uint8 and u8.shape == (224, 224, 3)
    assert torch.allclose(img, torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1.0, atol=1e-5)
    boxes, masks, il = it["boxes"], it["masks"], it["instance_labels"]
    n = boxes.shape[0]
    assert n >= 1 and boxes.dtype == torch.int64 and tuple(boxes.shape) == (n, 4)
    assert masks.dtype == torch.bool and tuple(masks.shape) == (n, 224, 224)
    assert il.dtype == torch.int64 and tuple(il.shape) == (n,)
    for b, m in zip(boxes.tolist(), masks.numpy()):
        assert m.any()
        ys, xs = np.nonzero(m)
        assert b == [xs.min(), ys.min(), xs.max(), ys.max()]  # tight, inclusive
        filled = np.zeros_like(m)
        filled[b[1]:b[3] + 1, b[0]:b[2] + 1] = True
        assert not (m & ~filled).any()
    # instances do not overlap
    assert int(masks.sum(0).max()) <= 1
    if split == "single":
        assert isinstance(it["label"], int) and 0 <= it["label"] < len(CLASSES)
        assert set(il.tolist()) == {it["label"]} and 1 <= n <= 4
    else:
        a, b = it["label"]
        assert a != b and 0 <= a < len(CLASSES) and 0 <= b < len(CLASSES)
        assert set(il.tolist()) == {a, b} and 2 <= n <= 4


def test_items_single_and_pairs():
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    for split in ("single", "pairs"):
        d = ShapesDataset(split=split, seed=7, size=40)
        assert len(d) == 40
        for i in range(40):
            _check_item(d[i], split)


def test_label_coverage_and_collate():
    d = ShapesDataset(seed=1, size=200)
    labels = {d.raw(i)["label"] for i in range(200)}
    assert labels == set(range(len(CLASSES)))
    batch = collate([d[i] for i in range(5)])
    assert tuple(batch["image"].shape) == (5, 3, 224, 224)
    assert tuple(batch["image_uint8"].shape) == (5, 224, 224, 3)
    assert batch["label"].tolist() == [d.raw(i)["label"] for i in range(5)]
    assert len(batch["boxes"]) == len(batch["masks"]) == len(batch["instance_labels"]) == 5
    pb = collate([ShapesDataset(split="pairs", seed=1, size=3)[i] for i in range(3)])
    assert tuple(pb["label"].shape) == (3, 2)
    loader = torch.utils.data.DataLoader(d, batch_size=4, collate_fn=collate)
    assert tuple(next(iter(loader))["image"].shape) == (4, 3, 224, 224)


def test_easy_variant():
    for split in ("single", "pairs"):
        for i in range(10):
            s = generate(0, split, i, easy=True)
            it = {"image": ShapesDataset().normalize(s["image_uint8"]), "image_uint8": s["image_uint8"],
                  "label": s["label"], "boxes": torch.from_numpy(s["boxes"]),
                  "masks": torch.from_numpy(s["masks"]), "instance_labels": torch.from_numpy(s["instance_labels"])}
            _check_item(it, split)
        assert not np.array_equal(generate(0, split, 0, easy=True)["image_uint8"],
                                  generate(0, split, 0)["image_uint8"])
