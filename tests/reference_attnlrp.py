"""Independent reference for AttnLRP through the model's OWN forward, written from lxt's patches.

lxt (the AttnLRP authors' library, "efficient" mode) patches a model's classes so that gradient x
input is the LRP relevance; this reference applies the same rules to the instances of one model,
for the duration of one call, and shares no code with ``captum_vit``:

* every LayerNorm ``(x - mean) / std * w + b`` with ``std`` detached, every RMS norm with its
  ``rsqrt(mean(x^2) + eps)`` detached (lxt ``layer_norm_forward``, ``rms_norm_forward``);
* every MLP activation ``x * stop_grad(act(x) / (x + 1e-10))`` (lxt ``identity_rule_implicit``);
* timm's gated MLPs (``SwiGLU``, ``GluMlp``): ``"attnlrp"`` the product ``act(gate) * value`` with
  its gradient halved (lxt ``gated_mlp_forward``), ``"cp"`` the gate detached (``cp_gated_mlp_forward``);
* ``torch.nn.functional.scaled_dot_product_attention`` replaced: ``"cp"`` with ``q`` and ``k``
  detached (lxt ``cp_wrap_attention_forward``), ``"attnlrp"`` with the gradients of ``q, k, v``
  divided by 4, 4, 2 (lxt ``wrap_attention_forward``); timm modules forced onto their fused path
  and Hugging Face models onto ``"sdpa"`` so that every attention calls it.

The map of one image: ``sum_d x[i, d] * dy/dx[i, d]`` at the tokens ``x`` entering the first block
(a forward pre-hook), over the patch tokens. Everything is restored in ``finally``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from reference_families import _force_sdpa, _model_logits, is_hf, num_prefix_tokens

_ACTIVATIONS = ("GELU", "SiLU", "ReLU", "GELUActivation", "SiLUActivation", "QuickGELU", "GELUTanh")


def _scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` forward, its gradient divided by ``factor``."""
    return t.detach() + (t - t.detach()) / factor


def _layer_norm(mod):
    def forward(x):
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        y = (x - mean) / (var + mod.eps).sqrt().detach()
        if mod.weight is not None:
            y = y * mod.weight
        if mod.bias is not None:
            y = y + mod.bias
        return y

    return forward


def _rms_norm(mod):
    def forward(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps).detach()
        return y * mod.weight if getattr(mod, "weight", None) is not None else y

    return forward


def _identity_rule(mod):
    own = type(mod).forward

    def forward(x):
        out = own(mod, x)
        return x * (out / (x + 1e-10)).detach()

    return forward


def _gated(mod, rule):
    name = type(mod).__name__

    def forward(x):
        if name == "SwiGLU":
            gate, value = mod.fc1_g(x), mod.fc1_x(x)
        else:  # GluMlp
            first, second = mod.fc1(x).chunk(2, dim=mod.chunk_dim)
            gate, value = (second, first) if mod.gate_last else (first, second)
        if rule == "cp":
            h = mod.act(gate.detach()) * value
        else:
            h = _scale_grad(mod.act(gate) * value, 2)
        return mod.drop2(mod.fc2(mod.norm(mod.drop1(h))))

    return forward


def _sdpa(old, rule):
    def sdpa(query, key, value, *args, **kwargs):
        if rule == "cp":
            query, key = query.detach(), key.detach()
        else:
            query, key, value = _scale_grad(query, 4), _scale_grad(key, 4), _scale_grad(value, 2)
        return old(query, key, value, *args, **kwargs)

    return sdpa


def first_block(model: nn.Module) -> nn.Module:
    if is_hf(model):
        base = getattr(model, model.base_model_prefix)
        layers = getattr(base, "layers", None)
        return (layers if layers is not None else base.encoder.layer)[0]
    return model.blocks[0]


@contextlib.contextmanager
def lrp_rules(model: nn.Module, rule: str):
    """The model's own forward with lxt's AttnLRP rules on its instances (``rule``: ``"cp"`` or ``"attnlrp"``)."""
    assert rule in ("cp", "attnlrp")
    patched = []
    sdpa_old = F.scaled_dot_product_attention
    restore = _force_sdpa(model)
    try:
        for mod in model.modules():
            name = type(mod).__name__
            if "forward" in mod.__dict__:
                raise RuntimeError(f"{name} already has an instance forward; the reference would hide it")
            if isinstance(mod, nn.LayerNorm):
                fwd = _layer_norm(mod)
            elif name in ("RmsNorm", "RMSNorm"):
                fwd = _rms_norm(mod)
            elif name in _ACTIVATIONS:
                fwd = _identity_rule(mod)
            elif name in ("SwiGLU", "GluMlp"):
                fwd = _gated(mod, rule)
            else:
                continue
            mod.forward = fwd
            patched.append(mod)
        F.scaled_dot_product_attention = _sdpa(sdpa_old, rule)
        yield
    finally:
        F.scaled_dot_product_attention = sdpa_old
        for mod in patched:
            del mod.forward
        restore()


def attnlrp(model: nn.Module, x: torch.Tensor, target: int, rule: str = "cp") -> torch.Tensor:
    """``[N - p]``: the relevance of logit ``target`` at each patch token entering the first block, one image."""
    captured = []
    handle = first_block(model).register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.enable_grad(), lrp_rules(model, rule):
            xg = x.detach().clone().requires_grad_(True)  # a graph even when the parameters need no grad
            out = _model_logits(model(xg))
            (tokens,) = captured
            (g,) = torch.autograd.grad(out[0, int(target)], tokens)
    finally:
        handle.remove()
    return (tokens.detach() * g)[0, num_prefix_tokens(model):].sum(-1)


def attnlrp_batched(model, images, targets, rule: str = "cp"):
    ts = [int(t) for t in targets] if not isinstance(targets, int) else [targets] * images.shape[0]
    return torch.stack([attnlrp(model, images[i : i + 1], ts[i], rule) for i in range(images.shape[0])])

