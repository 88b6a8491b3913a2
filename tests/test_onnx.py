"""The ONNX export: ONNX Runtime reproduces eager attributions; the file is lean and self-describing."""

import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy.stats import spearmanr

from captum_vit import AGCAM, AttentionRollout, RawAttention
from captum_vit.cli import main
from captum_vit.onnx import export_onnx
from helpers import _perturb, input_for, make, make_timm

ONE_TOKEN_ARCHS = ["plain", "qk_norm", "layerscale", "distilled", "registers", "dynamic", "convstem", "hf"]


def _config(x):
    return {"input_size": tuple(x.shape[1:]), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "squash"}


def _run(path, x, target):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy(), "target": np.asarray(target, dtype=np.int64)})


def _rel(a, b):
    b = np.asarray(b)
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("arch", ONE_TOKEN_ARCHS)
def test_onnx_runtime_equals_eager_agcam(arch, tmp_path):
    model = make(arch)
    x8 = input_for(arch, batch=8, seed=11)
    path = export_onnx(model, str(tmp_path / "m.onnx"), data_config=_config(x8))
    for x, target in ((x8[:1], [3]), (x8, [1, -1, 4, 9, -1, 0, 7, 2])):
        logits, cam = _run(path, x, target)
        with torch.no_grad():
            eager_logits = AGCAM(model).attribute(x, return_logits=True)[1]
        t = torch.tensor(target)
        t = torch.where(t < 0, eager_logits.argmax(-1), t)
        eager = AGCAM(model).attribute(x, target=t)[:, 0]
        assert eager.abs().max() > 0
        assert _rel(logits, eager_logits) <= 1e-4
        assert _rel(cam, eager) <= 1e-4, f"{arch}: rel. diff {_rel(cam, eager)}"


@pytest.mark.slow
def test_shipped_model_parity_fp16_ranking_size_and_metadata(tmp_path):
    from captum_vit.data import ShapesDataset, collate
    from captum_vit.zoo import SHAPES_CLASSES, shapes_vit

    model, cfg = shapes_vit()
    ds = ShapesDataset("single", seed=2026, size=8, mean=cfg["mean"], std=cfg["std"])
    x = collate([ds[i] for i in range(8)])["image"]
    target = [-1, 2, -1, 5, 0, -1, 7, 1]
    path = export_onnx(model, str(tmp_path / "s.onnx"), data_config=cfg, class_names=SHAPES_CLASSES, cam_image=True)
    logits, cam, cam_image = _run(path, x, target)
    t = torch.tensor(target)
    t = torch.where(t < 0, torch.from_numpy(logits).argmax(-1), t)
    eager = AGCAM(model).attribute(x, target=t)
    assert _rel(cam, eager[:, 0]) <= 1e-4
    up = AGCAM(model).attribute(x, target=t, upsample_to_input=True)[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    assert np.abs(cam_image - ((up - lo) / (hi - lo)).numpy()).max() <= 1e-4

    half = export_onnx(model, str(tmp_path / "h.onnx"), data_config=cfg, fp16=True)
    _, cam16 = _run(half, x, t.tolist())
    for a, b in zip(cam16.reshape(8, -1), cam.reshape(8, -1)):
        assert spearmanr(a, b).statistic >= 0.99

    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["captum_vit.method"] == "agcam" and meta["captum_vit.format"] == "1"
    assert json.loads(meta["captum_vit.input_size"]) == [3, 224, 224]
    assert json.loads(meta["captum_vit.grid"]) == [14, 14]
    assert json.loads(meta["captum_vit.class_names"]) == list(SHAPES_CLASSES)
    assert json.loads(meta["captum_vit.mean"]) == list(cfg["mean"])
    assert json.loads(meta["captum_vit.outputs"]) == ["logits", "cam", "cam_image"]
    onnx.checker.check_model(proto, full_check=True)
    # every weight once: no initializer repeats another's bytes, and the file is within 10% of the
    # forward-only export of the same classifier
    seen = set()
    for init in proto.graph.initializer:
        key = (init.data_type, tuple(init.dims), init.raw_data)
        assert len(init.raw_data) <= 64 or key not in seen, f"{init.name} is stored twice"
        seen.add(key)
    plain = str(tmp_path / "plain.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), plain, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    assert os.path.getsize(path) <= 1.10 * os.path.getsize(plain)
    assert os.path.getsize(half) <= 0.55 * os.path.getsize(path)


@pytest.mark.parametrize("method,cls", [("rollout", AttentionRollout), ("raw", RawAttention)])
def test_forward_only_methods_export(method, cls, tmp_path):
    model = make("registers")
    x = input_for("registers", batch=3)
    path = export_onnx(model, str(tmp_path / "m.onnx"), method=method, data_config=_config(x))
    logits, cam = _run(path, x, [-1, -1, -1])
    assert _rel(cam, cls(model).attribute(x)[:, 0]) <= 1e-4


@pytest.mark.parametrize("arch,reason", [("respost", "ResPostBlock"), ("scale_norm", "normalises the head outputs")])
def test_export_refuses_where_the_one_token_engine_does_not_apply(arch, reason, tmp_path):
    model = make_timm(arch)
    with pytest.raises(ValueError, match=reason):
        export_onnx(model, str(tmp_path / "m.onnx"), data_config=_config(input_for("plain")))
    with pytest.raises(ValueError, match="cannot be exported"):
        export_onnx(make_timm("plain"), str(tmp_path / "m.onnx"), method="lrp")
    assert not os.path.exists(tmp_path / "m.onnx")


def test_cli_export_defaults_to_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "shapes.onnx"
    assert main(["export", "--out", str(out), "--method", "raw"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["captum_vit.method"] == "raw"
    assert main(["export", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_export_takes_the_input_size_the_model_was_built_for(tmp_path):
    import timm

    from captum_vit.models import data_config_for

    torch.manual_seed(0)
    # timm's pretrained config says 224; the model takes 160 only
    model = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=160, num_classes=5,
                                       depth=2)).eval()
    assert data_config_for(model)["input_size"] == (3, 160, 160)
    path = export_onnx(model, str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["captum_vit.input_size"]) == [3, 160, 160]
    assert json.loads(meta["captum_vit.grid"]) == [10, 10]
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    logits, cam = _run(path, x, [1, -1, 4])
    with torch.no_grad():
        eager_logits = model(x)
    t = torch.tensor([1, int(eager_logits[1].argmax()), 4])
    eager = AGCAM(model).attribute(x, target=t)[:, 0]
    assert eager.abs().max() > 0
    assert _rel(logits, eager_logits) <= 1e-4
    assert _rel(cam, eager) <= 1e-4
    # a data config for another size is refused with the reason, not timm's assertion from inside the trace
    with pytest.raises(ValueError, match="does not match the model's fixed input size 160x160"):
        export_onnx(model, str(tmp_path / "bad.onnx"), data_config=_config(torch.zeros(1, 3, 224, 224)))
