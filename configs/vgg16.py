r"""VGG-16 with batch norm on 64x64x1 Medical MNIST, VGG-11's recipe.

Run (from the repo root):
  python -m medjax.main --config=configs/vgg16.py --workdir=workdirs/vgg16 \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~2.5 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import vgg11


def get_config() -> ml_collections.ConfigDict:
    """Returns the VGG-16 configuration."""
    config = vgg11.get_config()
    config.model.name = "vgg16"
    return config
