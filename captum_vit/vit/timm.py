"""timm ``VisionTransformer`` (also DeiT distilled, register tokens, ``dynamic_img_size``) by its parts."""

from __future__ import annotations

import copy
import types
from typing import Any, Callable, List, Optional, Tuple

from torch import Tensor, nn

from captum_vit.vit.base import (
    AttentionParts,
    BlockParts,
    HeadParts,
    Mlp,
    MlpParts,
    Record,
    Request,
    UnsupportedModelError,
    ViTAdapter,
    attention_core,
)
from captum_vit.vit.registry import register_adapter

__all__ = [
    "TimmViTAdapter",
    "is_timm_vit",
    "map_pool_weights",
    "timm_attention_patch",
    "timm_attentions",
    "timm_block_parts",
    "timm_check_size",
    "timm_grid",
    "timm_head_parts",
    "timm_mlp",
]


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer)


def _opt(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None or isinstance(module, nn.Identity) else module


def _gamma(ls: Any) -> Optional[Tensor]:  # timm's LayerScale, or Identity
    return None if isinstance(ls, nn.Identity) else ls.gamma


def map_pool_weights(pool: Any) -> Optional[Callable[[Tensor], Tensor]]:
    """The weights ``[B, N]`` of timm's ``AttentionPoolLatent`` over its input tokens, mean over its heads.

    ``None`` for a pool this cannot read (several latent queries, or no q/kv layers).
    """
    if getattr(pool, "latent_len", 1) != 1 or not all(hasattr(pool, n) for n in ("q", "kv", "latent", "scale")):
        return None

    def weights(x: Tensor) -> Tensor:
        B, N, C = x.shape
        H = pool.num_heads
        d = C // H if getattr(pool, "head_dim", None) is None else pool.head_dim
        if getattr(pool, "pos_embed", None) is not None:
            x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, 1, H, d).transpose(1, 2)
        k = pool.kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)[0]
        q, k = pool.q_norm(q), pool.k_norm(k)
        return ((q @ k.transpose(-2, -1)) * pool.scale).softmax(-1).mean(1)[:, 0]

    return weights


def timm_mlp(mlp: Any) -> Tuple[Optional[MlpParts], str]:
    """timm's ``Mlp``, ``SwiGLU`` or ``GluMlp`` by its parts, or ``(None, why not)``."""
    from captum_vit.vit.base import GluMlp

    kind = type(mlp).__name__
    linears = [getattr(mlp, n, None) for n in ("fc1", "fc1_g", "fc1_x", "fc2") if getattr(mlp, n, None) is not None]
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return None, "its MLP uses convolutions instead of linear layers"
    norm = _opt(getattr(mlp, "norm", None))
    if kind == "Mlp":
        return Mlp(fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2, norm=norm), ""
    if kind == "SwiGLU":
        return GluMlp(act=mlp.act, fc2=mlp.fc2, fc_gate=mlp.fc1_g, fc_value=mlp.fc1_x, norm=norm), ""
    if kind in ("GluMlp", "SwiGLUPacked") and getattr(mlp, "chunk_dim", -1) == -1:
        return GluMlp(act=mlp.act, fc2=mlp.fc2, fc1=mlp.fc1, gate_last=bool(getattr(mlp, "gate_last", True)),
                      norm=norm), ""
    return None, f"its MLP is {kind}, not timm's Mlp, SwiGLU or GluMlp"


def timm_attentions(blocks: List[Any]) -> List[Any]:
    """The attention module of every block, each a ``timm.layers.Attention``, or an :class:`UnsupportedModelError`.

    Shared by the adapters of timm models built from timm's ``Block`` (``VisionTransformer``,
    ``NaFlexVit``): the patched fallback and the description both read that module's layout.
    """
    try:
        from timm.layers import Attention
    except ImportError:  # timm < 1.0.20 defines it beside VisionTransformer
        from timm.models.vision_transformer import Attention

    attentions = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention):
            raise UnsupportedModelError(
                f"block {i} ({type(blk).__name__}) has attention module {type(attn).__name__}, which captum-vit "
                "cannot read: only timm.layers.Attention (the VisionTransformer default) is supported. "
                "Fused or custom attention modules hide the attention map; build the model with the default "
                "attn_layer."
            )
        attentions.append(attn)
    return attentions


