"""timm ``Eva`` (EVA, EVA02, PE-core, the ``vit_*_rope_*`` models) by its parts.

An ``Eva`` block is the pre-norm ViT block with rotary position embeddings on the queries and
keys of the patch tokens (the prefix tokens are not rotated), q/v biases kept outside a fused
``qkv`` (``EvaAttention``), or timm's ``AttentionRope`` (PE-core), separate q/k/v projections
(``qkv_fused=False``), an optional q/k norm, a norm of the head outputs before the projection
(``scale_attn_inner``), SwiGLU MLPs and per-block layer scale (``gamma_1``, ``gamma_2``).

The rotary table is the model's own (``model.rope.get_embed``, as ``Eva._pos_embed`` computes
it for fixed and dynamic input sizes; one table per block for the ``'mixed'`` rope type). It is
computed once per call by :meth:`TimmEvaAdapter.context` and read by every block's
``qk_transform``, so that a trace for one input size (ONNX) holds it as a constant.

Post-norm blocks (``use_post_norm=True``), gated attention and grouped-query attention are not
described by the parts; such models run through the serialised patched fallback, which
reproduces them exactly, and the methods that need the parts refuse them with the reason.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_vit.vit.base import (
    AttentionParts,
    BlockParts,
    ForwardContext,
    HeadParts,
    Record,
    Request,
    UnsupportedModelError,
    ViTAdapter,
    attention_core,
)
from captum_vit.vit.registry import register_adapter
from captum_vit.vit.timm import map_pool_weights, timm_check_size, timm_grid, timm_mlp

__all__ = ["TimmEvaAdapter", "is_timm_eva"]


def is_timm_eva(model: nn.Module) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, Eva)


def _opt(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None or isinstance(module, nn.Identity) else module


def _head_dim(a: Any) -> int:
    """The per-head width (timm < 1.0.20's ``EvaAttention`` keeps no ``head_dim``: read from the weights)."""
    if getattr(a, "head_dim", None) is not None:
        return int(a.head_dim)
    if a.qkv is not None:
        return a.qkv.out_features // (3 * a.num_heads)
    return a.q_proj.out_features // a.num_heads


def _fused_bias(a: Any) -> Optional[Tensor]:
    """The fused ``qkv`` bias: EVA's ``q_bias``, zero ``k_bias`` and ``v_bias``, or the linear layer's own."""
    if getattr(a, "q_bias", None) is not None:
        return torch.cat((a.q_bias, a.k_bias, a.v_bias))
    return a.qkv.bias


def rotate(q: Tensor, k: Tensor, table: Tensor, prefix: int, half: bool) -> Tuple[Tensor, Tensor]:
    """The attention module's rotary embedding: the patch tokens' ``q, k`` rotated by ``table``, prefix tokens kept.

    ``half``: timm's ``rotate_half`` layout (else interleaved), as the attention module is built.
    """
    from timm.layers import apply_rot_embed_cat

    def rot(t: Tensor) -> Tensor:
        # the half layout's keyword only where it is used: timm < 1.0.20 has no such argument
        r = apply_rot_embed_cat(t[:, :, prefix:], table, half=True) if half else apply_rot_embed_cat(
            t[:, :, prefix:], table)
        return torch.cat([t[:, :, :prefix], r], dim=2)

    return rot(q), rot(k)


def _rotary(prefix: int, half: bool, per_block: bool) -> Callable[[Tensor, Tensor, ForwardContext, int],
                                                                    Tuple[Tensor, Tensor]]:
    """The ``qk_transform`` of one block: the call's rotary table (block ``index``'s for the 'mixed' rope)."""

    def transform(q: Tensor, k: Tensor, context: ForwardContext, index: int) -> Tuple[Tensor, Tensor]:
        table = context.rope[index] if per_block else context.rope
        return rotate(q, k, table, prefix, half)

    return transform


class _FixedGridRope(nn.Module):
    """A rotary embedding fixed to one patch grid: what a fixed-size ``Eva`` asks its ``rope`` for.

    For the fixed-size copy of a ``dynamic_img_size`` model (:meth:`TimmEvaAdapter.for_input_size`),
    whose rope was built without a grid: ``get_embed()`` is the inner rope's table for ``grid``.
    """

    def __init__(self, inner: nn.Module, grid: Tuple[int, int]) -> None:
        super().__init__()
        self.inner = inner
        self.feat_shape = list(grid)

    def get_embed(self, shape: Optional[List[int]] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        kw = {"dtype": dtype} if dtype is not None else {}
        return self.inner.get_embed(shape=self.feat_shape, **kw)  # type: ignore[operator]


@register_adapter
class TimmEvaAdapter(ViTAdapter):
    library = "timm"
    family = "timm Eva (EVA, EVA02, PE-core)"
    # timm's Eva, its blocks and attention modules: their attributes (blocks, rope, patch_embed, ...) are
    # timm's, which nn.Module's typing cannot see
    model: Any
    blocks: List[Any]
    attentions: List[Any]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm_eva(model)

    def __init__(self, model: nn.Module):
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        if not is_timm_eva(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm Eva")
        self.model = self.wrapper = model
        vit: Any = model
        self.blocks = list(vit.blocks)
        self.attentions = []
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if type(attn) not in (EvaAttention, AttentionRope):
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) has attention module {type(attn).__name__}, which captum-vit "
                    "cannot read: only timm's EvaAttention and AttentionRope (attn_type='eva' or 'rope') are "
                    "supported in an Eva"
                )
            self.attentions.append(attn)
        a0 = self.attentions[0]
        self.num_heads, self.head_dim = a0.num_heads, _head_dim(a0)
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.has_class_token = getattr(vit, "cls_token", None) is not None
        self.pooling = "map" if getattr(vit, "attn_pool", None) is not None else (vit.global_pool or "none")
        pe = vit.patch_embed
        self.patch_size = tuple(pe.patch_size)
        self.in_chans = next(m for m in pe.modules() if isinstance(m, nn.Conv2d)).in_channels
        #: whether the rope holds one table per block (rope_type='mixed'): block i reads table[i]
        self.rope_per_block = bool(getattr(vit, "rope_mixed", False))
        self.parts, self.parts_missing = self._describe_blocks()
        self.head = self._describe_head()

    # ----------------------------------------------------------------- parts
    def _describe_blocks(self) -> Tuple[Optional[List[BlockParts]], str]:
        from timm.models.eva import EvaBlock

        parts = []
        for i, blk in enumerate(self.blocks):
            if type(blk) is not EvaBlock:
                return None, (
                    f"block {i} is {type(blk).__name__}, not the pre-norm EvaBlock (a post-norm block normalises "
                    "the attention and MLP outputs instead of their inputs)"
                )
            a: Any = blk.attn
            if getattr(a, "gate", None) is not None:
                return None, f"block {i}'s attention gates its output (a sigmoid gate before the projection)"
            if getattr(a, "num_kv_groups", 1) != 1:
                return None, f"block {i}'s attention shares key/value heads between query heads (grouped-query)"
            mlp_parts, why = timm_mlp(blk.mlp)
            if mlp_parts is None:
                return None, f"block {i}: {why}"
            rotary = None
            if self.model.rope is not None:
                rotary = _rotary(a.num_prefix_tokens, bool(getattr(a, "rotate_half", False)), self.rope_per_block)
            fused = a.qkv is not None
            attn = AttentionParts(
                num_heads=a.num_heads,
                head_dim=_head_dim(a),
                scale=a.scale,
                proj=a.proj,
                qkv=a.qkv,
                q=None if fused else a.q_proj,
                k=None if fused else a.k_proj,
                v=None if fused else a.v_proj,
                q_norm=_opt(a.q_norm),
                k_norm=_opt(a.k_norm),
                out_norm=_opt(getattr(a, "norm", None)),
                qkv_bias=functools.partial(_fused_bias, a) if fused else None,
                qk_transform=rotary,
            )
            parts.append(BlockParts(norm1=blk.norm1, attn=attn, norm2=blk.norm2, mlp=mlp_parts,
                                    ls1=blk.gamma_1, ls2=blk.gamma_2))
        return parts, ""

    def _describe_head(self) -> HeadParts:
        m = self.model
        tokens: Tuple[Tuple[int, nn.Linear], ...] = ()
        if self.pooling == "token" and isinstance(m.head, nn.Linear):
            tokens = ((0, m.head),)
        return HeadParts(
            norm=m.norm,
            pooling=self.pooling,
            tokens=tokens,
            fc_norm=_opt(getattr(m, "fc_norm", None)),
            pooled=None if tokens else m.forward_head,
            # Eva's attention pool reads every token, the prefix tokens included; average pooling skips them
            pool_from=0 if self.pooling == "map" else self.num_prefix_tokens,
            pool_weights=map_pool_weights(m.attn_pool) if self.pooling == "map" else None,
        )

    # ----------------------------------------------------------------- library hooks
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def active_randomness(self) -> List[str]:
        """Dropouts as for every ViT, and a rope that draws random coordinates (training-mode augmentation)."""
        names = super().active_randomness()
        rope = self.model.rope
        if rope is not None and rope.training and getattr(rope, "aug_active", False):
            names.append("rope (random coordinate augmentation)")
        return names

    def context(self, grid: Tuple[int, int]) -> ForwardContext:
        """The call's rotary table for the ``gh x gw`` grid, as ``Eva._pos_embed`` computes it.

        Only the pure forward reads it; where the patched fallback runs instead, the model's own
        forward computes (and, for an augmenting rope in training mode, draws) its table.
        """
        m = self.model
        if m.rope is None or self.parts is None or self.active_randomness():
            return ForwardContext(grid)
        if m.dynamic_img_size:
            table = m.rope.get_embed(shape=grid)
        elif hasattr(m.rope, "feat_shape"):
            table = m.rope.get_embed()
        else:  # a rope without a grid of its own (timm's MRoPE) is asked for the model's
            table = m.rope.get_embed(shape=m.patch_embed.grid_size)
        return ForwardContext(grid, rope=table)

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        tokens, _ = m._pos_embed(m.patch_embed(images))  # the rotary table is the context's
        return m.norm_pre(tokens)

    def _model_logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def for_input_size(self, h: int, w: int) -> nn.Module:
        """A copy of the wrapper whose ``dynamic_img_size`` Eva is fixed to ``h x w``; the wrapper for a fixed-size one.

        The copy's absolute position embedding is resampled once (no bicubic resampling reaches a
        trace) and its rope is asked for the one grid, so that the table is a constant of the trace.
        """
        m = self.model
        if not getattr(m, "dynamic_img_size", False):
            return self.wrapper
        if not hasattr(m, "set_input_size"):
            raise ValueError(
                "this timm version cannot fix a dynamic_img_size Eva to one input size (no Eva.set_input_size); "
                "upgrade timm (>= 1.0.20), or create the model with a fixed img_size"
            )
        memo: dict = {}
        wrapper = copy.deepcopy(self.wrapper, memo)
        vit = memo[id(m)]
        vit.set_input_size(img_size=(h, w))
        if vit.rope is not None:
            vit.rope = _FixedGridRope(vit.rope, self._grid(h, w))
        vit.dynamic_img_size = False
        vit.patch_embed.flatten = True  # fixed-size models take the patch tokens flattened (NLC)
        return wrapper

    def _check_size(self, h: int, w: int) -> None:
        timm_check_size(self.model, self.patch_size, h, w)

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        return timm_grid(self.model, h, w)

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        def forward(mod, x, rope=None, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                raise ValueError("captum-vit explains unmasked self-attention; got an attention mask")
            if req.detach:
                x = x.detach()
            B, N, _ = x.shape
            H, d = mod.num_heads, _head_dim(mod)
            kv_heads = getattr(mod, "num_kv_heads", H)
            gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
            if mod.qkv is not None:
                qkv = F.linear(x, mod.qkv.weight, _fused_bias(mod))
                q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q = mod.q_proj(x).reshape(B, N, H, d).transpose(1, 2)
                k = mod.k_proj(x).reshape(B, N, kv_heads, d).transpose(1, 2)
                v = mod.v_proj(x).reshape(B, N, kv_heads, d).transpose(1, 2)
            q, k = mod.q_norm(q), mod.k_norm(k)
            if rope is not None:  # the block's table, as the model passes it (a random draw in training mode)
                q, k = rotate(q, k, rope, mod.num_prefix_tokens, bool(getattr(mod, "rotate_half", False)))
                q, k = q.type_as(v), k.type_as(v)
            if kv_heads != H:
                k, v = k.repeat_interleave(H // kv_heads, dim=1), v.repeat_interleave(H // kv_heads, dim=1)
            out = attention_core(q, k, v, mod.scale, rec, req, mod.attn_drop if mod.training else None)
            out = mod.norm(out.transpose(1, 2).reshape(B, N, -1))
            if gate is not None:
                out = out * gate
            return mod.proj_drop(mod.proj(out))

        return types.MethodType(forward, attn)
