"""Attention-Guided CAM (Leem & Seo, AAAI 2024), paper-exact and batched."""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_vit.attr._base import TargetType, ViTLayerAttribution, fuse, resolve_targets
from captum_vit.vit import ViTAdapter

__all__ = ["AGCAM"]

_ENGINES = ("auto", "one_token", "generic")


class AGCAM(ViTLayerAttribution):
    r"""
    Attention-Guided CAM: for every block ``k`` and head ``h`` of a Vision Transformer,

    .. math::
        M_j = \sum_k \sum_h \sigma(S_{k,h}[0, j]) \cdot \mathrm{relu}(\partial y_c / \partial A_{k,h}[0, j])

    where ``S`` are the scaled pre-softmax attention scores, ``A = softmax(S)`` the attention the
    model uses, ``y_c`` the target logit, ``j`` runs over patch keys, and the gradient is taken
    with every attention block's input detached (the paper's gradient along skip connections).
    Heads and layers are fused by ``head_fusion`` / ``layer_fusion`` (sum by default).
    Nothing is normalised.

    Two engines compute the same numbers:

    * ``"one_token"`` -- one forward pass (fused attention kept) plus vector-Jacobian products on
      the [class] token only: with detached attention inputs the gradient is non-zero only there.
    * ``"generic"`` -- autograd through the unfused network.

    ``engine="auto"`` picks ``one_token`` where the architecture allows it (pre-norm timm
    ``Block``\ s or Hugging Face ``ViTLayer``\ s, [class]-token head, eval mode, ``detach=True``)
    and ``generic`` otherwise.

    Args:
        model (nn.Module): a timm ``VisionTransformer`` (incl. DeiT distilled, register tokens,
            ``dynamic_img_size``) or a Hugging Face ``ViTForImageClassification``.
        head_fusion (str): ``"sum"`` (paper), ``"mean"`` or ``"max"`` over heads.
        layer_fusion (str): ``"sum"`` (paper), ``"mean"`` or ``"max"`` over layers.
        detach (bool): detach each attention input (paper: True). ``False`` gives the plain
            autograd gradient, a different map; it uses the generic engine.
        layers (sequence of int, optional): block indices to include (negative allowed);
            default all.
        engine (str): ``"auto"``, ``"one_token"`` or ``"generic"``.

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
        layers: Sequence[int] = None,
        engine: str = "auto",
    ) -> None:
        super().__init__(model, layers)
        for name, val in (("head_fusion", head_fusion), ("layer_fusion", layer_fusion)):
            if val not in ("sum", "mean", "max"):
                raise ValueError(f"{name} must be 'sum', 'mean' or 'max', got {val!r}")
        if engine not in _ENGINES:
            raise ValueError(f"engine must be one of {_ENGINES}, got {engine!r}")
        ok, why = self.adapter.class_row_support()
        if not ok:
            raise ValueError(f"AGCAM is not defined for this model: {why}")
        self.head_fusion = head_fusion
        self.layer_fusion = layer_fusion
        self.detach = bool(detach)
        self.engine = engine
        if engine == "one_token":
            reason = self._one_token_blocker(check_training=False)
            if reason:
                raise ValueError(f"engine='one_token' does not apply: {reason}; use engine='generic' or 'auto'")

    @classmethod
    def get_name(cls) -> str:
        return "AGCAM"

    def _one_token_blocker(self, check_training: bool = True) -> str:
        if not self.detach:
            return "it relies on detached attention inputs (detach=True)"
        if check_training and self.model.training:
            return "the model is in training mode (dropout/drop-path are not token-wise deterministic)"
        ok, why = self.adapter.one_token_support()
        return "" if ok else why

    def resolved_engine(self) -> str:
        """The engine :meth:`attribute` will use now (``"one_token"`` or ``"generic"``)."""
        if self.engine == "generic":
            return "generic"
        reason = self._one_token_blocker()
        if self.engine == "one_token" and reason:
            raise ValueError(f"engine='one_token' does not apply: {reason}; use engine='generic' or 'auto'")
        return "generic" if reason else "one_token"

    @log_usage()
    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        upsample_to_input: bool = False,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or 1-tuple of Tensor): normalised images ``[B, C, H, W]``; a
                tuple in gives a tuple out (Captum convention).
            target (int, tuple, list or Tensor, optional): class per sample (Captum semantics);
                ``None`` explains the predicted class.
            upsample_to_input (bool): return the map bilinearly upsampled
                (``align_corners=False``) to ``H x W`` instead of the patch grid.

        Returns:
            *Tensor* of shape ``[B, 1, gh, gw]`` (or ``[B, 1, H, W]``) on the input's device,
            non-negative and not normalised.
        """
        inputs, grid, is_tuple = self._prepare(inputs)
        if self.resolved_engine() == "one_token":
            maps = self._one_token(inputs, target)
        else:
            maps = self._generic(inputs, target)
        return self._finish(maps, inputs, grid, upsample_to_input, is_tuple)

    # ------------------------------------------------------------------ formula
    def _combine(self, scores_cls: List[Tensor], grads_cls: List[Tensor]) -> Tensor:
        """``fuse_k fuse_h sigmoid(S[k,h][0, j]) * relu(G[k,h][0, j])`` over patch keys ``j``."""
        p = self.adapter.num_prefix_tokens
        per_layer = [
            fuse(torch.sigmoid(scores_cls[k][..., p:]) * torch.relu(grads_cls[k][..., p:]), self.head_fusion, 1)
            for k in self.layer_indices
        ]
        return fuse(torch.stack(per_layer, 0), self.layer_fusion, 0)

    # ------------------------------------------------------------------ engines
    def _generic(self, inputs: Tensor, target: TargetType) -> Tensor:
        adapter = self.adapter
        with torch.enable_grad():
            x = inputs if self.detach else inputs.detach().requires_grad_(True)
            with adapter.recording(detach=self.detach, attention="grad") as rec:
                logits = adapter.logits(x)
            t = resolve_targets(target, logits)
            y = logits.gather(1, t[:, None]).sum()
            wanted = [rec.attention[k] for k in self.layer_indices]
            grads = torch.autograd.grad(y, wanted, allow_unused=True)
        scores = {k: rec.scores_cls[k] for k in self.layer_indices}
        g = {k: (gr[:, :, 0] if gr is not None else torch.zeros_like(scores[k])) for k, gr in zip(self.layer_indices, grads)}
        return self._combine(scores, g)

    def _one_token(self, inputs: Tensor, target: TargetType) -> Tensor:
        adapter = self.adapter
        with torch.no_grad(), adapter.recording(detach=True, values=True, prefix=True) as rec:
            logits = adapter.logits(inputs)
        t = resolve_targets(target, logits)
        B = inputs.shape[0]
        H, d = adapter.num_heads, adapter.head_dim
        grads = {}
        with torch.enable_grad():
            prefix = rec.final_prefix.detach().requires_grad_(True)
            y = adapter.head_from_prefix(prefix).gather(1, t[:, None]).sum()
            # Tokens interact only through (detached) attention, so the [class] row's gradient is
            # carried by the [class] token alone: other prefix tokens never feed back into it.
            (g,) = torch.autograd.grad(y, prefix)
            g = g[:, 0]
            heads_out = torch.zeros(B, H * d, dtype=g.dtype, device=g.device, requires_grad=True)
            for k in range(adapter.num_layers - 1, self.layer_indices[0] - 1, -1):
                mid = rec.mid_prefix[k][:, 0].detach().requires_grad_(True)
                (g_mlp,) = torch.autograd.grad(adapter.mlp_branch(k, mid), mid, g)
                g = g + g_mlp
                if k in self.layer_indices:
                    (r,) = torch.autograd.grad(adapter.attn_output_branch(k, heads_out), heads_out, g)
                    # dy/dA[h, 0, j] = r_h . V[h, j]
                    grads[k] = torch.einsum("bhd,bhnd->bhn", r.reshape(B, H, d), rec.values[k])
        return self._combine(rec.scores_cls, grads)
