"""Independent references for every ViT family, through the model's OWN forward.

Unlike tests/reference.py and tests/reference_methods.py (which re-write the block by hand), these
references run the model's own ``forward`` and see its attention by temporarily replacing
``torch.nn.functional.scaled_dot_product_attention`` with an explicit, unfused version::

    S = q k^T * scale + attn_mask      (boolean masks: -inf where False; is_causal honoured)
    A = softmax(S)
    out = A @ v

recording ``S`` and ``A`` of every call, in call order. Every timm module that has a ``fused_attn``
flag is forced onto its fused (sdpa) path, and Hugging Face models onto their ``"sdpa"`` attention
implementation, so that the same patch sees every attention (the blocks', and a MAP head's latent
query). Everything is restored in ``finally``. It shares no code with ``captum_vit``.

Every function works on ONE image ``x [1, C, H, W]`` and returns a 1-D map over the patch keys
``j >= p`` (``p`` prefix tokens: [class], distillation, registers); ``*_batched`` loop over a batch
one image at a time and stack.

Query weights ``w [N]`` say which query rows a method reads (:func:`query_weights`):
``"class"`` is e_0 (the [class] token's row, the papers' definition); ``"pooled"`` weighs the rows as
the model's head pools the tokens (see :func:`query_weights`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- model anatomy


def is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers")


def block_attentions(model: nn.Module) -> List[nn.Module]:
    """The attention module of every block, in order (timm ``blk.attn``; HF ``layer.attention``)."""
    if is_hf(model):
        base = getattr(model, model.base_model_prefix)
        layers = getattr(base, "layers", None)
        if layers is None:
            layers = base.encoder.layer
        return [layer.attention for layer in layers]
    return [blk.attn for blk in model.blocks]


def num_prefix_tokens(model: nn.Module) -> int:
    if is_hf(model):
        cfg = model.config
        p = 1  # [class]
        if cfg.model_type == "deit":
            p += 1  # distillation token
        return p + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return int(model.num_prefix_tokens)


def has_class_token(model: nn.Module) -> bool:
    if is_hf(model):
        return True
    if getattr(model, "has_class_token", None) is not None:  # NaFlexVit
        return bool(model.has_class_token)
    return getattr(model, "cls_token", None) is not None


def _model_logits(out):
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------- the sdpa patch


class Call:
    """One sdpa call: ``S`` (softmax input) and ``A`` (softmax output), ``[B, H, Nq, Nk]``; ``block``
    is the index of the block whose attention module made it (None: another module, e.g. a MAP head)."""

    __slots__ = ("S", "A", "block")

    def __init__(self, S, A, block):
        self.S, self.A, self.block = S, A, block


class Recording:
    def __init__(self):
        self.calls: List[Call] = []
        self.T: Optional[torch.Tensor] = None  # CDAM: the last block's attention input, a leaf
        self.active: Optional[int] = None

    def block_calls(self) -> List[Call]:
        return [c for c in self.calls if c.block is not None]

    def other_calls(self) -> List[Call]:
        return [c for c in self.calls if c.block is None]


def _unfused_sdpa(rec: Recording, leaf_blocks: bool, edit: Optional[Callable]):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            raise RuntimeError("the reference runs models without attention dropout (eval mode)")
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(rep, dim=-3)
            value = value.repeat_interleave(rep, dim=-3)
        s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        S = (query @ key.transpose(-2, -1)) * s
        if is_causal:
            nq, nk = S.shape[-2], S.shape[-1]
            keep = torch.ones(nq, nk, dtype=torch.bool, device=S.device).tril()
            S = S.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                S = S.masked_fill(~attn_mask, float("-inf"))
            else:
                S = S + attn_mask
        A = torch.softmax(S, dim=-1)
        block = rec.active
        if block is not None and leaf_blocks:
            # detached inputs: A depends on constants only, a leaf is exact and autograd reaches it
            A = A.detach().requires_grad_(True)
        rec.calls.append(Call(S, A, block))
        if edit is not None:
            A = edit(A, block)
        return A @ value

    return sdpa


def _force_sdpa(model):
    """Every ``fused_attn`` flag True, HF on ``"sdpa"``; returns the function putting them back."""
    flags = []  # (module, had an instance attribute, old value)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            flags.append((m, "fused_attn" in m.__dict__, m.__dict__.get("fused_attn")))
    hf_cfg = model.config if is_hf(model) else None
    hf_old = hf_cfg._attn_implementation if hf_cfg is not None else None

    def restore():
        for m, had, old in flags:
            if had:
                m.fused_attn = old
            elif "fused_attn" in m.__dict__:
                del m.fused_attn
        if hf_cfg is not None:
            hf_cfg._attn_implementation = hf_old

    try:
        for m, _, _ in flags:
            m.fused_attn = True
        if hf_cfg is not None:
            hf_cfg._attn_implementation = "sdpa"
    except BaseException:
        restore()
        raise
    return restore


def _input_hooks(rec: Recording, attns, detach: bool, cdam_leaf: bool, handles: list):
    """Pre-hooks tagging each block attention's calls (and replacing its input), post-hooks untagging;
    their handles go to ``handles`` as they are made (all removed, even when one fails)."""
    last = len(attns) - 1

    def leaf(h):
        rec.T = h.detach().requires_grad_(True)
        return rec.T

    for k, at in enumerate(attns):
        replace = leaf if cdam_leaf and k == last else (lambda h: h.detach()) if detach else None

        def pre(mod, args, kwargs, k=k, replace=replace):
            rec.active = k
            if replace is None:
                return None
            if args:
                return (replace(args[0]),) + tuple(args[1:]), kwargs
            name = "hidden_states" if "hidden_states" in kwargs else "x"
            return args, {**kwargs, name: replace(kwargs[name])}

        def post(mod, args, output):
            rec.active = None

        handles.append(at.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(at.register_forward_hook(post, always_call=True))


@contextlib.contextmanager
def recording(model: nn.Module, detach: bool = False, cdam_leaf: bool = False, edit: Optional[Callable] = None):
    """Run the model's forward inside: every sdpa call unfused and recorded.

    ``detach``: every block attention's input hidden states ``.detach()``-ed (a forward pre-hook),
    and its recorded ``A`` a leaf requiring grad. ``cdam_leaf``: the last block attention's input
    replaced by a leaf requiring grad (``rec.T``). ``edit(A, block)``: a test hook, the attention used
    for the output in place of ``A`` (the recorded ``A`` is the true one).
    """
    rec = Recording()
    sdpa_old = F.scaled_dot_product_attention
    restore = _force_sdpa(model)
    handles = []
    try:
        _input_hooks(rec, block_attentions(model), detach, cdam_leaf, handles)
        F.scaled_dot_product_attention = _unfused_sdpa(rec, detach, edit)
        yield rec
    finally:
        F.scaled_dot_product_attention = sdpa_old
        for h in handles:
            h.remove()
        restore()


def _forward(model, x, **kw):
    """Logits ``[1, C]`` of the model's own forward, and its recording (checked for consistency)."""
    with recording(model, **kw) as rec:
        out = _model_logits(model(x))
    blocks = rec.block_calls()
    L = len(block_attentions(model))
    assert [c.block for c in blocks] == list(range(L)), f"block attention calls {[c.block for c in blocks]}"
    assert all(c.block is not None for c in rec.calls[:L]), "block attention calls are not the first calls"
    return out, rec


