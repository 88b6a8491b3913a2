"""The end-to-end demo on a handful of images (tiny models, a few seconds)."""

import argparse
import io
import json
import os
import re

import pytest
import torch
from torch import nn

from captum_vit.attr import AGCAM
from captum_vit.cli import main as cli_main
from captum_vit.data import ShapesDataset
from captum_vit.demo import add_demo_arguments, format_table, main, resolve_methods, run_demo, run_demo_from_args
from captum_vit.metrics import METRIC_NAMES
from captum_vit.zoo import training_seeds


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
    """Stand-in attribution method with the methods' ``attribute`` contract, recording its calls.

    Returns a fixed map per image; with ``return_logits=True`` also the logits of its one forward
    (``target=None`` explains the predicted class). Counts forwards in ``forwards``.
    """

    calls = []
    forwards = 0

    def __init__(self, model):
        self.model = model

    def attribute(self, inputs, target=None, upsample_to_input=False, return_logits=False):
        _RecordingMethod.calls.append((inputs.shape[0], None if target is None else torch.as_tensor(target).clone(),
                                       upsample_to_input, return_logits))
        with torch.no_grad():
            logits = self.model(inputs)
        _RecordingMethod.forwards += 1
        maps = torch.zeros(inputs.shape[0], 1, 7, 7)
        maps[:, :, 2:5, 2:5] = 1.0  # a centred blob
        return (maps, logits) if return_logits else maps


class _SecondMethod(_RecordingMethod):
    calls = []

    def attribute(self, inputs, target=None, upsample_to_input=False, return_logits=False):
        _SecondMethod.calls.append((inputs.shape[0], None if target is None else torch.as_tensor(target).clone(),
                                    upsample_to_input, return_logits))
        maps = torch.zeros(inputs.shape[0], 1, 7, 7)
        maps[:, :, 0:2, 0:2] = 1.0  # a corner blob
        return maps


