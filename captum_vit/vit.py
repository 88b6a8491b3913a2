"""The one module that knows Vision Transformer internals.

:func:`adapt` turns a timm ``VisionTransformer`` (also DeiT-distilled, register-token and
``dynamic_img_size`` variants) or a Hugging Face ``ViTForImageClassification`` into a
:class:`ViTAdapter`. The adapter describes the model (blocks, attention modules, prefix
tokens, pooling, patch grid for an input size) and, inside :meth:`ViTAdapter.recording`,
records what the attribution methods need during one forward pass:

* ``scores_cls``  -- scaled **pre-softmax** scores of the [class] query row, ``[B, H, N]``;
* ``attention``   -- post-softmax attention ``[B, H, N, N]`` (optionally as tensors that
  receive gradients);
* ``values``      -- attention values ``[B, H, N, d]``;
* ``block_inputs`` / ``mid_prefix`` / ``final_prefix`` -- residual-stream tensors.

Every switch (patched attention ``forward``, hooks) is undone in ``finally``; timm's
``fused_attn`` flag is never touched: the patched forward reads it and keeps the fused
kernel for everything except the one [class] row it must see.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ViTAdapter", "Recording", "adapt", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """The module is not a Vision Transformer that captum-vit can read."""


@dataclass
class Recording:
    """Tensors recorded during one forward pass, one list entry per block (in block order)."""

    scores_cls: List[Tensor] = field(default_factory=list)
    attention: List[Tensor] = field(default_factory=list)
    values: List[Tensor] = field(default_factory=list)
    block_inputs: List[Tensor] = field(default_factory=list)
    mid_prefix: List[Tensor] = field(default_factory=list)
    final_prefix: Optional[Tensor] = None


@dataclass
class _Want:
    detach: bool
    attention: str  # "none" | "keep" | "grad"
    values: bool
    block_inputs: bool
    scores_cls: bool


class ViTAdapter:
    """Common description of a ViT classifier; subclasses implement one library each.

    Attributes:
        model: the wrapped ``nn.Module`` (never modified outside :meth:`recording`).
        blocks: transformer blocks in order.
        attentions: the attention module of each block.
        num_heads, head_dim, embed_dim: attention geometry.
        num_prefix_tokens: [class] + distillation + register tokens, all before the patches.
        has_class_token: whether token 0 is a [class] token.
        pooling: ``"token"`` (head reads token 0), ``"token_distill"`` (mean of the heads on
            tokens 0 and 1), or another name (``"avg"``, ``"map"``, ...), which the
            [class]-row methods reject.
        patch_size: ``(ph, pw)``.
    """

    library: str = "?"
    model: nn.Module
    blocks: List[nn.Module]
    attentions: List[nn.Module]
    num_heads: int
    head_dim: int
    embed_dim: int
    num_prefix_tokens: int
    has_class_token: bool
    pooling: str
    patch_size: Tuple[int, int]
    in_chans: int

    # ----------------------------------------------------------------- description
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def grid_size(self, inputs: Tensor) -> Tuple[int, int]:
        """Patch grid ``(gh, gw)`` for ``inputs`` after :meth:`check_input`."""
        raise NotImplementedError

    def check_input(self, inputs: Tensor) -> None:
        """Raise a clear error for inputs the model cannot take."""
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor of images [B, C, H, W], got {type(inputs).__name__}")
        if inputs.dim() != 4:
            hint = " Add a batch dimension with inputs.unsqueeze(0)." if inputs.dim() == 3 else ""
            raise ValueError(
                f"inputs must be a batch of images [B, C, H, W]; got a tensor of shape {tuple(inputs.shape)}.{hint}"
            )
        if not inputs.is_floating_point():
            raise TypeError(
                f"inputs must be a floating-point tensor (normalised images), got dtype {inputs.dtype}; "
                "preprocess with the model's data config (see timm.data.resolve_data_config)."
            )
        if inputs.shape[1] != self.in_chans:
            raise ValueError(
                f"inputs have {inputs.shape[1]} channels but the model's patch embedding expects {self.in_chans}; "
                f"got shape {tuple(inputs.shape)} (channels-last input? use inputs.permute(0, 3, 1, 2))."
            )
        ref = next(self.model.parameters(), None)
        if ref is not None and inputs.device != ref.device:
            raise ValueError(
                f"inputs are on {inputs.device} but the model is on {ref.device}; move one of them "
                f"(e.g. inputs.to('{ref.device}'))"
            )
        if ref is not None and inputs.dtype != ref.dtype:
            raise TypeError(
                f"inputs have dtype {inputs.dtype} but the model's weights are {ref.dtype}; use "
                f"inputs.to({ref.dtype}) (or autocast)"
            )
        if inputs.shape[0] == 0:
            raise ValueError("inputs is an empty batch (B = 0)")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or infinite values; check the image loading and normalisation")
        self._check_size(inputs.shape[-2], inputs.shape[-1])

    def _check_size(self, h: int, w: int) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- computation
    def logits(self, inputs: Tensor) -> Tensor:
        """The model's class logits ``[B, num_classes]``."""
        raise NotImplementedError

    def head_from_prefix(self, prefix: Tensor) -> Tensor:
        """Logits from the last block's prefix tokens ``[B, P, D]`` (final norm + pool + head)."""
        raise NotImplementedError

    def mlp_branch(self, index: int, mid: Tensor) -> Tensor:
        """Token-wise second residual branch of block ``index`` (``ls2(mlp(norm2(u)))``)."""
        raise NotImplementedError

    def attn_output_branch(self, index: int, heads_out: Tensor) -> Tensor:
        """Token-wise map from the concatenated head outputs to the residual (``ls1(proj(o))``)."""
        raise NotImplementedError

    def one_token_support(self) -> Tuple[bool, str]:
        """Whether the one-token AGCAM engine applies, and why not when it does not."""
        raise NotImplementedError

    def class_row_support(self) -> Tuple[bool, str]:
        """Whether methods that read the [class]-query row (AGCAM) are defined for this model."""
        if not self.has_class_token:
            return False, (
                "the model has no [class] token (it pools patch tokens instead), so the [class]-query row "
                "that AGCAM reads does not exist; use a ViT with class_token=True and global_pool='token'"
            )
        if self.pooling not in ("token", "token_distill"):
            return False, (
                f"the model's head pools tokens with {self.pooling!r} instead of reading the [class] token, so "
                "the [class]-query row receives no gradient when attention inputs are detached (the AGCAM "
                "definition); use a model with global_pool='token'"
            )
        return True, ""

    # ----------------------------------------------------------------- recording
    @contextlib.contextmanager
    def recording(
        self,
        detach: bool = True,
        attention: str = "none",
        values: bool = False,
        block_inputs: bool = False,
        scores_cls: bool = True,
        prefix: bool = False,
    ) -> Iterator[Recording]:
        """Patch the attention modules (and add hooks) for the duration of the block.

        Args:
            detach: detach each attention module's input (the AGCAM paper's
                ``x = x.detach()``), so gradients reach an attention map only through residual
                paths and MLPs of later blocks.
            attention: ``"none"``; ``"keep"`` records post-softmax attention (no gradient);
                ``"grad"`` records post-softmax attention as tensors through which the output's
                gradient can be taken (leaves when ``detach``; otherwise the caller must make
                the input require grad).
            values: record the attention values ``[B, H, N, d]``.
            block_inputs: record each block's input ``[B, N, D]``.
            scores_cls: record the scaled pre-softmax [class]-query row ``[B, H, N]``.
            prefix: record the prefix tokens of each block's mid-residual ``u`` (input of the
                second norm) and of the last block's output, for the one-token engine.

        Yields:
            A :class:`Recording` filled by forward passes run inside the block.
        """
        if attention not in ("none", "keep", "grad"):
            raise ValueError(f"attention must be 'none', 'keep' or 'grad', got {attention!r}")
        rec = Recording()
        want = _Want(detach, attention, values, block_inputs, scores_cls)
        patched: List[Tuple[nn.Module, bool, object]] = []
        handles = []
        try:
            for attn in self.attentions:
                had = "forward" in attn.__dict__
                patched.append((attn, had, attn.__dict__.get("forward")))
                attn.forward = types.MethodType(self._make_attention_forward(rec, want), attn)
            if block_inputs:
                for blk in self.blocks:
                    handles.append(blk.register_forward_pre_hook(_append_arg0(rec.block_inputs)))
            if prefix:
                p = self.num_prefix_tokens
                for mod in self._mid_norms():
                    handles.append(mod.register_forward_pre_hook(_append_arg0(rec.mid_prefix, p)))

                def _final(_m, args):
                    rec.final_prefix = args[0][:, :p]

                handles.append(self._final_norm().register_forward_pre_hook(_final))
            yield rec
        finally:
            for h in handles:
                h.remove()
            for attn, had, old in patched:
                if had:
                    attn.forward = old
                else:
                    del attn.forward

    def _make_attention_forward(self, rec: Recording, want: _Want) -> Callable:
        raise NotImplementedError

    def _mid_norms(self) -> List[nn.Module]:
        raise NotImplementedError

    def _final_norm(self) -> nn.Module:
        raise NotImplementedError


