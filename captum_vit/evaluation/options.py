"""The evaluation's options, spelled once: the command line, the runner and the fingerprint read them here.

:class:`EvalOptions` holds what :func:`~captum_vit.evaluation.evaluate` takes;
:class:`RunOptions` adds what :func:`~captum_vit.evaluation.run_evaluation` needs to load a model
and a dataset by name and write files. Each field's ``metadata`` carries its command-line flag and
help, so :func:`add_arguments` builds the parser from the fields, and :meth:`EvalOptions.identity`
gives the options that identify results (they join the store's fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, TypeVar

from captum_vit.evaluation.datasets import DATASETS
from captum_vit.evaluation.schema import METRIC_GROUPS

__all__ = ["EvalOptions", "RunOptions", "add_arguments", "parse_list"]

_Options = TypeVar("_Options", bound="EvalOptions")


def parse_list(value: Any) -> Tuple[str, ...]:
    """``"a,b"``, ``["a", "b,c"]`` or a tuple -> ``("a", "b", "c")`` (blank items dropped)."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(v.strip() for item in items for v in str(item).split(",") if v.strip())


def _cli(flag: str, help: str, **kw: Any) -> Dict[str, Any]:
    return {"flag": flag, "help": help, **kw}


@dataclass
class EvalOptions:
    """The options of one evaluation (see :func:`captum_vit.evaluation.evaluate`)."""

    metrics: Tuple[str, ...] = field(default=("localization", "abpc", "diagnostics"), metadata=_cli(
        "--metrics", "comma-separated metric groups (default: localization,abpc,diagnostics)", list=True))
    batch_size: int = field(default=16, metadata=_cli("--batch-size", "images per attribute call (default 16)"))
    threshold: float = field(default=0.5, metadata=_cli(
        "--threshold", "localization threshold in [0, 1] (default 0.5)"))
    limit: Optional[int] = field(default=None, metadata=_cli("--limit", "evaluate only the first N images",
                                                             type=int))
    keep_maps: bool = field(default=True, metadata=_cli(
        "--no-maps", "do not keep each image's maps in the store (smaller; reports then show scores without "
        "pictures)", negate=True))
    query: str = field(default="class", metadata=_cli(
        "--query", "query rows read by agcam, rollout, raw and gae: 'class' (the [class] token's, the papers' "
        "definition) or 'pooled' (weighted as the model's head pools the tokens, for average- or "
        "attention-pooled ViTs)", choices=("class", "pooled")))
    workers: int = field(default=0, metadata=_cli("--workers", "DataLoader processes loading images (default 0)"))
    progress: bool = field(default=True, metadata=_cli("--no-progress", "hide the progress bar", negate=True))
    abpc_batch_size: int = 64  # perturbed copies per model call in ABPC (not on the command line)
    # the protocol localizes correctly classified images only; False scores every image (the demo's option)
    only_correct: bool = True

    def __post_init__(self) -> None:
        self.metrics = parse_list(self.metrics)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad option and its fix."""
        unknown = [g for g in self.metrics if g not in METRIC_GROUPS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric group(s) {unknown or list(self.metrics)}; choose from "
                             f"{list(METRIC_GROUPS)}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if int(self.workers) < 0:
            raise ValueError(f"workers {self.workers} must be 0 or more")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold {self.threshold} is outside [0, 1] (maps are min-max normalised first)")
        if self.query not in ("class", "pooled"):
            raise ValueError(f"query {self.query!r} must be 'class' or 'pooled'")
        if self.limit is not None and int(self.limit) < 1:
            raise ValueError(f"limit {self.limit} must be at least 1")

    def identity(self) -> Dict[str, Any]:
        """The options that identify the results (the store's fingerprint holds them)."""
        ident = {"metrics": list(self.metrics), "threshold": float(self.threshold), "keep_maps": bool(self.keep_maps)}
        if not self.only_correct:
            ident["localize_all"] = True
        if self.query != "class":
            ident["query"] = self.query
        return ident

    def columns(self) -> list:
        """The per-image score columns the selected metric groups store, in the schema's order."""
        return [c for g in METRIC_GROUPS for c in METRIC_GROUPS[g] if g in self.metrics]

    def replace(self: _Options, **changes: Any) -> _Options:
        return dataclasses.replace(self, **changes)


@dataclass
class RunOptions(EvalOptions):
    """:class:`EvalOptions` plus the model, the dataset and the files of a run by name (the command line's)."""

    dataset: str = field(default="shapes", metadata=_cli(
        "--dataset", "shapes: the shipped held-out benchmark (seed 2024, 300 images); the others need --root "
        "(default: shapes)", choices=tuple(DATASETS)))
    root: Optional[str] = field(default=None, metadata=_cli("--root", "the dataset's folder (imagenet, voc, cub)",
                                                            metavar="DIR"))
    methods: Tuple[str, ...] = field(default=("agcam", "rollout", "lrp"), metadata=_cli(
        "--methods", "comma-separated method names (default: agcam,rollout,lrp, the AGCAM paper's columns)",
        list=True))
    model: str = field(default="shapes_vit", metadata=_cli(
        "--model", "timm model name or shapes_vit (default: shapes_vit)"))
    checkpoint: Optional[str] = field(default=None, metadata=_cli(
        "--checkpoint", "state-dict file, loaded with weights_only=True", metavar="FILE"))
    device: str = field(default="cpu", metadata=_cli("--device", "torch device (default: cpu)"))
    preprocess: str = field(default="squash", metadata=_cli(
        "--preprocess", "squash: resize to the input size, the papers' protocol; resize_crop: timm's resize and "
        "center crop, boxes moved to match (default: squash)", choices=("squash", "resize_crop")))
    on_error: str = field(default="raise", metadata=_cli(
        "--on-error", "an unreadable image or annotation: stop naming the file, or skip it and count it "
        "(default: raise)", choices=("raise", "skip")))
    out: str = field(default="captum_vit_eval", metadata=_cli(
        "--out", "folder for results.h5 (resumed when present), table.md, results.json (default: captum_vit_eval)",
        metavar="DIR"))
    json_path: Optional[str] = field(default=None, metadata=_cli(
        "--json", "where to write the JSON (default: DIR/results.json)", metavar="FILE"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = parse_list(self.methods)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """The options :func:`add_arguments` parsed."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_arguments(parser: argparse.ArgumentParser, cls: type = RunOptions,
                  skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add one flag per field of ``cls`` that has command-line metadata (the defaults are the fields')."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "flag" not in meta or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta.get("negate"):
            parser.add_argument(meta["flag"], dest=f.name, action="store_false", help=meta["help"])
            continue
        kw: Dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": default}
        if meta.get("list"):
            kw["default"] = ",".join(default or ())
        elif "choices" in meta:
            kw["choices"] = list(meta["choices"])
        else:
            kw["type"] = meta.get("type") or (type(default) if default is not None else str)
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        parser.add_argument(meta["flag"], **kw)
    return parser
