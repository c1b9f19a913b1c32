r"""EfficientNet-Lite0 trained from scratch on BreastMNIST (MedMNIST v2, 28x28x1 ultrasound, malignant vs
normal + benign), resized to 64x64 inside the step like configs/pneumoniamnist.py.

A small dataset (train 546 / validation 78 / test 156), so a smaller batch and more epochs.

Run (from the repo root; the official npz at ../shared/data/medmnist/breastmnist.npz):
  python -m medjax.main --config=configs/breastmnist.py --workdir=workdirs/breastmnist \
    --config.data.manual_dir=../shared/data

Measured result: see README (not measured yet).
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
