r"""ResNet-18 (ImageNet stem) on 64x64x1 Medical MNIST, 3 epochs.

Run (from the repo root):
  python -m medjax.main --config=configs/resnet18.py --workdir=workdirs/resnet18 \
    --config.data.manual_dir=../shared/data

Expected: one epoch gives 99.93% test accuracy (~9 min on a 2-core CPU); the full recipe is not yet measured.
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