# ----------------------------------------------------------------------------- query weights


def _pooled_weights(model, rec: Recording, N: int) -> torch.Tensor:
    p = num_prefix_tokens(model)
    w = torch.zeros(N, dtype=torch.float64)
    uniform_patches = torch.zeros(N, dtype=torch.float64)
    uniform_patches[p:] = 1.0 / (N - p)
    if is_hf(model):
        name = type(model).__name__
        if name == "DeiTForImageClassificationWithTeacher":
            w[0] = w[1] = 0.5
        elif name.startswith("Dinov2"):  # classifier on concat(cls, mean of patch tokens)
            w = uniform_patches / 2
            w[0] += 0.5
        else:  # ViT / DeiT classification: sequence_output[:, 0]
            w[0] = 1.0
        return w
    if getattr(model, "attn_pool", None) is not None:
        pools = rec.other_calls()
        if len(pools) != 1 or type(model.attn_pool).__name__ != "AttentionPoolLatent":
            raise NotImplementedError(f"pooling head {type(model.attn_pool).__name__} with {len(pools)} calls")
        a = pools[0].A.detach()[0].mean(0)  # [latent, K], averaged over the pool's heads
        assert a.shape[0] == 1, "one latent query"
        K = a.shape[-1]
        w[N - K :] = a[0].double()  # keys: all tokens, or the patch tokens only (prefix dropped first)
        return w
    if hasattr(model, "head_dist"):  # timm distilled: the two heads averaged (eval)
        w[0] = w[1] = 0.5
        return w
    pool = model.global_pool
    if pool == "token":
        w[0] = 1.0
    elif pool == "avg":
        if getattr(model, "pool_include_prefix", False):
            w[:] = 1.0 / N
        else:
            w = uniform_patches
    else:
        raise NotImplementedError(f"global_pool={pool!r}")
    return w


def _weights(model, rec: Recording, query: str) -> torch.Tensor:
    A0 = rec.block_calls()[0].A
    N = A0.shape[-1]
    if query == "class":
        if not has_class_token(model):
            raise ValueError(f"{type(model).__name__} has no [class] token: query='class' is undefined")
        w = torch.zeros(N, dtype=torch.float64)
        w[0] = 1.0
    elif query == "pooled":
        w = _pooled_weights(model, rec, N)
    else:
        raise ValueError(query)
    return w.to(A0.dtype)


def query_weights(model: nn.Module, x: torch.Tensor, query: str = "class") -> torch.Tensor:
    """``w [N]`` over all tokens. ``"class"``: e_0. ``"pooled"``: [class]-token head e_0; timm distilled
    and HF DeiT with teacher (e_0 + e_1)/2; average pooling uniform over the patch tokens (over every
    token with ``pool_include_prefix``); MAP the pool's attention over its keys averaged over its heads;
    HF Dinov2 e_0/2 + uniform-over-patch-tokens/2."""
    with torch.no_grad():
        _, rec = _forward(model, x)
    return _weights(model, rec, query)


