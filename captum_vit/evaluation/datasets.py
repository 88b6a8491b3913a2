"""The datasets an evaluation runs on, by name, and what identifies their samples in a store's fingerprint."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["DATASETS", "SHAPES_BENCHMARK", "build_dataset", "collate_for", "describe_dataset"]

#: the held-out shapes benchmark the shipped model is scored on by default
SHAPES_BENCHMARK: Dict[str, Any] = {"split": "single", "seed": 2024, "size": 300}


def _shapes(root: Optional[str], size: int, mean, std, transform: str, on_error: str, **_: Any) -> Any:
    from captum_vit.data import ShapesDataset

    if root is not None:
        raise ValueError("--root does not apply to the synthetic shapes benchmark (it is generated); drop it")
    if transform != "squash":
        raise ValueError("--preprocess does not apply to the synthetic shapes benchmark (generated at the "
                         "model's input size); drop it")
    return ShapesDataset(SHAPES_BENCHMARK["split"], seed=SHAPES_BENCHMARK["seed"], size=SHAPES_BENCHMARK["size"],
                         image_size=size, mean=mean, std=std)


def _annotated(cls_name: str) -> Callable[..., Any]:
    def build(root: Optional[str], size: int, mean, std, transform: str, on_error: str, name: str = "",
              **kwargs: Any) -> Any:
        import captum_vit.data as data

        if root is None:
            raise ValueError(f"--dataset {name} needs --root DIR, the dataset's folder")
        return getattr(data, cls_name)(root, input_size=size, mean=mean, std=std, transform=transform,
                                       on_error=on_error, **kwargs)

    return build


#: dataset name -> builder; the command line's ``--dataset`` choices
DATASETS: Dict[str, Callable[..., Any]] = {
    "shapes": _shapes,
    "imagenet": _annotated("ImageNetVal"),
    "voc": _annotated("VOCSingleClass"),
    "cub": _annotated("CUBTest"),
}


def build_dataset(name: str, root: Optional[str], data_config: Mapping[str, Any], transform: str = "squash",
                  on_error: str = "raise") -> Any:
    """The dataset ``name`` (see :data:`DATASETS`) preprocessed for a model's timm-style data config.

    ``shapes`` is the shipped benchmark (:data:`SHAPES_BENCHMARK`, no ``root``); the real-image
    datasets need ``root`` and are squashed to the model's input size, as the protocol requires
    (``transform="resize_crop"``: timm's resize and center crop, boxes moved to match).
    ``on_error="skip"`` skips and counts unreadable images and annotations instead of raising.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    mean = tuple(data_config.get("mean", (0.5,) * 3))
    std = tuple(data_config.get("std", (0.5,) * 3))
    size = int(tuple(data_config.get("input_size", (3, 224, 224)))[-1])
    kwargs: Dict[str, Any] = {}
    if transform == "resize_crop":
        kwargs.update(crop_pct=float(data_config.get("crop_pct", 0.875)),
                      interpolation=str(data_config.get("interpolation", "bicubic")))
    return DATASETS[name](root, size, mean, std, transform, on_error, name=name, **kwargs)


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


def collate_for(dataset: Any) -> Callable:
    from captum_vit.data import ShapesDataset, collate, collate_annotated

    return collate if isinstance(dataset, ShapesDataset) else collate_annotated
