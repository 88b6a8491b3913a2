"""AttnLRP's rules as modified gradients, for the pure forward of a :class:`~captum_vit.vit.Request` with ``lrp_rules``.

Layer-wise relevance propagation written in the gradient x input form (lxt's "efficient"
implementation of AttnLRP, Achtibat et al., ICML 2024): the forward values are the model's, and
only the backward of a few operations is changed, so that ``x * dy/dx`` of any tensor ``x`` of
the pass is the LRP relevance of ``x`` for the output ``y``:

* :func:`norm` -- LayerNorm and RMS norm through the identity rule: the scale ``1 / std`` is a
  constant of the backward (the centring of a LayerNorm keeps its gradient);
* :func:`activation` -- element-wise non-linearities through the identity rule: the gradient is
  ``act(h) / h``, as if the activation were the linear map that gives its output;
* :func:`divide_gradient` -- the uniform rule on a product of two activations (``q k^T``, ``A v``,
  a gated MLP's ``act(gate) * value``): each operand receives its share of the relevance;
* :func:`attention_operands` -- the softmax rule: ``"attnlrp"`` lets the gradient through the
  softmax (the AttnLRP softmax rule is its gradient x input) and splits the two matrix products
  uniformly; ``"cp"`` makes the attention probabilities constants (CP-LRP, Ali et al., ICML 2022).

Linear layers keep their gradient (the epsilon rule with epsilon -> 0 in this form); residual
additions, layer scale and the position terms (rotary, additive bias) are linear or constant.
Every function is hook-free and stores nothing outside the autograd graph of its call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_vit.vit.vjp import _eps, norm_kind

__all__ = ["RULES", "activation", "attention_operands", "divide_gradient", "gate", "norm", "norm_blocker"]

#: The rule sets a request can name: how the attention softmax (and a gated MLP's gate) is treated.
RULES = ("cp", "attnlrp")

#: The identity rule's stabiliser, lxt's: ``act(h) / (h + 1e-10)``.
_IDENTITY_EPS = 1e-10


class _IdentityRule(torch.autograd.Function):
    """``act(h)`` forward; backward ``g * act(h) / (h + eps)``."""

    @staticmethod
    def forward(ctx, h: Tensor, act: nn.Module) -> Tensor:
        out = act(h)
        ctx.save_for_backward(out / (h + _IDENTITY_EPS))
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


class _DivideGradient(torch.autograd.Function):
    """Identity forward; backward ``g / factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g / ctx.factor, None


class _NormIdentityRule(torch.autograd.Function):
    """``norm(x)`` forward (the module's own values); backward with the scale ``1 / std`` a constant.

    LayerNorm ``(x - mean) / std * w + b``: ``((g w) - mean(g w)) / std``; RMS norm
    ``x / rms * w``: ``g w / rms``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module, eps_override: Optional[float]) -> Tensor:
        kind = norm_kind(module)
        eps = float(eps_override if eps_override is not None else _eps(module) or 0.0)
        if kind == "layer":
            ln = module
            assert isinstance(ln, nn.LayerNorm)  # norm_kind said so
            y = ln(x) if eps_override is None else F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, eps)
            xc = x - x.mean(-1, keepdim=True)
            rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
        else:
            y = module(x)
            rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        weight = getattr(module, "weight", None)
        ctx.center = kind == "layer"
        ctx.has_weight = weight is not None
        if weight is not None:
            ctx.save_for_backward(rstd, weight.detach())
        else:
            ctx.save_for_backward(rstd)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        saved = ctx.saved_tensors
        rstd = saved[0]
        gw = g * saved[1].to(g.dtype) if ctx.has_weight else g
        if ctx.center:
            gw = gw - gw.mean(-1, keepdim=True)
        return gw * rstd, None, None


def norm_blocker(module: Optional[nn.Module]) -> str:
    """Why :func:`norm` has no rule for ``module`` (a normalisation other than LayerNorm / RMS norm), or ``""``."""
    if module is None or isinstance(module, nn.Identity) or norm_kind(module) is not None:
        return ""
    return f"{type(module).__name__} is not a LayerNorm or an RMS norm, the normalisations with an identity rule"


def norm(module: Optional[nn.Module], x: Tensor, eps: Optional[float] = None) -> Tensor:
    """``module(x)`` with the identity rule (``None``, ``nn.Identity``: ``x``); ``eps`` overrides a LayerNorm's."""
    if module is None or isinstance(module, nn.Identity):
        return x
    if norm_kind(module) is None:
        raise ValueError(f"no LRP rule for the normalisation {type(module).__name__}: {norm_blocker(module)}")
    return _NormIdentityRule.apply(x, module, eps)


def activation(act: nn.Module, h: Tensor) -> Tensor:
    """``act(h)``, element-wise, with the identity rule."""
    if not h.requires_grad:
        return act(h)
    return _IdentityRule.apply(h, act)


def divide_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` forward, its gradient divided by ``factor`` (the uniform rule, after a product of ``factor`` terms)."""
    if not x.requires_grad:
        return x
    return _DivideGradient.apply(x, factor)


def attention_operands(q: Tensor, k: Tensor, v: Tensor, rules: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` as the attention ``softmax(q k^T * scale + bias) v`` reads them under ``rules``.

    ``"cp"``: ``q`` and ``k`` detached, so the attention probabilities are constants and the
    relevance flows through the values only (lxt's torchvision ViT default). ``"attnlrp"``: the
    gradient of ``q`` and ``k`` divided by 4 (the uniform rule on ``A v``, then on ``q k^T``) and
    of ``v`` by 2 (on ``A v``), the gradient through the softmax itself unchanged (lxt's attention
    wrapper for the transformers models).
    """
    if rules == "cp":
        return q.detach(), k.detach(), v
    if rules == "attnlrp":
        return divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    raise ValueError(f"lrp_rules must be one of {RULES}, got {rules!r}")


def gate(act: nn.Module, gate_in: Tensor, value: Tensor, rules: str) -> Tensor:
    """A gated MLP's ``act(gate_in) * value`` under ``rules`` (lxt's gated-MLP patches).

    ``"attnlrp"``: the identity rule on the activation and the uniform rule on the product;
    ``"cp"``: the gate a constant, so the product is linear in ``value``.
    """
    if rules == "cp":
        return act(gate_in.detach()) * value
    return divide_gradient(activation(act, gate_in) * value, 2)
