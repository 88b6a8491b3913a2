r"""The evaluation runner: datasets in, attribution methods and metrics joined, per-image results stored.

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
reports) go to a :class:`~captum_vit.evaluation.store.ResultStore` as they are computed: each batch
is committed as its own file, renamed into place when complete, and the run ends by merging them
into one HDF5 file that replaces the old one atomically. A run killed at any point loses at most
the batch in flight, and the same command started again recomputes nothing already stored. The
store holds a fingerprint of what produced it (a hash of the model's weights, the checkpoint file,
the methods, the metric options and the dataset with its preprocessing): a store written under
another fingerprint is refused, naming what differs, because mixing its rows with new ones would
average two different experiments.

An image whose logits or maps are not finite (a NaN checkpoint, an overflowing input) is stored
with ``finite = 0`` and NaN scores; the summary averages the finite rows and counts the others
(``n_nonfinite``), and the CLI warns and exits with status 3.

Under ``torchrun --nproc-per-node N`` the fixed batches are dealt round-robin over the ranks, each
rank commits its batches into the same store folder and rank 0 merges them at the end; the batch
files are named by their images, not by their process, so a rerun with any number of processes
reuses what any other stored. Each image is explained in the same batch as in a single-process
run, so the merged rows equal a single process's; bit for bit when the processes use the same
number of threads (torchrun sets ``OMP_NUM_THREADS=1``), otherwise to the float rounding of
multi-threaded kernels (about 1e-7).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from captum_vit.evaluation.datasets import build_dataset, collate_for, describe_dataset
from captum_vit.evaluation.options import EvalOptions, RunOptions
from captum_vit.evaluation.schema import METRIC_GROUPS, format_markdown, json_safe, summary
from captum_vit.evaluation.store import FORMAT_VERSION, STORE_NAME, ResultStore
from captum_vit.metrics import (
    ABPC_FRACTIONS,
    abpc,
    boxes_to_mask,
    evaluate_localization,
    insensitivity,
    map_entropy,
    mass_outside,
    remove_top_patches,
    texture_collapse,
)
from captum_vit.zoo.shapes import sha256_file

__all__ = ["EvaluationInterrupted", "INSENSITIVITY_FRACTION", "STORE_NAME", "evaluate", "fingerprint",
           "run_evaluation", "weights_fingerprint"]

#: share of the most relevant patches removed for the insensitivity diagnostic
INSENSITIVITY_FRACTION = 0.2


#: ``observe(method, batch, maps, rows, boxes)``: per batch and method, the predicted-class maps that
#: localization scored (``[k, 1, gh, gw]``), their rows in the batch and their contour boxes
Observer = Callable[[str, Mapping[str, Any], Tensor, List[int], List[Tensor]], None]


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


def fingerprint(model: torch.nn.Module, dataset: Any, classes: Mapping[str, type], options: EvalOptions,
                checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """What produced a run's results: the store refuses to mix rows of runs whose fingerprints differ."""
    ident = options.identity()
    return {
        "format_version": FORMAT_VERSION,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights_sha256": weights_fingerprint(model),
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "methods": {n: f"{c.__module__}.{c.__qualname__}" for n, c in classes.items()},
        "metrics": ident["metrics"],
        "threshold": ident["threshold"],
        "abpc_fractions": [float(f) for f in ABPC_FRACTIONS],
        "abpc_value": 0.0,
        "insensitivity_fraction": INSENSITIVITY_FRACTION,
        "keep_maps": ident["keep_maps"],
        "dataset": describe_dataset(dataset),
        **({"localize_all": True} if ident.get("localize_all") else {}),
        **({"query": ident["query"]} if "query" in ident else {}),
    }


def _version() -> str:
    from captum_vit import __version__

    return __version__


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


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
        self.dataset, self.batches, self.collate = dataset, batches, collate_for(dataset)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.collate([self.dataset[j] for j in self.batches[i]])


