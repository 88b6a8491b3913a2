r"""Evaluation runner: datasets in, attribution methods and metrics joined, per-image results stored.

:func:`evaluate` runs the weakly-supervised localization protocol and the ABPC perturbation
protocol of the AGCAM paper (plus per-map diagnostics) for several methods over one dataset,
in batches:

- **localization** on the correctly classified images only, with the map for the predicted class
  (:func:`captum_vit.metrics.evaluate_localization`);
- **abpc** on *all* images, with the map for the ground-truth class: for the correctly classified
  images that is the same map, for the others a second ``attribute`` call with ``target=label``
  (:func:`captum_vit.metrics.abpc`);
- **diagnostics** on the ground-truth-class map of every image: texture collapse, map entropy, the
  map's mass outside the ground-truth boxes and insensitivity (the Spearman correlation between the
  map and the map of the same image with its most relevant 20% of patches removed, stored with the
  drop in the ground-truth class's probability; one more ``attribute`` call per image).

Per-image results (and, unless ``keep_maps=False``, both maps of every image on the patch grid, for
reports) go to a :class:`ResultStore` as they are computed. With a file path the store is
an HDF5 file (h5py), because HDF5 gives chunked, appendable columns in one file: each batch is
appended and flushed, so an interrupted run loses at most the batch in flight, and a run started
again over the same file recomputes nothing already stored. Every column is written with HDF5's
Fletcher-32 chunk checksums, so a damaged chunk fails on read instead of returning wrong numbers.
The file also holds a fingerprint of what produced it (a hash of the model's weights, the
checkpoint file, the methods, the metric options and the dataset with its preprocessing): a store
written under another fingerprint is refused, naming what differs, because mixing its rows with
new ones would average two different experiments. A file that cannot be opened, or whose columns
disagree in length, is reported as corrupt and never read as results; a store of another format
version is refused as written by another version of captum-vit.

Under ``torchrun --nproc-per-node N`` the fixed batches are dealt round-robin over the ranks, each
rank writes its own shard file and rank 0 merges them into the store. Each image is explained in the
same batch as in a single-process run, so the merged rows equal a single process's; bit for bit when
the processes use the same number of threads (torchrun sets ``OMP_NUM_THREADS=1``), otherwise to the
float rounding of multi-threaded kernels (about 1e-7).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from captum_vit.metrics import (
    ABPC_FRACTIONS,
    METRIC_NAMES,
    abpc,
    boxes_to_mask,
    evaluate_localization,
    insensitivity,
    map_entropy,
    mass_outside,
    remove_top_patches,
    texture_collapse,
)

__all__ = [
    "DATASETS",
    "INSENSITIVITY_FRACTION",
    "METRIC_GROUPS",
    "ResultStore",
    "SHAPES_BENCHMARK",
    "STORE_NAME",
    "build_dataset",
    "StoreCorruptError",
    "StoreMismatchError",
    "StoreVersionError",
    "load_store",
    "shard_path",
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
    "diagnostics": ["texture_collapse", "entropy", "mass_outside", "insensitivity", "prob_drop"],
}
_FORMAT_VERSION = 2
_ID_COLUMNS = ("index", "label", "pred", "prob_pred", "prob_label")
_INT_COLUMNS = ("index", "label", "pred")
_MAP_COLUMNS = ("map_pred", "map_label")
#: the file name of the store inside an evaluation's output folder
STORE_NAME = "results.h5"
# the summary's names for the localization columns: the AGCAM paper's short names
_SUMMARY_NAMES = {"pixel_accuracy": "pixel_acc"}
#: share of the most relevant patches removed for the insensitivity diagnostic
INSENSITIVITY_FRACTION = 0.2


class StoreVersionError(ValueError):
    """The result store was written by a version of captum-vit with another store format."""


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

    Columns per method: ``index`` (dataset index), ``label``, ``pred``, ``prob_pred`` and
    ``prob_label`` (softmax probabilities of the predicted and the ground-truth class), one float64
    column per metric of the selected groups (NaN where the protocol does not score the image,
    e.g. localization of a misclassified image) and, when maps are kept, ``map_pred`` and
    ``map_label`` (float16 ``[n, gh, gw]``: the raw maps for the predicted and the ground-truth
    class on the patch grid).

    Args:
        path (str, optional): the HDF5 file; ``None`` keeps the rows in memory (no resume).
        fingerprint (dict): what produced the results (see the module docstring).
        methods (sequence of str): the method names.
        columns (sequence of str): the metric columns.
        keep_maps (bool, optional): store the maps too. Default: True
        mode (str, optional): ``"a"`` (create or resume) or ``"r"`` (read an existing store
            with this fingerprint; with an empty fingerprint, whatever its fingerprint, as
            :func:`load_store` does). Default: ``"a"``
    """

    def __init__(self, path: Optional[str], fingerprint: Mapping[str, Any], methods: Sequence[str],
                 columns: Sequence[str], keep_maps: bool = True, mode: str = "a") -> None:
        self.path = path
        self.fingerprint = dict(fingerprint)
        self.methods = list(methods)
        self.columns = list(_ID_COLUMNS) + list(columns)
        self.maps = list(_MAP_COLUMNS) if keep_maps else []
        self.attrs: Dict[str, Any] = {}
        self._mem: Dict[str, Dict[str, List[np.ndarray]]] = {m: {c: [] for c in self.columns + self.maps}
                                                             for m in self.methods}
        self._file = None
        if path is not None:
            self._open(path, mode)

    # -- file handling -------------------------------------------------------------------------
    def _open(self, path: str, mode: str) -> None:
        import h5py

        exists = os.path.exists(path)
        if mode == "r" and not exists:
            raise FileNotFoundError(f"result store {path!r} does not exist")
        try:
            f = h5py.File(path, mode)
        except OSError as e:
            raise StoreCorruptError(f"result store {path!r} cannot be opened as HDF5 ({e}); it is truncated or not a "
                                    "result store: delete it (or give another --out) to start afresh") from e
        self._file = f
        try:
            if mode == "r" and not self.fingerprint:
                self._adopt(f)
            elif mode == "r":
                self._check_existing(f)
            elif exists and len(f.keys()) + len(f.attrs.keys()) > 0:
                self._check_existing(f)
            else:
                f.attrs["format_version"] = _FORMAT_VERSION
                f.attrs["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
                for m in self.methods:
                    g = f.create_group(m)
                    for c in self.columns:
                        dtype = "i8" if c in _INT_COLUMNS else "f8"
                        g.create_dataset(c, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,),
                                         fletcher32=True)
                f.flush()
            self.attrs = {k: f.attrs[k] for k in f.attrs.keys()}
        except BaseException:
            f.close()
            self._file = None
            raise

    def _stored_fingerprint(self, f) -> Dict[str, Any]:
        where = f"result store {self.path!r}"
        if "fingerprint" not in f.attrs or "format_version" not in f.attrs:
            raise StoreCorruptError(f"{where} has no fingerprint: it is not a complete result store; delete it")
        version = int(f.attrs["format_version"])
        if version != _FORMAT_VERSION:
            raise StoreVersionError(f"{where} has store format {version}, this captum-vit ({_version()}) reads "
                                    f"format {_FORMAT_VERSION}: it was written by another version of captum-vit. "
                                    "Run the evaluation again into another --out, or use the version that wrote it")
        try:
            return json.loads(f.attrs["fingerprint"])
        except (TypeError, ValueError) as e:
            raise StoreCorruptError(f"{where} has an unreadable fingerprint ({e}); delete it") from e

    def _adopt(self, f) -> None:
        """Read mode: take the methods, columns and fingerprint from the file."""
        self.fingerprint = self._stored_fingerprint(f)
        # the fingerprint is stored with sorted keys; the run's own order of methods is an attribute
        order = json.loads(f.attrs["methods"]) if "methods" in f.attrs else []
        self.methods = list(order) if sorted(order) == sorted(self.fingerprint.get("methods", {})) \
            else sorted(self.fingerprint.get("methods", {}))
        if not self.methods or any(m not in f for m in self.methods):
            raise StoreCorruptError(f"result store {self.path!r} lacks the groups of its methods {self.methods}; "
                                    "it is damaged")
        first = f[self.methods[0]]
        self.maps = [c for c in _MAP_COLUMNS if c in first]
        self.columns = list(_ID_COLUMNS) + [c for c in first.keys() if c not in _ID_COLUMNS and c not in _MAP_COLUMNS]
        self._check_rows(f)

    def _check_existing(self, f) -> None:
        where = f"result store {self.path!r}"
        stored = self._stored_fingerprint(f)
        current = json.loads(json.dumps(self.fingerprint, sort_keys=True))
        if stored != current:
            diffs = [f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}"
                     for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
            raise StoreMismatchError(f"{where} was written by another run; its results cannot be resumed or mixed "
                                     "with this one. Differences: " + "; ".join(diffs)
                                     + ". Give another --out (or delete the file) to start afresh.")
        self._check_rows(f)

    def _check_rows(self, f) -> None:
        where = f"result store {self.path!r}"
        lengths = set()
        for m in self.methods:
            if m not in f or any(c not in f[m] for c in self.columns):
                raise StoreCorruptError(f"{where} lacks the columns of method {m!r}; it is damaged: delete it")
            lengths |= {f[m][c].shape[0] for c in self.columns}
            lengths |= {f[m][c].shape[0] for c in self.maps if c in f[m]}
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

    def set_attrs(self, **attrs: Any) -> None:
        """Record facts about the run that do not identify its results (e.g. how many images it covers)."""
        self.attrs.update(attrs)
        if self._file is not None:
            for k, v in attrs.items():
                self._file.attrs[k] = v
            self._file.flush()

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
        sets = [set(self.read(m, maps=False)["index"].tolist()) for m in self.methods]
        return set.intersection(*sets) if sets else set()

    def append(self, rows: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Append one batch: ``{method: {column: array[n, ...]}}``; the file is flushed afterwards."""
        if self._file is None:
            for m, cols in rows.items():
                for c in self.columns + self.maps:
                    self._mem[m][c].append(np.asarray(cols[c]))
            return
        for m, cols in rows.items():
            g = self._file[m]
            for c in self.columns + self.maps:
                v = np.asarray(cols[c])
                if c not in g:  # map columns: their grid is known only once a map exists
                    g.create_dataset(c, shape=(0,) + v.shape[1:], maxshape=(None,) + v.shape[1:], dtype="f2",
                                     chunks=(64,) + v.shape[1:], fletcher32=True)
                d = g[c]
                n = d.shape[0]
                d.resize((n + len(v),) + d.shape[1:])
                d[n:] = v
        self._file.flush()

    def read(self, method: str, maps: bool = True) -> Dict[str, np.ndarray]:
        """All rows of one method, as ``{column: array}``, sorted by dataset index."""
        names = self.columns + (self.maps if maps else [])
        if self._file is None:
            out = {c: np.concatenate(self._mem[method][c]) if self._mem[method][c] else _empty(c) for c in names}
        else:
            try:
                g = self._file[method]
                out = {c: g[c][...] if c in g else _empty(c) for c in names}
            except OSError as e:
                raise StoreCorruptError(f"result store {self.path!r}: reading method {method!r} failed ({e}); the "
                                        "file is damaged: delete it") from e
        order = np.argsort(out["index"], kind="stable")
        return {c: v[order] if len(v) == len(order) else v for c, v in out.items()}


def _empty(column: str) -> np.ndarray:
    return np.zeros(0, dtype=np.int64 if column in _INT_COLUMNS else np.float64)


def _version() -> str:
    from captum_vit import __version__

    return __version__


def load_store(path: str) -> ResultStore:
    r"""Open an existing result store read-only, whatever run wrote it.

    The fingerprint, methods and columns are taken from the file; its rows are checked as when a
    run resumes it. ``store.attrs`` holds the run's facts: ``n_total`` (the images the run was
    asked for), ``run`` (JSON: model name, checkpoint, dataset name and root) and ``complete``.

    Raises:
        FileNotFoundError: no such file.
        StoreVersionError: written by a version of captum-vit with another store format.
        StoreCorruptError: truncated, damaged or not a result store.
    """
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, STORE_NAME)):
            raise FileNotFoundError(f"no result store in folder {path!r} (expected {STORE_NAME} there): give the "
                                    "--out folder of a `captum-vit evaluate` run, or run the evaluation first")
        path = os.path.join(path, STORE_NAME)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no result store at {path!r}: give the --out folder of a `captum-vit evaluate` run "
                                f"(or its {STORE_NAME}), or run the evaluation first")
    return ResultStore(path, {}, [], [], mode="r")


def _collate_for(dataset: Any) -> Callable:
    from captum_vit.data import ShapesDataset, collate, collate_annotated

    return collate if isinstance(dataset, ShapesDataset) else collate_annotated


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _summary(store: ResultStore, groups: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for m in store.methods:
        rows = store.read(m, maps=False)  # sorted by index: the same sums whatever order the rows came in
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


def _batches(n_total: int, batch_size: int, rank: int, world_size: int) -> List[List[int]]:
    """This rank's batches: fixed chunks of ``range(n_total)``, dealt round-robin over the ranks.

    The chunks do not depend on the number of processes, so every image is explained in the same
    batch (the same numbers, to the last bit) by a sharded run as by a single process.
    """
    chunks = [list(range(i, min(i + batch_size, n_total))) for i in range(0, n_total, batch_size)]
    return [c for b, c in enumerate(chunks) if b % world_size == rank]


class _Batches(torch.utils.data.Dataset):
    """One item per batch of dataset indices, so that a DataLoader with workers keeps our batches."""

    def __init__(self, dataset: Any, batches: List[List[int]]) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, _collate_for(dataset)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.collate([self.dataset[j] for j in self.batches[i]])


def _score_batch(explainer: Any, model_fn: Callable[[Tensor], Tensor], batch: Mapping[str, Any],
                 groups: Sequence[str], threshold: float, abpc_batch_size: int, keep_maps: bool,
                 device: torch.device) -> Dict[str, np.ndarray]:
    """Every stored column of one method on one batch (see :class:`ResultStore`)."""
    x = batch["image"].to(device)
    labels = batch["label"].to(device)
    n, size = x.shape[0], tuple(x.shape[-2:])
    maps_pred, logits = explainer.attribute(x, target=None, return_logits=True)
    maps_pred, probs = maps_pred.detach(), logits.detach().float().softmax(-1)
    pred = probs.argmax(-1)
    correct = pred == labels
    prob_label = probs.gather(1, labels[:, None])[:, 0]
    cols: Dict[str, np.ndarray] = {
        "index": batch["index"].numpy().astype(np.int64),
        "label": labels.cpu().numpy().astype(np.int64),
        "pred": pred.cpu().numpy().astype(np.int64),
        "prob_pred": _np(probs.gather(1, pred[:, None])[:, 0]),
        "prob_label": _np(prob_label),
    }
    # the ground-truth-class map: the same map where the prediction is right, a second call elsewhere
    maps_label = maps_pred.clone()
    wrong = torch.nonzero(~correct).flatten()
    if len(wrong) and (keep_maps or "abpc" in groups or "diagnostics" in groups):
        maps_label[wrong] = explainer.attribute(x[wrong], target=labels[wrong]).detach()
    if keep_maps:
        cols["map_pred"] = maps_pred.flatten(0, 1).cpu().numpy().astype(np.float16)
        cols["map_label"] = maps_label.flatten(0, 1).cpu().numpy().astype(np.float16)
    if "localization" in groups:
        loc = {c: np.full(n, np.nan) for c in METRIC_GROUPS["localization"]}
        keep = torch.nonzero(correct).flatten()
        if len(keep):
            res = evaluate_localization(maps_pred[keep].float().cpu(), [batch["boxes"][i] for i in keep.tolist()],
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
        patch = size[0] // maps_label.shape[-2]
        x_removed = remove_top_patches(x, maps_label, patch, fraction=INSENSITIVITY_FRACTION)
        maps_removed, logits_removed = explainer.attribute(x_removed, target=labels, return_logits=True)
        prob_removed = logits_removed.detach().float().softmax(-1).gather(1, labels[:, None])[:, 0]
        ins = insensitivity(maps_label, maps_removed.detach(), prob_label, prob_removed)
        cols["insensitivity"], cols["prob_drop"] = _np(ins["spearman"]), _np(ins["prob_drop"])
    return cols


def _distributed() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_path(store: str, rank: int, world_size: int) -> str:
    """The file rank ``rank`` of ``world_size`` writes its rows to, next to the merged store."""
    return f"{store}.rank{rank}-of-{world_size}"


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
    keep_maps: bool = True,
    workers: int = 0,
    run_info: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    r"""Score attribution methods on a dataset with the localization, ABPC and diagnostic protocols.

    See the module docstring for the protocol. The model is used as given (it must be in eval
    mode); each method is constructed as ``cls(model)``.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) the batches are dealt
    round-robin over the ranks; each rank writes its rows to its own shard of the store
    (:func:`shard_path`), rank 0 merges the shards into ``store`` and every rank returns the
    summary of the merged store: the same numbers as a single-process run.

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
            fingerprint is resumed. Required under ``torchrun``. Default: None (in memory)
        progress (bool, optional): show a progress bar (images/s). Default: True
        checkpoint (str, optional): the checkpoint file the weights came from; its sha256 joins the
            fingerprint. Default: None
        abpc_batch_size (int, optional): perturbed copies per model call in ABPC. Default: 64
        on_batch (callable, optional): called as ``on_batch(batches_done, indices)`` after each
            batch is stored (progress hooks; an exception raised there stops the run cleanly).
        keep_maps (bool, optional): store each image's maps (patch grid, float16) for reports.
            Default: True
        workers (int, optional): DataLoader worker processes that load images. Default: 0
        run_info (dict, optional): facts stored with the results that do not identify them
            (e.g. the model's name), for reports. Default: None

    Returns:
        dict: ``{"methods": {name: {n_images, pixel_acc, iou, dice, precision, recall,
        n_images_abpc, auc_lerf, auc_morf, abpc, texture_collapse, entropy, mass_outside,
        insensitivity, prob_drop, n_images_total}}, "n_images", "n_correct", "accuracy",
        "metrics", "threshold", "dataset", "fingerprint", "store", "n_computed", "n_skipped",
        "world_size", "rank", "runtime_s", "images_per_s"}``.

    Raises:
        ValueError: bad options or a model in train mode; :class:`StoreMismatchError`,
            :class:`StoreVersionError` or :class:`StoreCorruptError` for a store that cannot be
            resumed.
    """
    from tqdm import tqdm

    from captum_vit.demo import resolve_methods

    t_start = time.perf_counter()
    groups = list(metrics.split(",") if isinstance(metrics, str) else metrics)
    groups = [g.strip() for g in groups if g.strip()]
    unknown = [g for g in groups if g not in METRIC_GROUPS]
    if unknown or not groups:
        raise ValueError(f"unknown metric group(s) {unknown or groups}; choose from {list(METRIC_GROUPS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if int(workers) < 0:
        raise ValueError(f"workers {workers} must be 0 or more")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1] (maps are min-max normalised first)")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit {limit} must be at least 1")
    if model.training:
        raise ValueError("the model is in train mode; call model.eval() first")
    rank, world_size = _distributed()
    if world_size > 1 and store is None:
        raise ValueError("a sharded run (torchrun) needs a store file: the ranks merge their results through it")
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
        "insensitivity_fraction": INSENSITIVITY_FRACTION,
        "keep_maps": bool(keep_maps),
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

    def open_store(path: Optional[str]) -> ResultStore:
        return ResultStore(path, fingerprint, list(classes), columns, keep_maps=keep_maps)

    run_attrs = dict(n_total=n_total, captum_vit_version=_version(), methods=json.dumps(list(classes)),
                     run=json.dumps(dict(run_info or {}), sort_keys=True))

    def finish(rs: ResultStore) -> Tuple[Dict[str, Dict[str, Any]], np.ndarray, np.ndarray]:
        """Mark the store complete (or not); the summary, labels and predictions of its rows."""
        rs.set_attrs(complete=len(rs.done()) >= n_total, **run_attrs)
        first = rs.read(next(iter(classes)), maps=False)
        return _summary(rs, groups), first["label"], first["pred"]

    done: set = set()
    if world_size > 1 and os.path.exists(store):  # images an earlier run already merged
        with ResultStore(store, fingerprint, list(classes), columns, keep_maps=keep_maps, mode="r") as merged:
            done = merged.done()
    if world_size > 1:
        torch.distributed.barrier()  # nobody writes the merged store while another rank reads it
    own = shard_path(store, rank, world_size) if world_size > 1 else store
    mine = _batches(n_total, int(batch_size), rank, world_size)
    n_computed = n_skipped = 0
    summary: Any = None
    with open_store(own) as rs:
        done |= rs.done()
        rs.set_attrs(complete=False, **run_attrs)
        # a resumed run skips what is stored; batches interrupted half-way resume as the remainder
        batches = [c for c in ([i for i in c if i not in done] for c in mine) if c]
        loader = torch.utils.data.DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False,
                                             num_workers=int(workers))
        share = sum(len(c) for c in mine)
        bar = tqdm(total=share, initial=share - sum(len(c) for c in batches), unit="img",
                   desc="captum-vit evaluate" + (f" (rank {rank} of {world_size})" if world_size > 1 else ""),
                   disable=not progress or rank != 0, file=sys.stderr)
        try:
            for b, (batch, wanted) in enumerate(zip(loader, batches)):
                n_skipped += len(wanted) - len(batch["label"])  # unreadable files dropped with on_error="skip"
                if len(batch["label"]) == 0:
                    continue
                rows = {name: _score_batch(explainer, model_fn, batch, groups, float(threshold),
                                           abpc_batch_size, keep_maps, device)
                        for name, explainer in explainers.items()}
                rs.append(rows)
                n_computed += len(batch["label"])
                bar.update(len(wanted))
                if on_batch is not None:
                    on_batch(b + 1, batch["index"].tolist())
        finally:
            bar.close()
        if world_size == 1:
            summary = finish(rs)
    if world_size > 1:
        counts = [None] * world_size
        torch.distributed.all_gather_object(counts, (n_computed, n_skipped))
        n_computed, n_skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if rank == 0:
            with open_store(store) as rs:
                _merge_shards(rs, [shard_path(store, r, world_size) for r in range(world_size)], fingerprint)
                summary = finish(rs)
        box = [summary]  # one process writes and reads the merged store; the others get its summary
        torch.distributed.broadcast_object_list(box, src=0)
        summary = box[0]
    summary, labels_stored, preds_stored = summary
    n_correct = int((labels_stored == preds_stored).sum())
    runtime = time.perf_counter() - t_start
    return {
        "methods": summary,
        "n_images": int(len(labels_stored)),
        "n_correct": n_correct,
        "accuracy": n_correct / len(labels_stored) if len(labels_stored) else float("nan"),
        "metrics": groups,
        "threshold": float(threshold),
        "dataset": fingerprint["dataset"],
        "fingerprint": fingerprint,
        "store": store,
        "n_computed": n_computed,
        "n_skipped": n_skipped,
        "world_size": world_size,
        "rank": rank,
        "runtime_s": runtime,
        "images_per_s": n_computed / runtime if runtime > 0 else float("nan"),
    }


def _merge_shards(merged: ResultStore, shards: Sequence[str], fingerprint: Mapping[str, Any]) -> None:
    """Append the shards' rows that ``merged`` lacks, in dataset order."""
    have = merged.done()
    parts: Dict[str, List[Dict[str, np.ndarray]]] = {m: [] for m in merged.methods}
    for path in shards:
        if not os.path.exists(path):
            continue
        with ResultStore(path, fingerprint, merged.methods, merged.columns[len(_ID_COLUMNS):],
                         keep_maps=bool(merged.maps), mode="r") as shard:
            for m in merged.methods:
                rows = shard.read(m)
                new = ~np.isin(rows["index"], list(have))
                if new.any():  # a rank dealt no batch has no rows (and no map columns yet)
                    parts[m].append({c: v[new] for c, v in rows.items()})
    rows = {m: {c: np.concatenate([p[c] for p in ps]) for c in ps[0]} for m, ps in parts.items() if ps}
    if rows:
        for m, cols in rows.items():
            order = np.argsort(cols["index"], kind="stable")
            rows[m] = {c: v[order] for c, v in cols.items()}
        merged.append(rows)


_ROWS = [("pixel_acc", "pixel acc"), ("iou", "IoU"), ("dice", "Dice"), ("precision", "precision"),
         ("recall", "recall"), ("auc_lerf", "LeRF AUC"), ("auc_morf", "MoRF AUC"), ("abpc", "ABPC"),
         ("texture_collapse", "texture collapse"), ("entropy", "map entropy"), ("mass_outside", "mass outside"),
         ("insensitivity", "insensitivity (Spearman)"), ("prob_drop", "prob. drop, top 20% removed")]


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


def build_dataset(name: str, root: Optional[str], data_config: Mapping[str, Any], transform: str = "squash",
                  on_error: str = "raise") -> Any:
    """The dataset ``name`` (see :data:`DATASETS`) preprocessed for a model's timm-style data config.

    ``shapes`` is the shipped benchmark (:data:`SHAPES_BENCHMARK`, no ``root``); the real-image
    datasets need ``root`` and are squashed to the model's input size, as the protocol requires
    (``transform="resize_crop"``: timm's resize and center crop, boxes moved to match).
    ``on_error="skip"`` skips and counts unreadable images and annotations instead of raising.
    """
    from captum_vit.data import CUBTest, ImageNetVal, ShapesDataset, VOCSingleClass

    mean = tuple(data_config.get("mean", (0.5,) * 3))
    std = tuple(data_config.get("std", (0.5,) * 3))
    size = int(tuple(data_config.get("input_size", (3, 224, 224)))[-1])
    if name == "shapes":
        if root is not None:
            raise ValueError("--root does not apply to the synthetic shapes benchmark (it is generated); drop it")
        if transform != "squash":
            raise ValueError("--preprocess does not apply to the synthetic shapes benchmark (generated at the "
                             "model's input size); drop it")
        return ShapesDataset(SHAPES_BENCHMARK["split"], seed=SHAPES_BENCHMARK["seed"], size=SHAPES_BENCHMARK["size"],
                             image_size=size, mean=mean, std=std)
    classes = {"imagenet": ImageNetVal, "voc": VOCSingleClass, "cub": CUBTest}
    if name not in classes:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"--dataset {name} needs --root DIR, the dataset's folder")
    kwargs: Dict[str, Any] = {}
    if transform == "resize_crop":
        kwargs.update(crop_pct=float(data_config.get("crop_pct", 0.875)),
                      interpolation=str(data_config.get("interpolation", "bicubic")))
    return classes[name](root, input_size=size, mean=mean, std=std, transform=transform, on_error=on_error,
                         **kwargs)


