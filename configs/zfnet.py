r"""ZFNet (Zeiler & Fergus, 2013; 62.4M params) on 64x64x1 Medical MNIST: AlexNet's recipe.

Same head, dropout and optimizer as configs/alexnet.py; only the conv layers differ.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/zfnet.py --workdir=workdirs/zfnet \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import alexnet


def get_config() -> ml_collections.ConfigDict:
    """Returns the ZFNet configuration."""
    config = alexnet.get_config()
    config.model.name = "zfnet"
    return config