def timm_block_parts(blocks: List[Any]) -> Tuple[Optional[List[BlockParts]], str]:
    """timm's pre-norm ``Block`` s by their parts, or ``(None, why not)`` (then the patched fallback runs)."""
    from timm.models.vision_transformer import Block

    parts = []
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:
            return None, f"block {i} is {type(blk).__name__}, not the pre-norm timm Block"
        a: Any = blk.attn
        mlp: Any = blk.mlp
        if getattr(a, "gate", None) is not None:
            return None, f"block {i}'s attention gates its output"
        mlp_parts, why = timm_mlp(mlp)
        if mlp_parts is None:
            return None, f"block {i}: {why}"
        attn = AttentionParts(
            num_heads=a.num_heads,
            head_dim=a.head_dim,
            scale=a.scale,
            proj=a.proj,
            qkv=a.qkv,
            q_norm=_opt(a.q_norm),
            k_norm=_opt(a.k_norm),
            out_norm=_opt(getattr(a, "norm", None)),
        )
        parts.append(
            BlockParts(
                norm1=blk.norm1,
                attn=attn,
                norm2=blk.norm2,
                mlp=mlp_parts,
                ls1=_gamma(blk.ls1),
                ls2=_gamma(blk.ls2),
            )
        )
    return parts, ""