def _lean(opts: EvalOptions) -> bool:
    """Localization alone, no maps kept: a method after the first explains only the images it scores."""
    return tuple(opts.metrics) == ("localization",) and not opts.keep_maps


def _predicted_maps(explainer: Any, x: Tensor, only_correct: bool, labels: Tensor,
                    first_logits: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(maps for the predicted class, logits, rows localization scores)``.

    With ``first_logits`` (the first method's logits of this batch, in a :func:`_lean` run) the
    method explains only the rows localization scores, for the class those logits predict; the
    other rows keep a zero map, neither stored nor scored.
    """
    if first_logits is None:
        maps, logits = explainer.attribute(x, target=None, return_logits=True)
        maps, logits = maps.detach(), logits.detach()
    else:
        logits = first_logits
    pred = logits.float().softmax(-1).argmax(-1)  # as the columns compute it, to the last tie
    scored = torch.nonzero((pred == labels) if only_correct else torch.ones_like(labels, dtype=torch.bool)).flatten()
    if first_logits is not None:
        part = explainer.attribute(x[scored], target=pred[scored]).detach() if len(scored) else None
        maps = torch.zeros((x.shape[0], 1) + (tuple(part.shape[-2:]) if part is not None else (1, 1)),
                           dtype=part.dtype if part is not None else torch.float32, device=x.device)
        if part is not None:
            maps[scored] = part
    return maps, logits, scored


def _check_labels(labels: Tensor, n_classes: int) -> None:
    if int(labels.min()) < 0:  # a negative target would mean "the predicted class" to the methods
        raise ValueError(f"a label ({int(labels.min())}) is negative: the dataset's labels must be class indices")
    if int(labels.max()) >= n_classes:
        raise ValueError(f"a label ({int(labels.max())}) is outside the model's {n_classes} classes: the dataset "
                         "and the model's head do not match; give a model (or --checkpoint) trained on this dataset")


def _score_batch(explainer: Any, model_fn: Callable[[Tensor], Tensor], batch: Mapping[str, Any],  # noqa: PLR0913
                 opts: EvalOptions, device: torch.device, observe: Optional[Observer] = None, name: str = "",
                 first_logits: Optional[Tensor] = None, clean_logits: Optional[Tensor] = None,
                 ) -> Tuple[Dict[str, np.ndarray], Tensor, Optional[Tensor]]:
    """Every stored column of one method on one batch (see :class:`ResultStore`), the logits it used, and
    ``model_fn``'s logits of the unperturbed images (``clean_logits`` when given, else ABPC's, else None).

    ABPC scores the unperturbed images with ``model_fn`` whatever the method, so a batch's first method
    computes them and the later ones reuse them; the explanation's own logits are not used there, as some
    methods' forwards differ from ``model_fn`` in the last bit.
    """
    groups = opts.metrics
    x = batch["image"].to(device)
    labels = batch["label"].to(device)
    maps_pred, logits, scored = _predicted_maps(explainer, x, opts.only_correct, labels, first_logits)
    probs = logits.float().softmax(-1)
    _check_labels(labels, probs.shape[1])
    pred = probs.argmax(-1)
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
    wrong = torch.nonzero(pred != labels).flatten()
    if len(wrong) and (opts.keep_maps or "abpc" in groups or "diagnostics" in groups):
        maps_label[wrong] = explainer.attribute(x[wrong], target=labels[wrong]).detach()
    # a non-finite logit or map gives no score: every metric of that row is NaN, never a number that looks right
    finite = torch.isfinite(logits).all(-1) & torch.isfinite(maps_pred.flatten(1)).all(-1) \
        & torch.isfinite(maps_label.flatten(1)).all(-1)
    cols["finite"] = finite.cpu().numpy().astype(np.int64)
    if opts.keep_maps:
        cols["map_pred"] = maps_pred.flatten(0, 1).cpu().numpy().astype(np.float16)
        cols["map_label"] = maps_label.flatten(0, 1).cpu().numpy().astype(np.float16)
    if "localization" in groups:
        cols.update(_localization(batch, maps_pred, scored, float(opts.threshold), observe, name))
    if "abpc" in groups:
        res = abpc(model_fn, x, maps_label, labels, batch_size=opts.abpc_batch_size, logits=clean_logits)
        clean_logits = res["logits"]
        cols.update({c: _np(res[c]) for c in METRIC_GROUPS["abpc"]})
    if "diagnostics" in groups:
        cols.update(_diagnostics(explainer, batch, x, labels, maps_label, prob_label))
    bad = ~cols["finite"].astype(bool)
    for c in [c for g in groups for c in METRIC_GROUPS[g]]:
        cols[c][bad] = np.nan
    return cols, logits, clean_logits


def _localization(batch: Mapping[str, Any], maps_pred: Tensor, scored: Tensor, threshold: float,
                  observe: Optional[Observer], name: str) -> Dict[str, np.ndarray]:
    """The localization columns: the scored rows' metrics, NaN elsewhere; ``observe`` sees their maps and boxes."""
    loc = {c: np.full(maps_pred.shape[0], np.nan) for c in METRIC_GROUPS["localization"]}
    if len(scored):
        maps = maps_pred[scored].float().cpu()
        res = evaluate_localization(maps, [batch["boxes"][i] for i in scored.tolist()], threshold=threshold,
                                    size=tuple(batch["image"].shape[-2:]), return_boxes=observe is not None)
        if observe is not None:
            res, boxes = res
            observe(name, batch, maps, scored.tolist(), boxes)
        for c in loc:
            loc[c][scored.cpu().numpy()] = _np(res[c])
    return loc


def _diagnostics(explainer: Any, batch: Mapping[str, Any], x: Tensor, labels: Tensor, maps_label: Tensor,
                 prob_label: Tensor) -> Dict[str, np.ndarray]:
    """Texture collapse, entropy, mass outside the boxes and insensitivity of the ground-truth-class maps."""
    size = tuple(x.shape[-2:])
    gt_mask = torch.stack([boxes_to_mask(bx, size) for bx in batch["boxes"]])
    patch = size[0] // maps_label.shape[-2]
    x_removed = remove_top_patches(x, maps_label, patch, fraction=INSENSITIVITY_FRACTION)
    maps_removed, logits_removed = explainer.attribute(x_removed, target=labels, return_logits=True)
    prob_removed = logits_removed.detach().float().softmax(-1).gather(1, labels[:, None])[:, 0]
    ins = insensitivity(maps_label, maps_removed.detach(), prob_label, prob_removed)
    return {"texture_collapse": _np(texture_collapse(maps_label)), "entropy": _np(map_entropy(maps_label)),
            "mass_outside": _np(mass_outside(maps_label.cpu(), gt_mask)),
            "insensitivity": _np(ins["spearman"]), "prob_drop": _np(ins["prob_drop"])}


def _distributed() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate(  # noqa: PLR0913 - model, data, methods, options; the rest are keyword-only hooks
    model: torch.nn.Module,
    dataset: Any,
    methods: Union[str, Sequence[str], Mapping[str, type]],
    options: Optional[EvalOptions] = None,
    *,
    store: Optional[str] = None,
    checkpoint: Optional[str] = None,
    on_batch: Optional[Callable[[int, List[int]], None]] = None,
    run_info: Optional[Mapping[str, Any]] = None,
    observe: Optional[Observer] = None,
    **option_values: Any,
) -> Dict[str, Any]:
    r"""Score attribution methods on a dataset with the localization, ABPC and diagnostic protocols.

    See the module docstring for the protocol. The model is used as given (it must be in eval
    mode); each method is constructed as ``cls(model)`` (with ``query=`` where it reads query rows).

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
        options (EvalOptions, optional): the metric groups, batch size, threshold, limit, maps,
            workers and progress bar (:class:`~captum_vit.evaluation.options.EvalOptions`);
            keyword arguments named like its fields override it (``metrics=("abpc",)``,
            ``batch_size=4``, ...). Default: ``EvalOptions()``
        store (str, optional): the store's HDF5 file; an existing one with the same fingerprint
            is resumed. Required under ``torchrun``. Default: None (in memory)
        checkpoint (str, optional): the checkpoint file the weights came from; its sha256 joins the
            fingerprint. Default: None
        on_batch (callable, optional): called as ``on_batch(batches_done, indices)`` after each
            batch is committed (progress hooks; an exception raised there stops the run cleanly).
        run_info (dict, optional): facts stored with the results that do not identify them
            (e.g. the model's name), for reports. Default: None
        observe (callable, optional): called per batch and method with the maps localization
            scored (see :data:`Observer`), for clients that draw or count more (the demo).

    Returns:
        dict: ``{"methods": {name: {n_images, pixel_accuracy, iou, dice, precision, recall,
        n_images_abpc, auc_lerf, auc_morf, abpc, texture_collapse, entropy, mass_outside,
        insensitivity, prob_drop, n_images_total, n_nonfinite}}, "n_images", "n_correct",
        "accuracy", "metrics", "threshold", "dataset", "fingerprint", "store", "n_computed",
        "n_skipped", "world_size", "rank", "runtime_s", "images_per_s", "seconds"}`` (``seconds``:
        this process's time per method; the score keys are those of
        :data:`~captum_vit.evaluation.schema.METRICS`).

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
    from captum_vit.attr import construct, resolve_methods

    t_start = time.perf_counter()
    opts = (options or EvalOptions()).replace(**option_values) if option_values else (options or EvalOptions())
    opts.validate()
    if model.training:
        raise ValueError("the model is in train mode; call model.eval() first")
    rank, world_size = _distributed()
    if world_size > 1 and store is None:
        raise ValueError("a sharded run (torchrun) needs a store file: the ranks merge their results through it")
    if store is not None and os.path.isdir(store):
        raise ValueError(f"store {store!r} is a folder; give the store's file name (e.g. {STORE_NAME} inside it)")
    classes = resolve_methods(methods)
    _check_classes(model, dataset)
    explainers = {name: construct(cls, model, opts.query) for name, cls in classes.items()}
    fp = fingerprint(model, dataset, classes, opts, checkpoint)
    n_total = len(dataset) if opts.limit is None else min(int(opts.limit), len(dataset))
    run_attrs = dict(n_total=n_total, captum_vit_version=_version(), methods=json.dumps(list(classes)),
                     run=json.dumps(dict(run_info or {}), sort_keys=True))
    # under torchrun every rank reads the store; only rank 0 locks it (and removes what a killed run left)
    with ResultStore(store, fp, list(classes), opts.columns(), keep_maps=opts.keep_maps, lock=rank == 0) as rs:
        if world_size > 1:
            torch.distributed.barrier()  # nobody commits a batch before every rank has read the store
        rs.set_attrs(complete=False, **run_attrs)
        mine = _batches(n_total, int(opts.batch_size), rank, world_size)
        seconds = {name: 0.0 for name in explainers}
        n_computed, n_skipped = _run_batches(model, dataset, explainers, opts, rs, mine, (rank, world_size),
                                             on_batch, observe, seconds)
        if world_size > 1:
            torch.distributed.barrier()  # every rank's batches are committed
            counts: List[Any] = [None] * world_size
            torch.distributed.all_gather_object(counts, (n_computed, n_skipped))
            n_computed, n_skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        result = _merge(rs, opts, n_total, run_attrs) if rank == 0 else None
    if world_size > 1:
        box = [result]  # one process writes and reads the merged store; the others get its summary
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
        # gloo sends are asynchronous: a rank that left (and destroyed its process group) while
        # another still had the broadcast in flight aborted that other process
        torch.distributed.barrier()
    assert result is not None  # rank 0 merged, and every other rank received its result
    runtime = time.perf_counter() - t_start
    result.update(metrics=list(opts.metrics), threshold=float(opts.threshold), dataset=fp["dataset"],
                  fingerprint=fp, store=store, n_computed=n_computed, n_skipped=n_skipped, world_size=world_size,
                  rank=rank, runtime_s=runtime,
                  images_per_s=n_computed / runtime if runtime > 0 else float("nan"), seconds=seconds)
    return result


def _run_batches(  # noqa: PLR0913 - one step of evaluate(), handed evaluate's state
        model: torch.nn.Module, dataset: Any, explainers: Mapping[str, Any], opts: EvalOptions, rs: ResultStore,
        mine: List[List[int]], where: Tuple[int, int], on_batch: Optional[Callable[[int, List[int]], None]],
        observe: Optional[Observer], seconds: Dict[str, float]) -> Tuple[int, int]:
    """Score and commit this process's batches that the store lacks; ``(images computed, images skipped)``.

    ``seconds`` accumulates each method's time."""
    from tqdm import tqdm

    rank, world_size = where
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def model_fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    done = rs.done() | rs.skipped()
    # a resumed run skips what is stored; batches interrupted half-way resume as the remainder
    batches = [c for c in ([i for i in c if i not in done] for c in mine) if c]
    loader = torch.utils.data.DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False,
                                         num_workers=int(opts.workers))
    share = sum(len(c) for c in mine)
    bar = tqdm(total=share, initial=share - sum(len(c) for c in batches), unit="img",
               desc="captum-vit evaluate" + (f" (rank {rank} of {world_size})" if world_size > 1 else ""),
               disable=not opts.progress or rank != 0, file=sys.stderr)
    n_computed = n_skipped = 0
    try:
        for b, (batch, wanted) in enumerate(zip(loader, batches)):
            # unreadable files dropped with on_error="skip" are recorded, so a rerun does not try them again
            skipped = sorted(set(wanted) - set(batch["index"].tolist()))
            rows: Dict[str, Dict[str, np.ndarray]] = {}
            first_logits = None  # in a lean run, the methods after the first take the first one's predictions
            clean_logits = None  # model_fn of the unperturbed images, from the first method's ABPC
            for name, explainer in explainers.items() if len(batch["label"]) else ():
                t0 = time.perf_counter()
                rows[name], logits, clean_logits = _score_batch(explainer, model_fn, batch, opts, device, observe,
                                                                name, first_logits, clean_logits)
                if _lean(opts):
                    first_logits = logits
                seconds[name] += time.perf_counter() - t0
            rs.append(rows, skipped=skipped)
            n_computed += len(batch["label"])
            n_skipped += len(skipped)
            bar.update(len(wanted))
            if on_batch is not None:
                on_batch(b + 1, batch["index"].tolist())
    except KeyboardInterrupt as e:
        n_total = int(rs.attrs.get("n_total", 0))
        stored = len((rs.done() | rs.skipped()) & set(range(n_total)))
        where_ = f"in {rs.path}" if rs.path else "in memory only (no store was given), so nothing is kept"
        raise EvaluationInterrupted(f"interrupted: {stored} of {n_total} images are stored {where_}"
                                    + ("; run the same command again to resume from them" if rs.path else "")) from e
    finally:
        bar.close()
    return n_computed, n_skipped


