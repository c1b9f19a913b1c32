r"""EfficientNet-Lite0 trained from scratch on BreastMNIST (MedMNIST v2, 28x28x1 ultrasound, malignant vs
normal + benign), resized to 64x64 inside the step like configs/pneumoniamnist.py.

A small dataset (train 546 / validation 78 / test 156), so a smaller batch and more epochs.

Run (from the repo root; the official npz at ../shared/data/medmnist/breastmnist.npz):
  python -m medjax.main --config=configs/breastmnist.py --workdir=workdirs/breastmnist \
    --config.data.manual_dir=../shared/data

Measured (2026-11-30, 2-core CPU, seeds 0/1/2; benchmarks/transfer.py's 'breastmnist / scratch' arm):
test ACC 0.831 ± 0.033, AUC 0.852 ± 0.026 (MedMNIST's ResNet-18 (28): 0.863 / 0.901). The paper CNN at
28x28 (configs/breastmnist_paper_cnn.py) does better: 0.874 ± 0.007 / 0.914 ± 0.002.
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
