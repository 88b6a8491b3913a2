"""The method template: Captum plumbing, one forward, targets resolved once, reshaping, upsampling."""

from __future__ import annotations

import inspect
import numbers
import threading
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from captum.attr._utils.attribution import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_vit.vit import Record, Request, ViTAdapter, adapt

__all__ = ["ViTLayerAttribution", "TargetType", "resolve_targets", "fuse", "alternatives", "QUERIES"]

#: The query rows a method on the attention's rows reads: the [class] token's (the published
#: definitions), or the rows weighted as the model's head pools the tokens.
QUERIES = ("class", "pooled")

_LISTING = threading.local()


def alternatives(adapter: ViTAdapter, exclude: object = None) -> str:
    """A sentence naming the registered methods that do work on ``adapter``'s model (and how).

    Every method's constructor checks the model's structure without computing anything, so the
    list is what would be accepted. Refusals raised while the list is made do not list again.
    """
    if getattr(_LISTING, "active", False):
        return ""
    from captum_vit.attr import METHODS

    _LISTING.active = True
    works = []
    try:
        for name, cls in METHODS.items():
            if cls is exclude or name == exclude:
                continue
            for kwargs in ({}, {"query": "pooled"}):
                try:
                    cls(adapter, **kwargs)
                except (ValueError, TypeError):
                    continue
                works.append(f"{cls.get_name()} ('{name}'" + (", query='pooled')" if kwargs else ")"))  # type: ignore[attr-defined]
                break
    finally:
        _LISTING.active = False
    if not works:
        return "No method of captum-vit is defined for this model."
    return "On this model these work: " + ", ".join(works) + "."

TargetType = Union[None, int, Tuple[int, ...], Tensor, List, np.ndarray, np.integer]

_FUSIONS = ("sum", "mean", "max", "min")


def _as_index(value: object, what: str) -> int:
    """An integer index from a Python or numpy integer (or a 1-element integer tensor); bools are refused."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        return int(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int index, got {value!r} ({type(value).__name__})")
    return int(value)


def resolve_targets(target: TargetType, logits: Tensor) -> Tensor:
    """Captum target semantics for a ``[B, C]`` classifier output, as a ``LongTensor[B]``.

    ``None`` is the predicted class; an int (Python or numpy, or a 1-tuple ``(c,)``, or a 0-d
    tensor) applies to every sample; a list, 1-D tensor or 1-D numpy array gives one class per
    sample. A negative class (the whole target, or any entry) is the predicted class of that
    sample, the rule of the ONNX graph and of the torch-free kit, so that ``[3, -1]`` means
    "class 3 for the first image, the predicted class for the second". Every class is checked
    against the number of classes.
    """
    B, C = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits.detach().argmax(dim=-1)
    t = _per_sample(_unwrap_target(target), B, logits.device)
    if B and int(t.max()) >= C:
        bad = t[t >= C][0].item()
        raise ValueError(
            f"target class {bad} is out of range for a model with {C} classes (valid: 0..{C - 1}, or a negative "
            "value for the predicted class)"
        )
    if B and int(t.min()) < 0:
        t = torch.where(t < 0, logits.detach().argmax(dim=-1), t)
    return t


def _unwrap_target(target: TargetType) -> TargetType:
    """A numpy target as a tensor (an int when 0-d); a 1-tuple ``(c,)`` as ``c``."""
    if isinstance(target, np.ndarray):
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"target array must hold integer class indices, got dtype {target.dtype}")
        target = torch.as_tensor(target) if target.ndim else int(target)
    if isinstance(target, tuple):
        if len(target) != 1:
            raise ValueError(
                f"a tuple target indexes one output element for every sample (Captum semantics), but the model's "
                f"output is [B, num_classes]; got {target!r}. Use an int, a 1-tuple (c,), or a list/1-D tensor "
                "with one class per sample."
            )
        target = target[0]
    return target


def _per_sample(target: TargetType, B: int, device: torch.device) -> Tensor:
    """``LongTensor[B]`` on ``device`` from an unwrapped target: a tensor, a list, or one index for every sample."""
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
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
        return t.to(device=device, dtype=torch.long)
    if isinstance(target, list):
        if len(target) != B:
            raise ValueError(
                f"target list has {len(target)} entries but the batch has {B} samples; give one per sample"
            )
        flat = [_as_index(t_i[0] if isinstance(t_i, tuple) and len(t_i) == 1 else t_i, "each per-sample target")
                for t_i in target]
        return torch.tensor(flat, dtype=torch.long, device=device)
    return torch.full((B,), _as_index(target, "target"), dtype=torch.long, device=device)


def fuse(x: Tensor, how: str, dim: int) -> Tensor:
    """Reduce ``dim`` of ``x`` by ``how`` in ``{'sum', 'mean', 'max', 'min'}``."""
    if how == "sum":
        return x.sum(dim)
    if how == "mean":
        return x.mean(dim)
    if how == "max":
        return x.amax(dim)
    if how == "min":
        return x.amin(dim)
    raise ValueError(f"fusion must be one of {_FUSIONS}, got {how!r}")


def check_fusion(name: str, value: str, allowed: Sequence[str] = _FUSIONS) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def identity_like(a: Tensor) -> Tensor:
    """``I`` of ``a``'s trailing ``N x N`` shape, broadcastable over its batch."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)


