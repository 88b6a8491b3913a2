"""Model zoo: small models shipped with the package (weights and config; the training recipe is in tools/)."""

from .shapes import DATA_CONFIG, SHAPES_CLASSES, build_shapes_vit, shapes_vit, training_seeds

__all__ = ["DATA_CONFIG", "SHAPES_CLASSES", "build_shapes_vit", "shapes_vit", "training_seeds"]
