"""Hugging Face ``ViTForImageClassification`` (transformers >= 5) by its parts."""

from __future__ import annotations

import types
from typing import Any, Callable, List, Tuple

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

__all__ = ["HFViTAdapter", "is_hf_vit"]


def is_hf_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "ViTForImageClassification"


def _attention_parts(a: Any) -> AttentionParts:  # a transformers ViTAttention
    return AttentionParts(
        num_heads=a.num_attention_heads if hasattr(a, "num_attention_heads") else a.config.num_attention_heads,
        head_dim=a.head_dim,
        scale=a.scaling,
        proj=a.o_proj,
        q=a.q_proj,
        k=a.k_proj,
        v=a.v_proj,
    )


@register_adapter
class HFViTAdapter(ViTAdapter):
    library = "transformers"
    family = "Hugging Face ViTForImageClassification"
    # transformers' ViTForImageClassification and its layers: their attributes (vit, config, attention,
    # ...) are transformers', which nn.Module's typing cannot see
    model: Any
    blocks: List[Any]
    attentions: List[Any]
    config: Any

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_hf_vit(model)

    def __init__(self, model: nn.Module):
        vit = getattr(model, "vit", None)
        layers = getattr(vit, "layers", None)
        if layers is None and vit is not None and hasattr(vit, "encoder"):
            layers = getattr(vit.encoder, "layer", None)
        if layers is None or not hasattr(model, "classifier"):
            raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face ViTForImageClassification")
        self.model = self.wrapper = model
        self.blocks = list(layers)
        self.attentions = []
        for i, layer in enumerate(self.blocks):
            a = layer.attention
            if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
                raise UnsupportedModelError(
                    f"layer {i}'s attention ({type(a).__name__}) has no q_proj/k_proj/v_proj/o_proj: this "
                    "transformers version's ViT layout is not supported (captum-vit reads transformers >= 5)"
                )
            self.attentions.append(a)
        hf: Any = model  # its attributes are transformers', which nn.Module's typing cannot see
        cfg = hf.config
        self.config = cfg
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self.attentions[0].head_dim
        self.embed_dim = cfg.hidden_size
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.pooling = "token"
        ps = cfg.patch_size
        self.patch_size = (ps, ps) if isinstance(ps, int) else tuple(ps)
        self.in_chans = cfg.num_channels
        self.parts = [
            BlockParts(
                norm1=layer.layernorm_before,
                attn=_attention_parts(layer.attention),
                norm2=layer.layernorm_after,
                mlp=Mlp(fc1=layer.mlp.fc1, act=layer.mlp.activation_fn, fc2=layer.mlp.fc2),
            )
            for layer in self.blocks
        ]
        self.parts_missing = ""
        self.head = HeadParts(norm=hf.vit.layernorm, pooling="token", tokens=((0, hf.classifier),))

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    def embed(self, images: Tensor) -> Tensor:
        return self.model.vit.embeddings(images)

    def _model_logits(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits

    def _check_size(self, h: int, w: int) -> None:
        s = self.config.image_size
        s = (s, s) if isinstance(s, int) else tuple(s)
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
            parts = _attention_parts(mod)
            q, k, v = parts.project(hidden_states)
            p = mod.attention_dropout if mod.training else 0.0
            out = attention_core(q, k, v, parts.scale, rec, req, (lambda a: F.dropout(a, p, True)) if p else None)
            weights = rec.attention[-1] if req.attention != "none" else None
            return parts.output(out.transpose(1, 2).flatten(2)), weights

        return types.MethodType(forward, attn)
