r"""EfficientNet-Lite0 from scratch on BreastMNIST (MedMNIST v2), resized to 64x64 in the step.

Run (from the repo root):
  python -m medjax.main --config=configs/breastmnist.py --workdir=workdirs/breastmnist \
    --config.data.manual_dir=../shared/data

Expected: test ACC 0.831 ± 0.033, AUC 0.852 ± 0.026 over 3 seeds (MedMNIST's ResNet-18 (28): 0.863 / 0.901).
"""

import ml_collections

from configs import pneumoniamnist


def get_config() -> ml_collections.ConfigDict:
    """Returns the BreastMNIST from-scratch configuration."""
    config = pneumoniamnist.get_config()
    config.data.name = "breastmnist"
    config.train.batch_size = 64
    config.train.num_epochs = 30.0  # 8 steps an epoch.
    config.train.bn_calibration_batches = 8
    config.eval.batch_size = 200
    return config
