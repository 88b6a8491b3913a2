"""The result store under attack: kills at system calls, a full disk, edited files, a second writer, torchrun."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from captum_vit.cli import main
from captum_vit.data import ShapesDataset
from captum_vit.evaluation import (
    EvaluationInterrupted,
    ResultStore,
    StoreCorruptError,
    StoreLockedError,
    StoreWriteError,
    evaluate,
    load_store,
)
from helpers import make_timm, one_thread

METHODS = "agcam,raw"
STRACE = shutil.which("strace")


@pytest.fixture(scope="module")
def tiny():
    return make_timm("plain")


def shapes(n=6):
    return ShapesDataset("single", seed=2024, size=n, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)


def run(model, store, n=6, **kw):
    with one_thread():
        return evaluate(model, shapes(n), METHODS, batch_size=2, store=store, progress=False, **kw)


def rows_of(store):
    with load_store(store) as rs:
        return {m: rs.read(m) for m in rs.methods}, dict(rs.attrs), rs.skipped()


def assert_same_store(a, b):
    ra, attrs_a, skip_a = rows_of(a)
    rb, attrs_b, skip_b = rows_of(b)
    assert list(ra) == list(rb) and skip_a == skip_b
    for m in ra:
        assert list(ra[m]) == list(rb[m])
        for c in ra[m]:
            np.testing.assert_array_equal(ra[m][c], rb[m][c], err_msg=f"{m}.{c}")
    assert attrs_a["complete"] and attrs_b["complete"]
    for k in ("n_total", "methods", "run", "fingerprint", "format_version"):
        assert attrs_a[k] == attrs_b[k], k


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("ref") / "results.h5")
    run(tiny, store)
    return store


def _in_child_under_strace(model, store, strace_args):
    """Fork (torch is imported once), attach strace to the child, let it evaluate; its exit status.

    The child runs exactly the parent's evaluation; strace counts or kills it at its system calls.
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(ready_w)
            os.read(ready_r, 1)
            run(model, store)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    tracer = subprocess.Popen([STRACE, "-p", str(pid), *strace_args], stderr=subprocess.PIPE, text=True)
    assert "attached" in tracer.stderr.readline()
    os.write(ready_w, b"go")
    os.close(ready_w)
    _, status = os.waitpid(pid, 0)
    tracer.wait(timeout=60)
    return status


WRITE_CALLS = ("write", "pwrite64", "fsync", "rename", "unlink")


