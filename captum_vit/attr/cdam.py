"""Class-Discriminative Attention Maps (Brocki & Chung, 2023), with Smooth and Integrated variants."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_vit.attr._base import TargetType, ViTLayerAttribution, alternatives
from captum_vit.vit import Record, Request, ViTAdapter

__all__ = ["CDAM"]

_VARIANTS = ("plain", "smooth", "integrated")


class CDAM(ViTLayerAttribution, GradientAttribution):
    r"""
    Class-Discriminative Attention Maps: with ``T`` the tokens entering the last attention
    (the output of the last block's first norm) and ``y`` a score of the model's output,

    .. math::
        S_i = \sum_j T_{ij} \, \partial y / \partial T_{ij}

    for every patch token ``i``. **Signed**: positive where a token is evidence for the score,
    negative where it is evidence against.

    The score ``y`` is, per call, one of: the logit of a class (``target``, Captum semantics);
    the dot product of the image's [class] embedding (the classifier's input) with a concept
    vector (``concept``: a ``[D]`` vector, or ``[M, C, H, W]`` example images whose mean
    embedding is the concept); or any ``target_fn`` mapping the ``[B, D]`` [class] embeddings
    to one scalar per image.

    Variants re-run only the last block, the final norm and the head:

    * ``"smooth"`` -- average of ``n_samples`` maps for the last block's input plus Gaussian
      noise of standard deviation ``noise_level * (max - min)`` of that input, per image;
    * ``"integrated"`` -- average of the maps for the last block's input scaled by ``k / n_steps``,
      ``k = 1 .. n_steps - 1`` (zero baseline, as the authors' code).

    CDAM is defined for any head, pooled ones included (a class logit as the score; a concept
    or ``target_fn`` needs a [class] embedding). The last block is re-run over its parts,
    which do not reproduce dropout, so a model with an active dropout or drop-path (training
    mode, rate above 0) is refused; with every rate 0 it is explained as in eval mode.

    Args:
        model (nn.Module): a supported ViT (see :class:`~captum_vit.AGCAM`).
        variant (str): ``"plain"``, ``"smooth"`` or ``"integrated"``.
        n_samples (int): noise samples of Smooth CDAM.
        noise_level (float): relative noise of Smooth CDAM.
        n_steps (int): steps of Integrated CDAM.

    Examples::

        >>> cdam = CDAM(model)
        >>> signed = cdam.attribute(x, target=[3, 7])             # [B, 1, gh, gw], signed
        >>> by_concept = cdam.attribute(x, concept=example_images)
        >>> smooth = CDAM(model, variant="smooth").attribute(x, target=3)
    """

    _needs_pure_forward = True

    def __init__(
        self,
        model: Union[nn.Module, ViTAdapter],
        variant: str = "plain",
        n_samples: int = 50,
        noise_level: float = 0.05,
        n_steps: int = 50,
    ) -> None:
        super().__init__(model, [-1])
        GradientAttribution.__init__(self, self.model)
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if self.adapter.parts is None:
            raise ValueError(f"CDAM re-runs the last block from its input, and {self.adapter.parts_missing}. "
                             f"{alternatives(self.adapter, exclude='cdam')}")
        for name, value in (("n_samples", n_samples), ("n_steps", n_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_samples" else 2):
                raise ValueError(f"{name} must be an int >= {1 if name == 'n_samples' else 2}, got {value!r}")
        self.variant, self.n_samples, self.noise_level, self.n_steps = variant, n_samples, float(noise_level), n_steps

    @classmethod
    def get_name(cls) -> str:
        return "CDAM"

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        concept: Optional[Tensor] = None,
        target_fn: Optional[Callable[[Tensor], Tensor]] = None,
        noise: Optional[Tensor] = None,
        upsample_to_input: bool = False,
        return_logits: bool = False,
    ):
        r"""
        Args:
            inputs (Tensor or 1-tuple of Tensor): normalised images ``[B, C, H, W]``.
            target (int, tuple, list, Tensor or numpy integer/array, optional): class per
                sample (Captum semantics); ``None`` or a negative class (the whole target or
                single entries, e.g. ``[3, -1]``) explains the predicted class.
            concept (Tensor, optional): a ``[D]`` concept vector in the [class]-embedding
                space, or ``[M, C, H, W]`` example images whose mean embedding is used.
            target_fn (callable, optional): maps the ``[B, D]`` [class] embeddings to ``[B]``.
            noise (Tensor, optional): Smooth CDAM's standard-normal draws
                ``[n_samples, B, N, D]`` (``N`` tokens); drawn with ``torch.randn`` if omitted.
            upsample_to_input (bool): upsample bilinearly to ``H x W``.
            return_logits (bool): also return the logits of the forward pass.

        Returns:
            *Tensor* ``[B, 1, gh, gw]`` (signed), as :meth:`ViTLayerAttribution.attribute`.
        """
        given = [n for n, v in (("target", target), ("concept", concept), ("target_fn", target_fn)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of target, concept or target_fn, not {' and '.join(given)}")
        if (concept is not None or target_fn is not None) and not self.adapter.head.tokens:
            # Checked before any forward: the head pools the tokens otherwise than through a
            # [class] token, so there is no embedding for a concept or target_fn to read.
            raise ValueError(
                f"this model's head pools the tokens with {self.adapter.pooling!r} and does not read a [class] "
                "embedding, so concept= and target_fn= have no embedding space here; explain a class with "
                "target= (CDAM works on this model for class logits)"
            )
        if concept is not None:
            concept = self._concept_vector(concept)
        return self._attribute(
            inputs, target, upsample_to_input, return_logits, concept=concept, target_fn=target_fn, noise=noise
        )

    def _request(self) -> Request:
        return Request(block_inputs=(self.adapter.num_layers - 1,))

    def _maps(self, record: Record, logits: Tensor, targets: Tensor, concept=None, target_fn=None, noise=None):
        self._require_autograd()
        x = record.block_inputs[-1]
        if self.variant == "plain":
            tails = [x]
        elif self.variant == "integrated":
            tails = [x * (k / self.n_steps) for k in range(1, self.n_steps)]
        else:
            noise = self._check_noise(noise, x)
            spread = x.flatten(1).amax(1) - x.flatten(1).amin(1)
            std = (self.noise_level * spread).view(-1, 1, 1)
            tails = [x + std * noise[s] for s in range(self.n_samples)]
        maps = [self._cdam(tail, targets, concept, target_fn, record.context) for tail in tails]
        return torch.stack(maps).mean(0)

    def _cdam(self, block_input: Tensor, targets: Tensor, concept, target_fn, context=None) -> Tensor:
        """``sum_j T_ij dy/dT_ij`` over patch tokens, re-running the last block from ``block_input``."""
        last = self.adapter.num_layers - 1
        by_embedding = concept is not None or target_fn is not None
        with torch.enable_grad():
            request = Request(grad_attention_inputs=(last,), features=by_embedding)
            rec = self.adapter.forward_tail(block_input, last, request, context=context)
            features, logits = rec.features, rec.logits
            if by_embedding and features is None:
                raise ValueError("this model's head does not read a [class] embedding: use a class target instead")
            if concept is not None:
                assert features is not None
                score = features @ concept.to(features.dtype)
            elif target_fn is not None:
                assert features is not None
                score = self._score_from_fn(target_fn, features)
            else:
                assert logits is not None  # forward_tail always records them
                score = logits.gather(1, targets[:, None])[:, 0]
            (tokens,) = rec.attention_inputs
            (grad,) = torch.autograd.grad(score.sum(), tokens)
        return (tokens * grad).sum(-1)[:, self.adapter.num_prefix_tokens :].detach()

    def _concept_vector(self, concept: Tensor) -> Tensor:
        if not isinstance(concept, Tensor) or concept.dim() not in (1, 4):
            raise ValueError("concept must be a [D] vector or a batch of example images [M, C, H, W]")
        if concept.dim() == 4:
            self.adapter.check_input(concept)
            with torch.no_grad():
                rec = self.adapter.forward(concept, Request(features=True))
            if rec.features is None:
                raise ValueError("this model's head does not read a [class] embedding, so there is no concept space")
            return rec.features.mean(0)
        if concept.shape[0] != self.adapter.embed_dim:
            raise ValueError(
                f"concept vector has {concept.shape[0]} entries but the [class] embedding has {self.adapter.embed_dim}"
            )
        return concept.detach()

    @staticmethod
    def _score_from_fn(target_fn: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
        score = target_fn(features)
        if not isinstance(score, Tensor) or score.shape != features.shape[:1]:
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"target_fn must return one scalar per sample, shape ({features.shape[0]},); got {got}")
        return score

    def _check_noise(self, noise: Optional[Tensor], x: Tensor) -> Tensor:
        shape = (self.n_samples,) + tuple(x.shape)
        if noise is None:
            return torch.randn(shape, dtype=x.dtype, device=x.device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape [n_samples, B, N, D] = {list(shape)}, got {list(noise.shape)}")
        return noise.to(device=x.device, dtype=x.dtype)
