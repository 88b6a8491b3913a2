"""Chefer et al.: Transformer Attribution (LRP, CVPR 2021) and generic attention explainability (ICCV 2021)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union, cast

import torch
from captum.attr._utils.attribution import GradientAttribution
from torch import Tensor, nn

from captum_vit.attr._base import ViTLayerAttribution, alternatives, identity_like
from captum_vit.vit import BlockTrace, Mlp, Record, Request, ViTAdapter
from captum_vit.vit.sweep import backward_sweep, head_gradient, sweep_support
from captum_vit.vit.vjp import layer_scale

__all__ = ["TransformerAttribution", "GradientAttentionRollout"]


def _roll_row(row: Tensor, grad_attention: Tensor, weights: Tensor) -> Tensor:
    """One block of a rollout read from the last block down: ``r (I + E_h[(grad A * weights)^+])``, ``r: [B, 1, N]``."""
    return row + row @ (grad_attention * weights).clamp_(min=0).mean(1)


def _attention_grads(record: Record, logits: Tensor, targets: Tensor, layers: List[int]) -> Dict[int, Tensor]:
    """``dy_t / dA_k`` of the target logit for the recorded (non-detached) attention maps."""
    y = logits.gather(1, targets[:, None]).sum()
    grads = torch.autograd.grad(y, [record.attention[k] for k in layers], allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(record.attention[k]) for k, g in zip(layers, grads)}


class GradientAttentionRollout(ViTLayerAttribution, GradientAttribution):
    r"""
    Chefer et al. (ICCV 2021), generic attention explainability for a self-attention encoder:

    .. math::
        R \leftarrow I; \qquad R \leftarrow R + \mathbb{E}_h\big[(\nabla A_b \odot A_b)^+\big] R
        \quad \text{for every block } b,

    read at the [class] row over the patch keys; no row normalisation. ``\nabla A_b`` is the
    ordinary gradient of the target logit (nothing detached). Where the pure forward runs, the
    backward visits one block at a time, recomputed from its input (:mod:`captum_vit.vit.sweep`),
    and the product is read row by row from the last block: ``w^T (I + \bar A_L) \cdots (I + \bar A_1)``,
    so the memory is a forward's few times over, not every block's graph. A model whose head does not
    read a [class] token alone (average or attention pooling) needs ``query="pooled"``: the
    query rows weighted as the head pools the tokens (see :class:`~captum_vit.AGCAM`).

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        layers (sequence of int, optional): blocks to include (default all).
        query (str): ``"class"`` or ``"pooled"``.

    Examples::

        >>> maps = GradientAttentionRollout(model).attribute(x, target=[3, 7])
    """

    def __init__(self, model: Union[nn.Module, ViTAdapter], layers=None, query: str = "class") -> None:
        super().__init__(model, layers)
        self.query = self._require_query(query)
        GradientAttribution.__init__(self, self.model)

    @classmethod
    def get_name(cls) -> str:
        return "Gradient Attention Rollout"

    def _request(self) -> Request:
        if sweep_support(self.adapter):
            return Request(block_inputs=True, query_weights=self.query == "pooled")
        return Request(detach=False, attention="grad", attention_layers=tuple(self.layer_indices),
                       query_weights=self.query == "pooled")

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        if record.head_input is not None:
            return self._swept(record, targets)
        grads = _attention_grads(record, logits, targets, self.layer_indices)
        relevance: Optional[Tensor] = None
        for k in self.layer_indices:
            a = record.attention[k]
            cam = (grads[k] * a).clamp(min=0).mean(1)
            relevance = identity_like(cam) if relevance is None else relevance
            relevance = relevance + cam @ relevance
        assert relevance is not None  # layer_indices is never empty
        return self._weighted_rows(record, relevance).detach()

    def _swept(self, record: Record, targets: Tensor) -> Tensor:
        """The rolled-out query rows, from the last block down: ``r <- r + r E_h[(grad A * A)^+]``."""
        self._require_autograd()
        r = self._query_row(record).unsqueeze(1)  # [B, 1, N]
        layers = set(self.layer_indices)

        def visit(k: int, block: Record, grad_attention: Tensor) -> None:
            nonlocal r
            if k in layers:
                r = _roll_row(r, grad_attention, block.attention[0])

        g = head_gradient(self.adapter, record, targets)
        backward_sweep(self.adapter, record, g, Request(detach=False, attention="grad"), visit, self.layer_indices[0])
        return r[:, 0, self.adapter.num_prefix_tokens:]


# --------------------------------------------------------------------------- LRP rules
def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` with the reference implementation's stabiliser: ``b + 1e-9``, and 0 where ``b == 0``.

    The reference writes the denominator as ``clamp(b, min=1e-9) + clamp(b, max=1e-9)``, which is
    ``b + 1e-9`` exactly for every ``b``, then replaces an exact 0 by ``1e-9``; this is that, in
    fewer passes over the (large) relevance tensors, and with one temporary of their size.
    """
    return _divide_into(a, b + 1e-9, b == 0)


