"""End-to-end demo: explain the shipped shapes ViT and score the maps with the localization protocol.

``run_demo`` is a client of the evaluation runner (:func:`captum_vit.evaluation.evaluate`): it
runs the localization protocol on held-out images of :class:`captum_vit.data.ShapesDataset`
(the correctly classified ones, as the weakly-supervised protocol requires), and adds what only
the demo shows: the multi-instance rate (images with at least two instances of the class where
the predicted contour boxes touch every instance), a gallery figure and a text table.

Command line: ``captum-vit demo --n 300 --seed 2024 --out captum_vit_demo --methods agcam`` or
``python -m captum_vit.demo ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, TextIO, Union

from captum_vit.attr import resolve_methods
from captum_vit.evaluation.schema import METRIC_GROUPS, json_safe, metric

if TYPE_CHECKING:
    import torch

__all__ = ["run_demo", "add_demo_arguments", "run_demo_from_args", "resolve_methods", "format_table", "main",
           "validate_demo_options"]

_LOCALIZATION = METRIC_GROUPS["localization"]


def _fmt(v: float) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_table(scores: Dict[str, Any]) -> str:
    r"""The demo's text report for a ``run_demo`` result.

    Args:
        scores (dict): the dictionary returned by :func:`run_demo`.

    Returns:
        str: a multi-line table.
    """
    lines = [
        f"captum-vit demo: {scores['n_images']} held-out ShapesDataset images (split 'single', seed "
        f"{scores['seed']}), threshold {scores['threshold']}",
        f"classification accuracy {_fmt(scores['accuracy'])} ({scores['n_correct']}/{scores['n_images']}); "
        f"localization on {scores['n_evaluated']} "
        f"{'correctly classified images' if scores['only_correct'] else 'images'}, map for the predicted class",
    ]
    head = (f"{'method':<12}" + "".join(f"{metric(k).short:>9}" for k in _LOCALIZATION)
            + f"{'multi-inst':>12}{'(n)':>6}{'sec':>8}")
    lines += [head, "-" * len(head)]
    for name, s in scores["methods"].items():
        lines.append(f"{name:<12}" + "".join(f"{_fmt(s[k]):>9}" for k in _LOCALIZATION)
                     + f"{_fmt(s['multi_instance_rate']):>12}{s['n_multi_instance']:>6}{s['seconds']:>8.1f}")
    lines.append("multi-inst: share of images with >= 2 instances whose predicted contour boxes touch every "
                 "instance (boxes may span several instances).")
    return "\n".join(lines)


def run_demo(  # noqa: PLR0913 - the Python face of `captum-vit demo`: one keyword per flag
    n: int = 300,
    seed: int = 2024,
    out: Optional[str] = "captum_vit_demo",
    methods: Union[None, str, Sequence[str], Mapping[str, type]] = None,
    batch_size: int = 16,
    gallery_rows: int = 6,
    threshold: float = 0.5,
    progress: bool = True,
    model: Optional[torch.nn.Module] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    only_correct: bool = True,
    stream: Optional[TextIO] = None,
) -> Dict[str, Any]:
    r"""Explain held-out shapes images with each method and score the maps for the predicted class.

    Per batch, each method's ``attribute(x, target=None, return_logits=True)`` gives its maps
    for the predicted class and the logits of its own forward, as in every evaluation (so any
    model the methods support works, a Hugging Face ViT included).

    Args:
        n (int, optional): number of images drawn from ``ShapesDataset("single", seed=seed)``;
            at least 1. Default: 300
        seed (int, optional): dataset seed; must not be one of the shipped model's training
            seeds (:func:`captum_vit.zoo.training_seeds`). Default: 2024
        out (str, optional): output folder for ``gallery.png``, ``scores.json`` and ``scores.txt``
            (the printed table); ``None``
            writes nothing. Default: ``"captum_vit_demo"``
        methods (optional): method names (see :func:`resolve_methods`); ``None`` = all registered.
        batch_size (int, optional): images per model call. Default: 16
        gallery_rows (int, optional): images shown in the gallery (the first evaluated ones);
            0 skips the figure. Default: 6
        threshold (float, optional): binarisation threshold on the min-max map, in [0, 1].
            Default: 0.5
        progress (bool, optional): show a tqdm progress bar. Default: True
        model (nn.Module, optional): a classifier to use instead of the shipped
            :func:`captum_vit.zoo.shapes_vit` (in eval mode). Default: None
        data_config (dict, optional): its timm-style data config (``mean``/``std`` are used);
            defaults to the shipped model's, or mean = std = 0.5.
        only_correct (bool, optional): evaluate only correctly classified images, as the
            protocol requires; ``False`` evaluates all images (map for the predicted class).
            Default: True
        stream (file, optional): where the table is printed. Default: ``sys.stdout``

    Returns:
        dict: ``n_images``, ``seed``, ``threshold``, ``only_correct``, ``accuracy``,
        ``n_correct``, ``n_evaluated``, ``n_multi_instance_images``, ``runtime_s``, ``files`` and
        ``methods`` = ``{name: {pixel_accuracy, iou, dice, precision, recall,
        multi_instance_rate, n_multi_instance, seconds}}`` (means over evaluated images; NaN when
        there are none). The same numbers are written to ``out/scores.json`` (NaN as null).

    Raises:
        ValueError: ``n`` or ``batch_size`` below 1, ``threshold`` outside [0, 1], ``seed`` a
            training seed, or a model in train mode.
    """
    from captum_vit.data import ShapesDataset
    from captum_vit.evaluation import evaluate

    t_start = time.perf_counter()
    stream = stream if stream is not None else sys.stdout
    validate_demo_options(n=n, seed=seed, threshold=threshold, batch_size=batch_size)
    if model is None:
        from captum_vit.zoo import shapes_vit

        model, shipped_config = shapes_vit()
        data_config = data_config if data_config is not None else shipped_config
    data_config = dict(data_config or {})
    mean_, std_ = tuple(data_config.get("mean", (0.5,) * 3)), tuple(data_config.get("std", (0.5,) * 3))
    classes = resolve_methods(methods)
    dataset = ShapesDataset("single", seed=int(seed), size=int(n), mean=mean_, std=std_)

    extras = _Extras(list(classes), int(gallery_rows))
    result = evaluate(model, dataset, classes, metrics=("localization",), batch_size=int(batch_size),
                      threshold=float(threshold), keep_maps=False, progress=progress, only_correct=bool(only_correct),
                      observe=extras)
    touched, rows, first = extras.touched, extras.rows, next(iter(classes))
    method_scores: Dict[str, Dict[str, Any]] = {}
    for name in classes:
        s = {k: result["methods"][name][k] for k in _LOCALIZATION}
        t = touched[name]
        s["multi_instance_rate"] = float(sum(t)) / len(t) if t else float("nan")
        s["n_multi_instance"] = len(t)
        s["seconds"] = result["seconds"][name]
        method_scores[name] = s

    scores: Dict[str, Any] = {
        "n_images": len(dataset),
        "seed": int(seed),
        "threshold": float(threshold),
        "only_correct": bool(only_correct),
        "accuracy": result["accuracy"],
        "n_correct": result["n_correct"],
        "n_evaluated": result["methods"][first]["n_images"],
        "n_multi_instance_images": len(touched[first]),
        "methods": method_scores,
        "files": {},
    }
    _write_files(scores, rows, out, gallery_rows, t_start, stream)
    return scores


class _Extras:
    """What the demo adds to each method's localization (the runner's ``observe``): the instances its
    contour boxes touch on multi-instance images, and the gallery's rows."""

    def __init__(self, methods: List[str], gallery_rows: int) -> None:
        self.first, self.gallery_rows = methods[0], gallery_rows
        self.touched: Dict[str, List[bool]] = {m: [] for m in methods}
        self.rows: Dict[str, Any] = {"images": [], "gt": [], "titles": [], "maps": {m: [] for m in methods},
                                     "boxes": {m: [] for m in methods}}

    def __call__(self, name: str, batch: Mapping[str, Any], maps: torch.Tensor, keep: List[int],
                 boxes: list) -> None:
        from captum_vit.data import CLASSES
        from captum_vit.metrics.localization import boxes_touch_instances

        inst = [batch["masks"][i] for i in keep]
        self.touched[name] += [boxes_touch_instances(boxes[j], m) for j, m in enumerate(inst) if m.shape[0] >= 2]
        rows = self.rows
        take = max(0, self.gallery_rows - len(rows["maps"][name]))
        if name == self.first:
            for i in keep[:take]:
                rows["images"].append(batch["image_uint8"][i].numpy())
                rows["gt"].append(batch["boxes"][i])
                rows["titles"].append(f"#{int(batch['index'][i])} {CLASSES[int(batch['label'][i])]} "
                                      f"x{batch['masks'][i].shape[0]}")
        rows["maps"][name] += list(maps[:take])
        rows["boxes"][name] += boxes[:take]


