r"""EfficientNet-Lite0 from scratch on PneumoniaMNIST (MedMNIST v2), resized to 64x64 in the step.

Run (from the repo root):
  python -m medjax.main --config=configs/pneumoniamnist.py --workdir=workdirs/pneumoniamnist \
    --config.data.manual_dir=../shared/data

Expected: test ACC 0.858 ± 0.021, AUC 0.964 ± 0.002 over 3 seeds (MedMNIST's ResNet-18 (28): 0.854 / 0.944).
"""

import ml_collections

from configs import efficientnet_lite0


def get_config() -> ml_collections.ConfigDict:
    """Returns the PneumoniaMNIST from-scratch configuration."""
    config = efficientnet_lite0.get_config()
    config.data.name = "pneumoniamnist"
    config.data.image_size = 64
    config.train.batch_size = 128
    config.train.num_epochs = 10.0  # 36 steps an epoch.
    config.train.warmup_steps = 30
    config.train.learning_rate = 2e-3
    config.train.log_every_steps = 20
    config.train.bn_calibration_batches = 20
    return config