def _divide_into(a: Tensor, den: Tensor, zero: Tensor, nonnegative: bool = False) -> Tensor:
    """:func:`safe_divide` with ``den = b + 1e-9`` (overwritten by the result) and ``zero = (b == 0)``.

    ``nonnegative``: ``b >= 0`` everywhere, so ``den >= 1e-9`` is never 0 and needs no check.
    """
    if not nonnegative:
        den.masked_fill_(den == 0, 1e-9)
    return torch.div(a, den, out=den).masked_fill_(zero, 0.0)


def _safe_divide_consuming(a: Tensor, b: Tensor, nonnegative: bool = False) -> Tensor:
    """:func:`safe_divide` for a ``b`` nobody else reads: ``b``'s memory holds the result."""
    zero = b == 0
    return _divide_into(a, b.add_(1e-9), zero, nonnegative)


def lrp_linear(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """alpha=1, beta=0 rule, no bias: positive and negative inputs each through the weights of their sign.

    ``px * (s pw) + nx * (s nw)`` with ``s = R / (px pw^T + nx nw^T)``. ``px`` and ``nx`` never
    overlap, so the sum is ``x * (s pw)`` where ``x > 0`` and ``x * (s nw)`` elsewhere: one select
    instead of two products and a sum. The halves of ``x`` live only inside the denominator's
    products, so that at most two temporaries of ``x``'s size (and a boolean mask) live at once.
    """
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    z = (x.clamp(min=0) @ pw.t()).add_(x.clamp(max=0) @ nw.t())  # >= 0: a sum of products of one sign
    s = _safe_divide_consuming(relevance, z, nonnegative=True)
    through_positive = s @ pw
    through_negative = s @ nw
    del s
    return torch.where(x > 0, through_positive, through_negative, out=through_positive).mul_(x)


def lrp_matmul(a: Tensor, b: Tensor, relevance: Tensor) -> Tuple[Tensor, Tensor]:
    """``Z = a @ b``: gradient x input on both operands, each halved."""
    s = _safe_divide_consuming(relevance, a @ b)
    return (s @ b.transpose(-2, -1)).mul_(a).div_(2), (a.transpose(-2, -1) @ s).mul_(b).div_(2)


def lrp_add(x: Tensor, branch: Tensor, relevance: Tensor) -> Tuple[Tensor, Tensor]:
    """Residual ``x + branch``: gradient x input, then each side rescaled to its share of ``|sum|``, per image."""
    s = safe_divide(relevance, x + branch)
    a, b = x * s, branch * s
    dims = tuple(range(1, x.dim()))
    a_sum, b_sum, total = a.sum(dims, keepdim=True), b.sum(dims, keepdim=True), relevance.sum(dims, keepdim=True)
    a_share = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    b_share = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * total
    return a * safe_divide(a_share, a_sum), b * safe_divide(b_share, b_sum)


def lrp_fork(x: Tensor, *relevances: Tensor) -> Tensor:
    """A tensor used twice (residual and branch): the relevances of its uses, summed through ``x``."""
    return cast(Tensor, sum(x * safe_divide(r, x) for r in relevances))  # never empty: a sum of tensors


class TransformerAttribution(ViTLayerAttribution, GradientAttribution):
    r"""
    Chefer et al. (CVPR 2021) "Transformer Attribution": LRP relevance ``R^{A_b}`` of every
    block's attention map, weighted by its gradient and rolled out without row normalisation,

    .. math::
        \bar A_b = \mathbb{E}_h\big[(\nabla A_b \odot R^{A_b})^+\big], \qquad
        C = \prod_{b \ge \text{start\_layer}} (I + \bar A_b),

    read at the [class] row over the patch keys. Relevance starts from the one-hot target and
    follows the published rules, one per operation of the block parts: linear layers
    alpha=1 beta=0 without biases; LayerNorm, GELU, softmax and layer scale pass relevance
    through; both attention matmuls gradient x input on each operand, halved; residual
    additions split by the ``|sum|`` share of each side and renormalised; forks summed;
    [class] pooling sends everything to the [class] token. Batched: every sum in the rules is
    per image.

    Args:
        model (nn.Module): a supported ViT with a single [class]-token head.
        start_layer (int): first block of the rollout; 0 as the AGCAM paper ran it, 1 as in
            Chefer et al.'s own evaluation.
        final_norm_eps (float or None): epsilon of the final LayerNorm in the forward pass
            that gives the gradients and the relevances. The reference implementation builds
            that norm with PyTorch's default 1e-5 where timm's ViTs use 1e-6; ``None`` keeps the
            model's own.

    A model in training mode is explained as in eval mode when every dropout and drop-path
    rate is 0, and refused (before any compute) when one is active: the rules need every
    activation of the forward, which only the pure forward over the parts records.

    Examples::

        >>> lrp = TransformerAttribution(model)
        >>> maps = lrp.attribute(x, target=[3, 7])   # [B, 1, gh, gw]
    """

    _needs_pure_forward = True

    def __init__(
        self,
        model: Union[nn.Module, ViTAdapter],
        start_layer: int = 0,
        final_norm_eps: Optional[float] = 1e-5,
    ) -> None:
        super().__init__(model)
        self.query = self._require_query("class")
        GradientAttribution.__init__(self, self.model)
        a = self.adapter
        n = a.num_layers
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n:
            raise ValueError(f"start_layer must be an int in 0..{n - 1}, got {start_layer!r}")
        if a.parts is None:
            raise ValueError(f"TransformerAttribution needs a rule per operation, and {a.parts_missing}. "
                             f"{alternatives(a, exclude='lrp')}")
        for i, blk in enumerate(a.parts):
            why = blk.attn.position_aware or ("a gated MLP" if not isinstance(blk.mlp, Mlp) else "")
            if why:
                raise ValueError(
                    f"TransformerAttribution's rules are published for the plain ViT block, and block {i} has {why}, "
                    f"for which no rule is defined. {alternatives(a, exclude='lrp')}"
                )
        if len(a.head.tokens) != 1 or a.head.tokens[0][0] != 0 or a.post:
            raise ValueError(
                "TransformerAttribution is defined for a single linear head on the [class] token whose output is "
                "the explained logit; this model pools or averages several heads, or transforms the logits. "
                f"{alternatives(a, exclude='lrp')}"
            )
        self.start_layer = start_layer
        self.final_norm_eps = final_norm_eps

    @classmethod
    def get_name(cls) -> str:
        return "Transformer Attribution"

    def _request(self) -> Request:
        return Request(block_inputs=True, final_norm_eps=self.final_norm_eps)

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        """``e_0^T (I + \\bar A_L) \\cdots (I + \\bar A_s)``, read from the last block down, one block at a time."""
        self._require_autograd()
        a = self.adapter
        relevance: Optional[Tensor] = self._head_relevance(record, logits, targets)
        row = self._query_row(record).unsqueeze(1)  # e_0: [B, 1, N]

        def visit(k: int, block: Record, grad_attention: Tensor) -> None:
            nonlocal relevance, row
            assert relevance is not None  # None only after the first layer, which the sweep visits last
            attention = block.attention.pop()
            last = k == self.start_layer  # nothing reads the relevance below the first rolled-out block
            relevance, attention_relevance = self._block_relevance(k, block.traces.pop(), attention, relevance, last)
            del attention
            row = _roll_row(row, grad_attention, attention_relevance)

        g = head_gradient(a, record, targets, self.final_norm_eps)
        block_request = Request(detach=False, attention="grad", activations=True)
        backward_sweep(a, record, g, block_request, visit, self.start_layer)
        return row[:, 0, a.num_prefix_tokens:]

    def _head_relevance(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        """Relevance at the head's input: the one-hot target through the classifier, all on the [class] token."""
        _, head = self.adapter.head.tokens[0]
        rec = Record()
        assert record.head_input is not None  # the request records the block inputs
        self.adapter.head(record.head_input, rec, Request(activations=True, features=True,
                                                          final_norm_eps=self.final_norm_eps))
        assert rec.features is not None and rec.head_trace is not None  # asked for
        one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        relevance_cls = lrp_linear(rec.features, head.weight, one_hot)  # fc_norm and the final norm pass it on
        normed = rec.head_trace.normed
        pooled = normed[:, 0]
        relevance = torch.zeros_like(normed)
        relevance[:, 0] = pooled * safe_divide(relevance_cls, pooled)
        return relevance

    def _block_relevance(self, k: int, t: BlockTrace, attn: Tensor, relevance: Tensor, last: bool = False
                         ) -> Tuple[Optional[Tensor], Tensor]:
        """Block ``k``'s rules: relevance at its output -> ``(relevance at its input, R^{A_k})``.

        ``last``: only ``R^{A_k}`` is wanted, so the rules after the attention-values product (the
        query-key product, the qkv projection, the fork into the block's input) are skipped and the
        input's relevance is ``None``.

        Each intermediate is let go once its rule has run (``del``), so that the rules add about
        one block's activations to the peak memory, not all of their own temporaries.
        """
        b = self.adapter.parts[k]  # type: ignore[index]  # the constructor checked the parts exist
        mlp = cast(Mlp, b.mlp)  # the constructor refused gated MLPs
        B, N, _ = t.x.shape
        H, d = b.attn.num_heads, b.attn.head_dim
        x, n1, q, key, v, o, attn_out, u, n2, mlp_out = t.x, t.n1, t.q, t.k, t.v, t.o, t.attn_out, t.u, t.n2, t.mlp
        del t
        # x' = u + ls2 * fc2(norm(act(fc1(norm2(u)))))
        r_u, r_mlp = lrp_add(u, layer_scale(b.ls2, mlp_out.out), relevance)
        del relevance
        hidden = mlp_out.act if mlp.norm is None else mlp.norm(mlp_out.act)
        del mlp_out
        r_hidden = lrp_linear(hidden, mlp.fc2.weight, r_mlp)
        del hidden, r_mlp
        r_n2 = lrp_linear(n2, mlp.fc1.weight, r_hidden)
        del n2, r_hidden
        relevance = lrp_fork(u, r_u, r_n2)
        del r_u, r_n2
        # u = x + ls1 * proj(A v)
        r_x, r_attn = lrp_add(x, layer_scale(b.ls1, attn_out), relevance)
        del u, attn_out, relevance
        r_o = lrp_linear(o, b.attn.proj.weight, r_attn).reshape(B, N, H, d).transpose(1, 2)
        del o, r_attn
        r_a, r_v = lrp_matmul(attn, v, r_o)
        del attn, v, r_o
        if last:
            return None, r_a
        r_q, r_k = lrp_matmul(q, key.transpose(-2, -1), r_a)  # softmax passes relevance on
        del q, key
        r_n1 = self._qkv_relevance(b, n1, r_q, r_k.transpose(-2, -1), r_v)
        del r_q, r_k, r_v
        return lrp_fork(x, r_x, r_n1), r_a

    @staticmethod
    def _qkv_relevance(b, n1: Tensor, r_q: Tensor, r_k: Tensor, r_v: Tensor) -> Tensor:
        heads = [r.transpose(1, 2).flatten(2) for r in (r_q, r_k, r_v)]  # [B, N, H*d] each
        if b.attn.qkv is not None:
            return lrp_linear(n1, b.attn.qkv.weight, torch.cat(heads, dim=-1))
        # Separate projections: the fused rule splits over output neurons, so their relevances add.
        return cast(Tensor, sum(lrp_linear(n1, lin.weight, r) for lin, r in zip((b.attn.q, b.attn.k, b.attn.v), heads)))
