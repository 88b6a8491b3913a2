import json
import os
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captum_vit.cli import explain, main
from captum_vit.models import load_checkpoint_state, load_model
from captum_vit.viz import overlay_stems

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


def test_explain_negative_target_is_the_predicted_class(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(tmp_path / "a"),
                 "--json", str(tmp_path / "a.json")]) == 0
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--target", "-1", "--out",
                 str(tmp_path / "b"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert b["images"][0]["target"] == a["images"][0]["predicted"] == a["images"][0]["target"]
    assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b")


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


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("captum-vit explain: error: ")
    return err


def _bomb_png(path, width=20000, height=20000):
    """A PNG whose header claims ``width x height`` pixels: PIL refuses it on open, before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return str(path)


def test_explain_skip_reports_unreadable_files_and_explains_the_rest(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    txt = tmp_path / "broken.png"
    txt.write_text("not an image")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    bomb = _bomb_png(tmp_path / "huge.png")
    given = [images[0], str(txt), str(folder), str(tmp_path / "missing.png"), bomb, images[1]]
    out = tmp_path / "out"
    js = tmp_path / "run.json"
    assert main(["explain", *given, "--model", MODEL, "--checkpoint", path, "--out", str(out), "--on-error", "skip",
                 "--target", "2", "--json", str(js)]) == 0
    assert sorted(os.listdir(out)) == ["img0_agcam_class2.png", "img1_agcam_class2.png"]
    cap = capsys.readouterr()
    assert cap.out.count("predicted class") == 2
    for p in given[1:5]:
        assert p in cap.err
    assert "is a folder" in cap.err and "does not exist" in cap.err and "pixels" in cap.err
    assert "2 images explained, 4 skipped" in cap.out
    data = json.loads(js.read_text())
    assert [r["image"] for r in data["images"]] == [images[0], images[1]]
    assert [s["image"] for s in data["skipped"]] == given[1:5]
    assert data["n_explained"] == 2 and data["n_skipped"] == 4


def test_explain_stops_at_an_unreadable_file_with_the_fix(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    txt = tmp_path / "broken.png"
    txt.write_text("not an image")
    out = tmp_path / "out"
    assert main(["explain", images[0], str(txt), "--model", MODEL, "--checkpoint", path, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(txt) in err and "--on-error skip" in err


def test_explain_a_folder_given_as_an_image(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    folder = tmp_path / "pics"
    folder.mkdir()
    assert main(["explain", str(folder), "--model", MODEL, "--checkpoint", path, "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "is a folder, not an image file" in err and "does not exist" not in err
    assert f"{folder}{os.sep}*" in err  # the fix: give the files inside it


def test_explain_decompression_bomb_is_a_clear_error(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    bomb = _bomb_png(tmp_path / "huge.png")
    assert main(["explain", bomb, "--model", MODEL, "--checkpoint", path, "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert bomb in err and "400000000 pixels" in err and "downscale" in err


def test_explain_out_below_a_file(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(f / "sub" / "out")]) == 2
    err = _one_line_error(capsys)
    assert "--out" in err and f"{str(f)!r} is a file" in err
    assert f.read_text() == "keep me"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders, so chmod cannot make one for this test")
def test_explain_out_read_only(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(ro)]) == 2
        err = _one_line_error(capsys)
        assert "not writable" in err
    finally:
        ro.chmod(0o755)


def test_explain_json_naming_a_folder(images, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "out"
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(out),
                 "--json", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "--json" in err and "is a folder" in err and "results.json" in err
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("model", [MODEL, "shapes_vit"])
def test_checkpoint_holding_a_list(images, tmp_path, capsys, model):
    bad = tmp_path / "list.pth"
    torch.save([1, 2], bad)
    assert main(["explain", images[0], "--model", model, "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "holds a list" in err and "torch.save(model.state_dict(), path)" in err


def test_explain_batch_size(images, checkpoint, tmp_path, capsys, stub_agcam):
    path, _ = checkpoint
    assert main(["explain", *images * 3, "--model", MODEL, "--checkpoint", path, "--out", str(tmp_path / "o"),
                 "--batch-size", "2"]) == 0
    assert stub_agcam.forwards == 3
    assert main(["explain", images[0], "--model", MODEL, "--checkpoint", path, "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size" in _one_line_error(capsys)


def test_explain_batch_size_gives_the_results_of_one_batch(images, checkpoint, tmp_path, capsys, monkeypatch):
    import captum_vit.viz

    path, _ = checkpoint
    rng = np.random.default_rng(5)
    more = []
    for i in range(3):
        p = tmp_path / f"more{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(180, 240, 3), dtype=np.uint8)).save(p)
        more.append(str(p))
    maps, save = [], captum_vit.viz.save_overlay
    monkeypatch.setattr(captum_vit.viz, "save_overlay", lambda png, img, cam: (maps.append(cam), save(png, img, cam)))
    runs = {}
    for bs in (2, 5):
        maps.clear()
        js = tmp_path / f"b{bs}.json"
        assert main(["explain", *images, *more, "--model", MODEL, "--checkpoint", path, "--out",
                     str(tmp_path / f"b{bs}"), "--batch-size", str(bs), "--json", str(js)]) == 0
        runs[bs] = json.loads(js.read_text())["images"], torch.stack(maps)
    (recs2, maps2), (recs5, maps5) = runs[2], runs[5]
    assert len(recs2) == len(recs5) == 5 and maps2.shape == (5, 14, 14)
    assert maps5.abs().max() > 0
    assert torch.allclose(maps2, maps5, rtol=1e-4, atol=1e-6 * float(maps5.abs().max()))
    for a, b in zip(recs2, recs5):
        assert a["predicted"] == b["predicted"] and a["target"] == b["target"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
        assert os.path.basename(a["overlay"]) == os.path.basename(b["overlay"])


class _NaNForOne(_StubAGCAM):
    """The stub, with a NaN map for the second image of every batch."""

    def attribute(self, inputs, target=None, upsample_to_input=False, return_logits=False):
        cam, logits = super().attribute(inputs, target=target, return_logits=True)
        if cam.shape[0] > 1:
            cam[1, 0, 3, 4] = float("nan")
        return (cam, logits) if return_logits else cam


def test_explain_flags_a_nan_map(images, checkpoint, tmp_path, capsys, monkeypatch):
    from captum_vit.attr import METHODS

    monkeypatch.setitem(METHODS, "agcam", _NaNForOne)
    path, _ = checkpoint
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["explain", *images, "--model", MODEL, "--checkpoint", path, "--out", str(out), "--target", "1",
                 "--json", str(js)]) == 1
    cap = capsys.readouterr()
    assert f"{images[1]}: the map" in cap.err and "NaN or infinite" in cap.err
    assert images[0] not in cap.err
    assert os.listdir(out) == ["img0_agcam_class1.png"]  # no picture of a broken map
    recs = json.loads(js.read_text())["images"]
    assert [r["finite"] for r in recs] == [True, False]
    assert recs[1]["overlay"] is None
    assert json.loads(js.read_text())["n_nonfinite"] == 1


def test_explain_flags_nan_logits_from_nan_weights(images, tmp_path, capsys):
    torch.manual_seed(0)
    m = timm.create_model(MODEL, num_classes=4)
    state = m.state_dict()
    state["head.weight"][0, 0] = float("nan")
    ck = tmp_path / "nan.pth"
    torch.save(state, ck)
    js = tmp_path / "r.json"
    assert main(["explain", *images, "--model", MODEL, "--checkpoint", str(ck), "--out", str(tmp_path / "o"),
                 "--json", str(js)]) == 1
    err = capsys.readouterr().err
    for p in images:
        assert f"{p}: the logits" in err
    assert "check the checkpoint" in err
    recs = json.loads(js.read_text())["images"]
    assert [r["finite"] for r in recs] == [False, False]
    assert all(r["probability"] is None for r in recs)  # NaN as null: strict JSON
    records = explain(images, MODEL, checkpoint=str(ck), out=str(tmp_path / "o2"))
    assert [r["finite"] for r in records] == [False, False]


def test_help_imports_no_torch():
    """`captum-vit --help` (and each command's) answers without importing torch, timm or h5py."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from captum_vit.cli import main\n"
        "for argv in (['--help'], ['evaluate', '--help'], ['explain', '--help'], ['export', '--help'],\n"
        "             ['report', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'timm', 'captum', 'h5py', 'matplotlib', 'cv2') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--methods" in proc.stdout and "{agcam,rollout,lrp,gae,cdam,raw,attnlrp}" in proc.stdout
