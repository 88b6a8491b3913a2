"""A stand-in captum-vit ONNX export for testing the torch-free runtime in ``export/``.

A tiny torch module with the export contract's signature (``image`` float32 ``[B, 3, H, W]``, ``target``
int64 ``[B]``, negative = predicted class; ``logits`` ``[B, C]``, ``cam`` ``[B, gh, gw]``, optional
``cam_image`` ``[B, H, W]``), written with ``torch.onnx.export`` and given the ``captum_vit.*`` metadata.
Its map is a class activation map over patch features, not AGCAM: the runtime only moves tensors.

Run as a script it writes a graph and a test image::

    python tests/make_ort_fixture.py OUT_DIR     # OUT_DIR/model.onnx, OUT_DIR/image.png
"""

import json
import os
import sys
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_HW = (32, 48)  # not square, so height and width cannot be swapped unnoticed
PATCH = 8
NUM_CLASSES = 5
CLASS_NAMES = ["circle", "square", "triangle", "star", "cross"]


class StandIn(nn.Module):
    """Patch features (a strided convolution), a linear head on their mean, and a class map per target."""

    def __init__(self, input_hw: Tuple[int, int] = INPUT_HW, num_classes: int = NUM_CLASSES, dim: int = 16,
                 with_cam_image: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_hw = input_hw
        self.with_cam_image = with_cam_image
        self.embed = nn.Conv2d(3, dim, PATCH, PATCH)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.head.weight.mul_(4.0)

    def forward(self, image: torch.Tensor, target: torch.Tensor):
        feats = self.embed(image)  # [B, D, gh, gw]
        logits = self.head(feats.mean(dim=(2, 3)))
        cls = torch.where(target < 0, logits.argmax(dim=1), target)
        cam = torch.relu(torch.einsum("bd,bdhw->bhw", self.head.weight[cls], feats))
        if not self.with_cam_image:
            return logits, cam
        up = F.interpolate(cam[:, None], size=self.input_hw, mode="bilinear", align_corners=False)[:, 0]
        lo = up.amin(dim=(1, 2), keepdim=True)
        hi = up.amax(dim=(1, 2), keepdim=True)
        return logits, cam, (up - lo) / (hi - lo).clamp_min(1e-12)


def metadata(model: StandIn, outputs: Sequence[str], class_names: Optional[Sequence[str]] = CLASS_NAMES,
             **overrides: str) -> Dict[str, str]:
    h, w = model.input_hw
    meta = {
        "captum_vit.format": "1",
        "captum_vit.method": "agcam",
        "captum_vit.input_size": json.dumps([3, h, w]),
        "captum_vit.mean": json.dumps([0.485, 0.456, 0.406]),
        "captum_vit.std": json.dumps([0.229, 0.224, 0.225]),
        "captum_vit.interpolation": "bicubic",
        "captum_vit.crop_pct": json.dumps(0.875),
        "captum_vit.crop_mode": "center",
        "captum_vit.grid": json.dumps([h // PATCH, w // PATCH]),
        "captum_vit.num_classes": str(model.head.out_features),
        "captum_vit.fp16": "0",
        "captum_vit.outputs": json.dumps(list(outputs)),
    }
    if class_names is not None:
        meta["captum_vit.class_names"] = json.dumps(list(class_names))
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def export_stand_in(path: str, model: Optional[StandIn] = None, class_names: Optional[Sequence[str]] = CLASS_NAMES,
                    dynamic_batch: bool = True, **metadata_overrides: str) -> StandIn:
    """Write ``model`` (default: a fresh :class:`StandIn`) as a captum-vit export; an override of ``None``
    drops that metadata key. Returns the model."""
    import onnx

    model = (model or StandIn()).eval()
    outputs = ["logits", "cam"] + (["cam_image"] if model.with_cam_image else [])
    h, w = model.input_hw
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (small, fixed opset); its deprecation notice is expected.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(2, 3, h, w), torch.tensor([-1, 0])), path, dynamo=False, opset_version=17,
            input_names=["image", "target"], output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["image", "target"] + outputs} if dynamic_batch else None,
        )
    graph = onnx.load(path)
    for key, value in metadata(model, outputs, class_names, **metadata_overrides).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, path)
    return model


def write_image(path: str, size: Tuple[int, int] = (70, 53), seed: int = 0) -> None:
    """A random RGB PNG, ``size`` as (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    export_stand_in(os.path.join(out, "model.onnx"))
    write_image(os.path.join(out, "image.png"))
    print(os.path.join(out, "model.onnx"), os.path.join(out, "image.png"))
