#!/usr/bin/env python3
"""Torch-free runtime for captum-vit ONNX exports: class maps for Vision Transformers with onnxruntime.

Needs only numpy, pillow and onnxruntime (or onnxruntime-gpu); copy this file next to the ``.onnx``.

The graph (written by ``captum-vit export``) takes ``image`` float32 ``[B, 3, H, W]`` (normalised as the
model was trained) and ``target`` int64 ``[B]`` (a negative entry explains the predicted class), and returns
``logits`` ``[B, C]``, ``cam`` ``[B, gh, gw]`` (the raw map on the patch grid) and, when exported with it,
``cam_image`` ``[B, H, W]`` (upsampled bilinearly, min-max normalised per image). Its metadata carries the
preprocessing (timm's evaluation transform), the method, the grid and the class names; this module reads
it, validates inputs before the session runs, and batches.

Python::

    from agcam_ort import CamSession
    cams = CamSession("model.onnx")                       # CUDA when available, else CPU
    out = cams.run(cams.preprocess_files(["cat.jpg"])[0]) # logits, cam, cam_image, classes, probabilities
    cams.explain_files(["cat.jpg", "dog.jpg"], "out/")    # overlay PNGs

Command line::

    python agcam_ort.py model.onnx cat.jpg dog.jpg --out out/ [--target C] [--cpu] [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

__all__ = [
    "CamSession",
    "CamOutputs",
    "ExportConfig",
    "ExportFormatError",
    "CamInputError",
    "preprocess_image",
    "bilinear_resize",
    "jet",
    "overlay",
    "main",
]

FORMAT_VERSION = "1"
METHODS = ("agcam", "rollout", "raw")
CROP_MODES = ("center", "squash", "border")
#: timm's interpolation names and the PIL filters they map to (timm.data.transforms.str_to_interp_mode).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
REQUIRED_OUTPUTS = ("logits", "cam")
OPTIONAL_OUTPUTS = ("cam_image",)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The resize before the crop may make no side more than this many times the model's larger input side:
#: beyond it the metadata or the image is absurd (a tiny crop_pct, a 4000 x 2 strip), and the resize would
#: take gigabytes and minutes for a crop that is a sliver of it.
MAX_RESIZE_FACTOR = 8
#: Plausible normalisation constants for pixels scaled to [0, 1]: outside these the metadata is wrong (a
#: std of 1e-300 becomes 0 in float32 and every input infinite; a mean of 1e300 likewise).
STD_RANGE = (1e-3, 1e3)
MEAN_RANGE = (-1.0, 2.0)


class ExportFormatError(ValueError):
    """The file is not a usable captum-vit export (missing, corrupt, no metadata, wrong inputs or outputs)."""


class CamInputError(ValueError):
    """Images, targets or files handed to a :class:`CamSession` do not fit the graph."""


@dataclass(frozen=True)
class ExportConfig:
    """What a captum-vit export says about itself (its ``captum_vit.*`` metadata), parsed and checked."""

    method: str
    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str
    grid: Tuple[int, int]
    num_classes: int
    class_names: Optional[Tuple[str, ...]]
    fp16: bool
    outputs: Tuple[str, ...]

    @classmethod
    def from_metadata(cls, meta: Dict[str, str], source: str = "graph") -> ExportConfig:
        def fail(problem: str) -> ExportFormatError:
            return ExportFormatError(f"{source}: {problem}")

        if "captum_vit.format" not in meta:
            raise fail("not a captum-vit export (no 'captum_vit.format' metadata); "
                       "export the model with `captum-vit export`")
        if meta["captum_vit.format"] != FORMAT_VERSION:
            raise fail(f"captum_vit.format is {meta['captum_vit.format']!r}; this runtime reads format "
                       f"{FORMAT_VERSION!r}")

        def get(key: str, parse: bool = True):
            full = "captum_vit." + key
            if full not in meta:
                raise fail(f"metadata {full!r} is missing")
            if not parse:
                return meta[full]
            try:
                return json.loads(meta[full])
            except ValueError:
                raise fail(f"metadata {full!r} is not JSON: {meta[full]!r}") from None

        def ints(key: str, n: int) -> Tuple[int, ...]:
            v = get(key)
            if not (isinstance(v, list) and len(v) == n and all(type(x) is int and x > 0 for x in v)):
                raise fail(f"metadata 'captum_vit.{key}' should be {n} positive integers, got {v!r}")
            return tuple(v)

        def floats(key: str, n: int) -> Tuple[float, ...]:
            v = get(key)
            if not (isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v)):
                raise fail(f"metadata 'captum_vit.{key}' should be {n} numbers, got {v!r}")
            return tuple(float(x) for x in v)

        def choice(key: str, allowed: Sequence[str]) -> str:
            v = get(key, parse=False)
            if v not in allowed:
                raise fail(f"metadata 'captum_vit.{key}' is {v!r}; expected one of {list(allowed)}")
            return v

        input_size = ints("input_size", 3)
        channels = input_size[0]
        if channels not in (1, 3):
            raise fail(f"metadata 'captum_vit.input_size' {list(input_size)}: the runtime reads images for 1 or 3 "
                       "channels (L or RGB)")
        std = floats("std", channels)
        if any(s == 0 for s in std):
            raise fail(f"metadata 'captum_vit.std' has a zero: {list(std)}")
        if not all(STD_RANGE[0] <= s <= STD_RANGE[1] for s in std):
            raise fail(f"metadata 'captum_vit.std' should be between {STD_RANGE[0]:g} and {STD_RANGE[1]:g} per "
                       f"channel (pixels are scaled to [0, 1] first), got {list(std)}; re-export the model")
        mean = floats("mean", channels)
        if not all(MEAN_RANGE[0] <= m <= MEAN_RANGE[1] for m in mean):
            raise fail(f"metadata 'captum_vit.mean' should be between {MEAN_RANGE[0]:g} and {MEAN_RANGE[1]:g} per "
                       f"channel (pixels are scaled to [0, 1] first), got {list(mean)}; re-export the model")
        crop_pct = get("crop_pct")
        if not (_is_number(crop_pct) and 0 < crop_pct <= 1):
            raise fail(f"metadata 'captum_vit.crop_pct' should be a number in (0, 1] (the crop's share of the "
                       f"resized image), got {crop_pct!r}")
        if crop_pct < 1 / MAX_RESIZE_FACTOR:
            raise fail(f"metadata 'captum_vit.crop_pct' is {crop_pct!r}: images would be resized to more than "
                       f"{MAX_RESIZE_FACTOR}x the input size before the crop; it should be at least "
                       f"{1 / MAX_RESIZE_FACTOR:g}")
        num_classes = get("num_classes")
        if not (type(num_classes) is int and num_classes > 0):
            raise fail(f"metadata 'captum_vit.num_classes' should be a positive integer, got {num_classes!r}")
        class_names = None
        if "captum_vit.class_names" in meta:
            names = get("class_names")
            if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(s, str) for s in names)):
                raise fail(f"metadata 'captum_vit.class_names' should be {num_classes} strings")
            class_names = tuple(names)
        outputs = get("outputs")
        if not (isinstance(outputs, list) and all(isinstance(s, str) for s in outputs)):
            raise fail(f"metadata 'captum_vit.outputs' should be a list of names, got {outputs!r}")
        return cls(
            method=choice("method", METHODS),
            input_size=input_size,  # type: ignore[arg-type]
            mean=mean,
            std=std,
            interpolation=choice("interpolation", tuple(PIL_FILTERS)),
            crop_pct=float(crop_pct),
            crop_mode=choice("crop_mode", CROP_MODES),
            grid=ints("grid", 2),  # type: ignore[arg-type]
            num_classes=num_classes,
            class_names=class_names,
            fp16=choice("fp16", ("0", "1")) == "1",
            outputs=tuple(outputs),
        )

    def class_name(self, c: int) -> Optional[str]:
        return self.class_names[c] if self.class_names is not None else None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class CamOutputs:
    """Results of :meth:`CamSession.run`, as numpy arrays on the host.

    Attributes:
        logits: ``[B, C]`` float32.
        probabilities: ``[B, C]`` softmax of the logits (float64).
        classes: ``[B]`` int64, the class each map explains (the target, or the predicted class where the
            target was negative or not given).
        cam: ``[B, gh, gw]`` float32, the method's raw map on the patch grid.
        cam_image: ``[B, H, W]`` float32 in [0, 1], or ``None`` when the graph was exported without it.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray
    cam: np.ndarray
    cam_image: Optional[np.ndarray]


