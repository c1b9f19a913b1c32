r"""AlexNet (torchvision variant) on 64x64x1 Medical MNIST, 3 epochs.

Run (from the repo root):
  python -m medjax.main --config=configs/alexnet.py --workdir=workdirs/alexnet \
    --config.data.manual_dir=../shared/data

Expected: one epoch gives 99.27% test accuracy (~4 min on a 2-core CPU); the full recipe is not yet measured.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the AlexNet configuration."""
    config = base.get_config()
    config.model = ml_collections.ConfigDict()  # Fields of medjax.models.AlexNet.
    config.model.name = "alexnet"
    config.model.dense_features = 4096
    config.model.pool_size = 6  # Adaptive average pooling to 6x6 before the head.
    config.model.dropout_rate = 0.5
    config.model.dtype = "float32"
    config.train.num_epochs = 3.0
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 200
    return config