# ----------------------------------------------------------------------------- references


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _model_logits(model(x))


def _layer_list(layers, L):
    if layers is None:
        return list(range(L))
    return [k % L for k in layers]


def agcam(model, x, target: int, query: str = "class", layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``M_j = sum_k sum_h sum_i w_i sigmoid(S_kh[i, j]) relu(dy/dA_kh[i, j])``, detached attention inputs."""
    with torch.enable_grad():
        out, rec = _forward(model, x, detach=True)
        calls = rec.block_calls()
        A = [c.A for c in calls]
        G = torch.autograd.grad(out[0, int(target)], A, allow_unused=True)
    w = _weights(model, rec, query)
    p = num_prefix_tokens(model)
    m = 0
    for k in _layer_list(layers, len(calls)):
        g = torch.zeros_like(A[k]) if G[k] is None else G[k]
        term = torch.sigmoid(calls[k].S.detach()[0]) * torch.relu(g[0])  # [H, N, N]
        m = m + torch.einsum("i,hij->j", w, term)
    return m[p:].detach()


def _fuse(a, head_fusion):
    if head_fusion == "mean":
        return a.mean(0)
    if head_fusion == "max":
        return a.max(0).values
    if head_fusion == "min":
        return a.min(0).values
    raise ValueError(head_fusion)


def rollout(model, x, query: str = "class", head_fusion: str = "mean") -> torch.Tensor:
    """``a_k = rownorm((fuse_h A_k + I)/2)``, ``R = a_L ... a_1``, ``map_j = sum_i w_i R[i, j]``."""
    with torch.no_grad():
        _, rec = _forward(model, x)
    w = _weights(model, rec, query)
    p = num_prefix_tokens(model)
    calls = rec.block_calls()
    N = calls[0].A.shape[-1]
    eye = torch.eye(N, dtype=calls[0].A.dtype)
    R = eye
    for c in calls:
        a = (_fuse(c.A[0], head_fusion) + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        R = a @ R
    return (w @ R)[p:]


def raw_attention(model, x, query: str = "class") -> torch.Tensor:
    """``sum_i w_i mean_h A_L[h, i, j]``."""
    with torch.no_grad():
        _, rec = _forward(model, x)
    w = _weights(model, rec, query)
    return (w @ rec.block_calls()[-1].A[0].mean(0))[num_prefix_tokens(model):]


def gae(model, x, target: int, query: str = "class") -> torch.Tensor:
    """Chefer ICCV 2021: nothing detached; ``R = I``; per block ``R += mean_h[(dA * A)^+] R``."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)  # a graph even when the parameters need no grad
        out, rec = _forward(model, xg)
        calls = rec.block_calls()
        A = [c.A for c in calls]
        G = torch.autograd.grad(out[0, int(target)], A, allow_unused=True)
    w = _weights(model, rec, query)
    N = A[0].shape[-1]
    R = torch.eye(N, dtype=A[0].dtype)
    for a, g in zip(A, G):
        g = torch.zeros_like(a) if g is None else g
        R = R + (g[0] * a.detach()[0]).clamp(min=0).mean(0) @ R
    return (w @ R)[num_prefix_tokens(model):]


def cdam(model, x, target: int) -> torch.Tensor:
    """``S_i = sum_d T[i, d] dy/dT[i, d]`` for patch tokens i; T = the last block attention's input."""
    with torch.enable_grad():
        with recording(model, cdam_leaf=True) as rec:
            out = _model_logits(model(x))
        g = torch.autograd.grad(out[0, int(target)], rec.T)[0]
    return (rec.T.detach() * g)[0, num_prefix_tokens(model):].sum(-1)


# ----------------------------------------------------------------------------- batched conveniences


def _targets(targets, n):
    if targets is None:
        return [None] * n
    if isinstance(targets, int):
        return [targets] * n
    return [int(t) for t in targets]


def agcam_batched(model, images, targets, **kw):
    ts = _targets(targets, images.shape[0])
    return torch.stack([agcam(model, images[i : i + 1], ts[i], **kw) for i in range(images.shape[0])])


def rollout_batched(model, images, targets=None, **kw):
    return torch.stack([rollout(model, images[i : i + 1], **kw) for i in range(images.shape[0])])


def raw_attention_batched(model, images, targets=None, **kw):
    return torch.stack([raw_attention(model, images[i : i + 1], **kw) for i in range(images.shape[0])])


def gae_batched(model, images, targets, **kw):
    ts = _targets(targets, images.shape[0])
    return torch.stack([gae(model, images[i : i + 1], ts[i], **kw) for i in range(images.shape[0])])


def cdam_batched(model, images, targets):
    ts = _targets(targets, images.shape[0])
    return torch.stack([cdam(model, images[i : i + 1], ts[i]) for i in range(images.shape[0])])


def logits_batched(model, images, targets=None):
    return torch.cat([logits(model, images[i : i + 1]) for i in range(images.shape[0])])
