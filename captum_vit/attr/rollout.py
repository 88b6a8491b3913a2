"""Attention Rollout (Abnar & Zuidema, 2020), batched."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from captum_vit.attr._base import ViTLayerAttribution, check_fusion, fuse, identity_like
from captum_vit.vit import Record, Request, ViTAdapter

__all__ = ["AttentionRollout"]


class AttentionRollout(ViTLayerAttribution):
    r"""
    Attention Rollout: the product over blocks of the head-fused attention mixed with the
    identity (the residual connection),

    .. math::
        a_k = \mathrm{rownorm}\big((\bar A_k + I) / 2\big), \qquad R = a_L \cdots a_1,

    read at the [class] row over the patch keys (``query="class"``; a model whose head does not
    read a [class] token alone is refused), or, with ``query="pooled"``, at the query rows
    weighted as the head pools the tokens (:class:`~captum_vit.AGCAM` describes the weights).
    **Class-agnostic**: ``target`` is accepted
    (for a uniform interface) and ignored. The defaults are the AGCAM paper's configuration
    (mean over heads, nothing discarded); ``head_fusion="max"`` with ``discard_ratio=0.9`` is
    vit-explain's own default.

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        head_fusion (str): ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio (float): per image and block, the fraction of the smallest fused
            attention entries set to zero before mixing (the [class]-to-[class] entry is kept).
        layers (sequence of int, optional): blocks to roll out (default all).
        query (str): ``"class"`` or ``"pooled"``.

    Examples::

        >>> rollout = AttentionRollout(model)
        >>> maps = rollout.attribute(x)              # [B, 1, gh, gw]
    """

    def __init__(
        self,
        model: Union[nn.Module, ViTAdapter],
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        layers: Optional[Sequence[int]] = None,
        query: str = "class",
    ) -> None:
        super().__init__(model, layers)
        self.query = self._require_query(query)
        self.head_fusion = check_fusion("head_fusion", head_fusion, ("mean", "max", "min"))
        if not 0.0 <= float(discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
        self.discard_ratio = float(discard_ratio)

    @classmethod
    def get_name(cls) -> str:
        return "Attention Rollout"

    def _request(self) -> Request:
        return Request(attention="keep", attention_layers=tuple(self.layer_indices), attention_heads=self.head_fusion,
                       query_weights=self.query == "pooled")

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        rollout: Optional[Tensor] = None
        for k in self.layer_indices:
            fused = self._discard(fuse(record.attention[k], self.head_fusion, 1))
            eye = identity_like(fused)
            a = (fused + eye) / 2
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        assert rollout is not None  # layer_indices is never empty
        return self._weighted_rows(record, rollout)

    def _discard(self, fused: Tensor) -> Tensor:
        if not self.discard_ratio:
            return fused
        flat = fused.flatten(1)
        lowest = flat.topk(int(flat.shape[-1] * self.discard_ratio), dim=-1, largest=False).indices
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
        drop[:, 0] = False
        return flat.masked_fill(drop, 0.0).view_as(fused)