def _merge(rs: ResultStore, opts: EvalOptions, n_total: int, run_attrs: Mapping[str, Any]) -> Dict[str, Any]:
    """Commit every rank's batches into the store; the summary and the counts of the merged rows."""
    rs.reload_parts()
    covered = (rs.done() | rs.skipped()) & set(range(n_total))
    rs.set_attrs(complete=len(covered) >= n_total, n_skipped=len(rs.skipped()), **run_attrs)
    rs.commit()
    first = rs.read(rs.methods[0], maps=False)
    n_correct = int((first["label"] == first["pred"]).sum())
    return {"methods": summary(rs, opts.metrics), "n_images": int(len(first["label"])), "n_correct": n_correct,
            "accuracy": n_correct / len(first["label"]) if len(first["label"]) else float("nan")}


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


def run_evaluation(options: Optional[RunOptions] = None, stream: Optional[Any] = None,
                   **option_values: Any) -> Dict[str, Any]:
    """Load a model and a dataset by name, :func:`evaluate`, print the markdown table, write the files.

    ``options`` (:class:`~captum_vit.evaluation.options.RunOptions`, what ``captum-vit evaluate``
    parses; keyword arguments named like its fields override it) names the model, dataset,
    methods and output folder. Writes ``out/results.h5`` (the resumable per-image store),
    ``out/table.md`` and the JSON (``json_path``, default ``out/results.json``, NaN as null).
    Under ``torchrun`` every rank evaluates its share and rank 0 merges and writes. Returns the
    result dictionary.
    """
    from captum_vit.models import load_model

    o = (options or RunOptions()).replace(**option_values) if option_values else (options or RunOptions())
    stream = stream if stream is not None else sys.stdout
    if os.path.exists(o.out) and not os.path.isdir(o.out):
        raise ValueError(f"--out {o.out!r} is an existing file, not a folder")
    joined, device = _init_distributed(o.device)
    try:
        net, cfg, _ = load_model(o.model, checkpoint=o.checkpoint, device=device)
        data = build_dataset(o.dataset, o.root, cfg, transform=o.preprocess, on_error=o.on_error)
        os.makedirs(o.out, exist_ok=True)
        run_info = {"model": o.model, "checkpoint": os.path.abspath(o.checkpoint) if o.checkpoint else None,
                    "dataset": o.dataset, "root": os.path.abspath(o.root) if o.root else None,
                    "preprocess": o.preprocess}
        eval_options = EvalOptions(**{f: getattr(o, f) for f in EvalOptions.__dataclass_fields__})
        result = evaluate(net, data, o.methods, eval_options, store=os.path.join(o.out, STORE_NAME),
                          checkpoint=o.checkpoint, run_info=run_info)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    result["model"], result["checkpoint"] = o.model, o.checkpoint
    if result["rank"] != 0:  # under torchrun, rank 0 prints and writes
        return result
    _write_outputs(result, o, stream)
    return result


