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



def resolve_methods(methods=None):
    r"""Turn a method selection into ``{name: attribution class}``.

    Args:
        methods: ``None`` (every method of :data:`METHODS`), a name, a comma-separated string, a
            sequence of names, or a ready ``{name: class}`` mapping (each class is constructed as
            ``cls(model)``).

    Returns:
        dict[str, type]: the selected classes, in the given order.
    """
    from collections.abc import Mapping

    if isinstance(methods, Mapping):
        return dict(methods)
    if methods is None:
        return dict(METHODS)
    if isinstance(methods, str):
        methods = [methods]
    names = list(dict.fromkeys(m.strip() for item in methods for m in str(item).split(",") if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
    if not names:
        raise ValueError("no method selected")
    return {m: METHODS[m] for m in names}


__all__ = [
    "AGCAM",
    "AttentionRollout",
    "CDAM",
    "GradientAttentionRollout",
    "METHODS",
    "RawAttention",
    "TransformerAttribution",
    "ViTLayerAttribution",
    "resolve_methods",
    "resolve_targets",
]
