"""``captum-vit`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main", "explain", "export", "build_parser"]


def _add_model_args(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, required=default is None,
                   help="timm model name (e.g. vit_base_patch16_224) or 'shapes_vit', the small ViT shipped with "
                        "captum-vit" + (f" (default: {default})" if default else ""))
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE", help="state-dict file, loaded with weights_only=True")
    src.add_argument("--pretrained", action="store_true", help="use timm's pretrained weights (cached or downloaded)")
    g.add_argument("--num-classes", type=int, metavar="N",
                   help="number of classes (default: from the checkpoint's head)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _image_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be an image file (a folder, a missing path), or ``None``."""
    if os.path.isdir(path):
        return (f"{path!r} is a folder, not an image file; give the images in it instead "
                f"(e.g. {os.path.join(path, '*.png')})")
    if not os.path.exists(path):
        return f"image file {path!r} does not exist; check the path"
    return None


def _read_image(path: str, cfg: dict):
    """One image file as a ``[1, C, H, W]`` tensor; every failure is a ``ValueError`` naming the file."""
    from PIL import Image

    from captum_vit.models import preprocess_images

    problem = _image_problem(path)
    if problem:
        raise ValueError(problem)
    try:
        return preprocess_images([path], cfg)[0]
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path!r} is too large to decode safely ({str(e).split(',')[0]}); downscale it first, "
                         "e.g. to the model's input size") from e
    except (ValueError, OSError) as e:
        msg = str(e) or type(e).__name__
        raise ValueError(msg if path in msg else f"could not read {path!r} as an image ({msg})") from e


def _check_out_folder(out: str) -> None:
    """Refuse an ``--out`` that cannot become a writable folder, before any work is done."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file, not a folder; give a folder path (created if missing)")
    anc = os.path.abspath(out)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise ValueError(f"--out {out!r} cannot be created: {anc!r} is a file, not a folder; give a folder path "
                         "that is not inside a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r} is not writable ({anc!r} does not allow writing); give a folder you can "
                         "write to, or change its permissions")


def _make_out_folder(out: str) -> None:
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".captum_vit_probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out!r} is not writable ({e.strerror or e}); give a folder you can write to, or "
                         "change its permissions") from e


def _check_json_path(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--json {path!r} is a folder; give the file to write, e.g. "
                         f"{os.path.join(path, 'results.json')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of --json {path!r} ({folder!r}) is not an existing folder; create it first or "
                         "give another path")


def _nonfinite_warning(path: str, logits_ok: bool) -> str:
    if not logits_ok:
        return (f"{path}: the logits are NaN or infinite, so the prediction and the map mean nothing; no overlay "
                "written; check the checkpoint's weights for NaN/inf values and the input scaling")
    return (f"{path}: the map has NaN or infinite values (the logits are finite), so it means nothing; no overlay "
            "written; the model's activations overflow on this image: check the weights and the input scaling")


def explain(  # noqa: PLR0913 - the Python face of `captum-vit explain`: one keyword per flag
    images: List[str],
    model: str,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    target: Optional[int] = None,
    out: str = "captum_vit_out",
    device: str = "cpu",
    batch_size: int = 16,
    method: str = "agcam",
    on_error: str = "raise",
    json_path: Optional[str] = None,
    query: str = "class",
) -> List[dict]:
    """Explain image files with one method; write one overlay PNG per image. Returns one record per image.

    Overlays are named ``<stem>_<method>_class<c>.png`` after the image file; images whose stems
    coincide (``a/img.png``, ``b/img.png``) get distinct names (see :func:`captum_vit.viz.overlay_stems`).
    ``method`` is a short name of :data:`captum_vit.attr.METHODS` (``agcam``, ``rollout``,
    ``lrp``, ``gae``, ``cdam``, ``raw``, ``attnlrp``). Images are explained ``batch_size`` at a time.
    ``query="pooled"`` makes agcam, rollout, raw and gae read the query rows as the model's head
    pools them (average- or attention-pooled ViTs; see :class:`captum_vit.AGCAM`).

    ``on_error="raise"`` stops at the first unreadable image (``ValueError`` naming it);
    ``"skip"`` reports it on stderr, counts it and explains the others. A record whose logits or
    map hold NaN or infinite values has ``"finite": False``, no overlay and a warning on stderr.
    ``json_path``: also write the records, the skipped files and the counts there (NaN as null).
    """
    from captum_vit.attr import METHODS, construct
    from captum_vit.models import load_model
    from captum_vit.viz import overlay_stems

    _check_explain_options(images, out, batch_size, on_error, json_path)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    net, cfg, names = load_model(model, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes,
                                 device=device)
    explainer = construct(METHODS[method], net, query)
    _make_out_folder(out)
    stems = overlay_stems(images)
    records: List[dict] = []
    skipped: List[dict] = []
    for start in range(0, len(images), batch_size):
        batch, idx = [], []
        for j in range(start, min(start + batch_size, len(images))):
            try:
                batch.append(_read_image(images[j], cfg))
            except ValueError as e:
                if on_error == "raise":
                    raise ValueError(f"{e}; fix or remove the file, or pass --on-error skip to explain the other "
                                     "images") from e
                skipped.append({"image": images[j], "error": str(e)})
                print(f"captum-vit explain: skipped {images[j]}: {e}", file=sys.stderr)
                continue
            idx.append(j)
        if batch:
            records += _explain_batch(explainer, batch, [images[j] for j in idx], [stems[j] for j in idx], cfg,
                                      names, target, method, out, device)
    n_bad = sum(not r["finite"] for r in records)
    if json_path is not None:
        _write_json(json_path, {
            "model": model, "checkpoint": checkpoint, "method": method, "target": target, "images": records,
            "skipped": skipped, "n_explained": len(records), "n_skipped": len(skipped), "n_nonfinite": n_bad,
        })
    summary = f"{len(records)} images explained, {len(skipped)} skipped"
    if n_bad:
        summary += f", {n_bad} with NaN or infinite logits or maps (no overlay)"
    print(summary + (f"; wrote {json_path}" if json_path else ""))
    if not records:
        raise ValueError(f"none of the {len(images)} image files could be read (see the messages above); give "
                         "readable image files")
    return records


def _check_explain_options(images: List[str], out: str, batch_size: int, on_error: str,
                           json_path: Optional[str]) -> None:
    """Refuse bad options, and in raise mode missing files and folders, before the model is loaded."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer of at least 1, got {batch_size!r}")
    if not images:
        raise ValueError("no image files given; pass one or more image paths")
    _check_out_folder(out)
    if json_path is not None:
        _check_json_path(json_path)
    if on_error == "raise":
        for path in images:
            problem = _image_problem(path)
            if problem:
                raise ValueError(f"{problem} (or pass --on-error skip to explain the other images)")


