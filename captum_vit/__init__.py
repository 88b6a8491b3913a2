"""captum-vit: class-specific explanations for Vision Transformers as Captum attribution methods."""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# Public names are imported lazily so that ``import captum_vit.data`` stays light
# (dataloader workers import it) and sub-packages do not depend on each other at import time.
_LAZY = {
    "AGCAM": "captum_vit.attr.agcam",
    "AttentionRollout": "captum_vit.attr.rollout",
    "AttnLRP": "captum_vit.attr.attnlrp",
    "CDAM": "captum_vit.attr.cdam",
    "GradientAttentionRollout": "captum_vit.attr.chefer",
    "RawAttention": "captum_vit.attr.raw",
    "TransformerAttribution": "captum_vit.attr.chefer",
    "METHODS": "captum_vit.attr",
    "ViTAdapter": "captum_vit.vit",
    "adapt": "captum_vit.vit",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'captum_vit' has no attribute {name!r}")
