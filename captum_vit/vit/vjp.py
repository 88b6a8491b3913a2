"""Transposed Jacobians of the token-wise operations of a ViT block, written out explicitly.

Each function takes the operation's input (or pre-activation) at one token per image,
``[B, D]``, and a cotangent ``g`` of the same layout as the operation's output, and returns
``g`` pulled back to the input. They use forward-only tensor operations (no
``torch.autograd``), so they run under ``torch.inference_mode()`` and trace into an ONNX graph.

:func:`layer_scale` is here too: LayerScale is diagonal, so the one function is both the
forward operation and its transposed Jacobian, and the forward pass and the methods use it.
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch import Tensor, nn

__all__ = [
    "layer_norm_vjp",
    "rms_norm_vjp",
    "norm_vjp",
    "norm_kind",
    "linear_vjp",
    "activation_vjp",
    "layer_scale",
    "activation_kind",
]

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)


def layer_norm_vjp(x: Tensor, norm: nn.LayerNorm, g: Tensor) -> Tensor:
    """``(d LayerNorm(x) / dx)^T g`` over the last dimension."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + norm.eps)
    x_hat = xc * rstd
    g_hat = g * norm.weight if norm.weight is not None else g
    return rstd * (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))


def rms_norm_vjp(x: Tensor, weight: Optional[Tensor], eps: float, g: Tensor) -> Tensor:
    """``(d RMSNorm(x) / dx)^T g`` over the last dimension, ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight``."""
    rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    g_hat = g * weight if weight is not None else g
    return rstd * (g_hat - x * rstd * rstd * (g_hat * x).mean(-1, keepdim=True))


def norm_kind(norm: nn.Module) -> Optional[str]:
    """``"layer"`` or ``"rms"`` for a normalisation whose derivative :func:`norm_vjp` knows, else ``None``.

    An RMS norm is recognised by class name (timm's ``RmsNorm``, ``torch.nn.RMSNorm``) with a
    readable ``eps``, since timm's RMS norms do not share a base class with torch's.
    """
    if isinstance(norm, nn.LayerNorm):
        return "layer"
    if type(norm).__name__ in ("RmsNorm", "RMSNorm") and _eps(norm) is not None:
        return "rms"
    return None


def _eps(norm: nn.Module) -> Optional[float]:
    eps = getattr(norm, "eps", None)
    if eps is None and isinstance(norm, getattr(nn, "RMSNorm", ())):
        return None  # torch's RMSNorm with eps=None uses the dtype's epsilon, which depends on the input
    return float(eps) if isinstance(eps, (int, float)) else None


def norm_vjp(norm: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """``(d norm(x) / dx)^T g`` for a LayerNorm or an RMS norm (see :func:`norm_kind`)."""
    kind = norm_kind(norm)
    if kind == "layer":
        return layer_norm_vjp(x, norm, g)  # type: ignore[arg-type]  # norm_kind checked it is a LayerNorm
    if kind == "rms":
        return rms_norm_vjp(x, getattr(norm, "weight", None), cast(float, _eps(norm)), g)
    raise ValueError(f"no derivative for normalisation {type(norm).__name__}")


def linear_vjp(linear: nn.Linear, g: Tensor) -> Tensor:
    """``W^T g`` (the bias does not depend on the input)."""
    return g @ linear.weight


def layer_scale(gamma: Optional[Tensor], x: Tensor) -> Tensor:
    """LayerScale ``x * gamma``; ``None`` stands for the identity (a block without layer scale).

    Diagonal, so it is its own transposed Jacobian: ``layer_scale(gamma, g)`` also pulls a
    cotangent ``g`` back through it.
    """
    return x if gamma is None else x * gamma


def activation_kind(act: nn.Module) -> Optional[str]:
    """Name of an element-wise activation whose derivative :func:`activation_vjp` knows, else ``None``."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    # transformers' GELUActivation is the exact (erf) GELU, whether through F.gelu or in Python.
    if type(act).__name__ == "GELUActivation":
        return "gelu"
    return None


def activation_vjp(kind: str, h: Tensor, g: Tensor) -> Tensor:
    """``act'(h) * g`` for the pre-activation ``h``."""
    if kind == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h / _SQRT_2))
        return g * (cdf + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    if kind == "gelu_tanh":
        t = torch.tanh(_TANH_K * (h + 0.044715 * h * h * h))
        return g * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _TANH_K * (1.0 + 3.0 * 0.044715 * h * h))
    if kind == "relu":
        return g * (h > 0).to(g.dtype)
    if kind == "silu":
        s = torch.sigmoid(h)
        return g * s * (1.0 + h * (1.0 - s))
    raise ValueError(f"no derivative for activation {kind!r}")
