r"""Evaluation runner: datasets in, attribution methods and metrics joined, per-image results stored.

:func:`evaluate` runs the weakly-supervised localization protocol and the ABPC perturbation
protocol of SPEC.md sections 3-4 (plus per-map diagnostics) for several methods over one dataset,
in batches:

- **localization** on the correctly classified images only, with the map for the predicted class
  (:func:`captum_vit.metrics.evaluate_localization`);
- **abpc** on *all* images, with the map for the ground-truth class: for the correctly classified
  images that is the same map, for the others a second ``attribute`` call with ``target=label``
  (:func:`captum_vit.metrics.abpc`);
- **diagnostics** on the ground-truth-class map of every image: texture collapse, map entropy and
  the map's mass outside the ground-truth boxes.

Per-image results go to a :class:`ResultStore` as they are computed. With a file path the store is
an HDF5 file (h5py), because HDF5 gives chunked, appendable columns in one file: each batch is
appended and flushed, so an interrupted run loses at most the batch in flight, and a run started
again over the same file recomputes nothing already stored. Every column is written with HDF5's
Fletcher-32 chunk checksums, so a damaged chunk fails on read instead of returning wrong numbers.
The file also holds a fingerprint of what produced it (a hash of the model's weights, the
checkpoint file, the methods, the metric options and the dataset with its preprocessing): a store
written under another fingerprint is refused, naming what differs, because mixing its rows with
new ones would average two different experiments. A file that cannot be opened, or whose columns
disagree in length, is reported as corrupt and never read as results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from captum_vit.metrics import (
    ABPC_FRACTIONS,
    METRIC_NAMES,
    abpc,
    boxes_to_mask,
    evaluate_localization,
    map_entropy,
    mass_outside,
    texture_collapse,
)

__all__ = [
    "DATASETS",
    "METRIC_GROUPS",
    "ResultStore",
    "SHAPES_BENCHMARK",
    "build_dataset",
    "StoreCorruptError",
    "StoreMismatchError",
    "describe_dataset",
    "evaluate",
    "format_markdown",
    "run_evaluation",
    "weights_fingerprint",
]

#: metric group -> the per-image columns it stores
METRIC_GROUPS: Dict[str, List[str]] = {
    "localization": list(METRIC_NAMES),
    "abpc": ["auc_lerf", "auc_morf", "abpc"],
    "diagnostics": ["texture_collapse", "entropy", "mass_outside"],
}
_FORMAT_VERSION = 1
# the summary's names for the localization columns: the AGCAM paper's short names
_SUMMARY_NAMES = {"pixel_accuracy": "pixel_acc"}


class StoreMismatchError(ValueError):
    """The result store was written by another model, checkpoint, method set, metric options or dataset."""


class StoreCorruptError(ValueError):
    """The result store cannot be read, or its columns are inconsistent (e.g. a truncated file)."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict: every entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # viewed as bytes so that every dtype (bfloat16 included) hashes without conversion
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_dataset(dataset: Any) -> Dict[str, Any]:
    """What identifies a dataset's samples and their preprocessing, as JSON-able values."""
    from captum_vit.data import AnnotatedImageDataset, ShapesDataset

    desc: Dict[str, Any] = {"class": type(dataset).__name__, "length": len(dataset)}
    if isinstance(dataset, ShapesDataset):
        desc.update(split=dataset.split, seed=dataset.seed, image_size=dataset.image_size,
                    mean=[round(float(v), 6) for v in dataset.mean.flatten()],
                    std=[round(float(v), 6) for v in dataset.std.flatten()])
    elif isinstance(dataset, AnnotatedImageDataset):
        p = dataset.preprocess
        desc.update(root=os.path.abspath(getattr(dataset, "root", "")), input_size=p.input_size,
                    transform=p.transform, crop_pct=p.crop_pct, interpolation=str(p.resample),
                    mean=[round(float(v), 6) for v in p.mean.flatten()],
                    std=[round(float(v), 6) for v in p.std.flatten()], on_error=dataset.on_error)
    return desc


