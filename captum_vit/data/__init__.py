"""Datasets.

The real-image datasets (ImageNet val, PASCAL VOC, CUB-200-2011) need only torch, PIL and the
standard library, like the synthetic shapes, so they are imported eagerly: ``import captum_vit.data``
stays light enough for dataloader workers.
"""

from .boxes import AnnotatedImageDataset, DatasetFileError, Preprocess, collate_annotated
from .cub import CUBTest
from .imagenet import IMAGENET_WNIDS, ImageNetVal
from .images import decode_image
from .shapes import CLASSES, SPLITS, ShapesDataset, collate, generate
from .voc import VOC_CLASSES, VOCSingleClass

SHAPES_CLASSES = CLASSES

__all__ = [
    "CLASSES",
    "SHAPES_CLASSES",
    "SPLITS",
    "ShapesDataset",
    "collate",
    "generate",
    "AnnotatedImageDataset",
    "CUBTest",
    "DatasetFileError",
    "IMAGENET_WNIDS",
    "ImageNetVal",
    "Preprocess",
    "VOCSingleClass",
    "VOC_CLASSES",
    "collate_annotated",
    "decode_image",
]
