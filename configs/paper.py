r"""The paper's setting: its CNN, constant Adam 1e-4, 2 epochs on 18,000 training images, no augmentation.

Differences from configs/base.py (the main job, which trains the same CNN with a stronger recipe):
  - optimizer: plain Adam (no weight decay) at a constant learning rate of 1e-4, no warmup;
  - 2 epochs over a fixed 18,000-image training subset (the first 18,000 of a seeded permutation of our
    train split), not the whole split;
  - no data augmentation.
Everything else (model, batch size 128, normalisation, leakage-free validation/test splits) is base's.

Run (from the repo root; data from a local copy, prepared once into TFDS_DATA_DIR):
  python -m medjax.main --config=configs/paper.py --workdir=workdirs/paper \
    --config.data.manual_dir=../shared/data

Measured result: see README results table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the paper-reproduction configuration."""
    config = base.get_config()
    config.data.num_train_examples = 18000
    config.augment.enabled = False
    config.model.name = "paper_cnn"
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-4
    config.train.schedule = "constant"
    config.train.warmup_steps = 0
    config.train.weight_decay = 0.0
    config.train.num_epochs = 2.0
    return config
