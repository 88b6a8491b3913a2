"""Attention-Guided CAM (Leem & Seo, AAAI 2024), paper-exact and batched."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from captum.attr._utils.attribution import GradientAttribution
from torch import Tensor, nn

from captum_vit.attr._base import ViTLayerAttribution, check_fusion, fuse
from captum_vit.vit import Record, Request, ViTAdapter
from captum_vit.vit.sweep import backward_sweep, head_gradient, sweep_support

__all__ = ["AGCAM"]

_ENGINES = ("auto", "one_token", "generic")


class AGCAM(ViTLayerAttribution, GradientAttribution):
    r"""
    Attention-Guided CAM: for every block ``k`` and head ``h`` of a Vision Transformer,

    .. math::
        M_j = \sum_k \sum_h \sigma(S_{k,h}[0, j]) \cdot \mathrm{relu}(\partial y_c / \partial A_{k,h}[0, j])

    where ``S`` are the scaled pre-softmax attention scores, ``A = softmax(S)`` the attention the
    model uses, ``y_c`` the target logit, ``j`` runs over patch keys, and the gradient is taken
    with every attention block's input detached (the paper's gradient along skip connections).
    Heads and layers are fused by ``head_fusion`` / ``layer_fusion`` (sum by default).
    Nothing is normalised. ``S`` is the softmax's input, so a relative-position bias (BEiT,
    ``vit_relpos_*``) is part of it, and rotary embeddings (EVA) are in the queries and keys.

    **Pooled heads.** The paper reads the [class] token's query row (``query="class"``), which
    a model whose head pools the tokens (average pooling, MAP attention pooling) does not
    classify; such a model is refused unless ``query="pooled"`` is passed explicitly. Then every
    query row ``i`` counts, weighted as the head pools the tokens (``w_i``: uniform over the
    patches for average pooling, the pooling attention's weights for a MAP head, half [class]
    and half patch mean for DINOv2's head):

    .. math::
        M_j = \sum_k \sum_h \sum_i w_i \, \sigma(S_{k,h}[i, j])
            \cdot \mathrm{relu}(\partial y_c / \partial A_{k,h}[i, j])

    On a [class]-token model ``query="pooled"`` is ``w = e_0``, the paper's map.

    Two engines compute the same numbers:

    * ``"one_token"`` -- one forward pass (fused attention kept) plus explicit vector-Jacobian
      products on the [class] token only: with detached attention inputs the gradient is
      non-zero only there. No autograd: it runs under ``torch.inference_mode()``.
    * ``"generic"`` -- autograd through the unfused network: where the pure forward runs, one
      block at a time from the last, each recomputed from its input
      (:mod:`captum_vit.vit.sweep`), so the memory stays a few forwards' whatever the depth.

    ``engine="auto"`` picks ``one_token`` where the architecture allows it (pre-norm blocks with
    LayerNorm and a GELU/ReLU/SiLU MLP, a [class]-token head, ``detach=True``, eval mode) and
    ``generic`` otherwise.

    Args:
        model (nn.Module): a timm ``VisionTransformer`` (incl. DeiT distilled, register tokens,
            ``dynamic_img_size``), a Hugging Face ``ViTForImageClassification``, a
            ``torch.compile`` of one, or an ``nn.Sequential`` with one of them inside.
        head_fusion (str): ``"sum"`` (paper), ``"mean"`` or ``"max"`` over heads.
        layer_fusion (str): ``"sum"`` (paper), ``"mean"`` or ``"max"`` over layers.
        detach (bool): detach each attention input (paper: True). ``False`` gives the plain
            autograd gradient, a different map; it uses the generic engine.
        layers (sequence of int, optional): block indices to include (negative allowed);
            default all.
        engine (str): ``"auto"``, ``"one_token"`` or ``"generic"``.
        query (str): ``"class"`` (paper) or ``"pooled"`` (the query rows weighted as the head
            pools them; the generic engine, since every row then carries gradient).

    Examples::

        >>> import timm, torch
        >>> from captum_vit import AGCAM
        >>> model = timm.create_model("vit_small_patch16_224").eval()
        >>> agcam = AGCAM(model)
        >>> x = torch.randn(2, 3, 224, 224)
        >>> cam = agcam.attribute(x, target=[3, 7])           # [2, 1, 14, 14]
        >>> cam_px = agcam.attribute(x, upsample_to_input=True)  # [2, 1, 224, 224], predicted class
    """

    def __init__(
        self,
        model: Union[nn.Module, ViTAdapter],
        head_fusion: str = "sum",
        layer_fusion: str = "sum",
        detach: bool = True,
        layers: Optional[Sequence[int]] = None,
        engine: str = "auto",
        query: str = "class",
    ) -> None:
        super().__init__(model, layers)
        GradientAttribution.__init__(self, self.model)
        self.head_fusion = check_fusion("head_fusion", head_fusion, ("sum", "mean", "max"))
        self.layer_fusion = check_fusion("layer_fusion", layer_fusion, ("sum", "mean", "max"))
        if engine not in _ENGINES:
            raise ValueError(f"engine must be one of {_ENGINES}, got {engine!r}")
        self.query = self._require_query(query)
        self.detach = bool(detach)
        self.engine = engine
        ok, why = self.adapter.one_token_support()
        self._one_token_blocker = "" if ok else why
        if self.query == "pooled":
            self._one_token_blocker = "query='pooled' reads every query row, and it the [class] row only"
        if not self.detach:
            self._one_token_blocker = "it relies on detached attention inputs (detach=True)"
        if engine == "one_token" and self._one_token_blocker:
            raise ValueError(
                f"engine='one_token' does not apply: {self._one_token_blocker}; use engine='generic' or 'auto'"
            )

    @classmethod
    def get_name(cls) -> str:
        return "AGCAM"

    def resolved_engine(self) -> str:
        """The engine :meth:`attribute` uses now (``"one_token"`` or ``"generic"``)."""
        if self.engine == "generic" or self._one_token_blocker:
            return "generic"
        if self.adapter.is_training:
            if self.engine == "one_token":
                raise ValueError(
                    "engine='one_token' does not apply to a model in training mode (dropout and drop-path are not "
                    "token-wise deterministic); call model.eval() or use engine='generic'"
                )
            return "generic"
        return "one_token"

    def _request(self) -> Request:
        if self.resolved_engine() == "one_token":
            return Request(detach=True, values=True, scores_cls=True, cls_tokens=True)
        if sweep_support(self.adapter):
            return Request(block_inputs=True, query_weights=self.query == "pooled")
        return self._block_request()

    def _block_request(self) -> Request:
        """What the generic engine records of each block (of all of them at once, or one at a time)."""
        pooled = self.query == "pooled"
        return Request(detach=self.detach, attention="grad", scores_cls=not pooled, scores_all=pooled,
                       query_weights=pooled)

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        if record.head_input is not None:  # generic engine, one block at a time
            return self._swept(record, targets)
        if not record.attention:  # one-token engine: explicit VJPs on the [class] row
            grads = self.adapter.class_row_grads(record, targets, first_layer=self.layer_indices[0])
            return self._combine(record, self._class_rows(record.scores_cls), self._class_rows(grads))
        # generic engine: autograd through the recorded attention maps
        y = logits.gather(1, targets[:, None]).sum()
        wanted = [record.attention[k] for k in self.layer_indices]
        grads = dict(zip(self.layer_indices, torch.autograd.grad(y, wanted, allow_unused=True)))
        grads = {k: g if g is not None else torch.zeros_like(record.attention[k]) for k, g in grads.items()}
        if self.query == "pooled":
            return self._combine(record, dict(enumerate(record.scores)), grads)
        return self._combine(record, self._class_rows(record.scores_cls), {k: g[:, :, :1] for k, g in grads.items()})

    def _swept(self, record: Record, targets: Tensor) -> Tensor:
        self._require_autograd()
        per_layer: Dict[int, Tensor] = {}
        pooled = self.query == "pooled"

        def visit(k: int, block: Record, grad_attention: Tensor) -> None:
            if k in self.layer_indices:
                scores = block.scores[0] if pooled else block.scores_cls[0].unsqueeze(2)
                grads = grad_attention if pooled else grad_attention[:, :, :1]
                per_layer[k] = self._layer_map(record, scores, grads)

        g = head_gradient(self.adapter, record, targets)
        backward_sweep(self.adapter, record, g, self._block_request(), visit, self.layer_indices[0])
        return fuse(torch.stack([per_layer[k] for k in self.layer_indices], 0), self.layer_fusion, 0)

    # ------------------------------------------------------------------ formula
    def _combine(self, record: Record, scores: Mapping[int, Tensor], grads: Mapping[int, Tensor]) -> Tensor:
        """``fuse_k fuse_h sum_i w_i sigmoid(S[k,h][i, j]) * relu(G[k,h][i, j])`` over patch keys ``j``.

        ``scores[k]``, ``grads[k]``: ``[B, H, rows, N]``, the [class] row alone (``w = e_0``) or all.
        """
        per_layer = [self._layer_map(record, scores[k], grads[k]) for k in self.layer_indices]
        return fuse(torch.stack(per_layer, 0), self.layer_fusion, 0)

    def _layer_map(self, record: Record, scores: Tensor, grads: Tensor) -> Tensor:
        """``fuse_h sum_i w_i sigmoid(S[h][i, j]) * relu(G[h][i, j])``: one block's term."""
        return fuse(self._weighted_rows(record, torch.sigmoid(scores) * torch.relu(grads)), self.head_fusion, 1)

    @staticmethod
    def _class_rows(rows: Union[Sequence[Tensor], Dict[int, Tensor]]) -> Dict[int, Tensor]:
        """``[B, H, N]`` [class]-row tensors as ``[B, H, 1, N]``, by block (``None`` placeholders dropped)."""
        items = rows.items() if isinstance(rows, dict) else enumerate(rows)
        return {k: r.unsqueeze(2) for k, r in items if r is not None}