def _explain_batch(explainer, batch: list, paths: List[str], stems: List[str], cfg: dict,  # noqa: PLR0913
                   names: Optional[List[str]], target: Optional[int], method: str, out: str, device: str) -> List[dict]:
    """One batch: one forward (the method returns the logits of the forward it explains), a record and an overlay
    per image; a map computed from NaNs must not look like a result, so it gets a flag and a warning instead."""
    import torch

    from captum_vit.viz import denormalise, save_overlay

    x = torch.cat(batch).to(device)
    cams, logits = explainer.attribute(x, target=target, return_logits=True)
    logits = logits.detach().float()
    probs = logits.softmax(-1)
    pred = probs.argmax(-1)
    records = []
    for i, path in enumerate(paths):
        logits_ok = bool(logits[i].isfinite().all())
        finite = logits_ok and bool(cams[i].detach().isfinite().all())
        p = int(pred[i]) if logits_ok else None
        c = p if target is None or int(target) < 0 else int(target)  # negative: the predicted class
        rec = {
            "image": path, "predicted": p, "predicted_name": names[p] if names and p is not None else None,
            "probability": float(probs[i, p]) if p is not None else float("nan"), "target": c,
            "target_probability": float(probs[i, c]) if c is not None else float("nan"),
            "overlay": None, "finite": finite,
        }
        records.append(rec)
        if not finite:
            print(f"captum-vit explain: warning: {_nonfinite_warning(path, logits_ok)}", file=sys.stderr)
            continue
        png = os.path.join(out, f"{stems[i]}_{method}_class{c}.png")
        try:
            save_overlay(png, denormalise(x[i], cfg["mean"], cfg["std"]), cams[i, 0].detach().cpu())
        except OSError as e:
            raise ValueError(f"could not write the overlay {png!r} ({e.strerror or e}); free disk space or give "
                             "another --out folder") from e
        rec["overlay"] = png
        name = f" ({rec['predicted_name']})" if names else ""
        line = f"{path}: predicted class {p}{name}, p={rec['probability']:.3f}"
        if target is not None:
            line += f"; explained class {c}, p={rec['target_probability']:.3f}"
        print(f"{line} -> {png}")
    return records


def _write_json(path: str, data: dict) -> None:
    import json

    from captum_vit.evaluation import json_safe

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2)
    except OSError as e:
        raise ValueError(f"could not write --json {path!r} ({e.strerror or e}); give a file path you can write "
                         "to") from e