def _kill_points(counts, total=44):
    """About ``total`` positions spread over every kind of write call in proportion, each kind at least twice."""
    points = []
    n_all = sum(counts.values())
    for call, n in counts.items():
        k = max(2, round(total * n / n_all))
        points += [(call, int(w)) for w in sorted(set(np.linspace(1, n, min(k, n)).round().astype(int)))]
    return points


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_a_kill_at_any_write_call_resumes_to_the_uninterrupted_store(tiny, reference, tmp_path):
    """SIGKILL at the n-th write/pwrite64/fsync/rename/unlink of a run; the same call then resumes.

    Every kill point ends, after one resumed run, in a store equal to the uninterrupted run's, row
    for row and bit for bit, and the resumed run recomputes only what the killed one had not committed.
    """
    trace = tmp_path / "trace.txt"
    status = _in_child_under_strace(tiny, str(tmp_path / "count.h5"), ["-o", str(trace), "-e",
                                                                       "trace=" + ",".join(WRITE_CALLS)])
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    counts = {c: 0 for c in WRITE_CALLS}
    for line in trace.read_text().splitlines():
        name = line.split("(", 1)[0].strip()
        if name in counts:
            counts[name] += 1
    assert counts["pwrite64"] > 10 and counts["write"] > 10 and counts["rename"] >= 4, counts
    points = _kill_points(counts)
    assert len(points) >= 40
    survived, recomputed = 0, []
    for call, n in points:
        store = str(tmp_path / f"{call}-{n}" / "results.h5")
        os.makedirs(os.path.dirname(store))
        status = _in_child_under_strace(tiny, store, ["-o", "/dev/null", "-e", f"trace={call}", "-e",
                                                      f"inject={call}:signal=SIGKILL:when={n}"])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (call, n, status)
        resumed = run(tiny, store)
        recomputed.append(resumed["n_computed"])
        assert_same_store(store, reference)
        assert not os.path.exists(store + ".parts") and not [p for p in os.listdir(os.path.dirname(store))
                                                             if ".tmp" in p], (call, n)
        survived += 1
    assert survived == len(points)
    # kills early in the run lose everything (nothing was committed yet), later ones lose at most a batch
    assert max(recomputed) == 6 and min(recomputed) == 0
    print(f"kill sweep: {survived}/{len(points)} kill points resumed to the uninterrupted store; {counts}")


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_committed_batches(tiny, reference, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = str(mount / "results.h5")
        with pytest.raises(StoreWriteError, match="disk is full.*run the same command again"):
            run(tiny, store, n=6)
        with load_store(store) as rs:
            kept = rs.done()
        assert 0 < len(kept) < 6 or os.path.isdir(store + ".parts")
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        resumed = run(tiny, store)
        assert resumed["n_computed"] == 6 - len(kept)
        assert_same_store(store, reference)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_the_lock_holder_is_named_not_called_damaged(tiny, tmp_path):
    store = str(tmp_path / "results.h5")
    with ResultStore(store, {"x": 1}, ["agcam"], []):
        with pytest.raises(StoreLockedError, match=f"another running evaluation \\(pid {os.getpid()}") as e:
            run(tiny, store)
        assert "delete" not in str(e.value) and "damaged" not in str(e.value)
    run(tiny, store, n=2)  # released with the writer


def test_a_file_that_is_not_a_store_is_not_answered_with_delete_it(tiny, tmp_path):
    store = tmp_path / "results.h5"
    store.write_text("my notes\n")
    with pytest.raises(StoreCorruptError, match="not a captum-vit result store") as e:
        run(tiny, str(store))
    assert "delete" not in str(e.value) and store.read_text() == "my notes\n"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreCorruptError, match="no fingerprint: it is not a captum-vit result store") as e:
        run(tiny, str(tmp_path / "other.h5"))
    assert "delete" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["agcam"]["index"].__setitem__(0, 99), "index 99 .* outside its dataset of 6 images"),
    (lambda f: f["agcam"]["index"].__setitem__(0, -3), "negative image index"),
    (lambda f: f["raw"]["index"].__setitem__(1, 0), "stores an image twice for method 'raw'"),
    (lambda f: f["agcam"].__delitem__("iou"), "lacks column 'iou' of method 'agcam'"),
    (lambda f: (f["agcam"].__delitem__("map_pred"),
                f["agcam"].create_dataset("map_pred", data=np.zeros((6, 4, 4), np.float16))),
     r"maps of grids \[\(4, 4\), \(8, 8\)\]"),
])
def test_an_impossible_store_is_refused_by_name(tiny, reference, tmp_path, edit, message):
    store = str(tmp_path / "results.h5")
    shutil.copy(reference, store)
    with h5py.File(store, "a") as f:
        edit(f)
    with pytest.raises(StoreCorruptError, match=message):
        load_store(store)
    with pytest.raises(StoreCorruptError, match=message):
        run(tiny, store)


