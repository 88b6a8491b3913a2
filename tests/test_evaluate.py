"""The evaluation runner: protocol numbers, the resumable per-image store and the CLI."""

import io
import json

import h5py
import numpy as np
import pytest
import torch

from captum_vit.attr import METHODS
from captum_vit.cli import main
from captum_vit.data import ShapesDataset, collate
from captum_vit.demo import run_demo
from captum_vit.evaluate import StoreCorruptError, StoreMismatchError, evaluate
from captum_vit.metrics import abpc
from conftest import make_timm

LOC = ["pixel_acc", "iou", "dice", "precision", "recall"]
KEYS = LOC + ["n_images", "n_images_abpc", "auc_lerf", "auc_morf", "abpc", "texture_collapse", "entropy",
              "mass_outside"]


@pytest.fixture(scope="module")
def tiny():
    return make_timm("plain")  # 64 x 64 input, 10 classes


def shapes64(n=12, mean=(0.5,) * 3):
    return ShapesDataset("single", seed=2024, size=n, image_size=64, mean=mean, std=(0.5,) * 3)


def counting(names, counter):
    """Method classes that record each attribute call: (images, whether it explains the predicted class)."""
    out = {}
    for name in names:
        base = METHODS[name]

        def attribute(self, inputs, *args, _base=base, **kwargs):
            counter.append((int(inputs.shape[0]), kwargs.get("target") is None))
            return _base.attribute(self, inputs, *args, **kwargs)

        out[name] = type(f"Counting{base.__name__}", (base,), {"attribute": attribute})
    return out


def close(a, b):
    for m in a["methods"]:
        for k in KEYS:
            x, y = a["methods"][m][k], b["methods"][m][k]
            assert (np.isnan(x) and np.isnan(y)) or np.isclose(x, y, rtol=0, atol=1e-9), (m, k, x, y)


def test_result_shape(tiny):
    r = evaluate(tiny, shapes64(8), "agcam,rollout", batch_size=4, progress=False)
    assert list(r["methods"]) == ["agcam", "rollout"]
    for s in r["methods"].values():
        assert set(KEYS) <= set(s)
        assert s["n_images_abpc"] == 8 and s["n_images"] == r["n_correct"]
        assert np.isclose(s["abpc"], s["auc_lerf"] - s["auc_morf"])
    assert r["n_images"] == 8 and r["n_computed"] == 8
    only = evaluate(tiny, shapes64(4), "agcam", metrics=("abpc",), progress=False)
    assert "iou" not in only["methods"]["agcam"] and "texture_collapse" not in only["methods"]["agcam"]


def test_localization_equals_demo():
    from captum_vit.zoo import shapes_vit

    model, cfg = shapes_vit()
    demo = run_demo(n=8, seed=2024, out=None, methods="agcam", batch_size=4, progress=False, model=model,
                    data_config=cfg, stream=io.StringIO())
    ds = ShapesDataset("single", seed=2024, size=8, mean=cfg["mean"], std=cfg["std"])
    r = evaluate(model, ds, "agcam", metrics=("localization",), batch_size=4, progress=False)
    assert r["methods"]["agcam"]["n_images"] == demo["n_evaluated"] > 0
    for ours, theirs in zip(LOC, ["pixel_accuracy", "iou", "dice", "precision", "recall"]):
        assert np.isclose(r["methods"]["agcam"][ours], demo["methods"]["agcam"][theirs], rtol=0, atol=1e-9)


def test_abpc_equals_direct_call(tiny):
    ds = shapes64(8)
    r = evaluate(tiny, ds, "agcam", metrics=("abpc",), batch_size=4, progress=False)
    batch = collate([ds[i] for i in range(8)])
    x, labels = batch["image"], batch["label"]
    maps = METHODS["agcam"](tiny).attribute(x, target=labels).detach()

    def model_fn(t):
        with torch.no_grad():
            return tiny(t)

    ref = abpc(model_fn, x, maps, labels)
    assert r["n_correct"] < 8  # the random model misclassifies: the ground-truth-class maps are exercised
    for k in ("auc_lerf", "auc_morf", "abpc"):
        assert np.isclose(r["methods"]["agcam"][k], float(ref[k].mean()), rtol=0, atol=1e-6), k


