r"""ResNet-34 on 64x64x1 Medical MNIST: ResNet-18's recipe with the ImageNet stem.

~0.44 GFLOPs per image (the 'small' stem would be ~8.6 GFLOPs), so two epochs.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/resnet34.py --workdir=workdirs/resnet34 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import resnet18


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-34 configuration."""
    config = resnet18.get_config()
    config.model.name = "resnet34"
    config.train.num_epochs = 2.0
    return config
