"""The end-to-end demo on a handful of images (tiny models, a few seconds)."""

import argparse
import io
import json
import os

import pytest
import torch
from torch import nn

from captum_vit.data import ShapesDataset
from captum_vit.demo import add_demo_arguments, format_table, resolve_methods, run_demo, run_demo_from_args
from captum_vit.metrics import METRIC_NAMES


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=32, num_classes=8, embed_dim=48, depth=2, num_heads=2).eval()


class _ConstantClassifier(nn.Module):
    """Always predicts class ``c``: the correctly classified images are exactly those labelled ``c``."""

    def __init__(self, c, num_classes=8):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[c] = 1.0
        self.eval()

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.mean((1, 2, 3))[:, None]


class _RecordingMethod:
    """Stand-in attribution method: records its calls, returns a fixed map per image."""

    calls = []

    def __init__(self, model):
        self.model = model

    def attribute(self, inputs, target=None, upsample_to_input=False):
        _RecordingMethod.calls.append((inputs.shape[0], torch.as_tensor(target).clone(), upsample_to_input))
        maps = torch.zeros(inputs.shape[0], 1, 7, 7)
        maps[:, :, 2:5, 2:5] = 1.0  # a centred blob
        return maps


def test_demo_writes_files_and_prints_the_table(tmp_path):
    pytest.importorskip("captum_vit.attr.agcam")
    stream = io.StringIO()
    out = tmp_path / "demo"
    scores = run_demo(n=6, seed=2024, out=str(out), methods=["agcam"], batch_size=4, gallery_rows=3,
                      progress=False, model=_tiny_vit(), only_correct=False, stream=stream)
    text = stream.getvalue()
    assert "agcam" in text and "IoU" in text and "classification accuracy" in text
    assert os.path.getsize(out / "gallery.png") > 1000
    saved = json.loads((out / "scores.json").read_text())
    assert saved["n_images"] == 6 and saved["n_evaluated"] == 6
    for k in METRIC_NAMES:
        assert 0.0 <= saved["methods"]["agcam"][k] <= 1.0
        assert saved["methods"]["agcam"][k] == pytest.approx(scores["methods"]["agcam"][k])
    assert scores["files"]["gallery"].endswith("gallery.png")
    assert format_table(scores).splitlines()[0] in text


def test_demo_keeps_only_correctly_classified_images(tmp_path):
    _RecordingMethod.calls = []
    labels = [ShapesDataset("single", seed=2024, size=10).raw(i)["label"] for i in range(10)]
    c = max(set(labels), key=labels.count)
    stream = io.StringIO()
    scores = run_demo(n=10, seed=2024, out=str(tmp_path), methods={"stub": _RecordingMethod}, batch_size=4,
                      gallery_rows=2, progress=False, model=_ConstantClassifier(c), stream=stream)
    assert scores["n_correct"] == scores["n_evaluated"] == labels.count(c)
    assert scores["accuracy"] == pytest.approx(labels.count(c) / 10)
    assert sum(b for b, _, _ in _RecordingMethod.calls) == labels.count(c)
    assert all(bool((t == c).all()) and up is False for _, t, up in _RecordingMethod.calls)
    n_multi = sum(ShapesDataset("single", seed=2024, size=10).raw(i)["masks"].shape[0] >= 2
                  for i in range(10) if labels[i] == c)
    assert scores["methods"]["stub"]["n_multi_instance"] == n_multi
    assert (tmp_path / "gallery.png").exists() and (tmp_path / "scores.json").exists()


def test_demo_with_no_correct_image_reports_nan(tmp_path):
    labels = {ShapesDataset("single", seed=2024, size=4).raw(i)["label"] for i in range(4)}
    c = next(k for k in range(8) if k not in labels)
    scores = run_demo(n=4, seed=2024, out=str(tmp_path), methods={"stub": _RecordingMethod}, progress=False,
                      model=_ConstantClassifier(c), stream=io.StringIO())
    assert scores["n_evaluated"] == 0
    assert all(v != v for k, v in scores["methods"]["stub"].items() if k in METRIC_NAMES)  # NaN
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["methods"]["stub"]["iou"] is None
    assert not (tmp_path / "gallery.png").exists()


def test_demo_warns_on_the_training_seed():
    with pytest.warns(UserWarning, match="training seed"):
        run_demo(n=2, seed=0, out=None, methods={"stub": _RecordingMethod}, progress=False,
                 model=_ConstantClassifier(0), stream=io.StringIO())


def test_demo_refuses_train_mode():
    with pytest.raises(ValueError, match="train mode"):
        run_demo(n=2, out=None, methods={"stub": _RecordingMethod}, model=_ConstantClassifier(0).train(),
                 progress=False, stream=io.StringIO())


def test_resolve_methods_and_arguments():
    pytest.importorskip("captum_vit.attr.agcam")
    from captum_vit.attr import AGCAM

    assert resolve_methods("agcam") == {"agcam": AGCAM}
    assert "agcam" in resolve_methods(None)
    assert list(resolve_methods(["agcam,agcam"])) == ["agcam"]
    with pytest.raises(ValueError, match="available"):
        resolve_methods(["nope"])
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--n", "5", "--seed", "7", "--methods", "agcam", "--no-progress", "--out", "x"])
    assert (args.n, args.seed, args.methods, args.no_progress, args.out) == (5, 7, ["agcam"], True, "x")
    assert args.batch_size == 16 and args.threshold == 0.5 and args.gallery_rows == 6
    assert callable(run_demo_from_args)


def test_demo_with_the_shipped_model(tmp_path):
    stream = io.StringIO()
    scores = run_demo(n=16, seed=2024, out=str(tmp_path), methods=["agcam"], batch_size=8, gallery_rows=2,
                      progress=False, stream=stream)
    assert scores["accuracy"] > 0.8
    assert scores["n_evaluated"] == scores["n_correct"] > 0
    assert "agcam" in stream.getvalue()
    assert (tmp_path / "gallery.png").exists() and (tmp_path / "scores.json").exists()
