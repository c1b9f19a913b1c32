r"""ResNet-18 on 64x64x1 Medical MNIST.

The ImageNet stem (7x7/2 conv + max-pool; 64x64 -> 16x16) keeps it at ~0.2 GFLOPs per image on a
CPU. The 'small' stem (3x3/1, no max-pool) keeps 4x the resolution at ~19x the FLOPs (4.1 GFLOPs):
add --config.model.stem=small on an accelerator.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/resnet18.py --workdir=workdirs/resnet18 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-18 configuration."""
    config = base.get_config()
    config.model.name = "resnet18"
    config.model.stem = "imagenet"
    config.train.num_epochs = 3.0
    config.train.learning_rate = 1e-3
    return config
