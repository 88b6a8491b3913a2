"""Model loading shared by the CLI and scripts: timm names, checkpoints, the shipped zoo model."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from captum_vit.vit import matching_adapter

__all__ = ["load_model", "load_checkpoint_state", "class_names", "data_config_for", "preprocess_images", "SHAPES_NAME"]

#: Name of the model shipped with the package (``captum_vit.zoo.shapes_vit``).
SHAPES_NAME = "shapes_vit"


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; unwraps common training-script wrappers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist; check the --checkpoint path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many different errors
        raise RuntimeError(
            f"could not read checkpoint {path!r}: it is not a PyTorch weights file or it is corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Only plain tensors are loaded "
            "(weights_only=True): re-save it with torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    fix = "re-save it with torch.save(model.state_dict(), path)"
    if not isinstance(obj, dict):
        raise RuntimeError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict (a dict of "
                           f"parameter name -> tensor); {fix}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise RuntimeError(f"checkpoint {path!r} is not a state dict of tensors (its entry {str(bad)!r} is a "
                           f"{type(obj[bad]).__name__}); {fix}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def _infer_num_classes(state: Dict[str, torch.Tensor]) -> Optional[int]:
    for key in ("head.weight", "classifier.weight", "head.fc.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def load_model(
    name: str,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    device: str = "cpu",
) -> Tuple[nn.Module, Dict[str, Any], Optional[List[str]]]:
    """Build a model for explanation, in eval mode.

    Args:
        name: a timm model name (``vit_base_patch16_224``, ``deit_small_distilled_patch16_224``,
            ...) or ``"shapes_vit"`` for the small ViT shipped with captum-vit.
        checkpoint: optional state-dict file (loaded with ``weights_only=True``).
        pretrained: ask timm for its pretrained weights (needs them cached or a network). Not for
            ``"shapes_vit"``, whose weights are always the shipped ones (``ValueError``). A timm model
            with neither ``checkpoint`` nor ``pretrained`` has random weights and gets a warning.
        num_classes: number of classes; inferred from the checkpoint's head when omitted.

    Returns:
        ``(model, data_config, class_names)``; ``class_names`` may be ``None``.
    """
    if checkpoint and pretrained:
        raise ValueError("give either --checkpoint or --pretrained, not both")
    if name == SHAPES_NAME:
        if pretrained:
            raise ValueError(f"--pretrained does not apply to {SHAPES_NAME!r}: its weights are always the shipped "
                             "ones; drop --pretrained (or give --checkpoint FILE for other weights of the same "
                             "architecture)")
        from captum_vit.zoo import SHAPES_CLASSES, shapes_vit

        if checkpoint:
            load_checkpoint_state(checkpoint)  # the same clear errors as for timm models, before the zoo loads it
        model, cfg = shapes_vit(checkpoint=checkpoint, device=device)
        return model, cfg, list(SHAPES_CLASSES)

    import timm

    state = load_checkpoint_state(checkpoint) if checkpoint else None
    if num_classes is None and state is not None:
        num_classes = _infer_num_classes(state)
    kwargs: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(
                f"unknown model {name!r}: give a timm model name (e.g. vit_base_patch16_224) or {SHAPES_NAME!r}"
                + (f"; similar names: {', '.join(close)}" if close else "")
            ) from e
        raise
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"checkpoint {checkpoint!r} does not fit model {name!r}: {str(e).splitlines()[0]} "
                f"{' '.join(str(e).split()[1:12])}... Check --model and --num-classes."
            ) from e
    if state is None and not pretrained:
        warnings.warn(f"model {name!r} has random weights (neither --pretrained nor --checkpoint was given), so its "
                      "predictions and explanations mean nothing; add --pretrained or --checkpoint FILE",
                      UserWarning, stacklevel=2)
    model = model.to(device).eval()
    cfg = data_config_for(model)
    return model, cfg, class_names(model)


def data_config_for(model: nn.Module) -> Dict[str, Any]:
    """The model's eval preprocessing as a timm data config (``input_size``, ``mean``, ``std``, ...).

    timm models: timm's own resolution, with the input size the model was built for
    (``patch_embed.img_size``; timm takes it from the pretrained config, which a model created
    with another ``img_size`` does not match). Hugging Face models: ``config.image_size`` with the
    normalisation, interpolation and crop of the family's image processor (the adapter's
    ``preprocessing``): mean = std = 0.5 and a square resize for ViT, the ImageNet mean and std
    with a 224/256 centre crop for DeiT and DINOv2. The processor itself lives beside the
    checkpoint, not in the model, so these are the defaults its published checkpoints use.
    """
    adapter = matching_adapter(model)
    if adapter is not None and adapter.library == "transformers":
        config: Any = model.config  # transformers'
        s = config.image_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        pre: Dict[str, Any] = getattr(adapter, "preprocessing", {})
        return {"input_size": (config.num_channels, int(h), int(w)), **pre}
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    return cfg


def class_names(model: nn.Module) -> Optional[List[str]]:
    """Human-readable class names for timm ImageNet models, where timm knows them offline."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            num_classes: Any = model.num_classes  # timm's
            return [info.index_to_description(i) for i in range(num_classes)]
    except Exception:
        pass
    return None


def preprocess_images(paths: List[str], data_config: Dict[str, Any]) -> Tuple[torch.Tensor, list]:
    """Open image files and apply the model's own eval transform; returns ``(batch, pil_images)``.

    Files are decoded by :func:`captum_vit.data.images.decode_image`, the datasets' rule: 16-bit
    images are scaled to 8 bits, float images read as ``[0, 1]`` (refused outside it), so
    ``explain`` sees the pixels an evaluation of the same file would.
    """
    from timm.data import create_transform

    from captum_vit.data.images import DatasetFileError, decode_image

    transform = create_transform(**{k: v for k, v in data_config.items() if k != "crop_mode"},
                                 crop_mode=data_config.get("crop_mode", "center"))
    tensors, pils = [], []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image file {p!r} does not exist")
        try:
            img = decode_image(p)
        except DatasetFileError as e:
            raise ValueError(f"could not read {p!r} as an image: {e.reason}") from e
        pils.append(img)
        tensors.append(transform(img))
    return torch.stack(tensors), pils
