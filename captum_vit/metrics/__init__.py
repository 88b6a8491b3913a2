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
from .perturbation import (
    ABPC_FRACTIONS,
    abpc,
    deletion_insertion,
    gaussian_blur,
    perturbation_curves,
    pixel_ranks,
)

__all__ = [
    "ABPC_FRACTIONS",
    "METRIC_NAMES",
    "abpc",
    "binarize",
    "boxes_to_mask",
    "boxes_touch_instances",
    "contour_boxes",
    "deletion_insertion",
    "evaluate_localization",
    "gaussian_blur",
    "instances_touched",
    "localization_metrics",
    "mass_inside",
    "mean",
    "perturbation_curves",
    "pixel_ranks",
    "minmax_normalize",
    "predict_boxes",
    "scale_boxes",
    "upsample",
]
