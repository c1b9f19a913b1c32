"""Datasets as TFDS builders, plus helpers to read image folders."""

from medjax.datasets.medical_mnist import (
    BUILDERS,
    CLASS_NAMES,
    IMAGE_SHAPE,
    MedicalMnist,
    decode_image,
    load_split,
    prepare,
    read_class_folder,
    split_for_hash,
)

__all__ = [
    "BUILDERS",
    "CLASS_NAMES",
    "IMAGE_SHAPE",
    "MedicalMnist",
    "decode_image",
    "load_split",
    "prepare",
    "read_class_folder",
    "split_for_hash",
]