def _append_arg0(store: List[Tensor], prefix: Optional[int] = None):
    def hook(_module, args):
        x = args[0]
        store.append(x if prefix is None else x[:, :prefix])

    return hook


def _attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    rec: Recording,
    want: _Want,
    fused: bool,
    mask: Optional[Tensor] = None,
    dropout: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Shared attention arithmetic: records what is asked and returns ``softmax(S) V``.

    ``q, k, v``: ``[B, H, N, d]``. When neither the full attention nor its gradient is needed
    and ``fused`` is set, the output comes from ``scaled_dot_product_attention`` and only the
    [class] row of the scores is computed separately.
    """
    if want.attention == "none" and fused:
        if want.scores_cls:
            row = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
            if mask is not None:
                row = row + mask[..., :1, :]
            rec.scores_cls.append(row[:, :, 0])
        if want.values:
            rec.values.append(v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    if want.scores_cls:
        rec.scores_cls.append(scores[:, :, 0].detach())
    attn = scores.softmax(dim=-1)
    if want.attention == "grad" and want.detach:
        # The input was detached, so A is a function of constants only: a leaf is exact.
        attn = attn.detach().requires_grad_(True)
    if want.attention != "none":
        rec.attention.append(attn)
    if want.values:
        rec.values.append(v)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


# --------------------------------------------------------------------------- timm
class TimmViTAdapter(ViTAdapter):
    library = "timm"

    def __init__(self, model: nn.Module):
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(_unsupported_msg(model))
        self.model = model
        self.blocks = list(model.blocks)
        self.attentions = []
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, Attention):
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) has attention module {type(attn).__name__}, which captum-vit "
                    "cannot read: only timm.layers.Attention (the VisionTransformer default) is supported. "
                    "Fused or custom attention modules hide the attention map; build the model with the default "
                    "attn_layer."
                )
            self.attentions.append(attn)
        a0 = self.attentions[0]
        self.num_heads, self.head_dim = a0.num_heads, a0.head_dim
        self.embed_dim = model.embed_dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self._block_cls = Block
        from timm.models.deit import VisionTransformerDistilled

        if isinstance(model, VisionTransformerDistilled):
            self.pooling = "token_distill"
        elif getattr(model, "attn_pool", None) is not None:
            self.pooling = "map"
        else:
            self.pooling = model.global_pool or "none"
        pe = model.patch_embed
        self.patch_size = tuple(pe.patch_size)
        # The first convolution reads the image (a linear patch projection or a convolutional stem).
        self.in_chans = next(m for m in pe.modules() if isinstance(m, nn.Conv2d)).in_channels

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _check_size(self, h: int, w: int) -> None:
        pe = self.model.patch_embed
        ph, pw = self.patch_size
        dynamic = getattr(self.model, "dynamic_img_size", False)
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

    def grid_size(self, inputs: Tensor) -> Tuple[int, int]:
        h, w = inputs.shape[-2:]
        return tuple(self.model.patch_embed.dynamic_feat_size((h, w)))

    def logits(self, inputs: Tensor) -> Tensor:
        out = self.model(inputs)
        if isinstance(out, tuple):  # distilled training mode returns (cls, dist)
            out = (out[0] + out[1]) / 2
        return out

    def head_from_prefix(self, prefix: Tensor) -> Tensor:
        m = self.model
        return m.forward_head(m.norm(prefix))

    def mlp_branch(self, index: int, mid: Tensor) -> Tensor:
        blk = self.blocks[index]
        return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(mid))))

    def attn_output_branch(self, index: int, heads_out: Tensor) -> Tensor:
        blk = self.blocks[index]
        return blk.ls1(blk.attn.proj(heads_out))

    def one_token_support(self) -> Tuple[bool, str]:
        ok, why = self.class_row_support()
        if not ok:
            return ok, why
        for i, blk in enumerate(self.blocks):
            if type(blk) is not self._block_cls:
                return False, f"block {i} is {type(blk).__name__}, not the pre-norm timm Block"
            a = blk.attn
            if not isinstance(a.norm, nn.Identity) or getattr(a, "gate", None) is not None:
                return False, f"block {i}'s attention normalises or gates the head outputs"
        if not isinstance(getattr(self.model, "fc_norm", nn.Identity()), nn.Identity):
            return False, "the model applies fc_norm after pooling"
        return True, ""

    def _mid_norms(self) -> List[nn.Module]:
        return [blk.norm2 for blk in self.blocks]

    def _final_norm(self) -> nn.Module:
        return self.model.norm

    def _make_attention_forward(self, rec: Recording, want: _Want) -> Callable:
        from timm.layers.attention import resolve_self_attn_mask

        def forward(attn_mod, x, attn_mask=None, is_causal=False):
            if want.detach:
                x = x.detach()
            B, N, _ = x.shape
            qkv = attn_mod.qkv(x).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
            gate = attn_mod.gate(x).sigmoid() if getattr(attn_mod, "gate", None) is not None else None
            mask = resolve_self_attn_mask(N, q, attn_mask, is_causal)
            fused = attn_mod.fused_attn and not attn_mod.training
            out = _attention_core(q, k, v, attn_mod.scale, rec, want, fused, mask, attn_mod.attn_drop)
            out = out.transpose(1, 2).reshape(B, N, attn_mod.attn_dim)
            out = attn_mod.norm(out)
            if gate is not None:
                out = out * gate
            return attn_mod.proj_drop(attn_mod.proj(out))

        return forward


# --------------------------------------------------------------------------- Hugging Face
class HFViTAdapter(ViTAdapter):
    library = "transformers"

    def __init__(self, model: nn.Module):
        vit = getattr(model, "vit", None)
        layers = getattr(vit, "layers", None)
        if layers is None and vit is not None and hasattr(vit, "encoder"):
            layers = getattr(vit.encoder, "layer", None)
        if layers is None or not hasattr(model, "classifier"):
            raise UnsupportedModelError(_unsupported_msg(model))
        self.model = model
        self.blocks = list(layers)
        self.attentions = []
        for i, layer in enumerate(self.blocks):
            a = layer.attention
            if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise UnsupportedModelError(
                    f"layer {i}'s attention ({type(a).__name__}) has no q_proj/k_proj/v_proj/o_proj: this "
                    "transformers version's ViT layout is not supported (captum-vit reads transformers >= 5)"
                )
            self.attentions.append(a)
        cfg = model.config
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

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    def _check_size(self, h: int, w: int) -> None:
        s = self.config.image_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        if (h, w) != s:
            raise ValueError(
                f"input size {h}x{w} does not match the model's input size {s[0]}x{s[1]} (config.image_size); "
                "resize the images"
            )

    def grid_size(self, inputs: Tensor) -> Tuple[int, int]:
        h, w = inputs.shape[-2:]
        return h // self.patch_size[0], w // self.patch_size[1]

    def logits(self, inputs: Tensor) -> Tensor:
        return self.model(pixel_values=inputs).logits

    def head_from_prefix(self, prefix: Tensor) -> Tensor:
        return self.model.classifier(self.model.vit.layernorm(prefix)[:, 0])

    def mlp_branch(self, index: int, mid: Tensor) -> Tensor:
        layer = self.blocks[index]
        return layer.dropout(layer.mlp(layer.layernorm_after(mid)))

    def attn_output_branch(self, index: int, heads_out: Tensor) -> Tensor:
        layer = self.blocks[index]
        return layer.dropout(layer.attention.o_proj(heads_out))

    def one_token_support(self) -> Tuple[bool, str]:
        return True, ""

    def _mid_norms(self) -> List[nn.Module]:
        return [layer.layernorm_after for layer in self.blocks]

    def _final_norm(self) -> nn.Module:
        return self.model.vit.layernorm

    def _make_attention_forward(self, rec: Recording, want: _Want) -> Callable:
        def forward(attn_mod, hidden_states, attention_mask=None, **kwargs):
            if want.detach:
                hidden_states = hidden_states.detach()
            B, N, _ = hidden_states.shape
            shape = (B, N, -1, attn_mod.head_dim)
            q = attn_mod.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = attn_mod.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = attn_mod.v_proj(hidden_states).view(shape).transpose(1, 2)
            drop = attn_mod.attention_dropout if attn_mod.training else 0.0
            out = _attention_core(
                q, k, v, attn_mod.scaling, rec, want, False, attention_mask, lambda a: F.dropout(a, drop, True) if drop else a
            )
            attn_weights = rec.attention[-1] if want.attention != "none" else None
            out = out.transpose(1, 2).reshape(B, N, -1)
            return attn_mod.o_proj(out), attn_weights

        return forward


def _unsupported_msg(model: object) -> str:
    return (
        f"{type(model).__name__} is not a supported Vision Transformer. captum-vit reads timm "
        "VisionTransformer models (vit_*, deit_*, including distilled and register-token variants) and "
        "Hugging Face ViTForImageClassification. Pass the classifier itself (not a wrapper), e.g. "
        "timm.create_model('vit_base_patch16_224')."
    )


def adapt(model: nn.Module) -> ViTAdapter:
    """Return the :class:`ViTAdapter` for ``model`` (timm or Hugging Face ViT).

    Raises:
        UnsupportedModelError: if ``model`` is not a ViT classifier captum-vit can read.
    """
    if isinstance(model, ViTAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(_unsupported_msg(model))
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = ()
    if isinstance(model, VisionTransformer):
        return TimmViTAdapter(model)
    if type(model).__name__ == "ViTForImageClassification":
        return HFViTAdapter(model)
    raise UnsupportedModelError(_unsupported_msg(model))
