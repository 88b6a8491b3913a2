"""AttnLRP (Achtibat et al., ICML 2024): layer-wise relevance propagation through attention, as gradient x input."""

from __future__ import annotations

from typing import Union

import torch
from captum.attr._utils.attribution import GradientAttribution
from torch import Tensor, nn

from captum_vit.attr._base import ViTLayerAttribution, alternatives
from captum_vit.vit import Record, Request, ViTAdapter
from captum_vit.vit.rules import RULES, norm_blocker

__all__ = ["AttnLRP"]


class AttnLRP(ViTLayerAttribution, GradientAttribution):
    r"""
    AttnLRP: the LRP relevance of the target logit ``y_c`` at the tokens ``x`` entering the first
    block, summed over the hidden dimension, for every patch token ``i``,

    .. math::
        R_i = \sum_d x_{i,d} \, \tilde\partial y_c / \tilde\partial x_{i,d},

    where :math:`\tilde\partial` is the gradient with AttnLRP's rules (lxt's "efficient"
    implementation, gradient x input with modified backward passes; the forward values are the
    model's): LayerNorm and RMS norm through the identity rule (their ``1 / std`` a constant),
    element-wise activations through the identity rule (gradient ``act(h) / h``), the products
    of two activations (``q k^T``, ``A v``, a gated MLP's ``act(gate) * value``) splitting their
    relevance uniformly between the operands, linear layers, residual additions and layer scale
    with their plain gradient (the epsilon rule, epsilon -> 0). The attention softmax follows
    ``attention_rule``:

    * ``"cp"`` (default; lxt's rules for torchvision's ViT) -- CP-LRP (Ali et al., ICML 2022):
      the attention probabilities are constants, so relevance flows through the values only;
      a gated MLP's gate is a constant as well (lxt's CP maps for gated MLPs).
    * ``"attnlrp"`` -- the AttnLRP softmax rule: the gradient passes the softmax (its gradient x
      input is the rule), and ``q``, ``k`` get a quarter and ``v`` half of the gradient (the
      uniform rule on ``q k^T`` and on ``A v``), as lxt's attention wrapper for the
      transformers models.

    **Signed**: positive where a token is evidence for the class, negative where it is evidence
    against. Nothing is normalised. The map is read at the tokens entering block 0 (patch
    embedding plus position embedding, after any pre-norm), not at the pixels: every model
    the description covers has those tokens, whatever its patch embedding (a convolutional
    stem included) or preprocessing, and the numbers are lxt's read at the same tensor. The
    relevance the patch embedding's bias and the position embedding absorb on the way to the
    pixels is therefore part of the map. The prefix tokens' relevance ([class], registers) is
    not shown.

    The rules act on the operations of the model description's pure forward, so the method
    needs pre-norm blocks the description covers, and a head that reads tokens through linear
    layers (a [class] head, DeiT's two averaged heads). Gradient x input itself needs no
    [class] row, but a head that pools the tokens (average pooling with its norm, MAP attention
    pooling, [class] and patch mean) runs in the library's own head code, which the rules do not
    reach; such models are refused, as are normalisations other than LayerNorm / RMS norm, a
    wrapper that transforms the logits after the ViT, and an active dropout (training mode
    with a rate above 0), all before any compute. Rotary embeddings and additive position biases
    are forward terms of the attention and are kept.

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        attention_rule (str): ``"cp"`` (CP-LRP in the attention) or ``"attnlrp"`` (the AttnLRP
            softmax rule).

    Examples::

        >>> import timm, torch
        >>> from captum_vit import AttnLRP
        >>> model = timm.create_model("vit_small_patch16_224").eval()
        >>> x = torch.randn(2, 3, 224, 224)
        >>> maps = AttnLRP(model).attribute(x, target=[3, 7])               # [2, 1, 14, 14], signed
        >>> maps = AttnLRP(model, attention_rule="attnlrp").attribute(x)    # predicted class
    """

    _needs_pure_forward = True

    def __init__(self, model: Union[nn.Module, ViTAdapter], attention_rule: str = "cp") -> None:
        super().__init__(model)
        GradientAttribution.__init__(self, self.model)
        if attention_rule not in RULES:
            raise ValueError(f"attention_rule must be one of {RULES}, got {attention_rule!r}")
        self.attention_rule = attention_rule
        why = self._blocker()
        if why:
            raise ValueError(f"AttnLRP is not defined for this model: {why}. "
                             f"{alternatives(self.adapter, exclude='attnlrp')}")

    @classmethod
    def get_name(cls) -> str:
        return "AttnLRP"

    def _blocker(self) -> str:
        """Why the rules cannot be applied to this model's operations, or ``""``."""
        a = self.adapter
        if a.parts is None:
            return f"its rules act on the operations of the model description, and {a.parts_missing}"
        h = a.head
        if not h.tokens:
            return (
                f"the model's head pools the tokens with {a.pooling!r} in the library's own head code, where the "
                "rules cannot reach its norm and pooling (the method needs a head that reads the [class] token, or "
                "DeiT's two tokens, through linear layers)"
            )
        if a.post:
            return "the wrapper transforms the ViT's logits after it, so its output is not a logit of the ViT"
        norms = [("the final norm", h.norm), ("the head's fc_norm", h.fc_norm)]
        for i, b in enumerate(a.parts):
            norms += [(f"block {i}'s norm1", b.norm1), (f"block {i}'s norm2", b.norm2),
                      (f"block {i}'s MLP norm", b.mlp.norm), (f"block {i}'s q norm", b.attn.q_norm),
                      (f"block {i}'s k norm", b.attn.k_norm), (f"block {i}'s attention output norm", b.attn.out_norm)]
        for where, module in norms:
            why = norm_blocker(module)
            if why:
                return f"{where}: {why}"
        return ""

    def _request(self) -> Request:
        return Request(detach=False, block_inputs=(0,), lrp_rules=self.attention_rule)

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        tokens = record.block_inputs[0]
        y = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(y, tokens)
        return (tokens * grad).sum(-1)[:, self.adapter.num_prefix_tokens :].detach()