def _init_distributed(device: str) -> Tuple[bool, str]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False, device
    use_cuda = device.startswith("cuda")
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True, device


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
    workers: int = 0,
    preprocess: str = "squash",
    on_error: str = "raise",
    keep_maps: bool = True,
) -> Dict[str, Any]:
    """Load a model and a dataset by name, :func:`evaluate`, print the markdown table, write the files.

    Writes ``out/results.h5`` (the resumable per-image store), ``out/table.md`` and the JSON
    (``json_path``, default ``out/results.json``, NaN as null). Under ``torchrun`` every rank
    evaluates its share and rank 0 merges and writes. Returns the result dictionary.
    """
    from captum_vit.models import load_model

    stream = stream if stream is not None else sys.stdout
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file, not a folder")
    joined, device = _init_distributed(device)
    try:
        net, cfg, _ = load_model(model, checkpoint=checkpoint, device=device)
        data = build_dataset(dataset, root, cfg, transform=preprocess, on_error=on_error)
        os.makedirs(out, exist_ok=True)
        run_info = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                    "dataset": dataset, "root": os.path.abspath(root) if root else None, "preprocess": preprocess}
        result = evaluate(net, data, methods, metrics=metrics.split(","), batch_size=batch_size,
                          threshold=threshold, limit=limit, store=os.path.join(out, STORE_NAME), progress=progress,
                          checkpoint=checkpoint, workers=workers, keep_maps=keep_maps, run_info=run_info)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    result["model"], result["checkpoint"] = model, checkpoint
    if result["rank"] != 0:  # under torchrun, rank 0 prints and writes
        return result
    title = f"{dataset} ({result['n_images']} images, {model})"
    table = format_markdown(result, title)
    print(table, file=stream)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    from captum_vit.demo import _json_safe

    json_path = json_path or os.path.join(out, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=2)
    skipped = f", {result['n_skipped']} skipped (unreadable)" if result["n_skipped"] else ""
    shards = f" by {result['world_size']} processes" if result["world_size"] > 1 else ""
    print(f"wrote {json_path} and {os.path.join(out, 'table.md')}; {result['n_computed']} images computed{shards} "
          f"({result['images_per_s']:.2f} img/s){skipped}, {result['n_images'] - result['n_computed']} read from "
          "the store", file=stream)
    return result

