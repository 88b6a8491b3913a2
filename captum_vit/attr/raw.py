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
    A model whose head does not read a [class] token is refused at construction.

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        layer (int): the block to read (default ``-1``, the last).
        head_fusion (str): ``"mean"`` (default), ``"max"`` or ``"min"`` over heads.

    Examples::

        >>> maps = RawAttention(model).attribute(x)   # [B, 1, gh, gw]
    """

    def __init__(self, model: Union[nn.Module, ViTAdapter], layer: int = -1, head_fusion: str = "mean") -> None:
        super().__init__(model, [layer])
        self._require_class_row()
        self.head_fusion = check_fusion("head_fusion", head_fusion, ("mean", "max", "min"))

    @classmethod
    def get_name(cls) -> str:
        return "Raw Attention"

    def _request(self) -> Request:
        return Request(attention="keep", attention_layers=tuple(self.layer_indices), attention_heads=self.head_fusion)

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        (k,) = self.layer_indices
        return fuse(record.attention[k][:, :, 0], self.head_fusion, 1)[:, self.adapter.num_prefix_tokens :]
