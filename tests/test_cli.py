import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captum_vit.cli import main
from captum_vit.models import load_checkpoint_state, load_model

MODEL = "vit_tiny_patch16_224"


@pytest.fixture()
def images(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i, size in enumerate([(300, 200), (224, 224)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model(MODEL, num_classes=7)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": m.state_dict()}, path)
    return str(path), m


def test_explain_with_checkpoint_infers_num_classes(images, checkpoint, tmp_path, capsys):
    path, ref = checkpoint
    out = tmp_path / "out"
    rc = main(["explain", *images, "--model", MODEL, "--checkpoint", path, "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("predicted class") == 2
    pngs = sorted(os.listdir(out))
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert Image.open(out / pngs[0]).size == (224, 224)
    model, cfg, _ = load_model(MODEL, checkpoint=path)
    assert model.num_classes == 7 and not model.training
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_explain_target_option(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    rc = main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--target", "3", "--out", str(tmp_path)])
    assert rc == 0
    assert "explained class 3" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "img0_agcam_class3.png")


def test_explain_errors(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["explain", images[0], "--model", "vit_small_patch16_224", "--checkpoint", path]) == 2
    assert "does not fit model" in capsys.readouterr().err
    assert main(["explain", images[0], "--model", "vit_nonexistent_model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--target", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    txt = tmp_path / "x.png"
    txt.write_text("not an image")
    assert main(["explain", str(txt), "--model", MODEL, "--checkpoint", path]) == 2
    assert "as an image" in capsys.readouterr().err


def test_checkpoint_loader_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_checkpoint_state(str(p))
