"""timm ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``) by its parts.

Its attention adds a relative-position bias to the scores: each block's own (``RelPosMlp``, a
small MLP on log-spaced coordinates, or ``RelPosBias``, a learned table), or one module shared
by every block (``shared_rel_pos=True``), whose bias is then computed once per call, as the
model does. The bias is built for the patch grid of the model's ``img_size``, so other input
sizes are refused. :class:`FixedGridBiasAdapter` is the part BEiT shares (:mod:`captum_vit.vit.beit`).
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
    HeadParts,
    Record,
    Request,
    UnsupportedModelError,
    ViTAdapter,
    attention_core,
)
from captum_vit.vit.registry import register_adapter
from captum_vit.vit.timm import timm_mlp

__all__ = ["FixedGridBiasAdapter", "TimmRelPosAdapter", "is_timm_relpos"]


def _opt(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None or isinstance(module, nn.Identity) else module


def _gamma(ls: Any) -> Optional[Tensor]:  # timm's LayerScale, or Identity
    return None if ls is None or isinstance(ls, nn.Identity) else ls.gamma


def _pair(size: Any) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class FixedGridBiasAdapter(ViTAdapter):
    """A timm ViT whose attention scores carry a relative-position bias built for one patch grid.

    What BEiT and ``VisionTransformerRelPos`` share: a ``PatchEmbed``, an optional [class] token,
    ``blocks``, a ``norm`` / ``fc_norm`` / ``head`` and a ``global_pool`` of ``"token"`` or
    ``"avg"``. Subclasses say which attention class they read (:meth:`_attention_class`), describe
    one block (:meth:`_describe_block`) and name the windows their biases are built for
    (:meth:`_bias_windows`), which fix the input size.
    """

    library = "timm"
    # timm's models, blocks and attention modules: their attributes are timm's, which nn.Module's
    # typing cannot see
    model: Any
    blocks: List[Any]
    attentions: List[Any]

    def __init__(self, model: nn.Module):
        attention_cls = self._attention_class()
        self.model = self.wrapper = model
        vit: Any = model
        self.blocks = list(vit.blocks)
        self.attentions = []
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, attention_cls):
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) has attention module {type(attn).__name__}, which captum-vit "
                    f"cannot read: only {attention_cls.__module__}.{attention_cls.__name__} (the {self.family} "
                    "default) is supported"
                )
            self.attentions.append(attn)
        if vit.global_pool not in ("token", "avg"):
            raise UnsupportedModelError(
                f"this {self.family} has global_pool={vit.global_pool!r}, so its output is not one logit vector per "
                "image; create it with global_pool='token' or 'avg' (or reset_classifier(n, global_pool='avg'))"
            )
        a0 = self.attentions[0]
        self.num_heads = a0.num_heads
        self.head_dim = a0.qkv.out_features // (3 * a0.num_heads)
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.has_class_token = getattr(vit, "cls_token", None) is not None
        self.pooling = vit.global_pool
        pe = vit.patch_embed
        self.patch_size = _pair(pe.patch_size)
        self.in_chans = pe.proj.in_channels
        parts: List[BlockParts] = []
        self.parts_missing = ""
        for i, blk in enumerate(self.blocks):
            block, why = self._describe_block(i, blk)
            if block is None:
                self.parts_missing = f"block {i}: {why}"
                break
            parts.append(block)
        self.parts = None if self.parts_missing else parts
        self.head = self._describe_head()

    # ----------------------------------------------------------------- what subclasses describe
    @classmethod
    def _attention_class(cls) -> type:
        raise NotImplementedError

    def _describe_block(self, index: int, blk: Any) -> Tuple[Optional[BlockParts], str]:
        """The block's parts, or ``(None, why not)`` (then the patched fallback runs)."""
        raise NotImplementedError

    def _bias_windows(self) -> List[Tuple[str, Tuple[int, int]]]:
        """``(module name, window)`` for every relative-position bias: the grids they are built for, read now."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared parts
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
            pool_from=self.num_prefix_tokens,
        )

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _model_logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        pe = self.model.patch_embed
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size((h, w)))
        return h // self.patch_size[0], w // self.patch_size[1]

    def _check_size(self, h: int, w: int) -> None:
        pe = self.model.patch_embed
        ph, pw = self.patch_size
        if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(
                f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop to the model's "
                "input size"
            )
        grid = self._grid(h, w)
        resize = (
            f"; resize the images, or call model.set_input_size(img_size=({h}, {w})) once to rebuild the model for "
            "that size (it resamples the bias tables)"
            if hasattr(self.model, "set_input_size")
            else "; resize the images (this timm version has no set_input_size to rebuild the bias for another size)"
        )
        for name, window in self._bias_windows():
            if tuple(grid) != tuple(window):
                size = f"{window[0] * ph}x{window[1] * pw}"
                raise ValueError(
                    f"input size {h}x{w} makes a {grid[0]}x{grid[1]} patch grid, but the relative-position bias of "
                    f"{name} is built for a {window[0]}x{window[1]} grid (input size {size}){resize}"
                )
        img = getattr(pe, "img_size", None)
        if img is not None and getattr(pe, "strict_img_size", True) and (h, w) != tuple(img):
            raise ValueError(
                f"input size {h}x{w} does not match the model's fixed input size {img[0]}x{img[1]}{resize}"
            )


# --------------------------------------------------------------------------- VisionTransformerRelPos
def is_timm_relpos(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformerRelPos)


def _score_bias(a: Any, shared: bool) -> Optional[Callable[[ForwardContext, int], Optional[Tensor]]]:
    """The block's score bias: its own ``rel_pos`` module's (read on every call), else the call's shared bias.

    As in timm's ``RelPosAttention``, a block's own bias replaces the shared one.
    """
    if a.rel_pos is None and not shared:
        return None

    def score_bias(context: ForwardContext, _index: int) -> Optional[Tensor]:
        return a.rel_pos.get_bias() if a.rel_pos is not None else context.shared_bias

    return score_bias


def _attention_parts(a: Any, score_bias: Optional[Callable[[ForwardContext, int], Optional[Tensor]]] = None
                     ) -> AttentionParts:  # a timm RelPosAttention
    return AttentionParts(
        num_heads=a.num_heads,
        head_dim=a.head_dim,
        scale=a.scale,
        proj=a.proj,
        qkv=a.qkv,
        q_norm=_opt(a.q_norm),
        k_norm=_opt(a.k_norm),
        score_bias=score_bias,
    )


@register_adapter
class TimmRelPosAdapter(FixedGridBiasAdapter):
    """timm ``VisionTransformerRelPos``: ``RelPosBlock`` parts; a post-norm ``ResPostRelPosBlock`` runs the fallback."""

    family = "timm VisionTransformerRelPos"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm_relpos(model)

    def __init__(self, model: nn.Module):
        if not is_timm_relpos(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformerRelPos")
        super().__init__(model)

    @classmethod
    def _attention_class(cls) -> type:
        from timm.models.vision_transformer_relpos import RelPosAttention

        return RelPosAttention

    def _describe_block(self, index: int, blk: Any) -> Tuple[Optional[BlockParts], str]:
        from timm.models.vision_transformer_relpos import RelPosBlock

        if type(blk) is not RelPosBlock:
            return None, f"it is {type(blk).__name__}, not the pre-norm RelPosBlock"
        mlp, why = timm_mlp(blk.mlp)
        if mlp is None:
            return None, why
        a = blk.attn
        score_bias = _score_bias(a, shared=self.model.shared_rel_pos is not None)
        return BlockParts(norm1=blk.norm1, attn=_attention_parts(a, score_bias), norm2=blk.norm2, mlp=mlp,
                          ls1=_gamma(blk.ls1), ls2=_gamma(blk.ls2)), ""

    def _bias_windows(self) -> List[Tuple[str, Tuple[int, int]]]:
        m = self.model
        found = [("shared_rel_pos", _pair(m.shared_rel_pos.window_size))] if m.shared_rel_pos is not None else []
        found += [(f"blocks.{i}.attn.rel_pos", _pair(a.rel_pos.window_size))
                  for i, a in enumerate(self.attentions) if a.rel_pos is not None]
        return found

    def context(self, grid: Tuple[int, int]) -> ForwardContext:
        """The shared bias, computed once per call (as the model's ``forward_features`` does)."""
        shared = self.model.shared_rel_pos
        return ForwardContext(grid, shared_bias=shared.get_bias() if shared is not None else None)

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(images)
        if m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        def forward(mod, x, shared_rel_pos=None):
            if req.detach:
                x = x.detach()
            B, N, _ = x.shape
            q, k, v = _attention_parts(mod).project(x)
            bias = mod.rel_pos.get_bias() if mod.rel_pos is not None else shared_rel_pos
            out = attention_core(q, k, v, mod.scale, rec, req, mod.attn_drop if mod.training else None, bias=bias)
            return mod.proj_drop(mod.proj(out.transpose(1, 2).reshape(B, N, -1)))

        return types.MethodType(forward, attn)
