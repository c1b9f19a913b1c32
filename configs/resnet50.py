r"""ResNet-50 (bottleneck blocks, ImageNet stem) on 64x64x1 Medical MNIST, ResNet-18's recipe.

Run (from the repo root):
  python -m medjax.main --config=configs/resnet50.py --workdir=workdirs/resnet50 \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~0.59 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import resnet18


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-50 configuration."""
    config = resnet18.get_config()
    config.model.name = "resnet50"
    config.train.num_epochs = 2.0
    return config
