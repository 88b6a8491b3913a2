"""The papers' evaluations: the runner, the crash-safe result store, the datasets by name and one metric schema.

One job per module: :mod:`~captum_vit.evaluation.runner` (prepare, fingerprint, run this process's
batches, merge), :mod:`~captum_vit.evaluation.store` (the per-image results on disk),
:mod:`~captum_vit.evaluation.schema` (every metric's name, label and better end; the summary and
the table), :mod:`~captum_vit.evaluation.datasets` (the datasets by name) and
:mod:`~captum_vit.evaluation.options` (the options, spelled once).
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use, so that the command line's --help needs no torch
    from captum_vit.evaluation.datasets import DATASETS, SHAPES_BENCHMARK, build_dataset, describe_dataset
    from captum_vit.evaluation.options import EvalOptions, RunOptions
    from captum_vit.evaluation.runner import (
        INSENSITIVITY_FRACTION,
        EvaluationInterrupted,
        evaluate,
        fingerprint,
        run_evaluation,
        weights_fingerprint,
    )
    from captum_vit.evaluation.schema import METRIC_GROUPS, METRICS, Metric, format_markdown, json_safe, summary
    from captum_vit.evaluation.store import (
        STORE_NAME,
        ResultStore,
        StoreCorruptError,
        StoreLockedError,
        StoreMismatchError,
        StoreVersionError,
        StoreWriteError,
        load_store,
    )

_WHERE = {
    **dict.fromkeys(["DATASETS", "SHAPES_BENCHMARK", "build_dataset", "describe_dataset"], "datasets"),
    **dict.fromkeys(["EvalOptions", "RunOptions"], "options"),
    **dict.fromkeys(["INSENSITIVITY_FRACTION", "EvaluationInterrupted", "evaluate", "fingerprint",
                     "run_evaluation", "weights_fingerprint"], "runner"),
    **dict.fromkeys(["METRIC_GROUPS", "METRICS", "Metric", "format_markdown", "json_safe", "summary"], "schema"),
    **dict.fromkeys(["STORE_NAME", "ResultStore", "StoreCorruptError", "StoreLockedError", "StoreMismatchError",
                     "StoreVersionError", "StoreWriteError", "load_store"], "store"),
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"captum_vit.evaluation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'captum_vit.evaluation' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "INSENSITIVITY_FRACTION",
    "METRICS",
    "METRIC_GROUPS",
    "SHAPES_BENCHMARK",
    "STORE_NAME",
    "EvalOptions",
    "EvaluationInterrupted",
    "Metric",
    "ResultStore",
    "RunOptions",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreVersionError",
    "StoreWriteError",
    "build_dataset",
    "describe_dataset",
    "evaluate",
    "fingerprint",
    "format_markdown",
    "json_safe",
    "load_store",
    "run_evaluation",
    "summary",
    "weights_fingerprint",
]