def _cmd_explain(a: argparse.Namespace) -> int:
    records = explain(a.images, a.model, a.checkpoint, a.pretrained, a.num_classes, a.target, a.out, a.device,
                      batch_size=a.batch_size, method=a.method, on_error=a.on_error, json_path=a.json,
                      query=a.query)
    # NaN or infinite results were warned about per image; the exit status says so to scripts too
    return 1 if any(not r["finite"] for r in records) else 0


def export(  # noqa: PLR0913 - the Python face of `captum-vit export`: one keyword per flag
    out: str,
    model: str = "shapes_vit",
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    method: str = "agcam",
    opset: int = 17,
    fp16: bool = False,
    cam_image: bool = False,
) -> str:
    """Export a model with an explanation method to ONNX (:func:`captum_vit.onnx.export_onnx`); returns the path."""
    from captum_vit.models import load_model
    from captum_vit.onnx import export_onnx

    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; give the .onnx file to write")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of --out {out!r} does not exist; create {folder!r} first")
    net, cfg, names = load_model(model, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes)
    path = export_onnx(net, out, method=method, data_config=cfg, class_names=names, opset=opset, fp16=fp16,
                       cam_image=cam_image)
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path} ({size:.1f} MB): {method}, input {list(cfg['input_size'])}, opset {opset}"
          + (", fp16" if fp16 else "") + (", with cam_image" if cam_image else ""))
    return path


def _cmd_export(a: argparse.Namespace) -> None:
    export(a.out, a.model, a.checkpoint, a.pretrained, a.num_classes, a.method, a.opset, a.fp16, a.cam_image)


def _cmd_demo(a: argparse.Namespace) -> None:
    from captum_vit.demo import run_demo_from_args

    run_demo_from_args(a)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from captum_vit.evaluation import RunOptions, run_evaluation

    result = run_evaluation(RunOptions.from_args(a))
    if a.report and result["rank"] == 0:  # under torchrun, rank 0 holds the merged store
        from captum_vit.report import run_report_from_args

        run_report_from_args(a, store=a.out, out=os.path.join(a.out, "report.html"))
    # results were written, but some are not numbers: a script must not take the run for a clean one
    return 3 if any(m.get("n_nonfinite") for m in result["methods"].values()) else 0


def _cmd_report(a: argparse.Namespace) -> None:
    from captum_vit.report import run_report_from_args

    run_report_from_args(a)


def build_parser() -> argparse.ArgumentParser:
    from captum_vit.attr import EXPORTABLE_METHODS, METHODS

    parser = argparse.ArgumentParser(
        prog="captum-vit", description="Class-specific explanations for Vision Transformers (AGCAM, Captum)."
    )
    from captum_vit import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="explain image files (AGCAM or another method) and write overlay PNGs")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_args(p)
    p.add_argument("--method", default="agcam", choices=list(METHODS),
                   help="explanation method (default: agcam)")
    p.add_argument("--target", type=int, help="class to explain (default, or negative: the predicted class)")
    p.add_argument("--query", default="class", choices=["class", "pooled"],
                   help="query rows read by agcam, rollout, raw and gae: the [class] token's (default, the papers') "
                        "or 'pooled', weighted as the model's head pools the tokens (average- or MAP-pooled ViTs)")
    p.add_argument("--out", default="captum_vit_out", metavar="DIR",
                   help="output folder, created if missing (default: captum_vit_out)")
    p.add_argument("--batch-size", type=int, default=16, help="images per attribute call (default 16)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="an unreadable image: stop naming the file, or skip it, report it and count it "
                        "(default: raise)")
    p.add_argument("--json", metavar="FILE", help="also write the records (prediction, probabilities, overlay, "
                   "finite), the skipped files and the counts to FILE")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("export", help="export a model with AGCAM (or rollout, raw) to one ONNX graph")
    _add_model_args(p, default="shapes_vit")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--method", default="agcam", choices=list(EXPORTABLE_METHODS),
                   help="explanation method in the graph (default: agcam)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and computation (float32 in and out)")
    p.add_argument("--cam-image", action="store_true",
                   help="add a cam_image output: the map at the input size, min-max normalised")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("evaluate", help="score methods with the localization and ABPC protocols (resumable)")
    from captum_vit.evaluation.options import RunOptions, add_arguments

    add_arguments(p, RunOptions)
    p.add_argument("--report", action="store_true", help="write DIR/report.html at the end (see `captum-vit report`)")
    p.set_defaults(func=_cmd_evaluate)

    from captum_vit.report import add_report_arguments

    p = sub.add_parser("report", help="an evaluation's results as one self-contained HTML page (sortable, filterable)")
    add_report_arguments(p)
    p.set_defaults(func=_cmd_report)

    from captum_vit.demo import add_demo_arguments

    p = sub.add_parser("demo", help="explain held-out synthetic images with the shipped model; gallery + scores")
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        print(f"captum-vit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"captum-vit {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
