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
from captum_vit.evaluation import StoreCorruptError, StoreMismatchError, StoreVersionError, evaluate, load_store
from captum_vit.metrics import abpc, remove_top_patches, spearman
from helpers import make_timm

LOC = ["pixel_accuracy", "iou", "dice", "precision", "recall"]
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


def test_later_methods_reuse_the_first_methods_clean_logits(tiny, monkeypatch):
    """Per batch the first method's abpc computes model_fn(x); the others get it as logits=, same numbers."""
    import captum_vit.evaluation.runner as runner

    calls = []

    def recording(*args, logits=None, **kwargs):
        out = abpc(*args, logits=logits, **kwargs)
        calls.append((logits, out["logits"]))
        return out

    monkeypatch.setattr(runner, "abpc", recording)
    kw = dict(metrics=("abpc",), batch_size=4, progress=False)
    reused = evaluate(tiny, shapes64(8), "agcam,rollout", **kw)
    assert [given is None for given, _ in calls] == [True, False, True, False]
    for (_, first), (given, second) in (calls[:2], calls[2:]):
        assert given is first and second is first
    monkeypatch.setattr(runner, "abpc", lambda *a, logits=None, **k: abpc(*a, **k))
    recomputed = evaluate(tiny, shapes64(8), "agcam,rollout", **kw)
    assert reused["methods"] == recomputed["methods"]


def test_interrupted_run_resumes_without_recomputing(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    calls = []
    methods = counting(["agcam", "rollout"], calls)

    def stop_after_two(done, indices):
        if done == 2:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, shapes64(12), methods, batch_size=4, store=store, progress=False, on_batch=stop_after_two)
    with load_store(store) as rs:
        assert sorted(rs.read("agcam")["index"].tolist()) == list(range(8))
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


