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
reports) go to a :class:`~captum_vit.store.ResultStore` as they are computed: each batch is
committed as its own file, renamed into place when complete, and the run ends by merging them into
one HDF5 file that replaces the old one atomically. A run killed at any point loses at most the
batch in flight, and the same command started again recomputes nothing already stored. The store
holds a fingerprint of what produced it (a hash of the model's weights, the checkpoint file, the
methods, the metric options and the dataset with its preprocessing): a store written under another
fingerprint is refused, naming what differs, because mixing its rows with new ones would average
two different experiments. See :mod:`captum_vit.store` for the files and their guarantees.

An image whose logits or maps are not finite (a NaN checkpoint, an overflowing input) is stored
with ``finite = 0`` and NaN scores; the summary averages the finite rows and counts the others
(``n_nonfinite``), and the CLI warns and exits with status 3.

Under ``torchrun --nproc-per-node N`` the fixed batches are dealt round-robin over the ranks, each
rank commits its batches into the same store folder and rank 0 merges them at the end; the batch
files are named by their images, not by their process, so a rerun with any number of processes
reuses what any other stored. Each image is explained in the
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
from captum_vit.store import (
    FORMAT_VERSION,
    ResultStore,
    StoreCorruptError,
    StoreLockedError,
    StoreMismatchError,
    StoreVersionError,
    StoreWriteError,
    load_store,
)

__all__ = [
    "DATASETS",
    "INSENSITIVITY_FRACTION",
    "METRIC_GROUPS",
    "EvaluationInterrupted",
    "ResultStore",
    "SHAPES_BENCHMARK",
    "STORE_NAME",
    "build_dataset",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreVersionError",
    "StoreWriteError",
    "load_store",
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
#: the file name of the store inside an evaluation's output folder
STORE_NAME = "results.h5"
# the summary's names for the localization columns: the AGCAM paper's short names
_SUMMARY_NAMES = {"pixel_accuracy": "pixel_acc"}
#: share of the most relevant patches removed for the insensitivity diagnostic
INSENSITIVITY_FRACTION = 0.2


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or another interruption) during :func:`evaluate`; the message says what is stored and how to resume."""


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


def _version() -> str:
    from captum_vit import __version__

    return __version__


def _collate_for(dataset: Any) -> Callable:
    from captum_vit.data import ShapesDataset, collate, collate_annotated

    return collate if isinstance(dataset, ShapesDataset) else collate_annotated


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _summary(store: ResultStore, groups: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Each method's means over its finite rows (localization: the correctly classified ones)."""
    out: Dict[str, Dict[str, Any]] = {}
    for m in store.methods:
        rows = store.read(m, maps=False)  # sorted by index: the same sums whatever order the rows came in
        finite = rows["finite"].astype(bool)
        correct = (rows["label"] == rows["pred"]) & finite
        s: Dict[str, Any] = {"n_images_total": int(len(rows["index"])), "n_nonfinite": int((~finite).sum())}
        if "localization" in groups:
            s["n_images"] = int(correct.sum())
            for c in METRIC_GROUPS["localization"]:
                s[_SUMMARY_NAMES.get(c, c)] = float(rows[c][correct].mean()) if correct.any() else float("nan")
        for g in ("abpc", "diagnostics"):
            if g in groups:
                if g == "abpc":
                    s["n_images_abpc"] = int(finite.sum())
                for c in METRIC_GROUPS[g]:
                    s[c] = float(rows[c][finite].mean()) if finite.any() else float("nan")
        out[m] = s
    return out


def _check_classes(model: torch.nn.Module, dataset: Any) -> None:
    """Refuse, before any compute, a dataset whose labels the model's head cannot even output."""
    n_data = getattr(dataset, "num_classes", None)
    n_model = getattr(model, "num_classes", None) or getattr(getattr(model, "config", None), "num_labels", None)
    if n_data is not None and isinstance(n_model, int) and n_model > 0 and int(n_data) > n_model:
        raise ValueError(f"the dataset has {int(n_data)} classes but the model's head has {n_model} outputs, so the "
                         "labels would not mean the model's classes: give a model (or --checkpoint) trained on this "
                         "dataset's classes")


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
    if int(labels.min()) < 0:  # a negative target would mean "the predicted class" to the methods
        raise ValueError(f"a label ({int(labels.min())}) is negative: the dataset's labels must be class indices")
    if int(labels.max()) >= probs.shape[1]:
        raise ValueError(f"a label ({int(labels.max())}) is outside the model's {probs.shape[1]} classes: the dataset "
                         "and the model's head do not match; give a model (or --checkpoint) trained on this dataset")
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
    # a non-finite logit or map gives no score: every metric of that row is NaN, never a number that looks right
    finite = torch.isfinite(logits.detach()).all(-1) & torch.isfinite(maps_pred.flatten(1)).all(-1) \
        & torch.isfinite(maps_label.flatten(1)).all(-1)
    cols["finite"] = finite.cpu().numpy().astype(np.int64)
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
    bad = ~cols["finite"].astype(bool)
    for c in [c for g in groups for c in METRIC_GROUPS[g]]:
        cols[c][bad] = np.nan
    return cols


