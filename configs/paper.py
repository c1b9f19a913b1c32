r"""The paper's setting: its CNN, constant Adam 1e-4, 2 epochs on 18,000 training images, no augmentation.

Run (from the repo root):
  python -m medjax.main --config=configs/paper.py --workdir=workdirs/paper \
    --config.data.manual_dir=../shared/data

Expected: ~99.7% test accuracy (paper: 99.42%), about a minute on a 2-core CPU.
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
