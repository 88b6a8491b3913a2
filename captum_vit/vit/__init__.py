"""The one package that knows Vision Transformer internals.

:func:`adapt` describes a ViT classifier by its parts (:class:`BlockParts` of
:class:`AttentionParts`, :class:`MlpParts` and layer scales, and :class:`HeadParts`) and returns
a :class:`ViTAdapter` whose :meth:`~ViTAdapter.forward` runs one pure forward pass over them,
recording what the attribution methods ask for (:class:`Request`, :class:`Record`). Nothing
outside this package reads timm or transformers internals.

Each family is one adapter module that registers its class (:mod:`captum_vit.vit.registry`):
timm ``VisionTransformer`` (DeiT distilled, registers, ``dynamic_img_size``, gap and MAP heads),
``Eva`` (EVA, EVA02, PE-core: rotary q/k, SwiGLU), ``Beit`` and ``VisionTransformerRelPos``
(relative-position bias), ``NaFlexVit``; Hugging Face ``ViTForImageClassification``,
``DeiTForImageClassification`` (with teacher) and ``Dinov2ForImageClassification`` (with
registers). A new family needs an adapter file and its import below, no edit elsewhere.

Wrappers: an ``nn.Sequential`` holding exactly one supported ViT (preprocessing before it,
output transforms after it) and a ``torch.compile`` wrapper (``OptimizedModule``) are explained
through the wrapper's own computation. Any other module that contains a ViT is refused with an
error naming the inner ViT to pass instead, since its forward could feed the ViT anything.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from torch import nn

from captum_vit.vit.base import (
    AttentionParts,
    BlockParts,
    BlockTrace,
    ForwardContext,
    GluMlp,
    HeadParts,
    HeadTrace,
    Mlp,
    MlpParts,
    Record,
    Request,
    UnsupportedModelError,
    ViTAdapter,
)

# Each adapter module registers its class on import; the registry asks them in this order.
from captum_vit.vit.timm import TimmViTAdapter  # isort: skip
from captum_vit.vit.eva import TimmEvaAdapter  # isort: skip
from captum_vit.vit.hf import HFViTAdapter  # isort: skip
from captum_vit.vit.hf_deit import HFDeiTAdapter  # isort: skip
from captum_vit.vit.hf_dinov2 import HFDinov2Adapter  # isort: skip
from captum_vit.vit.beit import TimmBeitAdapter  # isort: skip
from captum_vit.vit.relpos import TimmRelPosAdapter  # isort: skip
from captum_vit.vit.naflex import NaFlexVitAdapter  # isort: skip
from captum_vit.vit.registry import ADAPTERS, find_adapter, matching_adapter  # isort: skip

__all__ = [
    "ADAPTERS",
    "AttentionParts",
    "BlockParts",
    "BlockTrace",
    "ForwardContext",
    "GluMlp",
    "HeadParts",
    "HeadTrace",
    "HFDeiTAdapter",
    "HFDinov2Adapter",
    "HFViTAdapter",
    "Mlp",
    "MlpParts",
    "NaFlexVitAdapter",
    "Record",
    "Request",
    "TimmEvaAdapter",
    "TimmBeitAdapter",
    "TimmRelPosAdapter",
    "TimmViTAdapter",
    "UnsupportedModelError",
    "ViTAdapter",
    "adapt",
]


def _unsupported_msg(model: object) -> str:
    families = "; ".join(cls.family for cls in ADAPTERS)
    return (
        f"{type(model).__name__} is not a supported Vision Transformer. captum-vit reads: {families}; also inside "
        "nn.Sequential(preprocessing, vit) or torch.compile(vit), e.g. timm.create_model('vit_base_patch16_224')."
    )


def _uncompiled(model: nn.Module) -> nn.Module:
    # torch.compile returns an OptimizedModule whose _orig_mod is the module it compiles; the
    # description runs the original module's parts, so the numbers are those of the eager model.
    while type(model).__name__ == "OptimizedModule":
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _bare(model: nn.Module) -> Optional[ViTAdapter]:
    return find_adapter(_uncompiled(model))


def _inner_vits(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if name and matching_adapter(m) is not None]


def adapt(model: Union[nn.Module, ViTAdapter]) -> ViTAdapter:
    """Return the :class:`ViTAdapter` describing ``model``.

    Args:
        model: a timm or Hugging Face ViT classifier, a ``torch.compile`` of one, or an
            ``nn.Sequential`` with exactly one of them among its direct children.

    Raises:
        UnsupportedModelError: if ``model`` is not a ViT classifier captum-vit can read.
    """
    if isinstance(model, ViTAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(_unsupported_msg(model))
    adapter = _bare(model)
    if adapter is not None:
        adapter.wrapper = model
        return adapter
    inner = _uncompiled(model)
    if isinstance(inner, nn.Sequential):
        children = list(inner)
        found = [(i, a) for i, c in enumerate(children) if (a := _bare(c)) is not None]
        if len(found) == 1:
            i, adapter = found[0]
            adapter.wrapper, adapter.pre, adapter.post = model, tuple(children[:i]), tuple(children[i + 1 :])
            return adapter
    vits = _inner_vits(inner)
    if vits:
        names = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in vits[:3])
        raise UnsupportedModelError(
            f"{type(model).__name__} wraps a Vision Transformer at {names}, but captum-vit cannot see how its "
            f"forward feeds the ViT. Pass the inner ViT instead (e.g. model.{vits[0][0]}) with the inputs it "
            "receives, or put the preprocessing in an nn.Sequential(preprocessing, vit), which is explained as a whole."
        )
    raise UnsupportedModelError(_unsupported_msg(model))
