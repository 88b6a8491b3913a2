"""ONNX export of AGCAM (and the forward-only rollout and raw attention): logits and maps in one graph.

The graph is the method's own computation traced through the model description: one pure
forward pass over the block parts, then, for AGCAM, the one-token backward written as explicit
transposed Jacobians. It holds no autograd, so ``torch.onnx.export`` traces it like any forward.

Graph contract (``export/agcam_ort.py`` serves it without torch):

* inputs ``image`` float32 ``[B, 3, H, W]`` (dynamic batch, the model's input size) and
  ``target`` int64 ``[B]`` (a negative value explains the predicted class);
* outputs ``logits`` float32 ``[B, C]``, ``cam`` float32 ``[B, gh, gw]`` (the raw map, equal to
  ``attribute``'s), and with ``cam_image=True`` also ``cam_image`` float32 ``[B, H, W]``
  (bilinear upsampling, min-max normalised per image);
* ``metadata_props``: ``captum_vit.format``, ``.method``, ``.input_size``, ``.mean``, ``.std``,
  ``.interpolation``, ``.crop_pct``, ``.crop_mode``, ``.grid``, ``.num_classes``, ``.fp16``,
  ``.outputs`` and, where known, ``.class_names`` (JSON-encoded values).
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_vit.attr import EXPORTABLE_METHODS, METHODS
from captum_vit.vit import adapt

__all__ = ["export_onnx", "EXPORTABLE_METHODS", "FORMAT_VERSION"]

FORMAT_VERSION = "1"


class _ExportGraph(nn.Module):
    """``(image, target) -> (logits, cam[, cam_image])`` through one method's template steps."""

    def __init__(self, method, cam_image: bool, half: bool) -> None:
        super().__init__()
        self.model = method.model  # registered, so that the exporter stores each weight once
        self.method = method
        self.cam_image = cam_image
        self.fp16 = half  # not `half`: that would hide nn.Module.half()

    def forward(self, image: Tensor, target: Tensor):
        x = image.half() if self.fp16 else image
        request = self.method._request()
        record = self.method.adapter.forward(x, request)
        logits = record.logits
        targets = torch.where(target < 0, logits.argmax(-1), target)
        maps = self.method._maps(record, logits, targets)
        gh, gw = record.grid
        cam = maps.reshape(-1, gh, gw).float()
        # Class-agnostic maps (rollout, raw) do not read the target; this keeps it a graph
        # input all the same, so that every export has the same signature.
        cam = cam + 0.0 * targets[:, None, None].to(cam.dtype)
        outputs = [logits.float(), cam]
        if self.cam_image:
            up = F.interpolate(cam[:, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            lo = up.flatten(1).amin(1)[:, None, None]
            hi = up.flatten(1).amax(1)[:, None, None]
            outputs.append((up - lo) / (hi - lo).clamp_min(1e-12))
        return tuple(outputs)


def _trace(graph: nn.Module, args: tuple, path: str, outputs: list, dynamic: dict, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is the one that traces a plain forward without onnxscript;
        # its deprecation notice and the tracer's notes on shape arithmetic are expected here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*dynamo=False.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript-based ONNX export.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning,
                                module=r"torch\.onnx")
        torch.onnx.export(
            graph, args, path, input_names=["image", "target"], output_names=outputs,
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
            # Folding would store a transposed copy of every linear weight next to the original
            # (the forward reads W^T, the one-token backward W): twice the file for nothing.
            do_constant_folding=False,
        )


def export_onnx(
    model: nn.Module,
    path: str,
    method: str = "agcam",
    data_config: Optional[Dict[str, Any]] = None,
    class_names: Optional[Sequence[str]] = None,
    opset: int = 17,
    fp16: bool = False,
    cam_image: bool = False,
) -> str:
    r"""Export ``model`` with an explanation method as one ONNX graph (see the module docstring).

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`) in eval mode.
        path (str): the ``.onnx`` file to write.
        method (str): ``"agcam"`` (needs the one-token engine), ``"rollout"`` or ``"raw"``.
        data_config (dict, optional): the model's preprocessing (timm's data config:
            ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``);
            default: the model's own (:func:`captum_vit.models.data_config_for`).
        class_names (sequence of str, optional): recorded in the metadata.
        opset (int): ONNX opset (>= 14).
        fp16 (bool): weights and computation in float16; inputs and outputs stay float32.
        cam_image (bool): add the ``cam_image`` output (map at the input size, min-max normalised).

    Returns:
        str: ``path``.

    Raises:
        ValueError: for a method that is not forward-only on this model (AGCAM where the
            one-token engine does not apply names the reason), or a model in training mode.

    Examples::

        >>> from captum_vit.onnx import export_onnx
        >>> export_onnx(model, "vit_agcam.onnx", cam_image=True)
    """
    import onnx

    from captum_vit.models import data_config_for

    if method not in EXPORTABLE_METHODS:
        raise ValueError(f"method {method!r} cannot be exported; choose one of {EXPORTABLE_METHODS} (forward-only)")
    adapter = adapt(model)
    if adapter.is_training:
        raise ValueError("the model is in training mode; call model.eval() before exporting")
    if method == "agcam":
        ok, why = adapter.one_token_support()
        if not ok:
            raise ValueError(f"AGCAM exports through its one-token engine, which does not apply to this model: {why}")
    if not isinstance(opset, int) or opset < 14:
        raise ValueError(f"opset must be an int >= 14, got {opset!r}")
    cfg = dict(data_config or data_config_for(adapter.model))
    c, h, w = (int(v) for v in cfg["input_size"])
    model = adapter.for_input_size(h, w)
    if fp16:
        model = copy.deepcopy(model).half()
    explainer = METHODS[method](model)
    graph = _ExportGraph(explainer, cam_image, fp16).eval()
    ref = next(adapter.model.parameters())
    image = torch.zeros(2, c, h, w, device=ref.device)
    # a data config the model cannot take (another input size) fails here with the reason, not in the trace
    adapter.check_input(image)
    target = torch.tensor([0, -1], device=ref.device)
    outputs = ["logits", "cam"] + (["cam_image"] if cam_image else [])
    dynamic = {name: {0: "batch"} for name in ["image", "target"] + outputs}
    _trace(graph, (image, target), path, outputs, dynamic, opset)
    proto = onnx.load(path)
    gh, gw = adapter.grid_size(image)
    meta = {
        "format": FORMAT_VERSION,
        "method": method,
        "input_size": [c, h, w],
        "mean": [float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5))],
        "std": [float(v) for v in cfg.get("std", (0.5, 0.5, 0.5))],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "grid": [int(gh), int(gw)],
        "num_classes": int(adapter.num_classes),
        "fp16": int(bool(fp16)),
        "outputs": outputs,
    }
    if class_names is not None:
        meta["class_names"] = [str(n) for n in class_names]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = f"captum_vit.{key}"
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "captum-vit"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return path
