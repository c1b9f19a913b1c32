r"""VGG-16 with batch norm (138.4M params, ~2.5 GFLOPs per 64x64 image) on Medical MNIST.

VGG-11's recipe (configs/vgg11.py): one epoch, batch 64, dropout 0.5, AdamW 5e-4.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/vgg16.py --workdir=workdirs/vgg16 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import vgg11


def get_config() -> ml_collections.ConfigDict:
    """Returns the VGG-16 configuration."""
    config = vgg11.get_config()
    config.model.name = "vgg16"
    return config