def test_a_part_of_another_run_or_edited_is_refused(tiny, tmp_path):
    store = str(tmp_path / "results.h5")

    def stop(done, indices):
        raise KeyboardInterrupt

    with pytest.raises(EvaluationInterrupted):
        run(tiny, store, on_batch=stop)
    (part,) = [os.path.join(store + ".parts", p) for p in os.listdir(store + ".parts")]
    z = dict(np.load(part))
    z["agcam/index"] = np.array([40, 41])
    np.savez(part, **z)
    with pytest.raises(StoreCorruptError, match="index 41 .* outside its dataset"):
        run(tiny, store)
    with open(part, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(StoreCorruptError, match="cannot be read"):
        load_store(store)


def test_a_run_whose_images_are_all_computed_or_skipped_is_complete(tmp_path):
    from captum_vit.data import ImageNetVal
    from helpers import WNID_5, _imagenet_folders

    root = _imagenet_folders(str(tmp_path), extra=[("ILSVRC2012_val_00000004", WNID_5, "corrupt")])
    model = make_timm("plain")
    model.reset_classifier(1000)  # ImageNet labels are the 1000-class index
    store = str(tmp_path / "results.h5")
    first = evaluate(model, ImageNetVal(root, input_size=64, on_error="skip"), METHODS, batch_size=2, store=store,
                     progress=False)
    assert first["n_skipped"] == 1 and first["n_images"] == 3
    with load_store(store) as rs:
        assert rs.attrs["complete"] and rs.skipped() == {3} and rs.attrs["n_skipped"] == 1
    again = evaluate(model, ImageNetVal(root, input_size=64, on_error="skip"), METHODS, batch_size=2, store=store,
                     progress=False)
    assert again["n_computed"] == 0 and again["n_skipped"] == 0  # the unreadable file is not tried again
    from captum_vit.report import build_report

    warnings = []
    info = build_report(store, str(tmp_path / "report.html"), warn=warnings.append)
    assert info["complete"] and not [w for w in warnings if "incomplete" in w]
    assert "INCOMPLETE" not in (tmp_path / "report.html").read_text()


def test_a_dataset_with_more_classes_than_the_head_is_refused_before_any_compute(tiny):
    class Thousand(ShapesDataset):
        num_classes = 1000

    calls = []
    hook = tiny.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="1000 classes but the model's head has 10 outputs"):
            evaluate(tiny, Thousand("single", seed=2024, size=4, image_size=64), METHODS, progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_non_finite_logits_and_maps_are_flagged_not_scored(tmp_path, capsys):
    from captum_vit.zoo.shapes import shapes_vit

    model, _ = shapes_vit()
    state = model.state_dict()
    state["head.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.pth"
    torch.save(state, ckpt)
    out = tmp_path / "ev"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--limit", "4", "--methods", "raw", "--metrics",
               "localization,abpc", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3 and "non-finite logits or maps" in err and "4 images of raw" in err
    result = json.loads((out / "results.json").read_text())
    assert result["methods"]["raw"]["n_nonfinite"] == 4 and result["methods"]["raw"]["iou"] is None
    with load_store(str(out)) as rs:
        rows = rs.read("raw")
    assert (rows["finite"] == 0).all() and np.isnan(rows["iou"]).all() and np.isnan(rows["abpc"]).all()
    assert "WARNING: non-finite" in (out / "table.md").read_text()


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tmp_path, capsys, monkeypatch):
    import captum_vit.evaluation.runner as ev

    real, calls = ev._score_batch, []

    def interrupted_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "_score_batch", interrupted_on_the_third)
    out = tmp_path / "ev"
    rc = main(["evaluate", "--limit", "12", "--batch-size", "4", "--methods", "raw", "--metrics", "localization",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert f"interrupted: 8 of 12 images are stored in {out / 'results.h5'}; run the same command again" in err
    monkeypatch.setattr(ev, "_score_batch", real)
    assert main(["evaluate", "--limit", "12", "--batch-size", "4", "--methods", "raw", "--metrics", "localization",
                 "--out", str(out), "--no-progress"]) == 0
    assert "4 images computed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
@pytest.mark.parametrize("call, n", [("pwrite64", 20), ("pwrite64", 60), ("rename", 3)])
def test_torchrun_killed_in_the_merge_resumes_with_another_process_count(tiny, reference, tmp_path, call, n):
    """Rank 0 killed inside the final merge: no 0-byte store; one process then reuses every row.

    The assertions show where the kill struck: after every batch was committed, before the merged
    store was renamed into place (HDF5's pwrite64 calls; rank 0's third rename, after its two batches).
    """
    store = str(tmp_path / "results.h5")
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN.format(tests=os.path.dirname(__file__), store=store, methods=METHODS))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([STRACE, "-f", "-o", "/dev/null", "-e", f"trace={call}", "-e",
                           f"inject={call}:signal=SIGKILL:when={n}", sys.executable, "-m", "torch.distributed.run",
                           "--standalone", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert not os.path.exists(store)  # never a 0-byte or half-written store
    assert len(os.listdir(store + ".parts")) == 3  # every batch of both ranks is committed
    resumed = run(tiny, store)
    assert resumed["n_computed"] == 0
    assert_same_store(store, reference)


TORCHRUN = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from helpers import make_timm, one_thread
from captum_vit.data import ShapesDataset
from captum_vit.evaluation import evaluate

torch.distributed.init_process_group("gloo")
ds = ShapesDataset("single", seed=2024, size=6, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
evaluate(make_timm("plain"), ds, {methods!r}, batch_size=2, store={store!r}, progress=False)
torch.distributed.destroy_process_group()
"""


def test_read_maps_returns_the_stored_rows_and_refuses_an_unknown_index(tiny, reference, tmp_path):
    store = str(tmp_path / "results.h5")

    def stop(done, indices):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(EvaluationInterrupted):
        run(tiny, store, on_batch=stop)
    shutil.copy(reference, str(tmp_path / "full.h5"))
    with load_store(store) as part, load_store(str(tmp_path / "full.h5")) as full:
        rows = full.read("agcam")
        for rs in (part, full):  # parts of an interrupted run, then the committed file
            got = rs.read_maps("agcam", [3, 0, 2])
            for c in ("map_pred", "map_label"):
                np.testing.assert_array_equal(got[c], rows[c][[3, 0, 2]])
        with pytest.raises(KeyError, match=r"no maps of images \[5\]"):
            part.read_maps("agcam", [1, 5])
