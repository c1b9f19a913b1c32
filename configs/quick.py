r"""Tiny configuration for tests and smoke runs: a narrow CNN for a few steps.

Run (from the repo root):
  python -m medjax.main --config=configs/quick.py --workdir=/tmp/medjax_quick \
    --config.data.manual_dir=../shared/data

Expected: a falling loss within seconds; it checks plumbing, not accuracy.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the base configuration shrunk to a few cheap steps."""
    config = base.get_config()
    config.model.features = (4, 8)
    config.model.dense_features = 16
    config.train.batch_size = 8
    config.train.num_epochs = 1.0
    config.train.warmup_steps = 2
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 4
    config.train.bn_calibration_batches = 2
    config.eval.batch_size = 16
    return config
