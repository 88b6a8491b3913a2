"""Hugging Face ``Dinov2ForImageClassification`` (and ``Dinov2WithRegistersForImageClassification``) by their parts.

DINOv2's layers are pre-norm blocks with layer scale (``layer_scale1.lambda1``,
``layer_scale2.lambda1``) and either a GELU MLP (``fc1``, ``activation_fn``, ``fc2``) or a SwiGLU
(``silu(gate_proj(x)) * up_proj(x) -> down_proj``; older transformers pack gate and value into one
``weights_in`` and split it in halves, the gate first). The head is one linear layer on the
[class] token concatenated with the mean of the patch tokens (``"token+avg"``); register tokens
sit between the [class] token and the patches and are in neither. The positional embeddings are
interpolated to the patch grid of the input, so any input size that is a multiple of the patch
size is taken.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from captum_vit.vit.base import BlockParts, GluMlp, HeadParts, Mlp, MlpParts
from captum_vit.vit.hf import IMAGENET_PREPROCESSING, HFAdapter, hf_attention_parts
from captum_vit.vit.registry import register_adapter

__all__ = ["HFDinov2Adapter", "dinov2_mlp"]


def _silu(act: Any) -> nn.Module:
    # transformers' SiLUActivation is F.silu; nn.SiLU is the module whose derivative the VJP knows
    return nn.SiLU() if type(act).__name__ == "SiLUActivation" else act


def dinov2_mlp(mlp: Any) -> Tuple[Optional[MlpParts], str]:
    """DINOv2's ``Dinov2MLP`` or ``Dinov2SwiGLUFFN`` (either layout) by its parts, or ``(None, why not)``."""

    def linear(*names: str) -> bool:
        return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names)

    if linear("fc1", "fc2") and hasattr(mlp, "activation_fn"):
        return Mlp(fc1=mlp.fc1, act=mlp.activation_fn, fc2=mlp.fc2), ""
    if linear("gate_proj", "up_proj", "down_proj"):
        return GluMlp(act=_silu(getattr(mlp, "act_fn", nn.SiLU())), fc2=mlp.down_proj, fc_gate=mlp.gate_proj,
                      fc_value=mlp.up_proj), ""
    if linear("weights_in", "weights_out"):
        # x1, x2 = weights_in(x).chunk(2, dim=-1); weights_out(silu(x1) * x2)
        return GluMlp(act=nn.SiLU(), fc2=mlp.weights_out, fc1=mlp.weights_in, gate_last=False), ""
    return None, f"its MLP is {type(mlp).__name__}, not DINOv2's MLP or SwiGLU"


def _token_and_mean(classifier: nn.Linear, first_patch: int) -> Callable[[Tensor], Tensor]:
    def logits(normed: Tensor) -> Tensor:
        return classifier(torch.cat([normed[:, 0], normed[:, first_patch:].mean(dim=1)], dim=-1))

    return logits


@register_adapter
class HFDinov2Adapter(HFAdapter):
    family = "Hugging Face Dinov2ForImageClassification (also WithRegisters)"
    model_classes = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
    # facebook/dinov2-* checkpoints (BitImageProcessor): ImageNet mean/std, bicubic resize of the
    # shorter side to 256, centre crop 224
    preprocessing: Dict[str, Any] = dict(IMAGENET_PREPROCESSING)

    def _prefix_tokens(self) -> int:
        return 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)

    def _block_parts(self, layer: Any) -> Tuple[Optional[BlockParts], str]:
        mlp, why = dinov2_mlp(layer.mlp)
        if mlp is None:
            return None, why
        return BlockParts(
            norm1=layer.norm1,
            attn=hf_attention_parts(layer.attention),
            norm2=layer.norm2,
            mlp=mlp,
            ls1=layer.layer_scale1.lambda1,
            ls2=layer.layer_scale2.lambda1,
        ), ""

    def _head(self) -> HeadParts:
        p = self.num_prefix_tokens
        return HeadParts(norm=self.backbone.layernorm, pooling="token+avg",
                         pooled=_token_and_mean(self._classifier("classifier"), p), pool_from=p)

    def _check_size(self, h: int, w: int) -> None:
        ph, pw = self.patch_size
        if h % ph or w % pw or h < ph or w < pw:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {ph}x{pw}: the patch embedding would drop "
                "the remainder, and the map would not cover the image; resize or crop to a multiple of the patch size"
            )
