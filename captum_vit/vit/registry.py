"""The adapter registry: each adapter class says which models it describes.

An adapter module registers its class with :func:`register_adapter`; :func:`find_adapter`
asks every registered class, in registration order, whether it matches a model
(:meth:`ViTAdapter.matches`), so adding a ViT family is one adapter file and one import in
``captum_vit/vit/__init__.py``, with no edit to the dispatch.
"""

from __future__ import annotations

from typing import List, Optional, Type, TypeVar

from torch import nn

from captum_vit.vit.base import ViTAdapter

__all__ = ["ADAPTERS", "register_adapter", "find_adapter", "matching_adapter"]

#: The registered adapter classes, in the order they are asked.
ADAPTERS: List[Type[ViTAdapter]] = []

A = TypeVar("A", bound=Type[ViTAdapter])


def register_adapter(cls: A) -> A:
    """Class decorator: add an adapter class to :data:`ADAPTERS` (once)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def matching_adapter(model: nn.Module) -> Optional[Type[ViTAdapter]]:
    """The first registered adapter class that matches ``model`` (the module itself, unwrapped), or ``None``."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls
    return None


def find_adapter(model: nn.Module) -> Optional[ViTAdapter]:
    """An adapter describing ``model``, or ``None`` when no registered class matches it."""
    cls = matching_adapter(model)
    return cls(model) if cls is not None else None