def _write_files(scores: Dict[str, Any], rows: Mapping[str, Any], out: Optional[str], gallery_rows: int,
                 t_start: float, stream: TextIO) -> None:
    """The gallery, the table (printed and ``scores.txt``) and ``scores.json``; their paths go in ``scores``."""
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if gallery_rows > 0 and rows["images"]:
            from captum_vit.viz import gallery

            scores["files"]["gallery"] = gallery(
                os.path.join(out, "gallery.png"), rows["images"], rows["gt"], rows["maps"],
                pred_boxes_by_method=rows["boxes"], titles=rows["titles"])
    scores["runtime_s"] = time.perf_counter() - t_start
    text = format_table(scores)
    print(text, file=stream)
    if out is not None:
        path = os.path.join(out, "scores.json")
        scores["files"]["scores"] = path
        scores["files"]["table"] = os.path.join(out, "scores.txt")
        with open(scores["files"]["table"], "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(json_safe(scores), f, indent=2)
        print(f"wrote {', '.join(scores['files'].values())} in {scores['runtime_s']:.1f} s", file=stream)


def validate_demo_options(n: int, seed: int, threshold: float, batch_size: int = 1) -> None:
    r"""Check the demo's options; raise ``ValueError`` naming the problem and the fix.

    Args:
        n (int): number of images, at least 1.
        seed (int): dataset seed, none of :func:`captum_vit.zoo.training_seeds`.
        threshold (float): binarisation threshold in [0, 1].
        batch_size (int, optional): images per model call, at least 1. Default: 1
    """
    from captum_vit.zoo import training_seeds

    if int(n) < 1:
        raise ValueError(f"the number of images n={n} must be at least 1; pass a positive --n")
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1; pass a positive --batch-size")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1] (maps are min-max normalised before "
                         "thresholding); pass a --threshold between 0 and 1")
    seeds = training_seeds()
    if int(seed) in seeds:
        raise ValueError(f"seed {seed} is one of the shipped model's training seeds {sorted(seeds)}, so its images "
                         "are not held out; pass another --seed (the default is 2024)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    r"""Add the demo's options (``--n --seed --out --methods --batch-size --gallery-rows
    --threshold --no-progress``) to an argparse parser.

    Args:
        parser (argparse.ArgumentParser): the (sub)parser to extend.

    Returns:
        argparse.ArgumentParser: the same parser.
    """
    parser.add_argument("--n", type=int, default=300, help="number of held-out images (default 300)")
    parser.add_argument("--seed", type=int, default=2024,
                        help="dataset seed, not one of the shipped model's training seeds (default 2024)")
    parser.add_argument("--out", default="captum_vit_demo", help="output folder (default captum_vit_demo)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method names, space or comma separated (default: all registered)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--gallery-rows", type=int, default=6, help="images in gallery.png (default 6)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="binarisation threshold in [0, 1] on the min-max map (default 0.5)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_demo_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    r"""Call :func:`run_demo` with the options parsed by :func:`add_demo_arguments`."""
    return run_demo(n=args.n, seed=args.seed, out=args.out, methods=args.methods, batch_size=args.batch_size,
                    gallery_rows=args.gallery_rows, threshold=args.threshold, progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser(prog="python -m captum_vit.demo",
                                                        description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        run_demo_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # exits with status 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
