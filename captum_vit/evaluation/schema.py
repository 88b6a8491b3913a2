"""One schema for every metric the evaluation reports: its key, label, group and which end is better.

The per-image store columns, the summary, the markdown table, the JSON files, the demo's table and
the report page all read their names from :data:`METRICS`, so a metric has one name everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

__all__ = ["METRICS", "METRIC_GROUPS", "Metric", "format_markdown", "json_safe", "summarise", "summary"]


@dataclass(frozen=True)
class Metric:
    """One score: ``key`` (store column, summary and JSON name), ``label`` (tables, the report),
    ``short`` (narrow column headers), ``group`` (the metric group that computes it) and
    ``better`` (``"hi"`` or ``"lo"``: which end is better)."""

    key: str
    label: str
    short: str
    group: str
    better: str
    fmt: str = ".4f"


METRICS: Tuple[Metric, ...] = (
    Metric("pixel_accuracy", "pixel acc", "pix.acc", "localization", "hi"),
    Metric("iou", "IoU", "IoU", "localization", "hi"),
    Metric("dice", "Dice", "Dice", "localization", "hi"),
    Metric("precision", "precision", "prec.", "localization", "hi"),
    Metric("recall", "recall", "recall", "localization", "hi"),
    Metric("auc_lerf", "LeRF AUC", "LeRF", "abpc", "hi"),
    Metric("auc_morf", "MoRF AUC", "MoRF", "abpc", "lo"),
    Metric("abpc", "ABPC", "ABPC", "abpc", "hi"),
    Metric("texture_collapse", "texture collapse", "texture", "diagnostics", "lo"),
    Metric("entropy", "map entropy", "entropy", "diagnostics", "lo"),
    Metric("mass_outside", "mass outside", "outside", "diagnostics", "lo"),
    Metric("insensitivity", "insensitivity (Spearman)", "insens.", "diagnostics", "lo"),
    Metric("prob_drop", "prob. drop, top 20% removed", "p.drop", "diagnostics", "hi"),
)
_BY_KEY = {m.key: m for m in METRICS}

#: metric group -> the per-image columns it stores, in the schema's order
METRIC_GROUPS: Dict[str, List[str]] = {}
for _m in METRICS:
    METRIC_GROUPS.setdefault(_m.group, []).append(_m.key)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``None`` and numpy scalars as Python ones, for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return json_safe(obj.item())
    return obj


def summarise(rows_by_method: Mapping[str, Mapping[str, np.ndarray]], groups: Sequence[str],
              only_correct: bool = True) -> Dict[str, Dict]:
    """Each method's means over its finite rows (localization: the correctly classified ones, or every
    image when ``only_correct`` is False).

    ``rows_by_method`` maps a method to its store rows (``{column: array}``, as
    :meth:`ResultStore.read` returns them).
    """
    out: Dict[str, Dict[str, Any]] = {}
    for m, rows in rows_by_method.items():
        finite = rows["finite"].astype(bool)
        correct = ((rows["label"] == rows["pred"]) | (not only_correct)) & finite
        s: Dict[str, Any] = {"n_images_total": int(len(rows["index"])), "n_nonfinite": int((~finite).sum())}
        if "localization" in groups:
            s["n_images"] = int(correct.sum())
            for c in METRIC_GROUPS["localization"]:
                s[c] = float(rows[c][correct].mean()) if correct.any() else float("nan")
        for g in ("abpc", "diagnostics"):
            if g in groups:
                if g == "abpc":
                    s["n_images_abpc"] = int(finite.sum())
                for c in METRIC_GROUPS[g]:
                    s[c] = float(rows[c][finite].mean()) if finite.any() else float("nan")
        out[m] = s
    return out


def summary(store: Any, groups: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Each method's means over the rows of a :class:`~captum_vit.evaluation.store.ResultStore`
    (see :func:`summarise`)."""
    return summarise({m: store.read(m, maps=False) for m in store.methods}, groups,
                     only_correct=not store.fingerprint.get("localize_all", False))


def format_markdown(result: Mapping[str, Any], title: str = "") -> str:
    """A markdown table shaped like the AGCAM paper's: one row per metric, one column per method."""
    methods = list(result["methods"])
    present = [m for m in METRICS if any(m.key in result["methods"][name] for name in methods)]

    def cell(v: Any, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [f"| {title} | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {m.label} | " + " | ".join(cell(result["methods"][name].get(m.key), m.fmt) for name in methods)
              + " |" for m in present]
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


def metric(key: str) -> Metric:
    """The schema entry of ``key``."""
    return _BY_KEY[key]
