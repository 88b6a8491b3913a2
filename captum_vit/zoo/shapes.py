"""A small timm ViT trained on :class:`captum_vit.data.ShapesDataset`, shipped with the package.

``shapes_vit()`` returns ``(model, data_config)``: a ``timm`` ``VisionTransformer`` (patch 16 at
224, i.e. a 14x14 grid, a [class] token and ``global_pool='token'``) in eval mode, and a timm-style
data config (squash resize to 224, mean = std = 0.5). The weights are verified against the sha256
recorded in ``shapes_vit.json`` before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch

__all__ = ["shapes_vit", "build_shapes_vit", "load_config", "training_seeds", "SHAPES_CLASSES", "DATA_CONFIG",
           "CONFIG_PATH", "WEIGHTS_PATH", "sha256_file"]

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(_HERE, "shapes_vit.json")
WEIGHTS_PATH = os.path.join(_HERE, "shapes_vit.pth")

DATA_CONFIG: Dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "squash",
}

# default model config; the shipped json overrides/records it
DEFAULT_MODEL_KWARGS: Dict[str, Any] = dict(
    img_size=224, patch_size=16, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
    class_token=True, global_pool="token",
)


def _classes():
    from captum_vit.data.shapes import CLASSES

    return list(CLASSES)


SHAPES_CLASSES = _classes()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read ``chunk`` bytes at a time.

    The package's one file checksum: the shipped weights' check and the evaluation's checkpoint
    fingerprint both use it, so the same file always gets the same digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_config(path: Optional[str] = None) -> Dict[str, Any]:
    with open(path or CONFIG_PATH, encoding="utf-8") as f:
        return json.load(f)


def training_seeds(path: Optional[str] = None) -> FrozenSet[int]:
    r"""The :class:`~captum_vit.data.ShapesDataset` seeds the shipped weights were trained on.

    Read from ``training_seeds`` in the model's config (every run of the training chain), so that
    held-out evaluation can stay off them.

    Args:
        path (str, optional): a config json; default: the shipped ``shapes_vit.json``.

    Returns:
        frozenset[int]: the training seeds.
    """
    cfg_path = path or CONFIG_PATH
    seeds = load_config(cfg_path).get("training_seeds")
    if not seeds:
        raise RuntimeError(f"{cfg_path} records no training_seeds; re-fetch it with `git checkout -- {cfg_path}`")
    return frozenset(int(s) for s in seeds)


def _conv_stem_embed():
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        """timm ``PatchEmbed`` whose linear 16x16 projection is replaced by a convolutional stem.

        Four 3x3 stride-2 convolutions (BatchNorm, ReLU) and a 1x1 projection: the same 14x14 token
        grid at 224 (stride 16), as in "Early Convolutions Help Transformers See Better" (Xiao et
        al., 2021). It lets the small ViT train on a 2-core CPU in well under an hour.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            in_chans, dim = self.proj.in_channels, self.proj.out_channels
            chs = [in_chans, dim // 8, dim // 4, dim // 2, dim]
            layers = []
            for i in range(4):
                layers += [torch.nn.Conv2d(chs[i], chs[i + 1], 3, 2, 1, bias=False),
                           torch.nn.BatchNorm2d(chs[i + 1]), torch.nn.ReLU(inplace=True)]
            layers.append(torch.nn.Conv2d(dim, dim, 1))
            self.proj = torch.nn.Sequential(*layers)

    return ConvStemPatchEmbed


def build_shapes_vit(model_kwargs: Optional[Dict[str, Any]] = None, num_classes: Optional[int] = None):
    """An untrained ``timm`` VisionTransformer with the shapes architecture.

    ``model_kwargs`` are VisionTransformer arguments plus ``stem``: ``"patch"`` (timm's linear
    16x16 patch embedding) or ``"conv"`` (:class:`ConvStemPatchEmbed`, same 14x14 grid).
    """
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(DEFAULT_MODEL_KWARGS)
    kw.update(model_kwargs or {})
    if kw.pop("stem", "patch") == "conv":
        kw["embed_layer"] = _conv_stem_embed()
    kw["num_classes"] = int(num_classes if num_classes is not None else kw.get("num_classes", len(SHAPES_CLASSES)))
    return VisionTransformer(**kw)


def shapes_vit(checkpoint: Optional[str] = None, device="cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load the shipped shapes ViT.

    Args:
        checkpoint: path of a state_dict file; default: the shipped ``shapes_vit.pth``. Its sha256
            is checked against ``shapes_vit.json`` only for the shipped file (or when a json with the
            same stem sits next to ``checkpoint``).
        device: where to put the model.

    Returns:
        ``(model, data_config)``: the float32 model in eval mode and a timm-style data config dict.
    """
    path = os.path.abspath(checkpoint or WEIGHTS_PATH)
    cfg_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(cfg_path):
        cfg_path = CONFIG_PATH
    fix = ("re-fetch it with `git checkout -- captum_vit/zoo/shapes_vit.pth` (if it is a Git LFS pointer: "
           "`git lfs pull`) or retrain it from a clone of the repository with "
           "`python -m tools.train_shapes --out captum_vit/zoo` (see docs/shapes_vit_training.md)")
    if not os.path.isfile(path):
        raise RuntimeError(f"shapes_vit weights not found: {path}; {fix}")
    try:
        cfg = load_config(cfg_path)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not read the shapes_vit config {cfg_path}: {e}; {fix}") from e
    expected = cfg.get("sha256")
    if expected and (checkpoint is None or os.path.dirname(cfg_path) == os.path.dirname(path)):
        actual = sha256_file(path)
        if actual != expected:
            raise RuntimeError(
                f"checksum mismatch for {path}: sha256 {actual} != expected {expected} (from {cfg_path}); "
                f"the file is corrupt or was replaced; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file without a recorded checksum
        raise RuntimeError(f"could not load shapes_vit weights {path}: {e}; {fix}") from e
    model = build_shapes_vit(cfg.get("model_kwargs"), num_classes=len(cfg.get("classes", SHAPES_CLASSES)))
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
    model.load_state_dict(state)
    model = model.float().to(device).eval()
    data_config = dict(DATA_CONFIG)
    data_config.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("data_config", {}).items()})
    return model, data_config
