"""Attribution methods over a Vision Transformer's attention modules, one file each over one template."""

from captum_vit.attr._base import ViTLayerAttribution, resolve_targets
from captum_vit.attr.agcam import AGCAM
from captum_vit.attr.cdam import CDAM
from captum_vit.attr.chefer import GradientAttentionRollout, TransformerAttribution
from captum_vit.attr.raw import RawAttention
from captum_vit.attr.rollout import AttentionRollout

#: Short name (command line, result files) -> attribution class, each constructed as ``cls(model)``.
METHODS = {
    "agcam": AGCAM,
    "rollout": AttentionRollout,
    "lrp": TransformerAttribution,
    "gae": GradientAttentionRollout,
    "cdam": CDAM,
    "raw": RawAttention,
}

__all__ = [
    "AGCAM",
    "AttentionRollout",
    "CDAM",
    "GradientAttentionRollout",
    "METHODS",
    "RawAttention",
    "TransformerAttribution",
    "ViTLayerAttribution",
    "resolve_targets",
]
