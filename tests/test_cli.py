import os
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captum_vit.cli import explain, main, overlay_stems
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
    with Image.open(out / pngs[0]) as im:
        assert im.size == (224, 224)
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


def test_explain_errors(images, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out folder lands here, not in the repository
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


class _StubAGCAM:
    """Stand-in for AGCAM with the methods' ``attribute`` contract (``return_logits``).

    Counts the model's forward calls, so the tests can tell whether the CLI runs forwards of its own.
    """

    forwards = 0

    def __init__(self, model):
        self.model = model
        _StubAGCAM.forwards = 0
        model.register_forward_pre_hook(lambda *_: setattr(_StubAGCAM, "forwards", _StubAGCAM.forwards + 1))

    def attribute(self, inputs, target=None, upsample_to_input=False, return_logits=False):
        with torch.no_grad():
            logits = self.model(inputs)
        g = torch.Generator().manual_seed(int(inputs.sum().abs() * 1000) % 2**31)
        cam = torch.rand(inputs.shape[0], 1, 14, 14, generator=g)
        return (cam, logits) if return_logits else cam


@pytest.fixture()
def stub_agcam(monkeypatch):
    from captum_vit.attr import METHODS

    monkeypatch.setitem(METHODS, "agcam", _StubAGCAM)
    return _StubAGCAM


def test_overlay_stems_are_distinct_and_deterministic():
    paths = ["a/img.png", "b/img.png", "img_2.png", "c/IMG.jpg", "d/other.png"]
    assert overlay_stems(paths) == ["img", "img_2", "img_2_2", "IMG_3", "other"]
    assert overlay_stems(paths) == overlay_stems(list(paths))


def test_same_file_names_in_different_folders_do_not_overwrite(tmp_path, checkpoint, stub_agcam, capsys):
    path, _ = checkpoint
    rng = np.random.default_rng(1)
    imgs = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        p = tmp_path / d / "img.png"
        Image.fromarray(rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8)).save(p)
        imgs.append(str(p))
    out = tmp_path / "out"
    records = explain(imgs, MODEL, checkpoint=path, target=0, out=str(out))
    assert [os.path.basename(r["overlay"]) for r in records] == ["img_agcam_class0.png", "img_2_agcam_class0.png"]
    assert sorted(os.listdir(out)) == ["img_2_agcam_class0.png", "img_agcam_class0.png"]
    a, b = (np.asarray(Image.open(out / f)) for f in ("img_agcam_class0.png", "img_2_agcam_class0.png"))
    assert not np.array_equal(a, b)  # each overlay shows its own image


def test_explain_runs_one_forward_per_batch(images, checkpoint, tmp_path, stub_agcam, capsys):
    path, ref = checkpoint
    records = explain(images * 3, MODEL, checkpoint=path, out=str(tmp_path / "out"), batch_size=4)
    assert stub_agcam.forwards == 2  # 6 images in batches of 4: two forwards, the method's own
    assert len(os.listdir(tmp_path / "out")) == 6  # repeated files get distinct overlays too
    ref.eval()
    from captum_vit.models import preprocess_images

    _, cfg, _ = load_model(MODEL, checkpoint=path)
    with torch.no_grad():
        probs = ref(preprocess_images(images * 3, cfg)[0]).softmax(-1)
    assert [r["predicted"] for r in records] == probs.argmax(-1).tolist()
    for r, p in zip(records, probs):
        assert r["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_random_weights_warn(images, tmp_path, stub_agcam):
    with pytest.warns(UserWarning, match=r"random weights.*--pretrained or --checkpoint"):
        assert main(["explain", images[0], "--model", MODEL, "--out", str(tmp_path / "out")]) == 0


def test_checkpoint_weights_do_not_warn(checkpoint):
    path, _ = checkpoint
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*random weights.*")
        load_model(MODEL, checkpoint=path)


def test_out_naming_a_file_is_an_error(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert "existing file, not a folder" in err and "--out" in err
    assert f.read_text() == "keep me"


def test_pretrained_with_the_shipped_model_is_an_error(images, tmp_path, capsys):
    assert main(["explain", images[0], "--model", "shapes_vit", "--pretrained", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained does not apply to 'shapes_vit'" in err and "drop --pretrained" in err
    assert not (tmp_path / "o").exists()


def test_version(capsys):
    from captum_vit import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"captum-vit {__version__}"


@pytest.mark.parametrize("method", ["rollout", "lrp", "gae", "cdam", "raw"])
def test_explain_with_every_method(images, checkpoint, tmp_path, capsys, method):
    path, _ = checkpoint
    out = tmp_path / "out"
    assert main(["explain", *images, "--model", MODEL, "--checkpoint", path, "--out", str(out), "--method", method,
                 "--target", "3"]) == 0
    names = sorted(os.listdir(out))
    assert names == [f"img0_{method}_class3.png", f"img1_{method}_class3.png"]
    # The overlay shows this method's map: a different method gives a different picture.
    agcam_out = tmp_path / "agcam"
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(agcam_out),
                 "--target", "3"]) == 0
    a = np.asarray(Image.open(out / names[0]))
    b = np.asarray(Image.open(agcam_out / "img0_agcam_class3.png"))
    assert not np.array_equal(a, b)