def test_interrupted_run_resumes_without_recomputing(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    calls = []
    methods = counting(["agcam", "rollout"], calls)

    def stop_after_two(done, indices):
        if done == 2:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, shapes64(12), methods, batch_size=4, store=store, progress=False, on_batch=stop_after_two)
    with h5py.File(store, "r") as f:
        assert sorted(f["agcam"]["index"][...].tolist()) == list(range(8))
    assert sum(n for n, first in calls if first) == 2 * 8
    calls.clear()
    resumed = evaluate(tiny, shapes64(12), methods, batch_size=4, store=store, progress=False)
    assert resumed["n_computed"] == 4
    # per method: one call for the 4 remaining images, plus one for those of them it misclassifies
    assert sum(n for n, first in calls if first) == 2 * 4 and max(n for n, _ in calls) <= 4
    calls.clear()
    again = evaluate(tiny, shapes64(12), methods, batch_size=4, store=store, progress=False)
    assert calls == [] and again["n_computed"] == 0
    full = evaluate(tiny, shapes64(12), "agcam,rollout", batch_size=4, progress=False)
    close(resumed, full)
    close(again, full)


def test_limit_then_extend(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    evaluate(tiny, shapes64(12), "agcam", batch_size=4, limit=4, store=store, progress=False)
    r = evaluate(tiny, shapes64(12), "agcam", batch_size=4, store=store, progress=False)
    assert r["n_computed"] == 8 and r["n_images"] == 12


def test_store_of_another_run_is_refused(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    evaluate(tiny, shapes64(4), "agcam", batch_size=4, store=store, progress=False)
    with pytest.raises(StoreMismatchError, match="methods"):
        evaluate(tiny, shapes64(4), "rollout", batch_size=4, store=store, progress=False)
    with pytest.raises(StoreMismatchError, match="threshold"):
        evaluate(tiny, shapes64(4), "agcam", batch_size=4, store=store, progress=False, threshold=0.3)
    with pytest.raises(StoreMismatchError, match="metrics"):
        evaluate(tiny, shapes64(4), "agcam", metrics=("abpc",), store=store, progress=False)
    with pytest.raises(StoreMismatchError, match="dataset"):
        evaluate(tiny, shapes64(4, mean=(0.4,) * 3), "agcam", store=store, progress=False)
    other = make_timm("plain")
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        evaluate(other, shapes64(4), "agcam", store=store, progress=False)
    ckpt = tmp_path / "w.pth"
    torch.save(tiny.state_dict(), ckpt)
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        evaluate(tiny, shapes64(4), "agcam", store=store, progress=False, checkpoint=str(ckpt))


def test_damaged_store_is_reported(tiny, tmp_path):
    store = tmp_path / "r.h5"
    evaluate(tiny, shapes64(4), "agcam", batch_size=4, store=str(store), progress=False)
    good = store.read_bytes()
    store.write_bytes(good[: len(good) // 2])
    with pytest.raises(StoreCorruptError, match="truncated"):
        evaluate(tiny, shapes64(4), "agcam", store=str(store), progress=False)
    store.write_bytes(b"not an hdf5 file")
    with pytest.raises(StoreCorruptError):
        evaluate(tiny, shapes64(4), "agcam", store=str(store), progress=False)
    store.write_bytes(good)
    with h5py.File(store, "a") as f:
        f["agcam"]["iou"].resize((2,))  # as if a write stopped between columns
    with pytest.raises(StoreCorruptError, match="inconsistent"):
        evaluate(tiny, shapes64(4), "agcam", store=str(store), progress=False)


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", "--limit", "2", "--batch-size", "2", "--methods", "agcam,rollout", "--metrics",
            "localization,abpc", "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| agcam | rollout |" in text and "| IoU |" in text and "| ABPC |" in text
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["methods"]) == {"agcam", "rollout"} and r["n_images"] == 2
    assert (out / "results.h5").exists() and (out / "table.md").exists()
    assert main(args) == 0  # resumed from the store: nothing recomputed
    assert "0 images computed" in capsys.readouterr().out
    assert main(args[:-1] + ["--threshold", "0.3", "--no-progress"]) == 2
    assert "threshold" in capsys.readouterr().err