def timm_attention_patch(attn: nn.Module, rec: Record, req: Request) -> Callable:
    """A forward for a ``timm.layers.Attention`` that records into ``rec`` (the patched fallback's).

    It refuses an attention mask: captum-vit explains unmasked self-attention (the models whose
    blocks are timm's build none for a batch of images).
    """

    def forward(mod, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("captum-vit explains unmasked self-attention; got an attention mask")
        if req.detach:
            x = x.detach()
        B, N, _ = x.shape
        parts = AttentionParts(
            num_heads=mod.num_heads, head_dim=mod.head_dim, scale=mod.scale, proj=mod.proj, qkv=mod.qkv,
            q_norm=mod.q_norm, k_norm=mod.k_norm, out_norm=getattr(mod, "norm", None),
        )
        q, k, v = parts.project(x)
        gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
        out = attention_core(q, k, v, mod.scale, rec, req, mod.attn_drop if mod.training else None)
        out = out.transpose(1, 2).reshape(B, N, -1)
        if parts.out_norm is not None:
            out = parts.out_norm(out)
        if gate is not None:
            out = out * gate
        return mod.proj_drop(mod.proj(out))

    return types.MethodType(forward, attn)


def timm_head_parts(m: Any, pooling: str, num_prefix_tokens: int) -> HeadParts:
    """The head of a timm ViT classifier (``norm``, ``fc_norm``, ``head``, ``attn_pool``, ``forward_head``).

    A [class] head (``"token"``) or DeiT's two heads (``"token_distill"``) are read token by token;
    any other pooling runs the model's own ``forward_head`` on the normed tokens.
    """
    tokens: Tuple[Tuple[int, nn.Linear], ...] = ()
    if pooling == "token" and isinstance(m.head, nn.Linear):
        tokens = ((0, m.head),)
    elif pooling == "token_distill" and isinstance(m.head, nn.Linear):
        tokens = ((0, m.head), (1, m.head_dist))
    return HeadParts(
        norm=m.norm,
        pooling=pooling,
        tokens=tokens,
        fc_norm=_opt(getattr(m, "fc_norm", None)),
        pooled=None if tokens else m.forward_head,
        pool_from=0 if getattr(m, "pool_include_prefix", False) else num_prefix_tokens,
        pool_weights=map_pool_weights(m.attn_pool) if getattr(m, "attn_pool", None) is not None else None,
    )


def timm_check_size(model: Any, patch_size: Tuple[int, int], h: int, w: int) -> None:
    """Refuse an ``h x w`` input that a timm model's patch embedding (fixed size, no padding) does not take."""
    pe = model.patch_embed
    ph, pw = patch_size
    dynamic = getattr(model, "dynamic_img_size", False)
    if not dynamic and pe.img_size is not None and getattr(pe, "strict_img_size", True):
        if (h, w) != tuple(pe.img_size):
            raise ValueError(
                f"input size {h}x{w} does not match the model's fixed input size "
                f"{pe.img_size[0]}x{pe.img_size[1]}; resize the images, or create the model with "
                "dynamic_img_size=True to accept other sizes"
            )
    if not pe.dynamic_img_pad and (h % ph or w % pw):
        raise ValueError(
            f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop to a multiple "
            "of the patch size, or create the model with dynamic_img_pad=True"
        )


def timm_grid(model: Any, h: int, w: int) -> Tuple[int, int]:
    """The patch grid a timm model's patch embedding makes of an ``h x w`` input."""
    return tuple(model.patch_embed.dynamic_feat_size((h, w)))


@register_adapter
class TimmViTAdapter(ViTAdapter):
    library = "timm"
    family = "timm VisionTransformer"
    # timm's VisionTransformer, its blocks and attention modules: their attributes (blocks, patch_embed,
    # num_heads, ...) are timm's, which nn.Module's typing cannot see
    model: Any
    blocks: List[Any]
    attentions: List[Any]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm_vit(model)

    def __init__(self, model: nn.Module):
        from timm.models.deit import VisionTransformerDistilled

        if not is_timm_vit(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer")
        self.model = self.wrapper = model
        vit: Any = model  # its attributes are timm's, which nn.Module's typing cannot see
        self.blocks = list(vit.blocks)
        self.attentions = timm_attentions(self.blocks)
        a0 = self.attentions[0]
        self.num_heads, self.head_dim = a0.num_heads, a0.head_dim
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.has_class_token = getattr(vit, "cls_token", None) is not None
        if isinstance(model, VisionTransformerDistilled):
            self.pooling = "token_distill"
        elif getattr(vit, "attn_pool", None) is not None:
            self.pooling = "map"
        else:
            self.pooling = vit.global_pool or "none"
        pe = vit.patch_embed
        self.patch_size = tuple(pe.patch_size)
        # The first convolution reads the image (a linear patch projection or a convolutional stem).
        self.in_chans = next(m for m in pe.modules() if isinstance(m, nn.Conv2d)).in_channels
        self.parts, self.parts_missing = self._describe_blocks()
        self.head = self._describe_head()

    # ----------------------------------------------------------------- parts
    def _describe_blocks(self) -> Tuple[Optional[List[BlockParts]], str]:
        return timm_block_parts(self.blocks)

    def _describe_head(self) -> HeadParts:
        return timm_head_parts(self.model, self.pooling, self.num_prefix_tokens)

    # ----------------------------------------------------------------- library hooks
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def _model_logits(self, images: Tensor) -> Tensor:
        out = self.model(images)
        if isinstance(out, tuple):  # distilled training mode returns (cls, dist)
            out = (out[0] + out[1]) / 2
        return out

    def for_input_size(self, h: int, w: int) -> nn.Module:
        m = self.model
        if not getattr(m, "dynamic_img_size", False) or tuple(m.patch_embed.grid_size) == self._grid(h, w):
            return self.wrapper
        if not hasattr(m, "set_input_size"):
            raise ValueError(
                "this timm version cannot fix a dynamic_img_size model to one input size (no set_input_size); "
                "upgrade timm"
            )
        memo: dict = {}
        wrapper = copy.deepcopy(self.wrapper, memo)
        # The copy's positional embeddings are resampled once for h x w and the copy is made a
        # fixed-size model, so that no per-call (bicubic, antialiased) resampling reaches a trace.
        vit = memo[id(m)]
        vit.set_input_size(img_size=(h, w))
        vit.dynamic_img_size = False
        vit.patch_embed.flatten = True  # fixed-size models take the patch tokens flattened (NLC)
        return wrapper

    def _check_size(self, h: int, w: int) -> None:
        timm_check_size(self.model, self.patch_size, h, w)

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        return timm_grid(self.model, h, w)

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        return timm_attention_patch(attn, rec, req)
