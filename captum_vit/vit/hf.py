"""Hugging Face image classifiers (transformers >= 5) by their parts: the shared base, ``ViTForImageClassification``.

Every transformers ViT-like classifier keeps its encoder under ``model.<base_model_prefix>``
(``vit``, ``deit``, ``dinov2``, ...), its layers at ``.layers`` (or ``.encoder.layer``), the
final norm at ``.layernorm`` and attention modules with separate ``q_proj``/``k_proj``/``v_proj``
and ``o_proj``. :class:`HFAdapter` reads all of that once; a family's adapter says only what
differs: its prefix tokens, its block parts when they are not ViT's, its head, its input sizes.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from captum_vit.vit.base import (
    AttentionParts,
    BlockParts,
    HeadParts,
    Mlp,
    Record,
    Request,
    UnsupportedModelError,
    ViTAdapter,
    attention_core,
)
from captum_vit.vit.registry import register_adapter

__all__ = ["HFAdapter", "HFViTAdapter", "hf_attention_parts", "is_hf_vit", "IMAGENET_PREPROCESSING"]


def is_hf_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "ViTForImageClassification"


#: The eval preprocessing of checkpoints normalised with the ImageNet mean and std and centre-cropped
#: from a resize to 256 / 224 of the input size, bicubic (DeiT's and DINOv2's image processors).
IMAGENET_PREPROCESSING: Dict[str, Any] = {
    "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875,
    "crop_mode": "center",
}


def hf_attention_parts(a: Any) -> AttentionParts:  # a transformers ViTAttention (DeiT's, DINOv2's alike)
    return AttentionParts(
        num_heads=a.num_attention_heads if hasattr(a, "num_attention_heads") else a.config.num_attention_heads,
        head_dim=a.head_dim,
        scale=a.scaling,
        proj=a.o_proj,
        q=a.q_proj,
        k=a.k_proj,
        v=a.v_proj,
    )


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class HFAdapter(ViTAdapter):
    """What every transformers ViT-like classifier shares; a family subclass names its classes and its head.

    Subclass hooks: :attr:`model_classes`, :attr:`preprocessing`, :meth:`_prefix_tokens`,
    :meth:`_block_parts` (ViT's pre-norm layer by default), :meth:`_head`, and :meth:`_check_size`
    (the fixed ``config.image_size`` by default).
    """

    library = "transformers"
    #: the transformers class names this adapter describes.
    model_classes: Tuple[str, ...] = ()
    #: the eval preprocessing of the family's checkpoints (their image processor's defaults) as the
    #: keys of a timm data config besides ``input_size``, which is ``config.image_size``.
    preprocessing: Dict[str, Any] = {
        "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "squash",
    }
    # transformers' models, layers and attention modules: their attributes (config, attention,
    # layernorm, ...) are transformers', which nn.Module's typing cannot see
    model: Any
    backbone: Any
    blocks: List[Any]
    attentions: List[Any]
    config: Any

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        hf: Any = model  # its attributes are transformers', which nn.Module's typing cannot see
        prefix = getattr(hf, "base_model_prefix", "")
        backbone = getattr(hf, prefix, None) if prefix else None
        layers = getattr(backbone, "layers", None)
        if layers is None and backbone is not None and hasattr(backbone, "encoder"):
            layers = getattr(backbone.encoder, "layer", None)
        if layers is None or not hasattr(backbone, "embeddings") or not hasattr(backbone, "layernorm"):
            raise UnsupportedModelError(
                f"{name} has no encoder layers at .{prefix or '<base_model_prefix>'}.layers (or .encoder.layer) "
                "with embeddings and a final layernorm: captum-vit reads the layout of transformers >= 5"
            )
        self.model = self.wrapper = model
        self.backbone = backbone
        self.config = cfg = hf.config
        self.blocks = list(layers)
        self.attentions = []
        for i, layer in enumerate(self.blocks):
            a = getattr(layer, "attention", None)
            if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
                raise UnsupportedModelError(
                    f"layer {i}'s attention ({type(a).__name__}) has no q_proj/k_proj/v_proj/o_proj: this "
                    f"transformers version's {name} layout is not supported (captum-vit reads transformers >= 5)"
                )
            self.attentions.append(a)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self.attentions[0].head_dim
        self.embed_dim = cfg.hidden_size
        self.patch_size = _pair(cfg.patch_size)
        self.in_chans = cfg.num_channels
        self.has_class_token = True
        self.num_prefix_tokens = self._prefix_tokens()
        parts: List[BlockParts] = []
        self.parts_missing = ""
        for i, layer in enumerate(self.blocks):
            block, why = self._block_parts(layer)
            if block is None:
                self.parts_missing = f"layer {i}: {why}"
                break
            parts.append(block)
        self.parts = None if self.parts_missing else parts
        self.head = self._head()
        self.pooling = self.head.pooling

    # ----------------------------------------------------------------- family hooks
    def _prefix_tokens(self) -> int:
        """[class] and any other tokens before the patch tokens."""
        return 1

    def _block_parts(self, layer: Any) -> Tuple[Optional[BlockParts], str]:
        """A pre-norm ViT layer (``layernorm_before``, ``attention``, ``layernorm_after``, ``mlp``), or ``(None, why)``.

        The default: ViT's and DeiT's layers are the same.
        """
        mlp: Any = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1", "fc2")) or not hasattr(
            mlp, "activation_fn"
        ):
            return None, f"its MLP ({type(mlp).__name__}) is not fc1 -> activation_fn -> fc2"
        return BlockParts(
            norm1=layer.layernorm_before,
            attn=hf_attention_parts(layer.attention),
            norm2=layer.layernorm_after,
            mlp=Mlp(fc1=mlp.fc1, act=mlp.activation_fn, fc2=mlp.fc2),
        ), ""

    def _head(self) -> HeadParts:
        raise NotImplementedError

    def _classifier(self, attr: str) -> nn.Linear:
        """The linear head ``model.<attr>``; refused when the model was built without one (``num_labels=0``)."""
        head = getattr(self.model, attr, None)
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}.{attr} is {type(head).__name__}, not a linear classifier (a model built "
                "with num_labels=0 has no classes to explain); build it with num_labels > 0"
            )
        return head

    # ----------------------------------------------------------------- library hooks
    @property
    def num_classes(self) -> int:
        return self.config.num_labels

    def embed(self, images: Tensor) -> Tensor:
        return self.backbone.embeddings(images)

    def _model_logits(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits

    def _check_size(self, h: int, w: int) -> None:
        s = _pair(self.config.image_size)
        if (h, w) != s:
            raise ValueError(
                f"input size {h}x{w} does not match the model's input size {s[0]}x{s[1]} (config.image_size); "
                "resize the images"
            )

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        return h // self.patch_size[0], w // self.patch_size[1]

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        def forward(mod, hidden_states, attention_mask=None, **kwargs):
            if attention_mask is not None:
                raise ValueError("captum-vit explains unmasked self-attention; got an attention mask")
            if req.detach:
                hidden_states = hidden_states.detach()
            parts = hf_attention_parts(mod)
            q, k, v = parts.project(hidden_states)
            # transformers applies its attention dropout functionally, from a float rate
            p = mod.attention_dropout if mod.training else 0.0
            out = attention_core(q, k, v, parts.scale, rec, req, (lambda a: F.dropout(a, p, True)) if p else None)
            weights = rec.attention[-1] if req.attention != "none" else None
            return parts.output(out.transpose(1, 2).flatten(2)), weights

        return types.MethodType(forward, attn)


@register_adapter
class HFViTAdapter(HFAdapter):
    family = "Hugging Face ViTForImageClassification"
    model_classes = ("ViTForImageClassification",)

    def _head(self) -> HeadParts:
        return HeadParts(norm=self.backbone.layernorm, pooling="token", tokens=((0, self._classifier("classifier")),))