# ---------------------------------------------------------------------------------------------------------
# Preprocessing: timm's evaluation transform (transforms_imagenet_eval) on PIL images, without torch.


def _center_crop_box(size_hw: Tuple[int, int], crop_hw: Tuple[int, int]) -> Tuple[int, int]:
    """Top-left corner of a centred crop, rounded as torchvision's ``center_crop`` does."""
    return int(round((size_hw[0] - crop_hw[0]) / 2.0)), int(round((size_hw[1] - crop_hw[1]) / 2.0))


def _center_crop_or_pad(img: Image.Image, crop_hw: Tuple[int, int], fill: Tuple[int, ...]) -> Image.Image:
    """Pad (left/top get the smaller half) to at least ``crop_hw`` with ``fill``, then crop the centre."""
    ch, cw = crop_hw
    w, h = img.size
    if cw > w or ch > h:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        right = (cw - w + 1) // 2 if cw > w else 0
        bottom = (ch - h + 1) // 2 if ch > h else 0
        padded = Image.new(img.mode, (w + left + right, h + top + bottom), fill)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if (h, w) == (ch, cw):
            return img
    top, left = _center_crop_box((h, w), crop_hw)
    return img.crop((left, top, left + cw, top + ch))


def _resize(img: Image.Image, size_hw: Tuple[int, int], interpolation: str,
            input_hw: Optional[Tuple[int, int]] = None) -> Image.Image:
    if input_hw is not None and max(size_hw) > MAX_RESIZE_FACTOR * max(input_hw):
        raise CamInputError(f"the image is {img.size[0]}x{img.size[1]} (width x height); the preprocessing would "
                            f"resize it to {size_hw[1]}x{size_hw[0]}, more than {MAX_RESIZE_FACTOR}x the model's "
                            f"input {input_hw[1]}x{input_hw[0]}, for a crop of a sliver of it: crop or pad the "
                            "image closer to the model's aspect ratio first")
    if img.size == (size_hw[1], size_hw[0]):
        return img
    return img.resize((size_hw[1], size_hw[0]), PIL_FILTERS[interpolation])


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and float images as 8-bit gray with the same brightness (``convert`` would saturate them)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNG/TIFF ("I" where older Pillow opens them so)
        a = np.asarray(image).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise CamInputError(f"a {mode} integer image with values {a.min()}..{a.max()}, outside 0..65535: its "
                                "bit depth is unknown; convert it to an 8- or 16-bit image first")
        return Image.fromarray(((a * 2 + 257) // 514).astype(np.uint8))  # round(a / 257), exact in integers
    if mode == "F":
        a = np.asarray(image, dtype=np.float64)
        if not np.isfinite(a).all():
            raise CamInputError("a floating-point image (mode F) with NaN or infinite pixels; fix or replace it")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise CamInputError(f"a floating-point image (mode F) with values in [{a.min():g}, {a.max():g}]; "
                                "expected [0, 1] (scaled by 255): rescale it to [0, 1] or save it as 8-bit")
        return Image.fromarray(np.rint(a * 255).astype(np.uint8))
    return image


def preprocess_image(image: Image.Image, config: ExportConfig) -> Tuple[np.ndarray, np.ndarray]:
    r"""timm's evaluation transform for one image, from the export's metadata.

    ``center``: the shorter side goes to ``floor(side / crop_pct)`` (both sides keep the ratio of the
    target when it is not square), then the centre ``H x W`` is cropped. ``squash``: both sides are resized
    to ``floor(H / crop_pct), floor(W / crop_pct)``, then centre-cropped. ``border``: the longer side goes to
    its ``floor(side / crop_pct)``, and the image is padded with the mean colour and centre-cropped.
    Then ``/ 255`` and ``(x - mean) / std`` per channel.

    16-bit images (``I;16``, and ``I`` with values in 0..65535) are scaled by 1/257 and float images
    (``F``, values in [0, 1]) by 255 to 8-bit first; other values, and a resize to more than
    ``MAX_RESIZE_FACTOR`` times the input size (an extreme aspect ratio), raise :class:`CamInputError`.

    Args:
        image (PIL.Image.Image): any mode; converted to RGB (or L for one-channel models).
        config (ExportConfig): the export's preprocessing.

    Returns:
        (ndarray, ndarray): the network input ``[C, H, W]`` float32, and the resized, cropped image it was
        made from as ``[H, W, 3]`` uint8 (what the map lines up with).
    """
    c, h, w = config.input_size
    img = _to_8_bit(image).convert("RGB" if c == 3 else "L")
    scale = (math.floor(h / config.crop_pct), math.floor(w / config.crop_pct))
    if config.crop_mode == "squash":
        img = _resize(img, scale, config.interpolation, (h, w))
        img = _center_crop_or_pad(img, (h, w), (0,) * c)
    elif config.crop_mode == "border":
        ratio = max(img.size[1] / scale[0], img.size[0] / scale[1])
        img = _resize(img, (round(img.size[1] / ratio), round(img.size[0] / ratio)), config.interpolation, (h, w))
        fill = tuple(min(max(round(255 * m), 0), 255) for m in config.mean)  # a pixel value
        img = _center_crop_or_pad(img, (h, w), fill)
    else:
        iw, ih = img.size
        if scale[0] == scale[1]:  # shorter side to the scale, the longer one truncated like torchvision
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_short, new_long = scale[0], int(scale[0] * long / short)
            size = (new_long, new_short) if iw <= ih else (new_short, new_long)
        else:
            ratio = min(ih / scale[0], iw / scale[1])
            size = (round(ih / ratio), round(iw / ratio))
        img = _resize(img, size, config.interpolation, (h, w))
        img = _center_crop_or_pad(img, (h, w), (0,) * c)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    x = (x - mean) / std
    view = pixels if pixels.shape[2] == 3 else np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(x.transpose(2, 0, 1)), np.ascontiguousarray(view)


# ---------------------------------------------------------------------------------------------------------
# Overlays: bilinear upsampling as torch's interpolate (align_corners=False) and the jet colormap.


def _bilinear_weights(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def bilinear_resize(maps: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Resize ``[..., h, w]`` to ``[..., H, W]`` like ``F.interpolate(mode="bilinear", align_corners=False)``."""
    maps = np.asarray(maps, dtype=np.float64)
    y0, y1, wy = _bilinear_weights(maps.shape[-2], size_hw[0])
    x0, x1, wx = _bilinear_weights(maps.shape[-1], size_hw[1])
    rows = maps[..., y0, :] * (1 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def _minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


_JET = {  # matplotlib's "jet" segments: (x, value) per channel
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_JET_LUT = np.stack([np.interp(np.linspace(0.0, 1.0, 256), *zip(*_JET[ch])) for ch in ("red", "green", "blue")], -1)


def jet(values_01: np.ndarray) -> np.ndarray:
    """``[...]`` values in [0, 1] to ``[..., 3]`` RGB in [0, 1] with matplotlib's 256-entry jet colormap."""
    idx = np.clip(np.asarray(values_01, dtype=np.float64), 0.0, 1.0) * 256
    return _JET_LUT[np.minimum(idx.astype(np.int64), 255)]


def overlay(image_uint8_hwc: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a map (any size; upsampled bilinearly and min-max normalised) over an ``[H, W, 3]`` uint8 image."""
    image = np.asarray(image_uint8_hwc)
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape != image.shape[:2]:
        cam = bilinear_resize(cam, image.shape[:2])
    heat = jet(_minmax(cam)) * 255.0
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# The session.


def _providers(device: str) -> List[str]:
    """Execution providers to ask for, in order: CUDA (when offered and not refused), then CPU."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"device='cuda' but onnxruntime offers only {available}; "
                               "install onnxruntime-gpu (with a matching CUDA) or use device='cpu'")
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device should be 'auto', 'cuda' or 'cpu', got {device!r}")
    return [p for p in (CUDA, CPU) if p in available] or [CPU]


class CamSession:
    r"""An onnxruntime session over a captum-vit export, with its preprocessing and checks.

    The file is validated when the session is made: its ``captum_vit.*`` metadata, and inputs ``image``
    (float32, ``[B, C, H, W]`` with a dynamic batch and the metadata's ``C, H, W``) and ``target`` (int64,
    ``[B]``), and outputs ``logits``, ``cam`` and optionally ``cam_image``. Inputs are checked before the
    session runs. Runs go through IOBinding: on CUDA the inputs are copied to the device once and the
    outputs stay there (:meth:`run_ortvalues`) until :meth:`run` copies them to numpy.

    Args:
        path (str): the ``.onnx`` file.
        device (str, optional): ``"auto"`` (CUDA when onnxruntime offers it, else CPU), ``"cuda"`` or
            ``"cpu"``. Default: ``"auto"``
        device_id (int, optional): CUDA device. Default: 0
        session_options (onnxruntime.SessionOptions, optional): passed to onnxruntime.

    Examples::

        >>> cams = CamSession("model.onnx", device="cpu")
        >>> x, views = cams.preprocess_files(["cat.jpg", "dog.jpg"])
        >>> out = cams.run(x, targets=[-1, 3])   # predicted class for the first, class 3 for the second
        >>> out.classes, out.cam.shape
    """

    def __init__(self, path: Union[str, os.PathLike], device: str = "auto", device_id: int = 0,
                 session_options: Optional[ort.SessionOptions] = None) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ExportFormatError(f"{self.path}: no such file")
        # The session and the IOBinding must use the same GPU, so the CUDA provider gets the device id.
        providers = [(p, {"device_id": device_id}) if p == CUDA else p for p in _providers(device)]
        try:
            self.session = ort.InferenceSession(self.path, sess_options=session_options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            raise ExportFormatError(f"{self.path}: onnxruntime cannot load it as an ONNX model "
                                    f"({type(e).__name__}: {str(e).strip()[:300]})") from e
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.config = ExportConfig.from_metadata(meta, source=self.path)
        self._check_signature()
        # onnxruntime falls back to CPU when the CUDA provider fails to load; follow what it did.
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        self.device_id = device_id if self.device == "cuda" else 0
        self.output_names = [o.name for o in self.session.get_outputs()]

    # -- validation of the file ---------------------------------------------------------------------------

    def _check_signature(self) -> None:
        def fail(problem: str) -> ExportFormatError:
            return ExportFormatError(f"{self.path}: {problem}")

        c, h, w = self.config.input_size
        inputs = {i.name: i for i in self.session.get_inputs()}
        if sorted(inputs) != ["image", "target"]:
            raise fail(f"inputs are {sorted(inputs)}; a captum-vit export has 'image' and 'target'")
        image, target = inputs["image"], inputs["target"]
        if image.type != "tensor(float)":
            raise fail(f"input 'image' is {image.type}; expected tensor(float) (float32)")
        if target.type != "tensor(int64)":
            raise fail(f"input 'target' is {target.type}; expected tensor(int64)")
        if len(image.shape) != 4 or list(image.shape[1:]) != [c, h, w]:
            raise fail(f"input 'image' has shape {image.shape}; metadata says [B, {c}, {h}, {w}]")
        if isinstance(image.shape[0], int) or len(target.shape) != 1 or isinstance(target.shape[0], int):
            raise fail(f"inputs 'image' {image.shape} and 'target' {target.shape} need a dynamic batch axis")
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in REQUIRED_OUTPUTS if n not in outputs]
        extra = [n for n in outputs if n not in REQUIRED_OUTPUTS + OPTIONAL_OUTPUTS]
        if missing or extra:
            raise fail(f"outputs are {list(outputs)}; expected 'logits', 'cam' and optionally 'cam_image'")
        if sorted(self.config.outputs) != sorted(outputs):
            raise fail(f"metadata 'captum_vit.outputs' {list(self.config.outputs)} does not match the graph's "
                       f"outputs {list(outputs)}")
        gh, gw = self.config.grid
        expected = {"logits": [self.config.num_classes], "cam": [gh, gw], "cam_image": [h, w]}
        for name, out in outputs.items():
            if out.type != "tensor(float)":
                raise fail(f"output {name!r} is {out.type}; expected tensor(float) (float32)")
            dims = list(out.shape[1:])
            if len(out.shape) != len(expected[name]) + 1 or any(
                    isinstance(d, int) and d != e for d, e in zip(dims, expected[name])):
                want = ", ".join(map(str, expected[name]))
                raise fail(f"output {name!r} has shape {out.shape}; expected [B, {want}]")

    # -- validation of inputs -----------------------------------------------------------------------------

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Raise :class:`CamInputError` unless ``images`` is a float32 ``[B, C, H, W]`` batch for this graph."""
        c, h, w = self.config.input_size
        if not isinstance(images, np.ndarray):
            raise CamInputError(f"images should be a numpy array, got {type(images).__name__}")
        if images.ndim != 4:
            raise CamInputError(f"images should be [B, {c}, {h}, {w}], got rank {images.ndim} {list(images.shape)}")
        if images.dtype != np.float32:
            raise CamInputError(f"images should be float32, got {images.dtype}")
        if images.shape[1] != c:
            raise CamInputError(f"images have {images.shape[1]} channels; the model takes {c}")
        if images.shape[2:] != (h, w):
            raise CamInputError(f"images are {images.shape[2]}x{images.shape[3]}; the model takes {h}x{w} "
                                "(use preprocess_image / preprocess_files)")
        if images.shape[0] == 0:
            raise CamInputError("images is an empty batch")
        finite = np.isfinite(images)
        if not finite.all():
            bad = ~finite
            first = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
            raise CamInputError(f"images contain NaN or infinite values ({int(bad.sum())} of them, first in image "
                                f"{first}): such a map would mean nothing; check how the batch was made "
                                "(preprocess_image gives finite values)")
        return np.ascontiguousarray(images)

    def check_targets(self, targets: Union[None, int, Sequence[int], np.ndarray], batch: int) -> np.ndarray:
        """Targets as int64 ``[batch]``: ``None`` or negative entries mean the predicted class."""
        if targets is None:
            return np.full((batch,), -1, dtype=np.int64)
        t = np.asarray(targets)
        if t.dtype == np.bool_ or not np.issubdtype(t.dtype, np.integer):
            raise CamInputError(f"targets should be integers (class indices), got dtype {t.dtype}")
        if t.ndim == 0:
            t = np.full((batch,), int(t), dtype=np.int64)
        if t.ndim != 1 or t.shape[0] != batch:
            raise CamInputError(f"targets have shape {list(t.shape)}; {batch} images need [{batch}]")
        bad = t[t >= self.config.num_classes]
        if bad.size:
            raise CamInputError(f"target {int(bad[0])} is out of range: the model has {self.config.num_classes} "
                                "classes (0 .. num_classes-1; negative means the predicted class)")
        return np.ascontiguousarray(t.astype(np.int64))

    # -- running ------------------------------------------------------------------------------------------

    def run_ortvalues(self, images: np.ndarray, targets: Optional[np.ndarray] = None) -> Dict[str, ort.OrtValue]:
        """One batch through IOBinding; outputs stay where the session computed them (the GPU on CUDA).

        Args:
            images (ndarray): float32 ``[B, C, H, W]``, already preprocessed.
            targets (ndarray, optional): int ``[B]`` or ``None`` (predicted classes).

        Returns:
            dict: output name to ``onnxruntime.OrtValue``; ``.numpy()`` copies one to the host.
        """
        images = self.check_images(images)
        targets = self.check_targets(targets, images.shape[0])
        return self._run_bound(images, targets)

    def _run_bound(self, images: np.ndarray, targets: np.ndarray) -> Dict[str, ort.OrtValue]:
        binding = self.session.io_binding()
        # The OrtValues copy to the device (or wrap the host arrays on CPU); keep them alive until the run ends.
        image_value = ort.OrtValue.ortvalue_from_numpy(images, self.device, self.device_id)
        target_value = ort.OrtValue.ortvalue_from_numpy(targets, self.device, self.device_id)
        binding.bind_ortvalue_input("image", image_value)
        binding.bind_ortvalue_input("target", target_value)
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = dict(zip(self.output_names, binding.get_outputs()))
        self._check_output_shapes(values, images.shape[0])
        return values

    def _check_output_shapes(self, values: Dict[str, ort.OrtValue], batch: int) -> None:
        """Output sizes the graph leaves symbolic (the map's grid) are held to the metadata once they are known."""
        c, h, w = self.config.input_size
        expected = {"logits": [batch, self.config.num_classes], "cam": [batch, *self.config.grid],
                    "cam_image": [batch, h, w]}
        for name, value in values.items():
            if list(value.shape()) != expected[name]:
                raise ExportFormatError(f"{self.path}: the graph returned {name!r} of shape {list(value.shape())}; "
                                        f"its metadata says {expected[name]}")

    def run(self, images: np.ndarray, targets: Union[None, int, Sequence[int], np.ndarray] = None,
            batch_size: Optional[int] = None) -> CamOutputs:
        r"""Logits and maps for preprocessed images, in batches, copied to numpy.

        Args:
            images (ndarray): float32 ``[N, C, H, W]``, normalised as :func:`preprocess_image` does.
            targets (int, sequence or ndarray, optional): class per image (or one for all); ``None`` or a
                negative entry explains the predicted class. Default: ``None``
            batch_size (int, optional): images per session run; ``None`` runs all at once. Default: ``None``

        Returns:
            CamOutputs: logits, probabilities, explained classes, maps.
        """
        images = self.check_images(images)
        targets = self.check_targets(targets, images.shape[0])
        n = images.shape[0]
        if batch_size is None:
            batch_size = n
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise CamInputError(f"batch_size should be a positive integer, got {batch_size!r}")
        parts: Dict[str, List[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, n, int(batch_size)):
            stop = min(start + int(batch_size), n)
            values = self._run_bound(np.ascontiguousarray(images[start:stop]), targets[start:stop])
            for name, value in values.items():
                parts[name].append(value.numpy())
        out = {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}
        logits = out["logits"]
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        classes = np.where(targets < 0, logits.argmax(axis=1), targets).astype(np.int64)
        return CamOutputs(logits=logits, probabilities=probabilities, classes=classes, cam=out["cam"],
                          cam_image=out.get("cam_image"))

    # -- files --------------------------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> Tuple[np.ndarray, np.ndarray]:
        """:func:`preprocess_image` with this export's configuration."""
        return preprocess_image(image, self.config)

    def preprocess_files(self, paths: Sequence[Union[str, os.PathLike]]) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Open and preprocess image files; every file is read before anything runs.

        Returns:
            (ndarray, list): the batch ``[N, C, H, W]`` float32, and each image's ``[H, W, 3]`` uint8 view.
        """
        if len(paths) == 0:
            raise CamInputError("no image files given")
        batch, views = [], []
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()
                    x, view = self.preprocess(im)
            except Image.DecompressionBombError as e:
                raise CamInputError(f"{os.fspath(p)}: the image has more pixels than Pillow allows ({e}); it may be "
                                    "a decompression bomb: downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS "
                                    "if you trust the file") from e
            except CamInputError as e:  # read, but not usable as it is
                raise CamInputError(f"{os.fspath(p)}: {e}") from e
            except (OSError, SyntaxError, ValueError) as e:  # missing, unreadable or not an image
                raise CamInputError(f"{os.fspath(p)}: cannot read it as an image ({e})") from e
            batch.append(x)
            views.append(view)
        return np.stack(batch), views

    def explain_files(self, paths: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                      target: Optional[int] = None, batch_size: Optional[int] = None,
                      alpha: float = 0.5) -> List[Dict[str, object]]:
        r"""Explain image files and write one overlay PNG per image.

        Files are named ``<stem>_<method>_class<c>.png``; a stem given more than once (compared
        case-insensitively) gets ``_2``, ``_3``, ... in input order so no overlay overwrites another.

        Args:
            paths (sequence of str): image files.
            out_dir (str): folder for the overlays (created).
            target (int, optional): class to explain in every image; ``None`` or negative: the predicted one.
            batch_size (int, optional): as in :meth:`run`.
            alpha (float, optional): weight of the heat map in the overlay. Default: 0.5

        Returns:
            list of dict: per image ``path``, ``predicted``, ``predicted_name``, ``probability`` (of the
            predicted class), ``explained``, ``explained_name``, ``overlay`` (the PNG written).
        """
        images, views = self.preprocess_files(paths)
        targets = self.check_targets(target, images.shape[0])
        out = self.run(images, targets, batch_size=batch_size)
        os.makedirs(out_dir, exist_ok=True)
        records = []
        for i, (path, stem) in enumerate(zip(paths, _unique_stems(paths))):
            c = int(out.classes[i])
            cam = out.cam_image[i] if out.cam_image is not None else out.cam[i]
            dest = os.path.join(os.fspath(out_dir), f"{stem}_{self.config.method}_class{c}.png")
            Image.fromarray(overlay(views[i], cam, alpha=alpha)).save(dest)
            predicted = int(out.logits[i].argmax())
            records.append(dict(path=os.fspath(path), predicted=predicted,
                                predicted_name=self.config.class_name(predicted),
                                probability=float(out.probabilities[i, predicted]), explained=c,
                                explained_name=self.config.class_name(c), overlay=dest))
        return records


def _printable(text: object) -> str:
    """``text`` with control and other unprintable characters escaped as ``repr`` does (``\\x1b``, ``\\u2028``).

    Class names and file names come from files anyone may have written; raw, an escape sequence in one
    would recolour or rewrite the user's terminal.
    """
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else repr(ch)[1:-1])
    return "".join(out)


def _unique_stems(paths: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """One distinct output stem per image, in order: the file's stem, then ``_2``, ``_3``, ... on repeats.

    Compared case-insensitively, so that two overlays never overwrite each other on a case-insensitive
    file system either. The same rule as ``captum_vit.viz.overlay_stems`` (copied: this file runs without
    the package), so the kit and ``captum-vit explain`` name the overlays of the same images alike.
    """
    used, stems = set(), []
    for path in paths:
        base = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        stem, k = base, 1
        while stem.casefold() in used:
            k += 1
            stem = f"{base}_{k}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


# ---------------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agcam_ort.py",
        description="Class maps for images with a captum-vit ONNX export (numpy + pillow + onnxruntime only).")
    parser.add_argument("model", help="the .onnx file written by `captum-vit export`")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="folder for the overlay PNGs")
    parser.add_argument("--target", type=int, default=None,
                        help="class to explain in every image (default: each image's predicted class)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--batch-size", type=int, default=None, help="images per session run (default: all)")
    args = parser.parse_args(argv)
    try:
        cams = CamSession(args.model, device="cpu" if args.cpu else "auto")
        records = cams.explain_files(args.images, args.out, target=args.target, batch_size=args.batch_size)
    except (ExportFormatError, CamInputError) as e:
        print(f"error: {_printable(e)}", file=sys.stderr)
        return 2
    for r in records:
        name = f" ({_printable(r['predicted_name'])})" if r["predicted_name"] is not None else ""
        explained = ""
        if r["explained"] != r["predicted"]:
            ename = f" ({_printable(r['explained_name'])})" if r["explained_name"] is not None else ""
            explained = f", explained class {r['explained']}{ename}"
        print(f"{_printable(r['path'])}: class {r['predicted']}{name} p={r['probability']:.4f}{explained} -> "
              f"{_printable(r['overlay'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
