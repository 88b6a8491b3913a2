import os
import shutil

import numpy as np
import pytest
import torch

from captum_vit.data import CLASSES, generate
from captum_vit.zoo import SHAPES_CLASSES, shapes_vit, training_seeds
from captum_vit.zoo.shapes import CONFIG_PATH, WEIGHTS_PATH, load_config, sha256_file

HELDOUT_SEED = 12345  # disjoint from the training seeds (training_seeds in shapes_vit.json)

@pytest.fixture(scope="module")
def loaded():
    return shapes_vit()


def test_shipped_files():
    cfg = load_config()
    assert os.path.getsize(WEIGHTS_PATH) <= 25 * 1024 * 1024
    assert cfg["classes"] == list(CLASSES) == list(SHAPES_CLASSES)
    assert cfg["dataset"]["train"]["seed"] != HELDOUT_SEED == cfg["dataset"]["val"]["seed"]
    with open(WEIGHTS_PATH, "rb") as f:
        assert not f.read(64).startswith(b"version https://git-lfs"), "weights are a Git LFS pointer"


def test_package_folder_holds_weights_and_config_only():
    """pyproject.toml ships captum_vit/zoo/*.pth and *.json; training code and logs belong in tools/."""
    folder = os.path.dirname(WEIGHTS_PATH)
    files = {f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))}
    assert {f for f in files if not f.endswith((".py", ".pth", ".json"))} == set()
    assert {f for f in files if f.endswith(".py")} == {"__init__.py", "shapes.py"}


def test_training_seeds_cover_the_last_run():
    cfg = load_config()
    seeds = training_seeds()
    assert seeds == {0, 1}  # the chain trained on seed 0, its last run on seed 1
    assert cfg["training"]["seed"] in seeds and cfg["dataset"]["train"]["seed"] in seeds
    assert HELDOUT_SEED not in seeds and 2024 not in seeds  # the tests' and the demo's seeds are held out


def test_training_seeds_missing_is_an_error(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text("{}")
    with pytest.raises(RuntimeError, match="training_seeds"):
        training_seeds(str(p))


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    data = np.random.default_rng(0).integers(0, 256, (1 << 20) + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == digest
    assert sha256_file(str(path), chunk=1000) == digest  # more than one chunk, the last one short
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()
    assert sha256_file(WEIGHTS_PATH) == load_config()["sha256"]


def test_model_and_config(loaded):
    model, data_config = loaded
    assert not model.training and all(not m.training for m in model.modules())
    assert data_config == {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                           "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "squash"}
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.grid_size == (14, 14)
    assert model.cls_token is not None and model.global_pool == "token" and len(model.blocks) >= 6
    assert model.num_classes == len(CLASSES)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 224, 224)).shape) == (1, len(CLASSES))


def test_checksum_mismatch_is_reported(tmp_path):
    ckpt = tmp_path / "shapes_vit.pth"
    shutil.copy(WEIGHTS_PATH, ckpt)
    shutil.copy(CONFIG_PATH, tmp_path / "shapes_vit.json")
    shapes_vit(checkpoint=str(ckpt))  # an intact copy loads
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"checksum mismatch.*shapes_vit\.pth.*git checkout"):
        shapes_vit(checkpoint=str(ckpt))
    ckpt.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        shapes_vit(checkpoint=str(ckpt))


@pytest.mark.slow
def test_heldout_accuracy(loaded):
    model, _ = loaded
    n, bs, correct = 300, 50, 0
    with torch.inference_mode():
        for s in range(0, n, bs):
            items = [generate(HELDOUT_SEED, "single", i) for i in range(s, s + bs)]
            x = torch.from_numpy(np.stack([it["image_uint8"] for it in items])).permute(0, 3, 1, 2).float()
            x = x / 127.5 - 1.0
            y = torch.tensor([it["label"] for it in items])
            correct += int((model(x).argmax(1) == y).sum())
    acc = correct / n
    assert acc >= 0.95, f"held-out accuracy {acc:.3f} < 0.95"