def _distributed() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
    round-robin over the ranks; each rank commits its batches into ``store``'s folder of parts,
    rank 0 merges them and every rank returns the summary of the merged store: the same numbers as
    a single-process run.

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
            batch is committed (progress hooks; an exception raised there stops the run cleanly).
        keep_maps (bool, optional): store each image's maps (patch grid, float16) for reports.
            Default: True
        workers (int, optional): DataLoader worker processes that load images. Default: 0
        run_info (dict, optional): facts stored with the results that do not identify them
            (e.g. the model's name), for reports. Default: None

    Returns:
        dict: ``{"methods": {name: {n_images, pixel_acc, iou, dice, precision, recall,
        n_images_abpc, auc_lerf, auc_morf, abpc, texture_collapse, entropy, mass_outside,
        insensitivity, prob_drop, n_images_total, n_nonfinite}}, "n_images", "n_correct", "accuracy",
        "metrics", "threshold", "dataset", "fingerprint", "store", "n_computed", "n_skipped",
        "world_size", "rank", "runtime_s", "images_per_s"}``.

    Raises:
        ValueError: bad options, a model in train mode, or a dataset with more classes than the
            model's head; :class:`StoreMismatchError`, :class:`StoreVersionError` or
            :class:`StoreCorruptError` for a store that cannot be resumed.
        StoreLockedError: another running evaluation writes ``store``.
        StoreWriteError: the store could not be written (e.g. the disk is full); the batches
            committed before are kept and the same call resumes from them.
        EvaluationInterrupted: Ctrl-C; the message says how many images are stored and that the
            same call resumes.
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
    if store is not None and os.path.isdir(store):
        raise ValueError(f"store {store!r} is a folder; give the store's file name (e.g. {STORE_NAME} inside it)")
    classes = resolve_methods(methods)
    _check_classes(model, dataset)
    explainers = {name: cls(model) for name, cls in classes.items()}
    columns = [c for g in METRIC_GROUPS for c in METRIC_GROUPS[g] if g in groups]

    fingerprint = {
        "format_version": FORMAT_VERSION,
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

    run_attrs = dict(n_total=n_total, captum_vit_version=_version(), methods=json.dumps(list(classes)),
                     run=json.dumps(dict(run_info or {}), sort_keys=True))
    mine = _batches(n_total, int(batch_size), rank, world_size)
    n_computed = n_skipped = 0
    summary: Any = None
    # under torchrun every rank reads the store; only rank 0 locks it (and removes what a killed run left)
    with ResultStore(store, fingerprint, list(classes), columns, keep_maps=keep_maps, lock=rank == 0) as rs:
        if world_size > 1:
            torch.distributed.barrier()  # nobody commits a batch before every rank has read the store
        done = rs.done() | rs.skipped()
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
                # unreadable files dropped with on_error="skip" are recorded, so a rerun does not try them again
                skipped = sorted(set(wanted) - set(batch["index"].tolist()))
                rows = {}
                if len(batch["label"]):
                    rows = {name: _score_batch(explainer, model_fn, batch, groups, float(threshold),
                                               abpc_batch_size, keep_maps, device)
                            for name, explainer in explainers.items()}
                rs.append(rows, skipped=skipped)
                n_computed += len(batch["label"])
                n_skipped += len(skipped)
                bar.update(len(wanted))
                if on_batch is not None:
                    on_batch(b + 1, batch["index"].tolist())
        except KeyboardInterrupt as e:
            stored = len((rs.done() | rs.skipped()) & set(range(n_total)))
            where = f"in {store}" if store else "in memory only (no store was given), so nothing is kept"
            raise EvaluationInterrupted(f"interrupted: {stored} of {n_total} images are stored {where}"
                                        + ("; run the same command again to resume from them" if store else "")) from e
        finally:
            bar.close()
        if world_size > 1:
            torch.distributed.barrier()  # every rank's batches are committed
            counts: List[Any] = [None] * world_size
            torch.distributed.all_gather_object(counts, (n_computed, n_skipped))
            n_computed, n_skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if rank == 0:
            rs.reload_parts()
            covered = (rs.done() | rs.skipped()) & set(range(n_total))
            rs.set_attrs(complete=len(covered) >= n_total, n_skipped=len(rs.skipped()), **run_attrs)
            rs.commit()
            first = rs.read(next(iter(classes)), maps=False)
            summary = _summary(rs, groups), first["label"], first["pred"]
    if world_size > 1:
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
    flagged = {m: s.get("n_nonfinite", 0) for m, s in result["methods"].items() if s.get("n_nonfinite", 0)}
    if flagged:
        notes.append("WARNING: non-finite logits or maps, those images are left out of every mean: "
                     + ", ".join(f"{m} {n}" for m, n in flagged.items()))
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
    flagged = {m: v["n_nonfinite"] for m, v in result["methods"].items() if v.get("n_nonfinite")}
    if flagged:
        print("captum-vit evaluate: warning: non-finite logits or maps (NaN or inf: check the checkpoint and the "
              "inputs) for " + ", ".join(f"{n} images of {m}" for m, n in flagged.items())
              + "; they are stored with finite=0 and left out of every mean", file=sys.stderr)
    skipped = f", {result['n_skipped']} skipped (unreadable)" if result["n_skipped"] else ""
    shards = f" by {result['world_size']} processes" if result["world_size"] > 1 else ""
    print(f"wrote {json_path} and {os.path.join(out, 'table.md')}; {result['n_computed']} images computed{shards} "
          f"({result['images_per_s']:.2f} img/s){skipped}, {result['n_images'] - result['n_computed']} read from "
          "the store", file=stream)
    return result