def test_stored_maps_probabilities_and_insensitivity_equal_direct_calls(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    ds = shapes64(8)
    evaluate(tiny, ds, "agcam", metrics=("diagnostics",), batch_size=4, store=store, progress=False)
    batch = collate([ds[i] for i in range(8)])
    x, labels = batch["image"], batch["label"]
    explainer = METHODS["agcam"](tiny)
    maps_pred, logits = explainer.attribute(x, return_logits=True)
    probs = logits.softmax(-1)
    pred = probs.argmax(-1)
    maps_label = explainer.attribute(x, target=labels)
    removed = remove_top_patches(x, maps_label, patch_size=8, fraction=0.2)
    maps_removed, logits_removed = explainer.attribute(removed, target=labels, return_logits=True)
    with load_store(store) as rs:
        rows = rs.read("agcam")
        assert rs.attrs["complete"] and rs.attrs["n_total"] == 8
    assert rows["index"].tolist() == list(range(8)) and rows["pred"].tolist() == pred.tolist()
    assert rows["map_pred"].dtype == np.float16 and rows["map_pred"].shape == (8, 8, 8)
    np.testing.assert_allclose(rows["map_pred"], maps_pred[:, 0].numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(rows["map_label"], maps_label[:, 0].numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(rows["prob_pred"], probs.max(-1).values.numpy(), rtol=1e-5)
    p_label = probs.gather(1, labels[:, None])[:, 0]
    np.testing.assert_allclose(rows["prob_label"], p_label.numpy(), rtol=1e-5)
    rho = spearman(maps_label, maps_removed).numpy()
    np.testing.assert_allclose(rows["insensitivity"], rho, atol=1e-6)
    drop = (p_label - logits_removed.softmax(-1).gather(1, labels[:, None])[:, 0]).numpy()
    np.testing.assert_allclose(rows["prob_drop"], drop, atol=1e-5)


def test_store_of_an_interrupted_run_is_marked_incomplete(tiny, tmp_path):
    store = str(tmp_path / "r.h5")

    def stop(done, indices):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, shapes64(8), "agcam", metrics=("localization",), batch_size=4, store=store, progress=False,
                 on_batch=stop, run_info={"model": "tiny"})
    with load_store(str(tmp_path / "r.h5")) as rs:
        assert not rs.attrs["complete"] and rs.attrs["n_total"] == 8
        assert json.loads(rs.attrs["run"]) == {"model": "tiny"} and len(rs.done()) == 4
        assert rs.methods == ["agcam"] and "iou" in rs.columns and rs.maps == ["map_pred", "map_label"]


def test_store_of_another_format_version_is_refused(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    evaluate(tiny, shapes64(4), "agcam", metrics=("localization",), store=store, progress=False)
    with h5py.File(store, "a") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(StoreVersionError, match="another version of captum-vit"):
        load_store(store)
    with pytest.raises(StoreVersionError, match="format 1"):
        evaluate(tiny, shapes64(4), "agcam", metrics=("localization",), store=store, progress=False)
    with pytest.raises(FileNotFoundError):
        load_store(str(tmp_path / "missing.h5"))


def test_without_maps_the_store_holds_scores_only(tiny, tmp_path):
    store = str(tmp_path / "r.h5")
    a = evaluate(tiny, shapes64(4), "agcam", metrics=("abpc",), store=store, keep_maps=False, progress=False)
    b = evaluate(tiny, shapes64(4), "agcam", metrics=("abpc",), progress=False)
    with load_store(store) as rs:
        assert rs.maps == [] and "map_pred" not in rs.read("agcam")
    assert a["methods"]["agcam"]["abpc"] == b["methods"]["agcam"]["abpc"]


def test_real_dataset_through_the_runner_counts_skips_and_workers_change_nothing(tiny, tmp_path):
    from captum_vit.data import DatasetFileError, ImageNetVal
    from helpers import WNID_5, _imagenet_folders

    # three readable images of three classes, and a corrupt fourth
    root = _imagenet_folders(str(tmp_path), extra=[("ILSVRC2012_val_00000004", WNID_5, "corrupt")])
    tiny = make_timm("plain")
    tiny.reset_classifier(1000)  # ImageNet labels are the canonical 1000-class index
    strict = ImageNetVal(root, input_size=64)
    with pytest.raises(DatasetFileError, match="ILSVRC2012_val_00000004.JPEG"):
        evaluate(tiny, strict, "agcam,rollout", batch_size=2, progress=False)
    lenient = ImageNetVal(root, input_size=64, on_error="skip")
    r0 = evaluate(tiny, lenient, "agcam,rollout", batch_size=2, progress=False)
    r2 = evaluate(tiny, ImageNetVal(root, input_size=64, on_error="skip"), "agcam,rollout", batch_size=2,
                  workers=2, progress=False)
    assert r0["n_skipped"] == r2["n_skipped"] == 1 and r0["n_images"] == r2["n_images"] == 3
    close(r0, r2)
    assert r0["fingerprint"]["dataset"]["class"] == "ImageNetVal"


TORCHRUN_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from helpers import make_timm
from captum_vit.data import ShapesDataset
from captum_vit.evaluation import evaluate

if {dist}:
    torch.distributed.init_process_group("gloo")
ds = ShapesDataset("single", seed=2024, size=10, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
r = evaluate(make_timm("plain"), ds, "agcam,rollout,lrp", batch_size={batch}, store={store!r}, progress=False)
if {dist}:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
json.dump({{"rank": r["world_size"], "methods": r["methods"], "n": r["n_images"], "computed": r["n_computed"]}},
          open({out!r} + str(__import__("os").environ.get("RANK", "0")), "w"))
"""


def _run_script(tmp_path, name, dist, nproc, batch=3):
    import os
    import subprocess
    import sys

    store, out = str(tmp_path / f"{name}.h5"), str(tmp_path / f"{name}.json")
    script = tmp_path / f"{name}.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), dist=dist, store=store, out=out,
                                             batch=batch))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script)] if dist else [sys.executable, str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, out


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path):
    """Under torchrun (gloo on CPU) each rank commits its batches and rank 0 merges: the same numbers."""
    import os

    store1, out1 = _run_script(tmp_path, "single", dist=False, nproc=1)
    store2, out2 = _run_script(tmp_path, "sharded", dist=True, nproc=2)
    one = json.loads(open(out1 + "0").read())
    for rank in (0, 1):  # every rank returns the merged summary
        two = json.loads(open(out2 + str(rank)).read())
        assert two["methods"] == one["methods"] and two["n"] == one["n"] == 10 and two["computed"] == 10
    # the ranks' batch files are merged into the one store and removed
    assert not os.path.exists(store2 + ".parts")
    with load_store(store1) as a, load_store(store2) as b:
        assert a.fingerprint == b.fingerprint
        for m in ("agcam", "rollout", "lrp"):
            ra, rb = a.read(m), b.read(m)
            for c in ra:
                np.testing.assert_array_equal(ra[c], rb[c], err_msg=f"{m}.{c}")


@pytest.mark.slow
def test_torchrun_with_a_rank_dealt_no_batch(tmp_path):
    """10 images in one batch of 16: rank 1 has nothing to do, and the merge still equals one process."""
    store1, out1 = _run_script(tmp_path, "single", dist=False, nproc=1, batch=16)
    store2, out2 = _run_script(tmp_path, "sharded", dist=True, nproc=2, batch=16)
    assert json.loads(open(out2 + "1").read())["methods"] == json.loads(open(out1 + "0").read())["methods"]
    with load_store(store1) as a, load_store(store2) as b:
        for m in ("agcam", "rollout", "lrp"):
            ra, rb = a.read(m), b.read(m)
            for c in ra:
                np.testing.assert_array_equal(ra[c], rb[c], err_msg=f"{m}.{c}")


KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from helpers import make_timm
from captum_vit.data import ShapesDataset
from captum_vit.evaluation import evaluate

def stall(done, indices):
    if done == 2:
        open({marker!r}, "w").close()
        time.sleep(600)  # killed here, two batches stored, the third never started

ds = ShapesDataset("single", seed=2024, size=12, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
evaluate(make_timm("plain"), ds, "agcam,rollout", batch_size=4, store={store!r}, progress=False, on_batch=stall)
"""


@pytest.mark.slow
def test_killed_process_resumes_from_its_store(tiny, tmp_path):
    """SIGKILL after two flushed batches: the store opens cleanly and the rerun computes only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store, marker = str(tmp_path / "r.h5"), str(tmp_path / "two_batches_stored")
    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__), store=store, marker=marker))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the evaluation never stored two batches"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with load_store(store) as rs:
        assert sorted(rs.done()) == list(range(8)) and not rs.attrs["complete"]
    resumed = evaluate(tiny, shapes64(12), "agcam,rollout", batch_size=4, store=store, progress=False)
    assert resumed["n_computed"] == 4 and resumed["n_images"] == 12
    with load_store(store) as rs:
        assert rs.attrs["complete"]
    close(resumed, evaluate(tiny, shapes64(12), "agcam,rollout", batch_size=4, progress=False))


@pytest.mark.slow
def test_committed_benchmark_results_come_from_this_code():
    """benchmarks/results/shapes_eval: its table is its store's summary, and its first batch recomputes equal."""
    import os

    from captum_vit.evaluation import build_dataset, format_markdown, summary
    from captum_vit.models import load_model

    folder = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "shapes_eval")
    committed = json.loads(open(os.path.join(folder, "results.json")).read())
    with load_store(folder) as rs:
        assert rs.attrs["complete"] and len(rs.done()) == 300
        assert rs.methods == ["agcam", "rollout", "lrp", "gae", "cdam", "raw", "attnlrp"]
        method_summary = summary(rs, committed["metrics"])
        stored = rs.read("agcam")
    table = open(os.path.join(folder, "table.md")).read()
    assert format_markdown({"methods": method_summary}, "shapes (300 images, shapes_vit)") + "\n" == table
    for m, s in method_summary.items():
        for k, v in s.items():
            assert committed["methods"][m][k] == (None if np.isnan(v) else v), (m, k)
    model, cfg, _ = load_model("shapes_vit")
    fresh = evaluate(model, build_dataset("shapes", None, cfg), "agcam", limit=16, progress=False)
    assert fresh["fingerprint"]["dataset"] == committed["fingerprint"]["dataset"]
    assert fresh["fingerprint"]["weights_sha256"] == committed["fingerprint"]["weights_sha256"]
    for k in ("iou", "abpc", "texture_collapse", "insensitivity"):
        got = fresh["methods"]["agcam"][k]
        rows, correct = stored[k][:16], stored["label"][:16] == stored["pred"][:16]
        want = float(rows[correct].mean()) if k == "iou" else float(rows.mean())
        assert np.isclose(got, want, rtol=0, atol=1e-6), (k, got, want)
