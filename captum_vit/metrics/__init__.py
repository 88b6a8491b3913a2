"""Evaluation metrics: tensors in, numbers out; they know nothing of attribution methods."""

from .localization import (
    METRIC_NAMES,
    binarize,
    boxes_to_mask,
    boxes_touch_instances,
    contour_boxes,
    evaluate_localization,
    instances_touched,
    localization_metrics,
    mass_inside,
    mean,
    minmax_normalize,
    predict_boxes,
    scale_boxes,
    upsample,
)

__all__ = [
    "METRIC_NAMES",
    "binarize",
    "boxes_to_mask",
    "boxes_touch_instances",
    "contour_boxes",
    "evaluate_localization",
    "instances_touched",
    "localization_metrics",
    "mass_inside",
    "mean",
    "minmax_normalize",
    "predict_boxes",
    "scale_boxes",
    "upsample",
]
