"""Model zoo: small models shipped with the package."""

from .shapes import DATA_CONFIG, SHAPES_CLASSES, build_shapes_vit, shapes_vit

__all__ = ["DATA_CONFIG", "SHAPES_CLASSES", "build_shapes_vit", "shapes_vit"]
