r"""ResNet-50 (bottleneck blocks) on 64x64x1 Medical MNIST: ResNet-18's recipe, ImageNet stem.

~0.59 GFLOPs per image (the 'small' stem would be ~10.2 GFLOPs), so two epochs.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/resnet50.py --workdir=workdirs/resnet50 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import resnet18


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-50 configuration."""
    config = resnet18.get_config()
    config.model.name = "resnet50"
    config.train.num_epochs = 2.0
    return config
