"""Shared base of the captum-vit attribution methods: Captum plumbing, targets, upsampling."""

from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple, Union

import torch
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from torch import Tensor, nn

from captum_vit.vit import ViTAdapter, adapt

TargetType = Union[None, int, Tuple[int, ...], Tensor, List]

_FUSIONS = ("sum", "mean", "max")


def resolve_targets(target: TargetType, logits: Tensor) -> Tensor:
    """Captum target semantics for a ``[B, C]`` classifier output, as a ``LongTensor[B]``.

    ``None`` is the predicted class; an int (or a 1-tuple ``(c,)``, or a 0-d tensor) applies to
    every sample; a list or 1-D tensor gives one class per sample.
    """
    B, C = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits.argmax(dim=-1)
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, not a bool")
    if isinstance(target, tuple):
        if len(target) != 1:
            raise ValueError(
                f"a tuple target indexes one output element for every sample (Captum semantics), but the model's "
                f"output is [B, num_classes]; got {target!r}. Use an int, a 1-tuple (c,), or a list/1-D tensor "
                "with one class per sample."
            )
        target = target[0]
    if isinstance(target, int):
        t = torch.full((B,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, list):
        if len(target) != B:
            raise ValueError(f"target list has {len(target)} entries but the batch has {B} samples; give one per sample")
        flat = []
        for t_i in target:
            if isinstance(t_i, tuple) and len(t_i) == 1:
                t_i = t_i[0]
            if isinstance(t_i, Tensor) and t_i.numel() == 1:
                t_i = int(t_i.item())
            if not isinstance(t_i, int) or isinstance(t_i, bool):
                raise TypeError(f"each per-sample target must be an int class index, got {t_i!r}")
            flat.append(t_i)
        t = torch.tensor(flat, dtype=torch.long, device=logits.device)
    elif isinstance(target, Tensor):
        if target.is_floating_point():
            raise TypeError(f"target tensor must hold integer class indices, got dtype {target.dtype}")
        if target.numel() == 1:
            t = target.reshape(()).expand(B)
        elif target.dim() == 1 and target.numel() == B:
            t = target
        else:
            raise ValueError(
                f"target tensor of shape {tuple(target.shape)} does not match the batch of {B}: give a scalar or a "
                "1-D tensor with one class per sample"
            )
        t = t.to(device=logits.device, dtype=torch.long)
    else:
        raise TypeError(f"unsupported target type {type(target).__name__}; use None, int, list or 1-D tensor")
    if B and (int(t.min()) < 0 or int(t.max()) >= C):
        bad = t[(t < 0) | (t >= C)][0].item()
        raise ValueError(f"target class {bad} is out of range for a model with {C} classes (valid: 0..{C - 1})")
    return t


def fuse(x: Tensor, how: str, dim: int) -> Tensor:
    """Reduce ``dim`` of ``x`` by ``how`` in ``{'sum', 'mean', 'max'}``."""
    if how == "sum":
        return x.sum(dim)
    if how == "mean":
        return x.mean(dim)
    if how == "max":
        return x.amax(dim)
    raise ValueError(f"fusion must be one of {_FUSIONS}, got {how!r}")


class ViTLayerAttribution(LayerAttribution, GradientAttribution):
    """Base of the methods over a ViT's attention modules.

    Subclasses implement :meth:`_attribute_patches`, returning ``[B, gh*gw]`` maps for patch
    tokens; this base validates inputs, resolves targets, reshapes to ``[B, 1, gh, gw]`` and
    optionally upsamples to the input size.
    """

    def __init__(self, model: Union[nn.Module, ViTAdapter], layers: Sequence[int] = None) -> None:
        self.adapter = adapt(model)
        self.model = self.adapter.model
        n = self.adapter.num_layers
        if layers is None:
            self.layer_indices = list(range(n))
        else:
            idx = []
            for i in layers:
                if not isinstance(i, int) or not -n <= i < n:
                    raise ValueError(f"layer index {i!r} is out of range for a model with {n} blocks (valid: {-n}..{n - 1})")
                idx.append(i % n)
            if not idx:
                raise ValueError("layers is empty; give at least one block index or None for all")
            self.layer_indices = sorted(set(idx))
        LayerAttribution.__init__(self, self.adapter.logits, [self.adapter.attentions[i] for i in self.layer_indices])
        GradientAttribution.__init__(self, self.adapter.logits)

    def _prepare(self, inputs: Tensor) -> Tuple[Tensor, Tuple[int, int], bool]:
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError("a ViT takes one input tensor; got a tuple of %d" % len(inputs))
            inputs = inputs[0]
        self.adapter.check_input(inputs)
        if self.model.training:
            warnings.warn(
                f"{type(self.model).__name__} is in training mode: dropout and drop-path make the explanation random. "
                "captum-vit does not switch modes for you; call model.eval() first.",
                stacklevel=3,
            )
        return inputs, self.adapter.grid_size(inputs), is_tuple

    def _finish(self, maps: Tensor, inputs: Tensor, grid: Tuple[int, int], upsample_to_input: bool, is_tuple: bool):
        cam = maps.reshape(maps.shape[0], 1, grid[0], grid[1]).to(inputs.device)
        if upsample_to_input:
            cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
        # Captum convention: a tuple of inputs gets a tuple of attributions back.
        return (cam,) if is_tuple else cam