def _write_outputs(result: Dict[str, Any], o: RunOptions, stream: Any) -> None:
    """The table (printed and ``table.md``), the JSON and a last line saying what was computed."""
    title = f"{o.dataset} ({result['n_images']} images, {o.model})"
    table = format_markdown(result, title)
    print(table, file=stream)
    with open(os.path.join(o.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    json_path = o.json_path or os.path.join(o.out, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(json_safe(result), f, indent=2)
    flagged = {m: v["n_nonfinite"] for m, v in result["methods"].items() if v.get("n_nonfinite")}
    if flagged:
        print("captum-vit evaluate: warning: non-finite logits or maps (NaN or inf: check the checkpoint and the "
              "inputs) for " + ", ".join(f"{n} images of {m}" for m, n in flagged.items())
              + "; they are stored with finite=0 and left out of every mean", file=sys.stderr)
    skipped = f", {result['n_skipped']} skipped (unreadable)" if result["n_skipped"] else ""
    shards = f" by {result['world_size']} processes" if result["world_size"] > 1 else ""
    print(f"wrote {json_path} and {os.path.join(o.out, 'table.md')}; {result['n_computed']} images computed{shards} "
          f"({result['images_per_s']:.2f} img/s){skipped}, {result['n_images'] - result['n_computed']} read from "
          "the store", file=stream)
