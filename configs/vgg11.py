r"""VGG-11 with batch norm on 64x64x1 Medical MNIST, 1 epoch.

Run (from the repo root):
  python -m medjax.main --config=configs/vgg11.py --workdir=workdirs/vgg11 \
    --config.data.manual_dir=../shared/data

Expected: not yet measured (~1.3 GFLOPs per image; meant for a GPU or TPU).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the VGG-11 configuration."""
    config = base.get_config()
    config.model = ml_collections.ConfigDict()  # Fields of medjax.models.VGG.
    config.model.name = "vgg11"
    config.model.dense_features = 4096
    config.model.pool_size = 7  # Adaptive average pooling to 7x7 before the head.
    config.model.dropout_rate = 0.5
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.dtype = "float32"
    config.train.batch_size = 64
    config.train.num_epochs = 1.0
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 200
    return config
