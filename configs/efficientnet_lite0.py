r"""EfficientNet-Lite0 (4.65M params) trained from scratch on 64x64x1 Medical MNIST.

Batch-norm epsilon 1e-3 as published (the converted ImageNet weights expect it) and dropout 0.2.
It needs only ~0.06 GFLOPs per image; with the depthwise fast path of medjax/models/layers.py it trains at
~70-120 images/s on a 2-core CPU. One epoch: 98.65% test accuracy (2026-11-30, seed 0, see README's zoo table).

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/efficientnet_lite0.py --workdir=workdirs/efficientnet_lite0 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the EfficientNet-Lite0 configuration."""
    config = base.get_config()
    config.model.name = "efficientnet_lite0"
    config.model.dropout_rate = 0.2
    config.model.bn_epsilon = 1e-3
    config.train.num_epochs = 1.0
    config.train.learning_rate = 2e-3
    return config
