r"""ResNet-34 (ImageNet stem) on 64x64x1 Medical MNIST, ResNet-18's recipe.

Run (from the repo root):
  python -m medjax.main --config=configs/resnet34.py --workdir=workdirs/resnet34 \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~0.44 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import resnet18


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-34 configuration."""
    config = resnet18.get_config()
    config.model.name = "resnet34"
    config.train.num_epochs = 2.0
    return config
