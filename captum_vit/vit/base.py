"""Library-independent part of the model description: block parts, the pure forward, the records.

A :class:`ViTAdapter` describes a ViT classifier **by its parts** (:class:`BlockParts`,
:class:`AttentionParts`, :class:`HeadParts`) and runs a pure forward pass over them
(:meth:`ViTAdapter.forward`) that returns the intermediates the attribution methods ask for in
a :class:`Record`. The pure forward reads the parts' weights and calls their modules; it never
patches a module or registers a hook, so any number of threads may explain one model at once.
It calls ``scaled_dot_product_attention`` itself, so the fused kernel is kept wherever the full
attention matrix is not needed.

Architectures the parts do not cover (for example timm's post-norm ``ResPostBlock``), and
models with an active dropout (training mode with a rate above 0, which only the model's own
forward reproduces), run through the library's own forward with patched attention modules
instead. That fallback holds a per-model lock for the whole pass, restores every module in
``finally``, and is therefore serialised per model, never interleaved; the patch applies to
the explaining thread only, so other threads calling the model meanwhile run it unpatched.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_vit.vit import rules as lrp
from captum_vit.vit.vjp import activation_kind, activation_vjp, layer_scale, linear_vjp, norm_kind, norm_vjp

__all__ = [
    "AttentionParts",
    "BlockParts",
    "BlockTrace",
    "ForwardContext",
    "GluMlp",
    "HeadParts",
    "HeadTrace",
    "Mlp",
    "MlpParts",
    "MlpTrace",
    "POOLED_QUERIES",
    "Record",
    "Request",
    "UnsupportedModelError",
    "ViTAdapter",
]


class UnsupportedModelError(TypeError):
    """The module is not a Vision Transformer that captum-vit can read."""


# --------------------------------------------------------------------------- parts
@dataclass
class ForwardContext:
    """What one forward pass computes once and every block reads: the patch grid and position terms.

    ``rope`` holds whatever the adapter's rotary transform reads (timm's sin/cos table for the
    grid, or a per-block list), ``shared_bias`` a relative-position bias shared by the blocks.
    Made fresh for every call (:meth:`ViTAdapter.context`), never stored on a module.
    """

    grid: Tuple[int, int]
    rope: Any = None
    shared_bias: Optional[Tensor] = None


@dataclass(frozen=True)
class AttentionParts:
    """Multi-head self-attention by its parts; exactly one of ``qkv`` or ``q``/``k``/``v`` is set.

    The extension points of position-aware attention are forward-only, so every engine keeps them:
    ``qk_transform(q, k, context, index)`` returns the queries and keys the scores are made of
    (rotary embeddings), and ``score_bias(context, index)`` an additive bias broadcastable to
    ``[B, H, N, N]`` (a relative-position bias), added to the scaled scores before the softmax
    and passed to the fused kernel as its float mask. ``index`` is the block's.
    """

    num_heads: int
    head_dim: int
    scale: float
    proj: nn.Linear
    qkv: Optional[nn.Linear] = None
    q: Optional[nn.Linear] = None
    k: Optional[nn.Linear] = None
    v: Optional[nn.Linear] = None
    q_norm: Optional[nn.Module] = None
    k_norm: Optional[nn.Module] = None
    #: normalisation of the concatenated head outputs before ``proj`` (timm ``scale_norm``).
    out_norm: Optional[nn.Module] = None
    #: the bias of a fused ``qkv`` kept outside the linear layer (BEiT and EVA's q/v biases), read per call.
    qkv_bias: Optional[Callable[[], Optional[Tensor]]] = None
    qk_transform: Optional[Callable[[Tensor, Tensor, ForwardContext, int], Tuple[Tensor, Tensor]]] = None
    score_bias: Optional[Callable[[ForwardContext, int], Optional[Tensor]]] = None

    def project(
        self, x: Tensor, context: Optional[ForwardContext] = None, index: int = 0, rules: Optional[str] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` as ``[B, H, N, d]``, q/k norms and q/k transform applied (``rules``: see :class:`Request`)."""
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        if self.qkv is not None:
            bias = self.qkv_bias() if self.qkv_bias is not None else self.qkv.bias
            qkv = F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            assert self.q is not None and self.k is not None and self.v is not None  # no qkv: separate q, k, v
            q, k, v = (lin(x).reshape(B, N, H, d).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.q_norm is not None:
            assert self.k_norm is not None  # q and k are normalised together
            if rules is None:
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q, k = lrp.norm(self.q_norm, q), lrp.norm(self.k_norm, k)
        if self.qk_transform is not None:
            assert context is not None  # a position transform needs the call's context
            q, k = self.qk_transform(q, k, context, index)
            q, k = q.to(v.dtype), k.to(v.dtype)
        return q, k, v

    def bias(self, context: Optional[ForwardContext], index: int = 0) -> Optional[Tensor]:
        """The additive score bias of this call (``None`` without one)."""
        if self.score_bias is None:
            return None
        assert context is not None  # a position bias needs the call's context
        return self.score_bias(context, index)

    @property
    def position_aware(self) -> str:
        """What the scores hold besides ``q k^T``: ``""``, or a description (for refusals)."""
        what = [n for n, f in (("rotary query/key embeddings", self.qk_transform),
                               ("a relative-position bias", self.score_bias)) if f is not None]
        return " and ".join(what)

    def output(self, heads_out: Tensor, rules: Optional[str] = None) -> Tensor:
        """``proj(out_norm(o))`` for the concatenated head outputs ``o`` ``[B, N, H*d]``."""
        if self.out_norm is not None:
            heads_out = self.out_norm(heads_out) if rules is None else lrp.norm(self.out_norm, heads_out)
        return self.proj(heads_out)


@dataclass(frozen=True)
class MlpTrace:
    """One MLP call's intermediates: ``hidden`` (the first linear layer's output) and ``act`` (after the activation)."""

    out: Tensor
    hidden: Tensor
    act: Tensor


class MlpParts:
    """A block's MLP (after ``norm2``) by its parts: its forward, its transposed Jacobian at one token, its trace."""

    #: normalisation of the hidden units before the output layer (timm ``scale_mlp_norm``), or ``None``.
    norm: Optional[nn.Module]
    fc2: nn.Linear

    def __call__(self, x: Tensor, rules: Optional[str] = None) -> Tensor:
        return self.trace(x, rules).out

    def trace(self, x: Tensor, rules: Optional[str] = None) -> MlpTrace:
        """The MLP's intermediates; ``rules`` (see :class:`Request`) changes the backward only."""
        raise NotImplementedError

    def vjp(self, x: Tensor, g: Tensor) -> Tensor:
        """``(d mlp(x) / dx)^T g`` at ``x`` ``[B, D]``, with forward-only operations."""
        raise NotImplementedError

    def vjp_blocker(self) -> str:
        """Why :meth:`vjp` does not apply (an activation or norm without a known derivative), or ``""``."""
        raise NotImplementedError

    def _hidden_out(self, a: Tensor, rules: Optional[str] = None) -> Tensor:
        if self.norm is not None:
            a = self.norm(a) if rules is None else lrp.norm(self.norm, a)
        return self.fc2(a)

    def _norm_vjp(self, a: Tensor, g: Tensor) -> Tensor:
        g = linear_vjp(self.fc2, g)
        return norm_vjp(self.norm, a, g) if self.norm is not None else g

    def _blocker(self, act: nn.Module) -> str:
        if activation_kind(act) is None:
            return f"its MLP activation {type(act).__name__} has no explicit derivative here"
        if self.norm is not None and norm_kind(self.norm) is None:
            return f"its MLP norm is {type(self.norm).__name__}, not LayerNorm or RMSNorm"
        return ""


@dataclass(frozen=True)
class Mlp(MlpParts):
    """``fc2(norm(act(fc1(x))))``: the ViT MLP."""

    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    norm: Optional[nn.Module] = None

    def trace(self, x: Tensor, rules: Optional[str] = None) -> MlpTrace:
        h = self.fc1(x)
        a = self.act(h) if rules is None else lrp.activation(self.act, h)
        return MlpTrace(self._hidden_out(a, rules), h, a)

    def vjp(self, x: Tensor, g: Tensor) -> Tensor:
        h = self.fc1(x)
        g = self._norm_vjp(self.act(h), g)
        return linear_vjp(self.fc1, activation_vjp(cast(str, activation_kind(self.act)), h, g))

    def vjp_blocker(self) -> str:
        return self._blocker(self.act)


@dataclass(frozen=True)
class GluMlp(MlpParts):
    """``fc2(norm(act(gate(x)) * value(x)))``: a gated MLP (SwiGLU with SiLU).

    The gate and value are either two linear layers (``fc_gate``, ``fc_value``; timm ``SwiGLU``)
    or the two halves of one (``fc1``; timm ``GluMlp``, Hugging Face DINOv2's SwiGLU), the gate
    first unless ``gate_last``.
    """

    act: nn.Module
    fc2: nn.Linear
    fc1: Optional[nn.Linear] = None
    fc_gate: Optional[nn.Linear] = None
    fc_value: Optional[nn.Linear] = None
    gate_last: bool = False
    norm: Optional[nn.Module] = None

    def _gate_value(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.fc1 is not None:
            first, second = self.fc1(x).chunk(2, dim=-1)
            return (second, first) if self.gate_last else (first, second)
        assert self.fc_gate is not None and self.fc_value is not None  # no packed fc1: two layers
        return self.fc_gate(x), self.fc_value(x)

    def trace(self, x: Tensor, rules: Optional[str] = None) -> MlpTrace:
        gate, value = self._gate_value(x)
        a = self.act(gate) * value if rules is None else lrp.gate(self.act, gate, value, rules)
        return MlpTrace(self._hidden_out(a, rules), torch.cat([gate, value], -1), a)

    def vjp(self, x: Tensor, g: Tensor) -> Tensor:
        gate, value = self._gate_value(x)
        g = self._norm_vjp(self.act(gate) * value, g)
        g_gate = activation_vjp(cast(str, activation_kind(self.act)), gate, g * value)
        g_value = g * self.act(gate)
        if self.fc1 is not None:
            both = torch.cat([g_value, g_gate] if self.gate_last else [g_gate, g_value], -1)
            return linear_vjp(self.fc1, both)
        assert self.fc_gate is not None and self.fc_value is not None
        return linear_vjp(self.fc_gate, g_gate) + linear_vjp(self.fc_value, g_value)

    def vjp_blocker(self) -> str:
        return self._blocker(self.act)


@dataclass(frozen=True)
class BlockParts:
    """A pre-norm block ``u = x + ls1 * attn(norm1(x))``, ``x' = u + ls2 * mlp(norm2(u))``."""

    norm1: nn.Module
    attn: AttentionParts
    norm2: nn.Module
    mlp: MlpParts
    ls1: Optional[Tensor] = None
    ls2: Optional[Tensor] = None

    def mlp_branch(self, u: Tensor, rules: Optional[str] = None) -> Tensor:
        if rules is None:
            return layer_scale(self.ls2, self.mlp(self.norm2(u)))
        return layer_scale(self.ls2, self.mlp(lrp.norm(self.norm2, u), rules))


@dataclass(frozen=True)
class BlockTrace:
    """One block's intermediates, for rules per operation (LRP): named as in :class:`BlockParts`.

    ``x`` the block input, ``n1 = norm1(x)``, ``q, k, v`` ``[B, H, N, d]``, ``o`` the concatenated
    head outputs, ``attn_out = proj(o)``, ``u`` the mid-residual, ``n2 = norm2(u)``, ``mlp`` the
    MLP's trace (``mlp.out`` before layer scale).
    """

    x: Tensor
    n1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    attn_out: Tensor
    u: Tensor
    n2: Tensor
    mlp: MlpTrace


@dataclass(frozen=True)
class HeadTrace:
    """The head's input ``tokens`` and the final norm's output ``normed``."""

    tokens: Tensor
    normed: Tensor


#: Poolings whose query-row weights :meth:`HeadParts.query_weights` knows.
POOLED_QUERIES = ("token", "token_distill", "avg", "map", "token+avg")


@dataclass(frozen=True)
class HeadParts:
    """Final norm, pooling and classifier.

    ``tokens``: for token pooling, ``(token index, linear head)`` pairs whose outputs are
    averaged (one pair for a [class] head, two for DeiT's distilled heads); empty when the model
    pools otherwise, and then ``pooled`` maps the normed tokens to logits.
    ``pool_from``: the first token an average or attention pooling reads (the prefix tokens
    are skipped by default; 0 where the pool reads them too). ``pool_weights``: for attention
    pooling (``"map"``), the pooling attention's weights over the tokens it reads ``[B, K]``,
    averaged over its heads.
    """

    norm: nn.Module
    pooling: str
    tokens: Tuple[Tuple[int, nn.Linear], ...] = ()
    fc_norm: Optional[nn.Module] = None
    pooled: Optional[Callable[[Tensor], Tensor]] = None
    pool_from: int = 1
    pool_weights: Optional[Callable[[Tensor], Tensor]] = None

    def query_weights(self, normed: Tensor) -> Tensor:
        """``[B, N]``: how the head weighs each token's row, the query rows of a ``query="pooled"`` method.

        A [class] head: the [class] token; DeiT's two heads: half each; average pooling: uniform
        over the patch tokens; attention pooling: the pooling attention's weights (constants of
        the forward); [class] and mean of patches concatenated (DINOv2): half the [class] token,
        half uniform over the patches.
        """
        B, N = normed.shape[:2]
        p = self.pool_from
        w = normed.new_zeros(B, N)
        if self.pooling == "map":
            assert self.pool_weights is not None  # an attention-pooling head describes its weights
            w[:, p:] = self.pool_weights(normed[:, p:]).detach().to(normed.dtype)
        elif self.pooling == "token":
            w[:, 0] = 1.0
        elif self.pooling == "token_distill":
            w[:, :2] = 0.5
        elif self.pooling == "avg":
            w[:, p:] = 1.0 / (N - p)
        elif self.pooling == "token+avg":
            w[:, 0] = 0.5
            w[:, p:] = 0.5 / (N - p)
        else:
            raise ValueError(f"no query weights for pooling {self.pooling!r}")
        return w

    def __call__(self, tokens: Tensor, rec: Optional[Record] = None, req: Optional[Request] = None) -> Tensor:
        eps = req.final_norm_eps if req is not None else None
        rules = req.lrp_rules if req is not None else None
        if rules is not None:
            if not self.tokens:
                raise ValueError(
                    f"the LRP rules need a head read from tokens through linear layers; this head pools with "
                    f"{self.pooling!r} in the library's own code, which the rules do not reach"
                )
            x = lrp.norm(self.norm, tokens, eps)
        elif eps is None:
            x = self.norm(tokens)
        else:
            # a request that changes the final norm's epsilon is only made for a LayerNorm
            norm = cast(nn.LayerNorm, self.norm)
            x = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, eps)
        if req is not None and req.activations:
            assert rec is not None  # what a request asks for is recorded in a record
            rec.head_trace = HeadTrace(tokens, x)
        if req is not None and req.query_weights:
            assert rec is not None
            rec.query_weights = self.query_weights(x)
        if not self.tokens:
            assert self.pooled is not None  # no token heads: the head pools
            return self.pooled(x)
        outs, features = [], []
        for index, linear in self.tokens:
            t = x[:, index]
            if self.fc_norm is not None:
                t = self.fc_norm(t) if rules is None else lrp.norm(self.fc_norm, t)
            features.append(t)
            outs.append(linear(t))
        if req is not None and req.features:
            assert rec is not None
            rec.features = features[0] if len(features) == 1 else cast(Tensor, sum(features)) / len(features)
        return outs[0] if len(outs) == 1 else sum(outs) / len(outs)


def _pure_block(b: BlockParts, tokens: Tensor, rec: Record, req: Request, index: int) -> Tensor:
    # A function of its own, so that the block's temporaries (qkv, attention output, u) are
    # freed when it returns, as in the model's own block forward, instead of living on
    # through the next block and raising the peak memory.
    if req.block_inputs is True or (req.block_inputs and index in req.block_inputs):
        rec.block_inputs.append(tokens)
    elif req.block_inputs:
        rec.block_inputs.append(None)  # type: ignore[arg-type]  # keeps block indices aligned; never read
    rules = req.lrp_rules
    a_in = b.norm1(tokens) if rules is None else lrp.norm(b.norm1, tokens)
    if req.detach:
        a_in = a_in.detach()
    if index in req.grad_attention_inputs:
        # A leaf: the attention input feeds only the attention, so its gradient is exact.
        a_in = a_in.detach().requires_grad_(True)
        rec.attention_inputs.append(a_in)
    ctx = rec.context
    q, k, v = b.attn.project(a_in, ctx, index, rules)
    if rules is not None:
        q, k, v = lrp.attention_operands(q, k, v, rules)
    bias = b.attn.bias(ctx, index)
    if req.attention_layers is None or index in req.attention_layers:
        o = attention_core(q, k, v, b.attn.scale, rec, req, bias=bias)
    else:  # keep block indices aligned in the records
        o = attention_core(q, k, v, b.attn.scale, rec, replace(req, attention="none", scores_cls=False,
                                                               scores_all=False), bias=bias)
        # placeholders keep block indices aligned; only the requested layers are read
        if req.attention != "none":
            rec.attention.append(None)  # type: ignore[arg-type]
        if req.scores_cls:
            rec.scores_cls.append(None)  # type: ignore[arg-type]
        if req.scores_all:
            rec.scores.append(None)  # type: ignore[arg-type]
    heads_out = o.transpose(1, 2).flatten(2)
    attn_out = b.attn.output(heads_out, rules)
    u = tokens + layer_scale(b.ls1, attn_out)
    if req.cls_tokens:
        rec.mid_cls.append(u[:, 0].clone())  # a view would keep all of u alive
    if not req.activations:
        del q, k, v, a_in, o, heads_out, attn_out
        return u + b.mlp_branch(u, rules)
    n2 = b.norm2(u) if rules is None else lrp.norm(b.norm2, u)
    mlp = b.mlp.trace(n2, rules)
    rec.traces.append(BlockTrace(x=tokens, n1=a_in, q=q, k=k, v=v, o=heads_out, attn_out=attn_out, u=u, n2=n2,
                                 mlp=mlp))
    return u + layer_scale(b.ls2, mlp.out)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Request:
    """What a method needs from one forward pass.

    Args:
        detach: detach every attention block's input (the AGCAM paper's ``x = x.detach()``),
            so that gradients reach an attention map only through residual paths and MLPs.
        attention: ``"none"``; ``"keep"`` records the post-softmax attention; ``"grad"``
            records it as tensors through which the output's gradient can be taken (leaves
            when ``detach``).
        values: record the attention values ``[B, H, N, d]`` (contiguous copies).
        scores_cls: record the scaled pre-softmax [class]-query row ``[B, H, N]`` (the softmax's
            input: any additive position bias included).
        scores_all: record the scaled pre-softmax scores of every query row ``[B, H, N, N]``.
        block_inputs: record each block's input ``[B, N, D]`` and the head's (``True``), or
            only those of the given block indices (a tuple; the others are recorded as ``None``).
        cls_tokens: record the [class] token of each block's mid-residual ``u`` and of the
            last block's output (the one-token backward's linearisation points).
        attention_layers: record attention (and scores) only for these block indices;
            ``None``: every block.
        attention_heads: with ``attention="keep"``, ``"all"`` records ``[B, H, N, N]``;
            ``"mean"``, ``"max"`` or ``"min"`` record the head-fused ``[B, 1, N, N]``.
        activations: record every block's intermediate tensors (:class:`BlockTrace`) and the
            head's (:class:`HeadTrace`), for rules per operation (LRP).
        query_weights: record the head's weights over the query rows ``[B, N]``
            (:meth:`HeadParts.query_weights`).
        features: record the pre-logits [class] embedding (the classifier's input).
        grad_attention_inputs: block indices whose attention input (norm1 output) becomes a
            gradient leaf, recorded in ``attention_inputs`` (pure forward only).
        final_norm_eps: run the final LayerNorm with this epsilon instead of the model's.
        lrp_rules: ``None`` (the model's own backward), ``"cp"`` or ``"attnlrp"``: the forward
            values stay the model's, and the backward follows AttnLRP's rules
            (:mod:`captum_vit.vit.rules`), so that ``x * dy/dx`` of a tensor of the pass is its
            relevance: norms and activations through the identity rule, products of two
            activations split uniformly, the attention softmax as the rule set says (``"cp"``:
            its probabilities and a gated MLP's gate are constants; ``"attnlrp"``: the
            gradient passes the softmax). Pure forward only, on a head read from tokens.
    """

    detach: bool = True
    attention: str = "none"
    values: bool = False
    scores_cls: bool = False
    scores_all: bool = False
    block_inputs: Union[bool, Tuple[int, ...]] = False
    cls_tokens: bool = False
    attention_layers: Optional[Tuple[int, ...]] = None
    attention_heads: str = "all"
    activations: bool = False
    query_weights: bool = False
    features: bool = False
    grad_attention_inputs: Tuple[int, ...] = ()
    final_norm_eps: Optional[float] = None
    lrp_rules: Optional[str] = None

    @property
    def needs_autograd(self) -> bool:
        return self.attention == "grad" or bool(self.grad_attention_inputs) or not self.detach


@dataclass
class Record:
    """What one forward pass recorded, one list entry per block in block order."""

    logits: Optional[Tensor] = None
    grid: Tuple[int, int] = (0, 0)
    scores_cls: List[Tensor] = field(default_factory=list)
    scores: List[Tensor] = field(default_factory=list)
    attention: List[Tensor] = field(default_factory=list)
    values: List[Tensor] = field(default_factory=list)
    block_inputs: List[Tensor] = field(default_factory=list)
    head_input: Optional[Tensor] = None
    mid_cls: List[Tensor] = field(default_factory=list)
    final_cls: Optional[Tensor] = None
    attention_inputs: List[Tensor] = field(default_factory=list)
    traces: List[BlockTrace] = field(default_factory=list)
    head_trace: Optional[HeadTrace] = None
    query_weights: Optional[Tensor] = None
    context: Optional[ForwardContext] = None
    features: Optional[Tensor] = None


def attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    rec: Record,
    req: Request,
    dropout: Optional[Callable[[Tensor], Tensor]] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v``, recording what ``req`` asks for. ``q, k, v``: ``[B, H, N, d]``.

    ``dropout`` (training mode only) is applied to the attention before the values, as the
    model does; the fused kernel (with ``bias`` as its float mask) is used where neither it nor
    the full attention is needed.
    """
    fused = req.attention == "none" and dropout is None and not req.scores_all
    if req.scores_cls and fused:
        row = (q[:, :, :1] @ k.transpose(-2, -1)) * scale
        if bias is not None:
            row = row + bias[..., :1, :]
        rec.scores_cls.append(row[:, :, 0])
    if req.values:
        # A contiguous copy: a view would keep the whole qkv buffer (3x the values) alive.
        rec.values.append(v.contiguous() if not v.is_contiguous() else v)
    if fused:
        mask = bias.to(q.dtype) if bias is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if req.scores_cls:
        rec.scores_cls.append(scores[:, :, 0].detach())
    if req.scores_all:
        rec.scores.append(scores.detach())
    attn = scores.softmax(dim=-1)
    if req.attention == "grad" and req.detach:
        # The input was detached, so A is a function of constants only: a leaf is exact.
        attn = attn.detach().requires_grad_(True)
    if req.attention == "keep" and req.attention_heads != "all":
        # Fused over heads as it is recorded: H times less memory for methods that fuse anyway.
        reductions: Dict[str, Callable[..., Tensor]] = {"mean": attn.mean, "max": attn.amax, "min": attn.amin}
        rec.attention.append(reductions[req.attention_heads](dim=1).unsqueeze(1))
    elif req.attention != "none":
        rec.attention.append(attn)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


# --------------------------------------------------------------------------- the adapter
class _ParametersAsConstants(TorchFunctionMode):
    """Every ``nn.Parameter`` a torch function receives is passed on detached.

    The explanations differentiate with respect to attention maps and tokens, never weights.
    Autograd saves an operation's inputs only for the gradients it may compute, so with the
    weights out of the graph a linear layer no longer keeps its input for a weight gradient,
    and the backward computes no weight gradients: the memory of a gradient method falls to
    that of the activations it needs. A torch function mode is confined to the calling thread
    and changes no module, so other threads (training, say) see the parameters as they are.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, nn.Parameter) for a in args) or any(isinstance(v, nn.Parameter) for v in kwargs.values()):
            args = tuple(a.detach() if isinstance(a, nn.Parameter) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, nn.Parameter) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def parameters_as_constants() -> contextlib.AbstractContextManager:
    """Within it, on this thread, autograd treats every parameter as a constant (a no-op when grad is off)."""
    return _ParametersAsConstants() if torch.is_grad_enabled() else contextlib.nullcontext()


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises patched forwards of ``model`` (created once per model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _random_rate(module: nn.Module) -> Optional[float]:
    """The rate of a module that is random in training mode, ``None`` for a deterministic one.

    Dropouts (``torch.nn`` and timm's ``DropPath`` / ``PatchDropout``, by their rate
    attribute), and attention modules that apply dropout functionally (Hugging Face's
    ``attention_dropout`` float). A module named like a dropout whose rate cannot be read
    counts as random, so that an unknown one is never skipped by the pure forward.
    """
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p)
    rate = getattr(module, "attention_dropout", None)
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        return float(rate)
    if "drop" in type(module).__name__.lower():
        for name in ("drop_prob", "prob", "p"):
            rate = getattr(module, name, None)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool):
                return float(rate)
        return 1.0
    return None


