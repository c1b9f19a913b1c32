r"""LeNet-5 on 64x64x1 Medical MNIST: the smallest zoo model (~5 MFLOPs per image).

Cheap enough for more epochs; no batch norm or dropout, so AdamW with a moderate learning rate.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/lenet5.py --workdir=workdirs/lenet5 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the LeNet-5 configuration."""
    config = base.get_config()
    config.model.name = "lenet5"
    config.train.num_epochs = 5.0
    config.train.learning_rate = 2e-3
    return config
