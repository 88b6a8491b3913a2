"""Attribution methods over a Vision Transformer's attention modules."""

from captum_vit.attr._base import ViTLayerAttribution, resolve_targets
from captum_vit.attr.agcam import AGCAM

#: Method name -> attribution class, each constructed as ``cls(model)``.
METHODS = {"agcam": AGCAM}

__all__ = ["AGCAM", "METHODS", "ViTLayerAttribution", "resolve_targets"]