class ViTLayerAttribution(LayerAttribution):
    """Template of the methods over a ViT's attention modules.

    :meth:`attribute` formats the inputs (Captum's tuple convention), validates them, runs
    **one** forward pass through the model description recording what :meth:`_request` asks
    for, resolves the targets once (range-checked before any gradient work), hands
    ``(record, logits, targets)`` to :meth:`_maps`, and reshapes its ``[B, gh*gw]`` patch maps to
    ``[B, 1, gh, gw]`` (optionally upsampled to the input size). A method implements
    :meth:`_request` and :meth:`_maps`; structural checks belong in its constructor.

    Nothing per call is stored on the instance or the model, so one instance may serve
    several threads at once.
    """

    def __init__(self, model: Union[nn.Module, ViTAdapter], layers: Optional[Sequence[int]] = None) -> None:
        self.adapter = adapt(model)
        self.model = self.adapter.wrapper
        n = self.adapter.num_layers
        self.layer_indices: List[int]
        if layers is None:
            self.layer_indices = list(range(n))
        else:
            idx = []
            for i in layers:
                i = _as_index(i, "layer index")
                if not -n <= i < n:
                    raise ValueError(
                        f"layer index {i} is out of range for a model with {n} blocks (valid: {-n}..{n - 1})"
                    )
                idx.append(i % n)
            if not idx:
                raise ValueError("layers is empty; give at least one block index or None for all")
            self.layer_indices = sorted(set(idx))
        LayerAttribution.__init__(self, self.model, [self.adapter.attentions[i] for i in self.layer_indices])

    def _require_query(self, query: str) -> str:
        """Check, at construction, that the query rows ``query`` names are defined for this model.

        For the methods defined on query rows of the attention: ``"class"`` (the [class] token's
        row, the published definitions) needs a head that reads the [class] token alone, since on a
        pooled head row 0 is a patch's (or not what the model classifies) and the map would look
        like a result without being one; ``"pooled"`` (the rows weighted as the head pools the
        tokens, :meth:`~captum_vit.vit.HeadParts.query_weights`) needs a pooling whose weights are
        known. Returns ``query``.
        """
        if query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
        ok, why = (self.adapter.class_row_support() if query == "class" else self.adapter.pooled_query_support())
        if not ok:
            hint = (" Pass query='pooled' to read the query rows as the head pools them."
                    if query == "class" and self.adapter.pooled_query_support()[0]
                    and "query" in inspect.signature(type(self).__init__).parameters else "")
            raise ValueError(
                f"{self.get_name()} with query={query!r} is not defined for this model: {why}.{hint} "
                f"{alternatives(self.adapter, exclude=type(self))}"
            )
        return query

    def _weighted_rows(self, record: Record, rows: Tensor) -> Tensor:
        """``rows[..., i, j]`` read at the query rows of ``self.query`` over the patch keys: ``[..., gh*gw]``.

        ``"class"``: row 0; ``"pooled"``: ``sum_i w_i rows[..., i, :]`` with the head's weights ``w``.
        """
        p = self.adapter.num_prefix_tokens
        if self.query == "class":
            return rows[..., 0, p:]
        w = record.query_weights
        assert w is not None  # a pooled query asks for the weights
        w = w.to(rows.dtype)
        return torch.einsum("bi,b...ij->b...j", w, rows)[..., p:]

    def _query_row(self, record: Record) -> Tensor:
        """``[B, N]``: the weights :meth:`_weighted_rows` gives the query rows (``e_0`` for ``"class"``)."""
        x = record.block_inputs[0]
        if self.query == "class":
            w = x.new_zeros(x.shape[:2])
            w[:, 0] = 1.0
            return w
        assert record.query_weights is not None  # a pooled query asks for the weights
        return record.query_weights.to(x.dtype)

    # ----------------------------------------------------------------- what a method implements
    def _request(self) -> Request:
        """What the method needs recorded during the forward pass."""
        raise NotImplementedError

    def _maps(self, record: Record, logits: Tensor, targets: Tensor) -> Tensor:
        """``[B, gh*gw]`` patch-token maps from one forward's record (a method may take keyword arguments more)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the template
    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        upsample_to_input: bool = False,
        return_logits: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, ...], Tuple[Union[Tensor, Tuple[Tensor]], Tensor]]:
        r"""
        Args:
            inputs (Tensor or 1-tuple of Tensor): normalised images ``[B, C, H, W]``; a
                tuple in gives a tuple out (Captum convention).
            target (int, tuple, list, Tensor or numpy integer/array, optional): class per
                sample (Captum semantics); ``None`` explains the predicted class, and so does
                a negative class, for every sample (``-1``) or for single entries
                (``[3, -1]``: class 3, then the second image's predicted class), as in the
                ONNX export.
            upsample_to_input (bool): return the map bilinearly upsampled
                (``align_corners=False``) to ``H x W`` instead of the patch grid.
            return_logits (bool): also return the model's logits ``[B, num_classes]`` from
                the same forward pass, as ``(attributions, logits)``.

        Returns:
            *Tensor* of shape ``[B, 1, gh, gw]`` (or ``[B, 1, H, W]``) on the input's device,
            or a 1-tuple of it for tuple inputs; with ``return_logits`` a pair
            ``(attributions, logits)``.
        """
        return self._attribute(inputs, target, upsample_to_input, return_logits)

    def _attribute(self, inputs, target, upsample_to_input: bool, return_logits: bool, **method_args):
        """The template; ``method_args`` are passed on to :meth:`_maps` (e.g. CDAM's concept)."""
        inputs, is_tuple = _format_inputs(inputs)
        self.adapter.check_input(inputs)
        self._check_mode()
        request = self._request()
        record = self._forward(inputs, request)
        logits = record.logits
        assert logits is not None  # the forward always records them
        targets = resolve_targets(target, logits)
        with torch.enable_grad() if request.needs_autograd else torch.no_grad():
            maps = self._maps(record, logits, targets, **method_args)
        gh, gw = record.grid
        cam = maps.detach().reshape(maps.shape[0], 1, gh, gw).to(inputs.device)
        if upsample_to_input:
            cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
        out = (cam,) if is_tuple else cam  # Captum convention: a tuple of inputs gets a tuple back
        return (out, logits.detach()) if return_logits else out

    #: Whether the method needs the pure forward over the parts (rules per recorded operation,
    #: or re-running blocks from a recorded input), which does not reproduce an active dropout.
    _needs_pure_forward: bool = False

    def _check_mode(self) -> None:
        """Before any compute: refuse or warn about a model in training mode."""
        random = self.adapter.active_randomness()
        name = type(self.model).__name__
        if random and self._needs_pure_forward:
            shown = ", ".join(random[:3]) + (f" and {len(random) - 3} more" if len(random) > 3 else "")
            raise ValueError(
                f"{self.get_name()} needs the pure forward over the model's parts, which does not reproduce "
                f"dropout or drop-path, and {name} has them active ({shown}: training mode with a rate above 0). "
                "Call model.eval() first, or set those rates to 0."
            )
        if random:
            warnings.warn(
                f"{name} is in training mode: dropout and drop-path make the explanation random. "
                "captum-vit does not switch modes for you; call model.eval() first.",
                stacklevel=5,
            )
        elif self.adapter.is_training:
            warnings.warn(
                f"{name} is in training mode. Its dropout and drop-path rates are all 0, so the explanation is "
                "that of eval mode, but captum-vit does not switch modes for you; call model.eval() first.",
                stacklevel=5,
            )

    def _require_autograd(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{self.get_name()} needs autograd here, which torch.inference_mode() switches off; call it under "
                "torch.no_grad() instead (it enables gradients only inside)"
                + (", or use engine='one_token'" if hasattr(self, "engine") else "")
            )

    def _forward(self, inputs: Tensor, request: Request) -> Record:
        if not request.needs_autograd:
            with torch.no_grad():
                return self.adapter.forward(inputs, request)
        self._require_autograd()
        if inputs.is_inference():  # made under inference_mode: autograd cannot save it
            inputs = inputs.clone()
        with torch.enable_grad():
            if not request.detach:
                inputs = inputs.detach().requires_grad_(True)
            return self.adapter.forward(inputs, request)


def _format_inputs(inputs) -> Tuple[Tensor, bool]:
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(f"a ViT takes one input tensor; got a tuple of {len(inputs)}")
        return inputs[0], True
    return inputs, False