def _confined(owner: int, patched: Callable, own: Optional[Callable], module: nn.Module) -> Callable:
    """``patched`` in the thread ``owner``, the module's own forward in every other thread.

    ``own`` is a forward the user had set on the instance (``None``: the class's). The class's
    forward is looked up at call time, as ``nn.Module.__call__`` would.
    """

    def forward(*args, **kwargs):
        if threading.get_ident() == owner:
            return patched(*args, **kwargs)
        if own is not None:
            return own(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    return forward


class ViTAdapter:
    """Description of a ViT classifier; subclasses read one library each.

    Attributes:
        model: the ViT (``nn.Module``); never modified outside the serialised fallback.
        wrapper: the module the user passed (the ViT itself, an ``nn.Sequential`` around it,
            or a ``torch.compile`` wrapper).
        blocks: the block modules in order; ``attentions``: their attention modules.
        parts: the block parts (:class:`BlockParts`), or ``None`` where a block is not a
            pre-norm block the description covers (then the patched fallback runs).
        head: :class:`HeadParts`.
        num_heads, head_dim, embed_dim: attention geometry.
        num_prefix_tokens: [class] + distillation + register tokens, all before the patches.
        has_class_token: whether token 0 is a [class] token.
        pooling: ``"token"``, ``"token_distill"`` or another pooling (``"avg"``, ``"map"``).
        patch_size: ``(ph, pw)``; in_chans: image channels.
    """

    library: str = "?"
    #: the model family, as the README's supported-models table names it.
    family: str = "?"
    model: nn.Module
    wrapper: nn.Module
    blocks: List[nn.Module]
    attentions: List[nn.Module]
    parts: Optional[List[BlockParts]]
    parts_missing: str
    head: HeadParts
    num_heads: int
    head_dim: int
    embed_dim: int
    num_prefix_tokens: int
    has_class_token: bool
    pooling: str
    patch_size: Tuple[int, int]
    in_chans: int
    pre: Sequence[nn.Module] = ()
    post: Sequence[nn.Module] = ()

    def __init__(self, model: nn.Module) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- library hooks
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter describes ``model`` (the registry asks every adapter class)."""
        raise NotImplementedError

    def embed(self, images: Tensor) -> Tensor:
        """Tokens ``[B, N, D]`` entering the first block."""
        raise NotImplementedError

    def _model_logits(self, images: Tensor) -> Tensor:
        """The ViT's own forward (used by the fallback)."""
        raise NotImplementedError

    def _patch_attention(self, attn: nn.Module, rec: Record, req: Request) -> Callable:
        """A forward for ``attn`` that records into ``rec`` (used by the fallback)."""
        raise NotImplementedError

    def _check_size(self, h: int, w: int) -> None:
        raise NotImplementedError

    def context(self, grid: Tuple[int, int]) -> ForwardContext:
        """The per-call context for a ``gh x gw`` patch grid (position terms the blocks read)."""
        return ForwardContext(grid)

    def _grid(self, h: int, w: int) -> Tuple[int, int]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    # ----------------------------------------------------------------- description
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_training(self) -> bool:
        """Whether the ViT is in training mode (a new ``nn.Sequential`` around an eval ViT is not)."""
        return self.model.training

    def active_randomness(self) -> List[str]:
        """Names of the ViT's sub-modules that are random now: in training mode with a rate above 0.

        Empty in eval mode, and in training mode when every dropout and drop-path rate is 0
        (timm's default): then the training-mode forward is the eval forward, and the pure
        forward (which does not call dropouts) reproduces it exactly.
        """
        return [
            name or type(self.model).__name__
            for name, m in self.model.named_modules()
            if m.training and (_random_rate(m) or 0.0) > 0.0
        ]

    def for_input_size(self, h: int, w: int) -> nn.Module:
        """The wrapper, or a copy of it whose ViT is fixed to ``h x w`` inputs.

        For tracing one input size (ONNX export): a model that resizes its positional
        embeddings on every call gets them resized once, ahead of time, in the copy.
        """
        return self.wrapper

    def vit_input(self, inputs: Tensor) -> Tensor:
        """The wrapper's preprocessing applied to ``inputs`` (identity for a bare ViT)."""
        for m in self.pre:
            inputs = m(inputs)
        return inputs

    def grid_size(self, inputs: Tensor) -> Tuple[int, int]:
        """Patch grid ``(gh, gw)`` of the ViT for the images ``inputs`` (after any preprocessing)."""
        if self.pre:
            with torch.no_grad():
                inputs = self.vit_input(inputs[:1])
        return self._grid(*inputs.shape[-2:])

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
        ref = next(self.model.parameters(), None)
        if ref is not None and inputs.device != ref.device:
            raise ValueError(
                f"inputs are on {inputs.device} but the model is on {ref.device}; move one of them "
                f"(e.g. inputs.to('{ref.device}'))"
            )
        if inputs.shape[0] == 0:
            raise ValueError("inputs is an empty batch (B = 0)")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or infinite values; check the image loading and normalisation")
        if self.pre:
            return  # the preprocessing decides what the ViT sees; checked again in forward()
        self._check_vit_input(inputs)

    def _check_vit_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"the ViT's patch embedding expects {self.in_chans}-channel images [B, {self.in_chans}, H, W]; got "
                f"shape {tuple(x.shape)} (channels-last input? use inputs.permute(0, 3, 1, 2))."
            )
        ref = next(self.model.parameters(), None)
        if ref is not None and x.dtype != ref.dtype:
            raise TypeError(
                f"inputs have dtype {x.dtype} but the model's weights are {ref.dtype}; use "
                f"inputs.to({ref.dtype}) (or autocast)"
            )
        self._check_size(x.shape[-2], x.shape[-1])

    def class_row_support(self) -> Tuple[bool, str]:
        """Whether methods that read the [class]-query row of the attention are defined for this model.

        AGCAM, rollout, raw attention, GAE and Transformer Attribution read row 0 of the
        attention as the [class] token's; without a [class] token that row is the top-left
        patch's, and with a head that pools the patches the [class] token is not what the
        model classifies.
        """
        if not self.has_class_token:
            return False, (
                "the model has no [class] token (its head pools the patch tokens instead), so the [class]-query "
                "row of the attention does not exist: row 0 is the top-left patch's"
            )
        if self.pooling not in ("token", "token_distill"):
            what = {"token+avg": " (the [class] token concatenated with the mean of the patch tokens)"}.get(
                self.pooling, "")
            return False, (
                f"the model's head pools tokens with {self.pooling!r}{what} instead of reading the [class] token "
                "alone, so the [class]-query row is not what the model classifies (and receives no gradient from the "
                "other tokens when attention inputs are detached, the AGCAM definition)"
            )
        return True, ""

    def pooled_query_support(self) -> Tuple[bool, str]:
        """Whether ``query="pooled"`` is defined: the head pools in a way :meth:`HeadParts.query_weights` knows."""
        if self.pooling not in POOLED_QUERIES:
            return False, (
                f"the model's head pools tokens with {self.pooling!r}, which weighs no query rows "
                f"(known poolings: {', '.join(POOLED_QUERIES)})"
            )
        if self.pooling == "map" and self.head.pool_weights is None:
            return False, "the model's attention-pooling head is not one captum-vit can read"
        return True, ""

    def one_token_support(self) -> Tuple[bool, str]:
        """Whether the one-token backward (:meth:`class_row_grads`) applies, and why not when it does not."""
        ok, why = self.class_row_support()
        if not ok:
            return ok, why
        if self.parts is None:
            return False, self.parts_missing
        if self.post:
            return False, "the wrapper transforms the ViT's logits after it (its output is not the ViT's logits)"
        for i, b in enumerate(self.parts):
            if b.attn.out_norm is not None:
                return False, f"block {i}'s attention normalises the head outputs before the projection"
            blocker = b.mlp.vjp_blocker()
            if blocker:
                return False, f"block {i}: {blocker}"
            if norm_kind(b.norm2) is None:
                return False, f"block {i}'s norm2 is {type(b.norm2).__name__}, not LayerNorm or RMSNorm"
        h = self.head
        if norm_kind(h.norm) is None or not (h.fc_norm is None or norm_kind(h.fc_norm) is not None):
            return False, "the final norm is not LayerNorm or RMSNorm"
        if not h.tokens or h.tokens[0][0] != 0:
            return False, "the head does not read the [class] token through a linear layer"
        return True, ""

    # ----------------------------------------------------------------- the forward pass
    def forward(self, inputs: Tensor, request: Request = Request()) -> Record:
        """One forward pass of the wrapper over ``inputs``, recording what ``request`` asks for.

        Uses the pure forward over the parts (no patching, no hooks, thread-safe) where the
        parts cover the architecture and no dropout is active (eval mode, or training mode with
        every rate 0); otherwise the serialised patched fallback.
        Returns a :class:`Record` whose ``logits`` are the wrapper's output.
        """
        with parameters_as_constants():
            x = self.vit_input(inputs)
            if self.pre:
                self._check_vit_input(x)
            grid = self._grid(*x.shape[-2:])
            rec = Record(grid=grid, context=self.context(grid))
            if self.parts is not None and not self.active_randomness():
                logits = self._pure_forward(x, rec, request)
            else:
                logits = self._patched_forward(x, rec, request)
            for m in self.post:
                logits = m(logits)
        rec.logits = logits
        return rec

    def logits(self, inputs: Tensor) -> Tensor:
        """The wrapper's output ``[B, num_classes]`` for ``inputs``, recording nothing."""
        logits = self.forward(inputs).logits
        assert logits is not None  # forward always sets them
        return logits

    def _pure_forward(self, images: Tensor, rec: Record, req: Request) -> Tensor:
        return self._run_blocks(self.embed(images), 0, rec, req)

    def _run_blocks(self, tokens: Tensor, start: int, rec: Record, req: Request) -> Tensor:
        assert self.parts is not None  # the pure forward runs only where the parts cover the model
        for index in range(start, self.num_layers):
            tokens = _pure_block(self.parts[index], tokens, rec, req, index)
        if req.cls_tokens:
            rec.final_cls = tokens[:, 0].clone()
        if req.block_inputs is True:
            rec.head_input = tokens
        return self.head(tokens, rec, req)

    def forward_tail(self, tokens: Tensor, start: int, request: Request = Request(),
                     context: Optional[ForwardContext] = None) -> Record:
        """Run blocks ``start, start+1, ...`` and the head on ``tokens`` (the input of block ``start``).

        For methods that perturb the residual stream late in the network (Smooth and
        Integrated CDAM). Records are indexed from ``start``. Needs the pure forward
        (architectures the parts cover); the wrapper's output transforms are applied.
        ``context``: the full forward's (:attr:`Record.context`), for position-aware attention.
        """
        if self.parts is None:
            raise ValueError(
                f"re-running part of the network needs a model the description covers: {self.parts_missing}"
            )
        rec = Record(context=context)
        if context is not None:
            rec.grid = context.grid
        with parameters_as_constants():
            logits = self._run_blocks(tokens, start, rec, request)
            for m in self.post:
                logits = m(logits)
        rec.logits = logits
        return rec

    @contextlib.contextmanager
    def _patched(self, rec: Record, req: Request) -> Iterator[None]:
        """Patch every attention module and hook every block, serialised per model; undone in ``finally``.

        The patch is confined to the calling thread: a call of the model from any other thread
        while it is in place (a plain ``model(x)`` of a server, say) runs the module's own
        forward and records nothing, so an explanation never changes what other callers see
        and their calls never reach this explanation's record.
        """
        owner = threading.get_ident()
        with model_lock(self.model):
            saved: List[Tuple[nn.Module, bool, Any]] = []
            handles = []
            try:
                for attn in self.attentions:
                    had, old = "forward" in attn.__dict__, attn.__dict__.get("forward")
                    saved.append((attn, had, old))
                    attn.forward = _confined(owner, self._patch_attention(attn, rec, req), old if had else None, attn)
                if req.block_inputs:

                    def record_input(_m, args):
                        if threading.get_ident() == owner:
                            rec.block_inputs.append(args[0])

                    for blk in self.blocks:
                        handles.append(blk.register_forward_pre_hook(record_input))
                if req.query_weights:
                    # the head's weights over the query rows, from the final norm's output as the head reads it

                    def record_weights(_m, _args, out):
                        if threading.get_ident() == owner:
                            rec.query_weights = self.head.query_weights(out)

                    handles.append(self.head.norm.register_forward_hook(record_weights))
                yield
            finally:
                for h in handles:
                    h.remove()
                for attn, had, old in saved:
                    if had:
                        attn.forward = old
                    else:
                        del attn.forward

    def _patched_forward(self, images: Tensor, rec: Record, req: Request) -> Tensor:
        if req.lrp_rules is not None:
            why = self.parts_missing or "the model has an active dropout or drop-path (training mode)"
            raise ValueError(f"the LRP rules need the pure forward over the model's parts, and {why}")
        if req.cls_tokens:
            why = self.one_token_support()[1] or "the model has an active dropout or drop-path (training mode)"
            raise ValueError(f"the one-token backward does not apply here: {why}")
        with self._patched(rec, req):
            return self._model_logits(images)

    # ----------------------------------------------------------------- one-token backward
    def class_row_grads(self, rec: Record, targets: Tensor, first_layer: int = 0) -> Dict[int, Tensor]:
        """``dy_t / dA[k][:, :, 0, :]`` for blocks ``k >= first_layer``, with every attention input detached.

        With detached attention inputs and a head reading the [class] token, the gradient of
        the target logit is non-zero only at the [class] token of every block, so the backward
        pass is a chain of explicit vector-Jacobian products on one token per image:
        ``g <- dy/dx_L[cls]``; for each block from the last, ``g <- g + J_mlp^T g``,
        ``r = W_proj^T (ls1 * g)`` split into heads, ``dy/dA[h, 0, j] = r_h . V[h, j]``.
        Needs a record of ``Request(values=True, cls_tokens=True)``. Runs without autograd.

        Returns:
            ``{k: [B, H, N]}``.
        """
        B, H, d = targets.shape[0], self.num_heads, self.head_dim
        head = self.head
        final = rec.final_cls
        # recorded with cls_tokens=True, and only where one_token_support() holds: the parts exist and
        # every norm on the path is a LayerNorm and every activation has a known derivative
        assert final is not None and self.parts is not None, "needs a record of Request(cls_tokens=True)"
        # Other prefix tokens never feed back into the [class] row: tokens interact only through
        # the detached attention, so only the heads reading token 0 contribute here.
        (_, linear), n_heads = head.tokens[0], len(head.tokens)
        g = linear.weight.index_select(0, targets).to(final.dtype) / n_heads
        if head.fc_norm is not None:
            g = norm_vjp(head.fc_norm, head.norm(final), g)
        g = norm_vjp(head.norm, final, g)
        grads: Dict[int, Tensor] = {}
        for k in range(self.num_layers - 1, first_layer - 1, -1):
            b, u = self.parts[k], rec.mid_cls[k]
            g = g + self._mlp_vjp(b, u, g)
            r = linear_vjp(b.attn.proj, layer_scale(b.ls1, g))
            values = rec.values[k]
            grads[k] = torch.einsum("bhd,bhnd->bhn", r.reshape(B, H, d).to(values.dtype), values)
        return grads

    @staticmethod
    def _mlp_vjp(b: BlockParts, u: Tensor, g: Tensor) -> Tensor:
        """``(d ls2 * mlp(norm2(u)) / du)^T g``."""
        return norm_vjp(b.norm2, u, b.mlp.vjp(b.norm2(u), layer_scale(b.ls2, g)))
