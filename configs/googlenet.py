r"""GoogLeNet / Inception v1 (torchvision layout with batch norm, no aux heads) on Medical MNIST.

torchvision's batch-norm epsilon 1e-3 and dropout 0.2 before the classifier; ~0.2 GFLOPs per image
but many small convs, so two epochs.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/googlenet.py --workdir=workdirs/googlenet \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the GoogLeNet configuration."""
    config = base.get_config()
    config.model.name = "googlenet"
    config.model.dropout_rate = 0.2
    config.model.bn_epsilon = 1e-3
    config.train.num_epochs = 2.0
    config.train.learning_rate = 1e-3
    return config
