"""Raw attention: the last block's [class]-row attention, averaged over heads."""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from captum_vit.attr._base import ViTLayerAttribution, check_fusion, fuse
from captum_vit.vit import Record, Request, ViTAdapter

__all__ = ["RawAttention"]


class RawAttention(ViTLayerAttribution):
    r"""
    The post-softmax attention of one block's [class] query over the patch keys, fused over
    heads: ``mean_h A_{L,h}[0, j]``. **Class-agnostic**: ``target`` is accepted and ignored.
    ``query="pooled"`` reads the query rows weighted as the head pools the tokens instead of the
    [class] row; a model whose head does not read a [class] token alone needs it.

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        layer (int): the block to read (default ``-1``, the last).
        head_fusion (str): ``"mean"`` (default), ``"max"`` or ``"min"`` over heads.
        query (str): ``"class"`` or ``"pooled"``.

    Examples::

        >>> maps = RawAttention(model).attribute(x)   # [B, 1, gh, gw]
    """

    def __init__(self, model: Union[nn.Module, ViTAdapter], layer: int = -1, head_fusion: str = "mean",
                 query: str = "class") -> None:
        super().__init__(model, [layer])
        self.query = self._require_query(query)
        self.head_fusion = check_fusion("head_fusion", head_fusion, ("mean", "max", "min"))

    @classmethod
    def get_name(cls) -> str:
        return "Raw Attention"

    def _request(self) -> Request:
        return Request(attention="keep", attention_layers=tuple(self.layer_indices), attention_heads=self.head_fusion,
                       query_weights=self.query == "pooled")

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        (k,) = self.layer_indices
        return self._weighted_rows(record, fuse(record.attention[k], self.head_fusion, 1))
