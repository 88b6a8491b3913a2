"""timm ``Beit`` (BEiT and BEiT v2: ``beit_*``, ``beitv2_*``) by its parts.

A BEiT block is the pre-norm ViT block with layer scale (``gamma_1``, ``gamma_2``); its
attention keeps the q and v biases outside the fused ``qkv`` layer (the k bias is a zero
buffer) and adds a relative-position bias to the scores: each block's own table
(``use_rel_pos_bias``), one table shared by every block (``use_shared_rel_pos_bias``, computed
once per call as the model does), or both summed. The tables are built for the patch grid of
the model's ``img_size``, so other input sizes are refused.
"""

from __future__ import annotations

import types
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from captum_vit.vit.base import (
    AttentionParts,
    BlockParts,
    ForwardContext,
    Record,
    Request,
    UnsupportedModelError,
    attention_core,
)
from captum_vit.vit.registry import register_adapter
from captum_vit.vit.relpos import FixedGridBiasAdapter, _pair
from captum_vit.vit.timm import timm_mlp

__all__ = ["TimmBeitAdapter", "is_timm_beit"]


def is_timm_beit(model: nn.Module) -> bool:
    try:
        from timm.models.beit import Beit
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, Beit)


def _qkv_bias(a: Any) -> Optional[Callable[[], Optional[Tensor]]]:
    """BEiT's ``cat(q_bias, k_bias, v_bias)``, read on every call (``None`` for an attention without them)."""
    if a.q_bias is None:
        return None
    return lambda: torch.cat((a.q_bias, a.k_bias, a.v_bias))


def _own_bias(a: Any) -> Optional[Tensor]:
    """The block's own relative-position bias ``[1, H, N, N]``, or ``None``."""
    return a._get_rel_pos_bias() if a.relative_position_bias_table is not None else None


def _sum(own: Optional[Tensor], shared: Optional[Tensor]) -> Optional[Tensor]:
    if own is None:
        return shared
    return own if shared is None else own + shared


def _score_bias(a: Any, shared: bool) -> Optional[Callable[[ForwardContext, int], Optional[Tensor]]]:
    """The block's score bias: its own table (read from the module on every call) plus the call's shared bias."""
    if a.relative_position_bias_table is None and not shared:
        return None

    def score_bias(context: ForwardContext, _index: int) -> Optional[Tensor]:
        return _sum(_own_bias(a), context.shared_bias)

    return score_bias


def _attention_parts(a: Any, score_bias: Optional[Callable[[ForwardContext, int], Optional[Tensor]]] = None
                     ) -> AttentionParts:  # a timm beit.Attention
    return AttentionParts(
        num_heads=a.num_heads,
        head_dim=a.qkv.out_features // (3 * a.num_heads),
        scale=a.scale,
        proj=a.proj,
        qkv=a.qkv,
        qkv_bias=_qkv_bias(a),
        score_bias=score_bias,
    )


@register_adapter
class TimmBeitAdapter(FixedGridBiasAdapter):
    """timm ``Beit``, [class]-token (``global_pool="token"``) or average-pooled (the default, with ``fc_norm``)."""

    family = "timm BEiT"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm_beit(model)

    def __init__(self, model: nn.Module):
        if not is_timm_beit(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm Beit")
        super().__init__(model)

    @classmethod
    def _attention_class(cls) -> type:
        from timm.models.beit import Attention

        return Attention

    def _describe_block(self, index: int, blk: Any) -> Tuple[Optional[BlockParts], str]:
        from timm.models.beit import Block

        if type(blk) is not Block:
            return None, f"it is {type(blk).__name__}, not timm's beit.Block"
        mlp, why = timm_mlp(blk.mlp)
        if mlp is None:
            return None, why
        a = blk.attn
        score_bias = _score_bias(a, shared=self.model.rel_pos_bias is not None)
        return BlockParts(norm1=blk.norm1, attn=_attention_parts(a, score_bias), norm2=blk.norm2, mlp=mlp,
                          ls1=blk.gamma_1, ls2=blk.gamma_2), ""

    def _bias_windows(self) -> List[Tuple[str, Tuple[int, int]]]:
        m = self.model
        found = [("rel_pos_bias", _pair(m.rel_pos_bias.window_size))] if m.rel_pos_bias is not None else []
        found += [(f"blocks.{i}.attn", _pair(a.window_size))
                  for i, a in enumerate(self.attentions) if a.relative_position_bias_table is not None]
        return found

    def context(self, grid: Tuple[int, int]) -> ForwardContext:
        """The shared bias, computed once per call (as the model's ``forward_features`` does)."""
        shared = self.model.rel_pos_bias
        return ForwardContext(grid, shared_bias=shared() if shared is not None else None)

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(images)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        def forward(mod, x, shared_rel_pos_bias=None):
            if req.detach:
                x = x.detach()
            B, N, _ = x.shape
            q, k, v = _attention_parts(mod).project(x)
            bias = _sum(_own_bias(mod), shared_rel_pos_bias)
            out = attention_core(q, k, v, mod.scale, rec, req, mod.attn_drop if mod.training else None, bias=bias)
            return mod.proj_drop(mod.proj(out.transpose(1, 2).reshape(B, N, -1)))

        return types.MethodType(forward, attn)
