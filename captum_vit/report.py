r"""Evaluation report: one self-contained HTML page from a result store.

:func:`build_report` reads the store that :func:`captum_vit.evaluation.evaluate` wrote and writes one
HTML file that opens from the file system in any browser: no server, no network, no external
scripts, styles or fonts; the pictures are WebP ``data:`` URIs and the page's data is one inline
JSON object.

The page holds the per-image scores of *every* image in the store (sortable and filterable in the
browser) but pictures only for a bounded selection, so that a run of 50,000 images does not make a
50,000-picture page: for every method and every score, the ``per_score`` images with the lowest and
the ``per_score`` with the highest value, plus a seeded random sample of ``sample`` images. The
pictures are rebuilt from the dataset the store's fingerprint describes (images are not stored);
the maps come from the store (``map_pred``, and ``map_label`` where the prediction is wrong), drawn
as the localization protocol sees them: upsampled bilinearly to the input size, min-max normalised,
with the contour boxes of the map thresholded at the run's threshold.

With ``pairs > 0`` (synthetic shapes stores only) the page gets a two-class section: images of the
``"pairs"`` split, each explained by every method for each of its two classes, computed here with
the model the store names (its weights are checked against the store's fingerprint).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from captum_vit.evaluation.schema import METRICS, json_safe, summary
from captum_vit.evaluation.store import STORE_NAME, load_store

if TYPE_CHECKING:
    import torch

__all__ = ["SCORES", "ReportError", "build_report", "select_pictures", "add_report_arguments", "run_report_from_args"]

#: every per-image score the page can show: column -> (label, which end is better: "hi" or "lo")
SCORES: Dict[str, Tuple[str, str]] = {m.key: (m.label, m.better) for m in METRICS}
_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.html")
_CMAP = "jet"  # the colour scale of captum_vit.viz
_ALPHA = 0.5  # the overlay weight of captum_vit.viz.overlay


class ReportError(ValueError):
    """The report cannot be made from these inputs (the message names the problem and the fix)."""


# -- selection --------------------------------------------------------------------------------
def select_pictures(scores: Mapping[str, Mapping[str, np.ndarray]], n_images: int, per_score: int,
                    sample: int, seed: int = 0) -> np.ndarray:
    r"""Row positions (sorted) of the images that get pictures.

    For every method and score column, the ``per_score`` rows with the lowest and the ``per_score``
    with the highest finite value (ties broken by row order), plus ``sample`` rows drawn at random
    with ``seed``. At most ``methods * scores * 2 * per_score + sample`` rows, whatever ``n_images``.
    """
    chosen = set()
    for cols in scores.values():
        for v in cols.values():
            finite = np.flatnonzero(np.isfinite(v))
            if per_score > 0 and len(finite):
                order = finite[np.argsort(v[finite], kind="stable")]
                chosen.update(order[:per_score].tolist())
                chosen.update(order[-per_score:].tolist())
    if sample > 0 and n_images:
        rng = np.random.default_rng(seed)
        chosen.update(rng.choice(n_images, size=min(sample, n_images), replace=False).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


# -- pictures ---------------------------------------------------------------------------------
def _webp(rgb: np.ndarray, quality: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="WEBP", quality=quality, method=4)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat(grid_map: np.ndarray, size: Tuple[int, int], threshold: float) -> Tuple[str, List[List[int]]]:
    """The map as the protocol sees it (upsampled, min-max), coloured; and its contour boxes."""
    import torch

    from captum_vit.metrics import contour_boxes, minmax_normalize, upsample
    from captum_vit.viz import colorize

    m = torch.from_numpy(np.nan_to_num(np.asarray(grid_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0))
    m01 = minmax_normalize(upsample(m[None, None], size))[0, 0]
    boxes = contour_boxes(m01 > threshold).tolist()
    rgb = np.clip(np.rint(colorize(m01.numpy(), _CMAP) * 255.0), 0, 255).astype(np.uint8)
    return _webp(rgb, 70), boxes


class _Images:
    """The store's images, rebuilt from the dataset its fingerprint describes."""

    def __init__(self, fingerprint: Mapping[str, Any], run: Mapping[str, Any]) -> None:
        from captum_vit.data import ShapesDataset
        from captum_vit.evaluation import build_dataset, describe_dataset

        desc = dict(fingerprint.get("dataset", {}))
        self.desc = desc
        if desc.get("class") == "ShapesDataset":
            ds = ShapesDataset(desc["split"], seed=desc["seed"], size=desc["length"], image_size=desc["image_size"],
                               mean=desc["mean"], std=desc["std"])
        else:
            if not run.get("dataset") or not run.get("root"):
                raise ReportError("the store does not name the dataset's folder (it was written through the Python "
                                  "API without run information)")
            cfg = {"mean": desc.get("mean"), "std": desc.get("std"), "input_size": (3, desc["input_size"],
                                                                                    desc["input_size"]),
                   "crop_pct": desc.get("crop_pct") or 0.875, "interpolation": desc.get("interpolation", "bicubic")}
            ds = build_dataset(run["dataset"], run["root"], cfg, transform=desc.get("transform", "squash"),
                               on_error=desc.get("on_error", "raise"))
        now = json.loads(json.dumps(describe_dataset(ds), sort_keys=True))
        if now != json.loads(json.dumps(desc, sort_keys=True)):
            differ = sorted(k for k in set(now) | set(desc) if now.get(k) != desc.get(k))
            raise ReportError(f"the dataset found now differs from the one the run used (in {', '.join(differ)})")
        self.ds = ds
        self.classes = list(getattr(ds, "classes", []) or [])

    def get(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(image uint8 [H, W, 3] as the model saw it, ground-truth boxes [k, 4])``."""
        from captum_vit.data import ShapesDataset

        if isinstance(self.ds, ShapesDataset):
            r = self.ds.raw(int(index))
            return r["image_uint8"], np.asarray(r["boxes"]).reshape(-1, 4)
        from captum_vit.viz import denormalise

        s = self.ds[int(index)]
        if s is None:
            raise ReportError(f"image {index} of the dataset cannot be read now")
        return denormalise(s["image"], self.desc["mean"], self.desc["std"]), np.asarray(s["boxes"]).reshape(-1, 4)


# -- the two-class section ---------------------------------------------------------------------
def _registered_class(name: str, path: Any) -> type:
    """The package's own attribution class a store names under ``name``; nothing else is imported.

    A store is a file anyone may have edited: its class paths are only compared with the registered
    classes, never imported, so an edited store cannot make the report run code of its choosing.
    """
    from captum_vit.attr import METHODS

    cls = METHODS.get(name)
    if cls is None:
        raise ReportError(f"--pairs: the store's method entry {name!r} -> {path!r} is not one of captum-vit's "
                          f"methods ({', '.join(METHODS)}); the store was edited or written by another program: "
                          "drop --pairs or evaluate again")
    registered = f"{cls.__module__}.{cls.__qualname__}"
    if path != registered:
        raise ReportError(f"--pairs: the store's method entry {name!r} -> {path!r} is not the registered class "
                          f"{registered!r}; the store was edited or written by another version of captum-vit: "
                          "drop --pairs or evaluate again")
    return cls


def _pairs(fingerprint: Mapping[str, Any], run: Mapping[str, Any], methods: Sequence[str], n: int,
           threshold: float, model: Optional[torch.nn.Module]) -> List[Dict[str, Any]]:
    import torch

    from captum_vit.data import ShapesDataset
    from captum_vit.evaluation import weights_fingerprint

    stored = fingerprint.get("methods", {})
    classes = {name: _registered_class(name, stored.get(name)) for name in methods}  # before any work
    desc = fingerprint.get("dataset", {})
    if desc.get("class") != "ShapesDataset":
        raise ReportError("--pairs needs a store of the synthetic shapes benchmark (its two-class split has the same "
                          f"classes); this store's dataset is {desc.get('class')!r}: drop --pairs")
    if model is None:
        from captum_vit.models import load_model

        if not run.get("model"):
            raise ReportError("--pairs needs the model that wrote the store, and the store does not name it (written "
                              "through the Python API); drop --pairs")
        model, _, _ = load_model(run["model"], checkpoint=run.get("checkpoint"))
    if weights_fingerprint(model) != fingerprint.get("weights_sha256"):
        raise ReportError("--pairs: the model named in the store no longer has the weights that wrote it (checkpoint "
                          f"{run.get('checkpoint')!r} changed?); drop --pairs or restore the checkpoint")
    ds = ShapesDataset("pairs", seed=desc["seed"], size=int(n), image_size=desc["image_size"], mean=desc["mean"],
                       std=desc["std"])
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    labels = torch.tensor([list(ds[i]["label"]) for i in range(len(ds))])  # [n, 2] sorted class pairs
    with torch.no_grad():
        probs = model(x).float().softmax(-1)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    rows: List[Dict[str, Any]] = []
    for i in range(len(ds)):
        r = ds.raw(i)
        gt = [np.asarray(r["boxes"])[np.asarray(r["instance_labels"]) == int(c)].tolist() for c in labels[i]]
        rows.append({"img": _webp(r["image_uint8"], 85), "hw": list(size), "classes": labels[i].tolist(),
                     "prob": [round(float(probs[i, c]), 4) for c in labels[i]], "pred": int(probs[i].argmax()),
                     "prob_pred": round(float(probs[i].max()), 4), "gt": gt, "m": {}})
    for name in methods:
        explainer = classes[name](model)
        maps = [explainer.attribute(x, target=labels[:, k]).detach().float().cpu() for k in range(2)]
        for i, row in enumerate(rows):
            row["m"][name] = []
            for k in range(2):
                heat, boxes = _heat(maps[k][i, 0].numpy(), size, threshold)
                row["m"][name].append({"heat": heat, "boxes": boxes})
    return rows


# -- the page ---------------------------------------------------------------------------------
def _column_json(v: np.ndarray, digits: int = 4) -> str:
    return "[" + ",".join("null" if not math.isfinite(x) else repr(round(x, digits)) for x in v.tolist()) + "]"


# Characters that may not appear raw in JSON inside <script>: "<" could start "</script>" or "<!--" (which
# changes how the HTML parser looks for the script's end), ">" and "&" for good measure, and U+2028/U+2029,
# line terminators to older JavaScript engines. Each only occurs inside JSON strings, where a \u escape
# stands for the same character, so the parsed data is unchanged.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")
_PLACEHOLDERS = re.compile(r"__TITLE__|/\*__DATA__\*/null")


def _script_json(text: str) -> str:
    """JSON text made safe to place inside an inline ``<script>``: no string in it can end or alter the script."""
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group(0)], text)


def _fill_template(page: str, title: str, data: str) -> str:
    """The page with its title (HTML-escaped) and data (script-safe JSON) in place.

    One pass over the template: a title or data string that contains a placeholder's text is not
    substituted again.
    """
    values = {"__TITLE__": html.escape(title), "/*__DATA__*/null": _script_json(data)}
    return _PLACEHOLDERS.sub(lambda m: values[m.group(0)], page)


def _check_out(out: str) -> None:
    if os.path.isdir(out):
        example = os.path.join(out, "report.html")
        raise ReportError(f"--out {out!r} is a folder; give the .html file to write (e.g. {example!r})")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ReportError(f"the folder of --out {out!r} does not exist; create {folder!r} first")


def build_report(  # noqa: PLR0913 - the Python face of `captum-vit report`: one keyword per flag
    store: str,
    out: str,
    per_score: int = 3,
    sample: int = 24,
    seed: int = 0,
    pairs: int = 0,
    model: Optional[torch.nn.Module] = None,
    title: Optional[str] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    r"""Write the HTML report of a result store; returns facts about it.

    Args:
        store (str): the store file, or the folder holding ``results.h5``.
        out (str): the HTML file to write (its folder must exist).
        per_score (int, optional): pictures for the lowest and highest ``per_score`` images of each
            score and method. Default: 3
        sample (int, optional): plus this many images drawn at random (``seed``). Default: 24
        seed (int, optional): seed of the random sample. Default: 0
        pairs (int, optional): images of the shapes ``"pairs"`` split explained for each of their
            two classes (shapes stores only; needs the model). Default: 0
        model (nn.Module, optional): the model for ``pairs``; default: the one the store names.
        title (str, optional): the page title.
        warn (callable, optional): called with a message when the run is incomplete or the
            pictures cannot be made. Default: print to stderr.

    Returns:
        dict: ``path``, ``bytes``, ``n_images`` (rows in the store), ``n_total`` (images the run was
        asked for), ``complete``, ``n_pictures``, ``pictures`` (dataset indices with pictures),
        ``n_pairs``, ``notes``.

    Raises:
        FileNotFoundError: no store there.
        StoreVersionError, StoreCorruptError: from :func:`captum_vit.evaluation.load_store`.
        ReportError: bad options (e.g. ``out`` is a folder).
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if int(per_score) < 0 or int(sample) < 0 or int(pairs) < 0:
        raise ReportError("--per-score, --sample and --pairs must be 0 or more")
    _check_out(out)
    v = _read_store(store, int(per_score), int(sample), int(seed))
    notes: List[str] = []
    n_images = int(len(v.index))
    n_total = int(v.attrs.get("n_total", n_images))
    # complete: every image was computed or counted as skipped (unreadable under --on-error skip)
    complete = bool(v.attrs.get("complete", False)) and n_images + v.n_skipped >= n_total
    if not complete:
        warn(f"the run is incomplete: {n_images} of {n_total} images in the store; the report shows what it holds")
    threshold = float(v.fp.get("threshold", 0.5))
    classes, pics = _pictures(v, threshold, notes, warn)
    pair_rows = _pairs(v.fp, v.run, v.methods, int(pairs), threshold, model) if pairs else []

    from captum_vit import __version__
    from captum_vit.viz import colorize

    jet = ["#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)
           for rgb in colorize(np.linspace(0, 1, 11)[None], _CMAP)[0]]
    dataset_name = v.run.get("dataset") or v.fp.get("dataset", {}).get("class", "dataset")
    model_name = v.run.get("model") or v.fp.get("model", "model").rsplit(".", 1)[-1]
    title = title or f"captum-vit report: {dataset_name}, {model_name}"
    meta = {
        "title": title, "methods": v.methods, "classes": classes, "n_images": n_images, "n_total": n_total,
        "complete": complete, "threshold": threshold, "alpha": _ALPHA, "jet": jet,
        "scores": [{"key": c, "label": SCORES[c][0], "better": SCORES[c][1],
                    "group": next(m.group for m in METRICS if m.key == c)} for c in v.scores[v.methods[0]]],
        "per_score": int(per_score), "sample": int(sample), "seed": int(seed), "n_pictures": len(pics),
        "has_maps": v.has_maps, "notes": notes, "version": __version__,
        "store_version": v.attrs.get("captum_vit_version", "unknown"), "run": v.run,
        "dataset": v.fp.get("dataset", {}),
        "accuracy": float((v.first["label"] == v.first["pred"]).mean()) if n_images else None,
    }
    with open(_TEMPLATE, encoding="utf-8") as f:
        page = _fill_template(f.read(), title, _page_data(v, meta, pics, pair_rows))
    tmp = out + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return {"path": out, "bytes": os.path.getsize(out), "n_images": n_images, "n_total": n_total,
            "complete": complete, "n_pictures": len(pics), "pictures": sorted(int(k) for k in pics),
            "n_pairs": len(pair_rows), "notes": notes}


@dataclass
class _StoreView:
    """What the page shows of a store: the rows every method holds, their scores, the picked maps."""

    fp: Dict[str, Any]
    attrs: Dict[str, Any]
    run: Dict[str, Any]
    methods: List[str]
    summary: Dict[str, Any]
    index: np.ndarray  # dataset indices every method holds, sorted
    first: Dict[str, np.ndarray]  # the first method's rows (labels, predictions, probabilities)
    scores: Dict[str, Dict[str, np.ndarray]]
    picks: np.ndarray  # positions in ``index`` that get pictures
    maps: Dict[str, Dict[str, np.ndarray]]
    has_maps: bool
    n_skipped: int


def _read_store(store: str, per_score: int, sample: int, seed: int) -> _StoreView:
    with load_store(store) as rs:
        fp, attrs = rs.fingerprint, dict(rs.attrs)
        methods = list(rs.methods)  # the run's order, as in its evaluate table
        rows = {m: rs.read(m, maps=False) for m in methods}
        index = rows[methods[0]]["index"]
        for m in methods[1:]:
            index = np.intersect1d(index, rows[m]["index"])
        rows = {m: {c: v[np.isin(r["index"], index)] for c, v in r.items()} for m, r in rows.items()}
        score_cols = [c for c in SCORES if c in rows[methods[0]]]
        scores = {m: {c: rows[m][c] for c in score_cols} for m in methods}
        picks = select_pictures(scores, len(index), per_score, sample, seed)
        # the map columns of the picked rows only: a large store is never read whole
        maps = {m: rs.read_maps(m, index[picks]) for m in methods} if rs.maps and len(picks) else {}
        return _StoreView(fp=fp, attrs=attrs, run=json.loads(attrs.get("run", "{}") or "{}"), methods=methods,
                          summary=summary(rs, list(fp.get("metrics", []))), index=index, first=rows[methods[0]],
                          scores=scores, picks=picks, maps=maps, has_maps=bool(rs.maps), n_skipped=len(rs.skipped()))


def _pictures(v: _StoreView, threshold: float, notes: List[str],
              warn: Callable[[str], None]) -> Tuple[List[str], Dict[str, Any]]:
    """The class names and the picked images with each method's overlays (both maps where the prediction is wrong)."""
    try:
        images = _Images(v.fp, v.run)
    except (ReportError, FileNotFoundError, OSError, ValueError, KeyError) as e:
        notes.append(f"No pictures: the images could not be rebuilt ({e}); the scores are all here.")
        warn(notes[-1])
        return [], {}
    pics: Dict[str, Any] = {}
    for k, p in enumerate(v.picks.tolist()):
        img, gt = images.get(int(v.index[p]))
        size = (int(img.shape[0]), int(img.shape[1]))
        entry: Dict[str, Any] = {"img": _webp(img, 85), "hw": list(size), "gt": gt.tolist(), "m": {}}
        wrong = int(v.first["label"][p]) != int(v.first["pred"][p])
        for m in v.methods if v.has_maps else ():
            heat, boxes = _heat(v.maps[m]["map_pred"][k].astype(np.float32), size, threshold)
            cell = {"heat": heat, "boxes": boxes}
            if wrong:
                heat, boxes = _heat(v.maps[m]["map_label"][k].astype(np.float32), size, threshold)
                cell.update(heat_label=heat, boxes_label=boxes)
            entry["m"][m] = cell
        pics[str(int(v.index[p]))] = entry
    if not v.has_maps:
        notes.append("The run kept no maps (--no-maps): the pictures show the images and their boxes only.")
    return images.classes, pics


def _page_data(v: _StoreView, meta: Mapping[str, Any], pics: Mapping[str, Any], pair_rows: List[Any]) -> str:
    """The page's data as one JSON object (columns written compactly, NaN as null)."""
    parts = [
        '{"meta":', json.dumps(json_safe(meta), allow_nan=False),
        ',"summary":', json.dumps(json_safe(v.summary), allow_nan=False),
        ',"idx":', _column_json(v.index.astype(np.float64), 0).replace(".0", ""),
        ',"y":', json.dumps(v.first["label"].tolist()),
        ',"p":', json.dumps(v.first["pred"].tolist()),
        ',"pp":', _column_json(v.first["prob_pred"]),
        ',"pl":', _column_json(v.first["prob_label"]),
        ',"scores":{',
        ",".join(json.dumps(m) + ":{" + ",".join(json.dumps(c) + ":" + _column_json(col) for c, col in cols.items())
                 + "}" for m, cols in v.scores.items()),
        '},"pics":', json.dumps(pics),
        ',"pairs":', json.dumps(json_safe(pair_rows)), "}",
    ]
    return "".join(parts)


# -- command line -----------------------------------------------------------------------------
def add_report_arguments(parser: Any) -> Any:
    """Add the report's options to an argparse parser."""
    parser.add_argument("store", metavar="STORE", help=f"an evaluation's --out folder (or its {STORE_NAME})")
    parser.add_argument("--out", default="report.html", metavar="FILE.html",
                        help="the HTML file to write (default: report.html)")
    parser.add_argument("--per-score", type=int, default=3, metavar="N",
                        help="pictures for the N lowest and N highest images of every score and method (default 3)")
    parser.add_argument("--sample", type=int, default=24, metavar="K",
                        help="plus K images drawn at random for pictures (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help="shapes stores: add N images of the two-class split, each method's map for each of "
                             "the two classes, computed with the store's model (default 0)")
    return parser


def run_report_from_args(a: Any, store: Optional[str] = None, out: Optional[str] = None) -> Dict[str, Any]:
    """Build the report from parsed arguments and print where it went."""
    info = build_report(store or a.store, out or a.out, per_score=getattr(a, "per_score", 3),
                        sample=getattr(a, "sample", 24), seed=getattr(a, "seed", 0), pairs=getattr(a, "pairs", 0))
    state = "" if info["complete"] else f", INCOMPLETE run ({info['n_images']} of {info['n_total']} images)"
    print(f"wrote {info['path']} ({info['bytes'] / 2**20:.1f} MB): {info['n_images']} images scored, pictures for "
          f"{info['n_pictures']}" + (f", {info['n_pairs']} two-class images" if info["n_pairs"] else "") + state)
    return info
