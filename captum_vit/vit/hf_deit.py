"""Hugging Face ``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher`` by their parts.

DeiT's layers are ViT's; what differs is the distillation token after the [class] token (two
prefix tokens) and the head: ``DeiTForImageClassification`` classifies the [class] token alone,
``...WithTeacher`` averages ``cls_classifier`` on the [class] token and
``distillation_classifier`` on the distillation token (``"token_distill"``, as timm's distilled
DeiT in eval mode).
"""

from __future__ import annotations

from typing import Any, Dict

from captum_vit.vit.base import HeadParts
from captum_vit.vit.hf import IMAGENET_PREPROCESSING, HFAdapter
from captum_vit.vit.registry import register_adapter

__all__ = ["HFDeiTAdapter"]


@register_adapter
class HFDeiTAdapter(HFAdapter):
    family = "Hugging Face DeiTForImageClassification (also WithTeacher)"
    model_classes = ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
    # facebook/deit-* checkpoints: ImageNet mean/std, bicubic resize to 256x256, centre crop 224
    preprocessing: Dict[str, Any] = dict(IMAGENET_PREPROCESSING, crop_mode="squash")

    def _prefix_tokens(self) -> int:
        return 2  # [class], distillation

    def _head(self) -> HeadParts:
        norm = self.backbone.layernorm
        if type(self.model).__name__ == "DeiTForImageClassificationWithTeacher":
            tokens = ((0, self._classifier("cls_classifier")), (1, self._classifier("distillation_classifier")))
            return HeadParts(norm=norm, pooling="token_distill", tokens=tokens, pool_from=2)
        return HeadParts(norm=norm, pooling="token", tokens=((0, self._classifier("classifier")),), pool_from=2)