class _CountingModel(nn.Module):
    """Wraps a classifier and counts its forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.eval()

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _reset():
    _RecordingMethod.calls, _RecordingMethod.forwards, _SecondMethod.calls = [], 0, []


def test_demo_writes_files_and_prints_the_table(tmp_path):
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
    _reset()
    labels = [ShapesDataset("single", seed=2024, size=10).raw(i)["label"] for i in range(10)]
    c = max(set(labels), key=labels.count)
    stream = io.StringIO()
    model = _CountingModel(_ConstantClassifier(c))
    scores = run_demo(n=10, seed=2024, out=str(tmp_path), methods={"stub": _RecordingMethod, "second": _SecondMethod},
                      batch_size=4, gallery_rows=2, progress=False, model=model, stream=stream)
    assert scores["n_correct"] == scores["n_evaluated"] == labels.count(c)
    assert scores["accuracy"] == pytest.approx(labels.count(c) / 10)
    # one forward per batch, by the first method, for the predicted class, with its logits
    assert model.calls == _RecordingMethod.forwards == 3
    assert [(b, t, up, rl) for b, t, up, rl in _RecordingMethod.calls] == [(4, None, False, True),
                                                                           (4, None, False, True),
                                                                           (2, None, False, True)]
    # the second method gets only the correctly classified images and their predicted class as target
    assert sum(b for b, _, _, _ in _SecondMethod.calls) == labels.count(c)
    assert all(bool((t == c).all()) and up is False and rl is False for _, t, up, rl in _SecondMethod.calls)
    # each method's own maps are scored: the blobs differ, so do the scores
    assert scores["methods"]["stub"]["iou"] != scores["methods"]["second"]["iou"]
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


@pytest.mark.parametrize("seed", sorted(training_seeds()))
def test_demo_refuses_a_training_seed(seed):
    with pytest.raises(ValueError, match=rf"seed {seed} is one of the shipped model's training seeds.*--seed"):
        run_demo(n=2, seed=seed, out=None, methods={"stub": _RecordingMethod}, progress=False,
                 model=_ConstantClassifier(0), stream=io.StringIO())


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), r"n=0 must be at least 1.*--n"),
    (dict(n=-3), r"n=-3 must be at least 1.*--n"),
    (dict(threshold=1.5), r"threshold 1.5 is outside \[0, 1\].*--threshold"),
    (dict(threshold=-0.1), r"threshold -0.1 is outside \[0, 1\].*--threshold"),
    (dict(batch_size=0), r"batch size 0 must be at least 1.*--batch-size"),
])
def test_demo_rejects_bad_options(kwargs, match):
    _reset()
    with pytest.raises(ValueError, match=match):
        run_demo(**dict(dict(n=2, seed=2024, out=None, progress=False), **kwargs),
                 methods={"stub": _RecordingMethod}, model=_ConstantClassifier(0), stream=io.StringIO())
    assert _RecordingMethod.calls == []  # refused before any work


@pytest.mark.parametrize("argv, match", [
    (["--n", "0"], "must be at least 1"),
    (["--n", "-1"], "must be at least 1"),
    (["--threshold", "2"], r"outside \[0, 1\]"),
    (["--seed", str(min(training_seeds()))], "training seeds"),
])
def test_demo_command_line_errors_exit_2(argv, match, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli_main(["demo", "--out", out, "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captum-vit demo: error:") and re.search(match, err)
    with pytest.raises(SystemExit) as e:  # python -m captum_vit.demo
        main(["--out", out, "--no-progress", *argv])
    assert e.value.code == 2
    assert not os.path.exists(out)


def test_demo_refuses_train_mode():
    with pytest.raises(ValueError, match="train mode"):
        run_demo(n=2, out=None, methods={"stub": _RecordingMethod}, model=_ConstantClassifier(0).train(),
                 progress=False, stream=io.StringIO())


def test_resolve_methods_and_arguments():
    assert resolve_methods("agcam") == {"agcam": AGCAM}
    assert "agcam" in resolve_methods(None)
    assert list(resolve_methods(["agcam,agcam"])) == ["agcam"]
    with pytest.raises(ValueError, match="available"):
        resolve_methods(["nope"])
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--n", "5", "--seed", "7", "--methods", "agcam", "--no-progress", "--out", "x"])
    assert (args.n, args.seed, args.methods, args.no_progress, args.out) == (5, 7, ["agcam"], True, "x")
    assert args.batch_size == 16 and args.threshold == 0.5 and args.gallery_rows == 6


def test_run_demo_from_args_passes_every_option(tmp_path, monkeypatch):
    """``run_demo_from_args`` on tiny parsed options: each option reaches ``run_demo`` and its outputs."""
    import captum_vit.attr
    import captum_vit.zoo

    _reset()
    labels = [ShapesDataset("single", seed=7, size=5).raw(i)["label"] for i in range(5)]
    c = max(set(labels), key=labels.count)
    monkeypatch.setattr(captum_vit.zoo, "shapes_vit", lambda: (_ConstantClassifier(c), {"mean": (0.5,) * 3,
                                                                                         "std": (0.5,) * 3}))
    monkeypatch.setitem(captum_vit.attr.METHODS, "stub", _RecordingMethod)
    out = tmp_path / "demo"
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--n", "5", "--seed", "7", "--methods", "stub", "--batch-size", "2", "--gallery-rows", "1",
         "--threshold", "0.3", "--no-progress", "--out", str(out)])
    scores = run_demo_from_args(args)
    assert (scores["n_images"], scores["seed"], scores["threshold"]) == (5, 7, 0.3)
    assert scores["n_correct"] == labels.count(c) and list(scores["methods"]) == ["stub"]
    assert [b for b, *_ in _RecordingMethod.calls] == [2, 2, 1]
    assert json.loads((out / "scores.json").read_text())["seed"] == 7
    assert (out / "gallery.png").exists()


def test_demo_with_a_hugging_face_vit(tmp_path):
    """The demo needs no ``model(x)`` of its own: a model whose forward returns an output object works."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=224, patch_size=32, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=96, num_labels=8)
    model = transformers.ViTForImageClassification(cfg).eval()
    scores = run_demo(n=4, seed=2024, out=None, methods=["agcam"], batch_size=4, progress=False, model=model,
                      only_correct=False, stream=io.StringIO())
    assert scores["n_evaluated"] == 4
    assert all(0.0 <= scores["methods"]["agcam"][k] <= 1.0 for k in METRIC_NAMES)


@pytest.mark.slow
def test_demo_with_the_shipped_model(tmp_path):
    stream = io.StringIO()
    scores = run_demo(n=16, seed=2024, out=str(tmp_path), methods=["agcam"], batch_size=8, gallery_rows=2,
                      progress=False, stream=stream)
    assert scores["accuracy"] > 0.8
    assert scores["n_evaluated"] == scores["n_correct"] > 0
    assert "agcam" in stream.getvalue()
    assert (tmp_path / "gallery.png").exists() and (tmp_path / "scores.json").exists()
