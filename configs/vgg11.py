r"""VGG-11 with batch norm (132.9M params, ~1.3 GFLOPs per 64x64 image) on Medical MNIST.

The costliest family per image on a CPU, hence one epoch and a smaller batch; dropout 0.5 in the
head as published, AdamW with a reduced learning rate for the 25088x4096 classifier.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/vgg11.py --workdir=workdirs/vgg11 \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the VGG-11 configuration."""
    config = base.get_config()
    config.model.name = "vgg11"
    config.model.dropout_rate = 0.5
    config.train.batch_size = 64
    config.train.num_epochs = 1.0
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 200
    return config
