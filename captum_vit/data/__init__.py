"""Datasets."""

from .shapes import CLASSES, SPLITS, ShapesDataset, collate, generate

SHAPES_CLASSES = CLASSES

__all__ = ["CLASSES", "SHAPES_CLASSES", "SPLITS", "ShapesDataset", "collate", "generate"]
