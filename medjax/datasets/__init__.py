"""Datasets as TFDS builders, registered by name for `config.data.name`, plus helpers to read image folders.

Medical MNIST (medical_mnist), the MedMNIST v2 28x28 datasets (pneumoniamnist, breastmnist,
retinamnist, ...; medjax/datasets/medmnist.py), and a user's folder of class subfolders (image_folder).
"""

from medjax.datasets import medical_mnist
from medjax.datasets import medmnist
from medjax.datasets import image_folder
from medjax.datasets.medical_mnist import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    MedicalMnist,
    decode_image,
    read_class_folder,
    split_for_hash,
)
from medjax.datasets.registry import BUILDERS, load_split, prepare, prepare_config, register

__all__ = [
    "BUILDERS",
    "CLASS_NAMES",
    "image_folder",
    "IMAGE_SHAPE",
    "MedicalMnist",
    "decode_image",
    "load_split",
    "medical_mnist",
    "medmnist",
    "prepare",
    "prepare_config",
    "read_class_folder",
    "register",
    "split_for_hash",
]
