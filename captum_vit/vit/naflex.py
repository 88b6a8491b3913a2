"""timm ``NaFlexVit`` on batches of images ``[B, C, H, W]``, by its parts.

``NaFlexVit`` takes two kinds of input: plain image tensors, and the variable-resolution patch
dictionaries of timm's NaFlex data loader (``patches``, ``patch_coord``, ``patch_valid``), whose
padding tokens are masked out of the attention. captum-vit explains the first kind: a batch of
same-size images, for which the model builds no attention mask (``patch_valid`` is ``None``), so
every block is plain self-attention over all tokens, as in a ``VisionTransformer``. The patch
dictionaries are refused with a message saying what to pass instead.

The parts: the embedding is the model's own ``NaFlexEmbeds`` (patchify and a linear or
convolutional projection, the learned or factorized position table resampled to the image's
patch grid, then the [class] and register tokens in front), the blocks are timm's pre-norm
``Block`` with ``timm.layers.Attention`` (described by the helpers the ``VisionTransformer``
adapter uses), and the head is timm's: a [class] token, average pooling, or attention pooling
(``AttentionPoolLatent``) over the patch tokens, or over every token with
``pool_include_prefix``. NaFlexVit configurations built from EVA blocks (rotary embeddings,
SwiGLU, gated attention, grouped key/value heads) are refused.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, List, Tuple

import torch
from torch import Tensor, nn

from captum_vit.vit.base import Record, Request, UnsupportedModelError, ViTAdapter
from captum_vit.vit.registry import register_adapter
from captum_vit.vit.timm import timm_attention_patch, timm_attentions, timm_block_parts, timm_head_parts

__all__ = ["NaFlexVitAdapter", "is_naflex_vit"]


def is_naflex_vit(model: nn.Module) -> bool:
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:  # a timm without NaFlexVit
        return False
    return isinstance(model, NaFlexVit)


_DICT_INPUT = (
    "NaFlexVit's variable-resolution input (a dict of 'patches', 'patch_coord' and 'patch_valid', as timm's "
    "NaFlex data loader makes it) is not supported: captum-vit explains batches of images. Pass the images as "
    "one tensor [B, C, H, W] (any height and width that are multiples of the patch size; the model resamples "
    "its position embedding to the patch grid), e.g. the images before the NaFlex collator patchifies them."
)


@register_adapter
class NaFlexVitAdapter(ViTAdapter):
    library = "timm"
    family = "timm NaFlexVit"
    # timm's NaFlexVit, its blocks and attention modules: their attributes (blocks, embeds, attn_pool, ...)
    # are timm's, which nn.Module's typing cannot see
    model: Any
    blocks: List[Any]
    attentions: List[Any]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_naflex_vit(model)

    def __init__(self, model: nn.Module):
        if not is_naflex_vit(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm NaFlexVit")
        self.model = self.wrapper = model
        vit: Any = model
        if getattr(vit, "rope", None) is not None:
            raise UnsupportedModelError(
                "this NaFlexVit has rotary position embeddings (NaFlexVitCfg.rope_type), whose EVA blocks captum-vit "
                "does not read in a NaFlexVit; NaFlexVit with learned or factorized position embeddings and the "
                "default blocks (rope_type='') is supported"
            )
        self.blocks = list(vit.blocks)
        for i, blk in enumerate(self.blocks):
            if type(blk).__name__ == "EvaBlock":
                raise UnsupportedModelError(
                    f"block {i} of this NaFlexVit is an EvaBlock (NaFlexVitCfg with attn_type 'eva'/'rope', "
                    "swiglu_mlp, attn_gated, attn_only_layer_scale or num_kv_heads), which captum-vit does not "
                    "read in a NaFlexVit; the default blocks (timm's Block with its Attention) are supported"
                )
        self.attentions = timm_attentions(self.blocks)
        a0 = self.attentions[0]
        self.num_heads, self.head_dim = a0.num_heads, a0.head_dim
        self.embed_dim = vit.embed_dim
        emb = vit.embeds
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.has_class_token = getattr(emb, "cls_token", None) is not None
        self.pooling = "map" if getattr(vit, "attn_pool", None) is not None else (vit.global_pool or "none")
        self.patch_size = tuple(emb.patch_size)
        self.in_chans = emb.in_chans
        self.parts, self.parts_missing = timm_block_parts(self.blocks)
        self.head = timm_head_parts(vit, self.pooling, self.num_prefix_tokens)

    # ----------------------------------------------------------------- library hooks
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        out = m.embeds(images)
        # timm >= 1.0.20 returns (tokens, grid size); older versions the tokens alone
        tokens = out[0] if isinstance(out, tuple) else out
        return m.norm_pre(tokens)

    def _model_logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        return timm_attention_patch(attn, rec, req)

    def check_input(self, inputs: Any) -> None:
        """As :meth:`ViTAdapter.check_input`, and NaFlex patch dictionaries or pre-patchified tensors refused."""
        if isinstance(inputs, dict):
            raise TypeError(_DICT_INPUT)
        if isinstance(inputs, Tensor) and not self.pre and (
            inputs.dim() == 5 or (inputs.dim() == 3 and inputs.shape[0] != self.in_chans)
        ):
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} look like NaFlexVit's pre-patchified patches [B, N, P*P*C], "
                "which captum-vit does not explain: " + _DICT_INPUT.split(": ", 1)[1]
            )
        super().check_input(inputs)

    def _check_size(self, h: int, w: int) -> None:
        emb = self.model.embeds
        ph, pw = self.patch_size
        if not emb.dynamic_img_pad and (h % ph or w % pw):
            raise ValueError(
                f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop to a multiple "
                "of the patch size, or create the model with dynamic_img_pad=True"
            )

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        gh, gw = self.model.embeds.dynamic_feat_size((h, w))
        return int(gh), int(gw)

    def _resamples(self, grid: Tuple[int, int]) -> bool:
        """Whether the model resamples its position table for a ``grid``-sized patch grid on every call."""
        emb = self.model.embeds
        if emb.pos_embed_type == "learned":
            return tuple(emb.pos_embed.shape[1:3]) != grid
        if emb.pos_embed_type == "factorized":
            table = (emb.pos_embed_y.shape[1], emb.pos_embed_x.shape[1])
            return table != grid or (bool(emb.pos_embed_ar_preserving) and grid[0] != grid[1])
        return False

    def for_input_size(self, h: int, w: int) -> nn.Module:
        """The wrapper, or a copy whose position table is the one the model resamples for ``h x w``.

        The model resamples its learned (bicubic, antialiased) or factorized (linear) position table
        to the patch grid on every call; the copy holds the result for ``h x w`` as a learned table
        of exactly that grid, which the embedding adds as it is, so no resampling reaches a trace and
        the copy computes what the model computes at that size.
        """
        grid = self._grid(h, w)
        if not self._resamples(grid):
            return self.wrapper
        emb = self.model.embeds
        ref = emb.pos_embed if emb.pos_embed is not None else emb.pos_embed_y
        with torch.no_grad():
            # the model's own resampling, added to zeros: the table it adds at this grid, bit for bit
            table = torch.zeros(1, grid[0] * grid[1], self.embed_dim, dtype=ref.dtype, device=ref.device)
            if emb.pos_embed_type == "learned":
                emb._apply_learned_pos_embed(table, grid_size=list(grid))
            else:
                emb._apply_factorized_pos_embed(table, grid_size=list(grid))
        memo: dict = {}
        wrapper = copy.deepcopy(self.wrapper, memo)
        fixed = memo[id(emb)]
        fixed.pos_embed = nn.Parameter(table.reshape(1, grid[0], grid[1], -1), requires_grad=ref.requires_grad)
        fixed.pos_embed_y = fixed.pos_embed_x = None
        fixed.pos_embed_type = "learned"
        return wrapper
