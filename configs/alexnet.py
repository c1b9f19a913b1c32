r"""AlexNet (torchvision variant, 61.1M params) on 64x64x1 Medical MNIST.

No batch norm, so a small AdamW learning rate with warmup; the published dropout 0.5 in the
4096-wide head. The 1x1 map at 64x64 is spread over the published 6x6 grid (adaptive pooling).

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/alexnet.py --workdir=workdirs/alexnet \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the AlexNet configuration."""
    config = base.get_config()
    config.model.name = "alexnet"
    config.model.dropout_rate = 0.5
    config.train.num_epochs = 3.0
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 200
    return config
