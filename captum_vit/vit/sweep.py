"""The backward pass one block at a time, each block recomputed from its recorded input.

A gradient method that backpropagates through the whole network keeps every block's
activations alive until its backward has run: twelve blocks' worth, about ten times a
forward's peak memory. The gradients of the attention maps are needed only one block at a
time, from the top: so the forward records just each block's input (no autograd, the fused
attention kernel), and the backward visits the blocks from the last, re-running each from its
input with autograd on, taking the vector-Jacobian product of the block with the gradient that
arrived at its output, handing the block's record and the gradient of its attention to the
method, and freeing the block's graph before the next. The peak is then the inputs of the
blocks plus one block's graph, at the price of a second forward of each block.

Needs the pure forward over the parts (a record of ``Request(block_inputs=True)``);
:func:`sweep_support` says whether a model in its present mode has it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from captum_vit.vit.base import Record, Request, ViTAdapter, _pure_block, parameters_as_constants

__all__ = ["Visit", "backward_sweep", "head_gradient", "sweep_support"]

#: Called as ``visit(k, block_record, dy/dA_k)`` for each block of the sweep, from the last.
Visit = Callable[[int, Record, Tensor], None]


def sweep_support(adapter: ViTAdapter) -> bool:
    """Whether blocks can be recomputed from their inputs: the pure forward runs (parts, no active dropout)."""
    return adapter.parts is not None and not adapter.active_randomness()


def head_gradient(adapter: ViTAdapter, record: Record, targets: Tensor, final_norm_eps: Optional[float] = None
                  ) -> Tensor:
    """``dy_t / dx`` at the head's input ``x`` (the last block's output), for the target logits ``y_t``."""
    assert record.head_input is not None, "needs a record of Request(block_inputs=True) from the pure forward"
    with torch.enable_grad(), parameters_as_constants():
        x = record.head_input.detach().requires_grad_(True)
        logits = adapter.head(x, Record(), Request(final_norm_eps=final_norm_eps))
        for m in adapter.post:
            logits = m(logits)
        (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return g


def backward_sweep(adapter: ViTAdapter, record: Record, g: Tensor, request: Request, visit: Visit,
                   first_layer: int = 0) -> None:
    """The blocks from the last down to ``first_layer``, each recomputed and differentiated alone.

    ``g`` is the gradient at the head's input (:func:`head_gradient`). Block ``k`` is re-run from
    ``record.block_inputs[k]`` recording what ``request`` asks for (its ``attention`` must be
    ``"grad"``; ``detach`` as the method defines its gradient), ``visit(k, block_record,
    dy/dA_k)`` is called, and the gradient moves on to the block's input. The block's record
    holds one entry per list (``attention[0]``, ``traces[0]``, ...); ``visit`` runs under
    ``torch.no_grad()``, so that nothing it keeps holds a block's graph alive.
    """
    assert adapter.parts is not None and len(record.block_inputs) == adapter.num_layers, (
        "needs a record of Request(block_inputs=True) from the pure forward")
    block_request = replace(request, block_inputs=False, attention_layers=None)
    for k in range(adapter.num_layers - 1, first_layer - 1, -1):
        rec = Record(grid=record.grid, context=record.context)
        with torch.enable_grad(), parameters_as_constants():
            x = record.block_inputs[k].detach().requires_grad_(True)  # puts the attention in the graph
            out = _pure_block(adapter.parts[k], x, rec, block_request, k)
            wanted = [rec.attention[0]] + ([x] if k > first_layer else [])
            grads = torch.autograd.grad(out, wanted, g, allow_unused=True)
        del out
        grad_attention = grads[0] if grads[0] is not None else torch.zeros_like(rec.attention[0])
        if k > first_layer:
            g = grads[1]
        del grads
        with torch.no_grad():
            visit(k, rec, grad_attention)
        del rec, grad_attention  # one block's activations at a time
