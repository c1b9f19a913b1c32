r"""ZFNet on 64x64x1 Medical MNIST with AlexNet's recipe.

Run (from the repo root):
  python -m medjax.main --config=configs/zfnet.py --workdir=workdirs/zfnet \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~0.2 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import alexnet


def get_config() -> ml_collections.ConfigDict:
    """Returns the ZFNet configuration."""
    config = alexnet.get_config()
    config.model.name = "zfnet"
    return config
