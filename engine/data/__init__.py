"""Synthetic training data for the tiny class-conditional VAR model (see :mod:`engine.data.shapes`)."""

from engine.data.shapes import (
    CLASS_NAMES,
    EVAL_SEED,
    IMAGE_SIZE,
    NUM_CLASSES,
    SHAPES,
    TEXTURES,
    TRAIN_SEED,
    SampleParams,
    ShapesDataset,
    render,
    render_batch,
    sample_params,
    to_tensor,
    to_uint8,
)

__all__ = [
    "CLASS_NAMES",
    "EVAL_SEED",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SHAPES",
    "TEXTURES",
    "TRAIN_SEED",
    "SampleParams",
    "ShapesDataset",
    "render",
    "render_batch",
    "sample_params",
    "to_tensor",
    "to_uint8",
]