class ResultStore:
    r"""Per-image results of one evaluation, one row per (method, image), appendable and resumable.

    Columns per method: ``index`` (dataset index), ``label``, ``pred``, and one float64 column per
    metric of the selected groups (NaN where the protocol does not score the image, e.g.
    localization of a misclassified image).

    Args:
        path (str, optional): the HDF5 file; ``None`` keeps the rows in memory (no resume).
        fingerprint (dict): what produced the results (see the module docstring).
        methods (sequence of str): the method names.
        columns (sequence of str): the metric columns.
    """

    def __init__(self, path: Optional[str], fingerprint: Mapping[str, Any], methods: Sequence[str],
                 columns: Sequence[str]) -> None:
        self.path = path
        self.fingerprint = dict(fingerprint)
        self.methods = list(methods)
        self.columns = ["index", "label", "pred"] + list(columns)
        self._mem: Dict[str, Dict[str, List[np.ndarray]]] = {m: {c: [] for c in self.columns} for m in self.methods}
        self._file = None
        if path is not None:
            self._open(path)

    # -- file handling -------------------------------------------------------------------------
    def _open(self, path: str) -> None:
        import h5py

        exists = os.path.exists(path)
        try:
            f = h5py.File(path, "a")
        except OSError as e:
            raise StoreCorruptError(f"result store {path!r} cannot be opened as HDF5 ({e}); it is truncated or not a "
                                    "result store: delete it (or give another --out) to start afresh") from e
        self._file = f
        try:
            if exists and len(f.keys()) + len(f.attrs.keys()) > 0:
                self._check_existing(f)
            else:
                f.attrs["format_version"] = _FORMAT_VERSION
                f.attrs["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
                for m in self.methods:
                    g = f.create_group(m)
                    for c in self.columns:
                        dtype = "f8" if c not in ("index", "label", "pred") else "i8"
                        g.create_dataset(c, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,),
                                         fletcher32=True)
                f.flush()
        except BaseException:
            f.close()
            self._file = None
            raise

    def _check_existing(self, f) -> None:
        where = f"result store {self.path!r}"
        if "fingerprint" not in f.attrs:
            raise StoreCorruptError(f"{where} has no fingerprint: it is not a complete result store; delete it")
        try:
            stored = json.loads(f.attrs["fingerprint"])
        except (TypeError, ValueError) as e:
            raise StoreCorruptError(f"{where} has an unreadable fingerprint ({e}); delete it") from e
        current = json.loads(json.dumps(self.fingerprint, sort_keys=True))
        if stored != current:
            diffs = [f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}"
                     for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
            raise StoreMismatchError(f"{where} was written by another run; its results cannot be resumed or mixed "
                                     "with this one. Differences: " + "; ".join(diffs)
                                     + ". Give another --out (or delete the file) to start afresh.")
        lengths = set()
        for m in self.methods:
            if m not in f or any(c not in f[m] for c in self.columns):
                raise StoreCorruptError(f"{where} lacks the columns of method {m!r}; it is damaged: delete it")
            lengths |= {f[m][c].shape[0] for c in self.columns}
        if len(lengths) > 1:
            raise StoreCorruptError(f"{where} is inconsistent: its columns hold {sorted(lengths)} rows (an interrupted "
                                    "write or a damaged file); delete it to start afresh")
        for m in self.methods:
            try:
                idx = f[m]["index"][...]
            except OSError as e:
                raise StoreCorruptError(f"{where}: reading method {m!r} failed ({e}); the file is damaged") from e
            if len(np.unique(idx)) != len(idx):
                raise StoreCorruptError(f"{where} stores an image twice for method {m!r}; it is damaged: delete it")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows ----------------------------------------------------------------------------------
    def done(self) -> set:
        """Dataset indices stored for every method."""
        sets = [set(self.read(m)["index"].tolist()) for m in self.methods]
        return set.intersection(*sets) if sets else set()

    def append(self, rows: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Append one batch: ``{method: {column: array[n]}}``; the file is flushed afterwards."""
        if self._file is None:
            for m, cols in rows.items():
                for c in self.columns:
                    self._mem[m][c].append(np.asarray(cols[c]))
            return
        for m, cols in rows.items():
            g = self._file[m]
            for c in self.columns:
                v = np.asarray(cols[c])
                d = g[c]
                n = d.shape[0]
                d.resize((n + len(v),))
                d[n:] = v
        self._file.flush()

    def read(self, method: str) -> Dict[str, np.ndarray]:
        """All rows of one method, as ``{column: array}``."""
        if self._file is None:
            return {c: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64 if c in ("index", "label", "pred")
                                                         else np.float64))
                    for c, v in self._mem[method].items()}
        try:
            return {c: self._file[method][c][...] for c in self.columns}
        except OSError as e:
            raise StoreCorruptError(f"result store {self.path!r}: reading method {method!r} failed ({e}); the file "
                                    "is damaged: delete it") from e


def _collate_for(dataset: Any) -> Callable:
    from captum_vit.data import ShapesDataset, collate, collate_annotated

    return collate if isinstance(dataset, ShapesDataset) else collate_annotated


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _summary(store: ResultStore, groups: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for m in store.methods:
        rows = store.read(m)
        correct = rows["label"] == rows["pred"]
        s: Dict[str, Any] = {"n_images_total": int(len(rows["index"]))}
        if "localization" in groups:
            s["n_images"] = int(correct.sum())
            for c in METRIC_GROUPS["localization"]:
                s[_SUMMARY_NAMES.get(c, c)] = float(rows[c][correct].mean()) if correct.any() else float("nan")
        for g in ("abpc", "diagnostics"):
            if g in groups:
                if g == "abpc":
                    s["n_images_abpc"] = int(len(rows["index"]))
                for c in METRIC_GROUPS[g]:
                    s[c] = float(rows[c].mean()) if len(rows[c]) else float("nan")
        out[m] = s
    return out


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    methods: Union[str, Sequence[str], Mapping[str, type]],
    metrics: Sequence[str] = ("localization", "abpc", "diagnostics"),
    batch_size: int = 16,
    threshold: float = 0.5,
    limit: Optional[int] = None,
    store: Optional[str] = None,
    progress: bool = True,
    checkpoint: Optional[str] = None,
    abpc_batch_size: int = 64,
    on_batch: Optional[Callable[[int, List[int]], None]] = None,
) -> Dict[str, Any]:
    r"""Score attribution methods on a dataset with the localization, ABPC and diagnostic protocols.

    See the module docstring for the protocol. The model is used as given (it must be in eval
    mode); each method is constructed as ``cls(model)``.

    Args:
        model (nn.Module): the classifier, in eval mode.
        dataset (Dataset): yields samples with ``image``, ``label``, ``boxes`` (ground-truth boxes
            in input pixels) and ``index`` (:class:`captum_vit.data.ShapesDataset` or an
            :class:`captum_vit.data.AnnotatedImageDataset`).
        methods: method names (comma-separated string or sequence) of
            :data:`captum_vit.attr.METHODS`, or a ``{name: class}`` mapping.
        metrics (sequence of str, optional): any of ``"localization"``, ``"abpc"``,
            ``"diagnostics"``. Default: all three
        batch_size (int, optional): images per ``attribute`` call. Default: 16
        threshold (float, optional): localization binarisation threshold in [0, 1]. Default: 0.5
        limit (int, optional): evaluate only the first ``limit`` images. Default: all
        store (str, optional): HDF5 file for the per-image results; an existing one with the same
            fingerprint is resumed. Default: None (in memory)
        progress (bool, optional): show a progress bar (images/s). Default: True
        checkpoint (str, optional): the checkpoint file the weights came from; its sha256 joins the
            fingerprint. Default: None
        abpc_batch_size (int, optional): perturbed copies per model call in ABPC. Default: 64
        on_batch (callable, optional): called as ``on_batch(batches_done, indices)`` after each
            batch is stored (progress hooks; an exception raised there stops the run cleanly).

    Returns:
        dict: ``{"methods": {name: {n_images, pixel_acc, iou, dice, precision, recall,
        n_images_abpc, auc_lerf, auc_morf, abpc, texture_collapse, entropy, mass_outside,
        n_images_total}}, "n_images", "n_correct", "accuracy", "metrics", "threshold",
        "dataset", "fingerprint", "store", "n_computed", "runtime_s", "images_per_s"}``.

    Raises:
        ValueError: bad options or a model in train mode; :class:`StoreMismatchError` or
            :class:`StoreCorruptError` for a store that cannot be resumed.
    """
    from tqdm.auto import tqdm

    from captum_vit.demo import resolve_methods

    t_start = time.perf_counter()
    groups = list(metrics.split(",") if isinstance(metrics, str) else metrics)
    groups = [g.strip() for g in groups if g.strip()]
    unknown = [g for g in groups if g not in METRIC_GROUPS]
    if unknown or not groups:
        raise ValueError(f"unknown metric group(s) {unknown or groups}; choose from {list(METRIC_GROUPS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1] (maps are min-max normalised first)")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit {limit} must be at least 1")
    if model.training:
        raise ValueError("the model is in train mode; call model.eval() first")
    classes = resolve_methods(methods)
    explainers = {name: cls(model) for name, cls in classes.items()}
    columns = [c for g in METRIC_GROUPS for c in METRIC_GROUPS[g] if g in groups]

    fingerprint = {
        "format_version": _FORMAT_VERSION,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights_sha256": weights_fingerprint(model),
        "checkpoint_sha256": _file_sha256(checkpoint) if checkpoint else None,
        "methods": {n: f"{c.__module__}.{c.__qualname__}" for n, c in classes.items()},
        "metrics": groups,
        "threshold": float(threshold),
        "abpc_fractions": [float(f) for f in ABPC_FRACTIONS],
        "abpc_value": 0.0,
        "dataset": describe_dataset(dataset),
    }
    n_total = len(dataset) if limit is None else min(int(limit), len(dataset))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def model_fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    n_computed = 0
    with ResultStore(store, fingerprint, list(classes), columns) as rs:
        done = rs.done()
        todo = [i for i in range(n_total) if i not in done]
        # batches of the remaining indices in dataset order: a run resumed at a batch boundary
        # sees the same batches as an uninterrupted one
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=int(batch_size),
                                             shuffle=False, num_workers=0, collate_fn=_collate_for(dataset))
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="captum-vit evaluate", unit="img",
                   disable=not progress, file=sys.stderr)
        try:
            for b, batch in enumerate(loader):
                if len(batch["label"]) == 0:
                    continue
                x = batch["image"].to(device)
                labels = batch["label"].to(device)
                size = tuple(x.shape[-2:])
                rows: Dict[str, Dict[str, np.ndarray]] = {}
                for name, explainer in explainers.items():
                    maps_pred, logits = explainer.attribute(x, target=None, return_logits=True)
                    maps_pred = maps_pred.detach()
                    pred = logits.detach().argmax(-1)
                    correct = pred == labels
                    n = x.shape[0]
                    cols: Dict[str, np.ndarray] = {"index": batch["index"].numpy().astype(np.int64),
                                                   "label": labels.cpu().numpy().astype(np.int64),
                                                   "pred": pred.cpu().numpy().astype(np.int64)}
                    maps_label = maps_pred.clone()
                    wrong = torch.nonzero(~correct).flatten()
                    if len(wrong) and ("abpc" in groups or "diagnostics" in groups):
                        maps_label[wrong] = explainer.attribute(x[wrong], target=labels[wrong]).detach()
                    if "localization" in groups:
                        loc = {c: np.full(n, np.nan) for c in METRIC_GROUPS["localization"]}
                        keep = torch.nonzero(correct).flatten()
                        if len(keep):
                            res = evaluate_localization(maps_pred[keep].float().cpu(),
                                                        [batch["boxes"][i] for i in keep.tolist()],
                                                        threshold=threshold, size=size)
                            for c in loc:
                                loc[c][keep.cpu().numpy()] = _np(res[c])
                        cols.update(loc)
                    if "abpc" in groups:
                        res = abpc(model_fn, x, maps_label, labels, batch_size=abpc_batch_size)
                        cols.update({c: _np(res[c]) for c in METRIC_GROUPS["abpc"]})
                    if "diagnostics" in groups:
                        gt_mask = torch.stack([boxes_to_mask(bx, size) for bx in batch["boxes"]])
                        cols["texture_collapse"] = _np(texture_collapse(maps_label))
                        cols["entropy"] = _np(map_entropy(maps_label))
                        cols["mass_outside"] = _np(mass_outside(maps_label.cpu(), gt_mask))
                    rows[name] = cols
                rs.append(rows)
                n_computed += x.shape[0]
                bar.update(x.shape[0])
                if on_batch is not None:
                    on_batch(b + 1, batch["index"].tolist())
        finally:
            bar.close()
        summary = _summary(rs, groups)
        first = rs.read(next(iter(classes)))
    n_correct = int((first["label"] == first["pred"]).sum())
    runtime = time.perf_counter() - t_start
    return {
        "methods": summary,
        "n_images": int(len(first["index"])),
        "n_correct": n_correct,
        "accuracy": n_correct / len(first["index"]) if len(first["index"]) else float("nan"),
        "metrics": groups,
        "threshold": float(threshold),
        "dataset": fingerprint["dataset"],
        "fingerprint": fingerprint,
        "store": store,
        "n_computed": n_computed,
        "runtime_s": runtime,
        "images_per_s": n_computed / runtime if runtime > 0 else float("nan"),
    }


_ROWS = [("pixel_acc", "pixel acc"), ("iou", "IoU"), ("dice", "Dice"), ("precision", "precision"),
         ("recall", "recall"), ("auc_lerf", "LeRF AUC"), ("auc_morf", "MoRF AUC"), ("abpc", "ABPC"),
         ("texture_collapse", "texture collapse"), ("entropy", "map entropy"), ("mass_outside", "mass outside")]


def format_markdown(result: Mapping[str, Any], title: str = "") -> str:
    """A markdown table shaped like the AGCAM paper's: one row per metric, one column per method."""
    methods = list(result["methods"])
    present = [(k, label) for k, label in _ROWS if any(k in result["methods"][m] for m in methods)]

    def cell(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    lines = [f"| {title} | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(result["methods"][m].get(k)) for m in methods) + " |"
              for k, label in present]
    first = result["methods"][methods[0]] if methods else {}
    notes = []
    if "n_images" in first:
        notes.append(f"localization: {first['n_images']} correctly classified images, map for the predicted class")
    if "n_images_abpc" in first:
        notes.append(f"ABPC: all {first['n_images_abpc']} images, map for the ground-truth class")
    return "\n".join(lines + ([""] + notes if notes else []))


#: the held-out shapes benchmark the shipped model is scored on by default
SHAPES_BENCHMARK = {"split": "single", "seed": 2024, "size": 300}
DATASETS = ("shapes", "imagenet", "voc", "cub")


def build_dataset(name: str, root: Optional[str], data_config: Mapping[str, Any]) -> Any:
    """The dataset ``name`` (see :data:`DATASETS`) preprocessed for a model's timm-style data config.

    ``shapes`` is the shipped benchmark (:data:`SHAPES_BENCHMARK`, no ``root``); the real-image
    datasets need ``root`` and are squashed to the model's input size, as the protocol requires.
    """
    from captum_vit.data import CUBTest, ImageNetVal, ShapesDataset, VOCSingleClass

    mean = tuple(data_config.get("mean", (0.5,) * 3))
    std = tuple(data_config.get("std", (0.5,) * 3))
    size = int(tuple(data_config.get("input_size", (3, 224, 224)))[-1])
    if name == "shapes":
        if root is not None:
            raise ValueError("--root does not apply to the synthetic shapes benchmark (it is generated); drop it")
        return ShapesDataset(SHAPES_BENCHMARK["split"], seed=SHAPES_BENCHMARK["seed"], size=SHAPES_BENCHMARK["size"],
                             image_size=size, mean=mean, std=std)
    classes = {"imagenet": ImageNetVal, "voc": VOCSingleClass, "cub": CUBTest}
    if name not in classes:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"--dataset {name} needs --root DIR, the dataset's folder")
    return classes[name](root, input_size=size, mean=mean, std=std, transform="squash")


def run_evaluation(
    dataset: str = "shapes",
    root: Optional[str] = None,
    methods: str = "agcam,rollout,lrp",
    metrics: str = "localization,abpc,diagnostics",
    model: str = "shapes_vit",
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    limit: Optional[int] = None,
    threshold: float = 0.5,
    out: str = "captum_vit_eval",
    json_path: Optional[str] = None,
    device: str = "cpu",
    progress: bool = True,
    stream: Optional[Any] = None,
) -> Dict[str, Any]:
    """Load a model and a dataset by name, :func:`evaluate`, print the markdown table, write the files.

    Writes ``out/results.h5`` (the resumable per-image store), ``out/table.md`` and the JSON
    (``json_path``, default ``out/results.json``, NaN as null). Returns the result dictionary.
    """
    from captum_vit.models import load_model

    stream = stream if stream is not None else sys.stdout
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file, not a folder")
    net, cfg, _ = load_model(model, checkpoint=checkpoint, device=device)
    data = build_dataset(dataset, root, cfg)
    os.makedirs(out, exist_ok=True)
    result = evaluate(net, data, methods, metrics=metrics.split(","), batch_size=batch_size, threshold=threshold,
                      limit=limit, store=os.path.join(out, "results.h5"), progress=progress, checkpoint=checkpoint)
    result["model"], result["checkpoint"] = model, checkpoint
    title = f"{dataset} ({result['n_images']} images, {model})"
    table = format_markdown(result, title)
    print(table, file=stream)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    from captum_vit.demo import _json_safe

    json_path = json_path or os.path.join(out, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=2)
    print(f"wrote {json_path} and {os.path.join(out, 'table.md')}; {result['n_computed']} images computed "
          f"({result['images_per_s']:.2f} img/s), {result['n_images'] - result['n_computed']} read from the store",
          file=stream)
    return result

