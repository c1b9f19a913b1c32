r"""DenseNet-121 (torchvision layout) on 64x64x1 Medical MNIST, 1 epoch.

Run (from the repo root):
  python -m medjax.main --config=configs/densenet121.py --workdir=workdirs/densenet121 \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~0.43 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the DenseNet-121 configuration."""
    config = base.get_config()
    config.model = ml_collections.ConfigDict()  # Fields of medjax.models.DenseNet.
    config.model.name = "densenet121"
    config.model.bn_size = 4  # Bottleneck width as a multiple of the growth rate.
    config.model.dropout_rate = 0.0
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.dtype = "float32"
    config.train.num_epochs = 1.0
    config.train.learning_rate = 1e-3
    return config
