"""Attribution methods over a Vision Transformer's attention modules, one file each over one template."""

from collections.abc import MutableMapping
from importlib import import_module
from typing import TYPE_CHECKING, Dict, Iterator

if TYPE_CHECKING:  # the classes are imported on first use, so that the command line's --help needs no torch
    from captum_vit.attr._base import ViTLayerAttribution, resolve_targets
    from captum_vit.attr.agcam import AGCAM
    from captum_vit.attr.attnlrp import AttnLRP
    from captum_vit.attr.cdam import CDAM
    from captum_vit.attr.chefer import GradientAttentionRollout, TransformerAttribution
    from captum_vit.attr.raw import RawAttention
    from captum_vit.attr.rollout import AttentionRollout

# public name -> the module of this package that defines it
_WHERE = {
    "AGCAM": "agcam",
    "AttentionRollout": "rollout",
    "AttnLRP": "attnlrp",
    "CDAM": "cdam",
    "GradientAttentionRollout": "chefer",
    "TransformerAttribution": "chefer",
    "RawAttention": "raw",
    "ViTLayerAttribution": "_base",
    "resolve_targets": "_base",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"captum_vit.attr.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'captum_vit.attr' has no attribute {name!r}")


class _Registry(MutableMapping):
    """``{short name: attribution class}`` whose names are known without importing the classes."""

    def __init__(self, names: Dict[str, str]) -> None:
        self._entries: Dict[str, object] = dict(names)  # a class name (imported on first use) or a class

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = __getattr__(entry)
        return entry  # type: ignore[return-value]  # a class once imported

    def __setitem__(self, name: str, cls: type) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self._entries)})"


#: Short name (command line, result files) -> attribution class, each constructed as ``cls(model)``.
METHODS: MutableMapping[str, type] = _Registry({
    "agcam": "AGCAM",
    "rollout": "AttentionRollout",
    "lrp": "TransformerAttribution",
    "gae": "GradientAttentionRollout",
    "cdam": "CDAM",
    "raw": "RawAttention",
    "attnlrp": "AttnLRP",
})
#: the methods the ONNX export can put in a graph (forward-only computations, or AGCAM's one-token engine)
EXPORTABLE_METHODS = ("agcam", "rollout", "raw")


def construct(cls: type, model, query: str = "class"):
    """``cls(model)``, with ``query=`` passed to the methods that read query rows of the attention.

    ``query="pooled"`` (see :class:`AGCAM`) reaches AGCAM, rollout, raw attention and GAE;
    CDAM is defined on every head and takes no query; Transformer Attribution is defined on the
    [class] row only, and AttnLRP on heads read from tokens, so they are constructed as they are
    and refuse a pooled head themselves.
    """
    import inspect

    from captum_vit.attr._base import QUERIES

    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    if query != "class" and "query" in inspect.signature(cls).parameters:
        return cls(model, query=query)
    return cls(model)


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
    "AttnLRP",
    "CDAM",
    "GradientAttentionRollout",
    "EXPORTABLE_METHODS",
    "METHODS",
    "RawAttention",
    "TransformerAttribution",
    "ViTLayerAttribution",
    "construct",
    "resolve_methods",
    "resolve_targets",
]
