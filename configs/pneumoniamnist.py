r"""EfficientNet-Lite0 trained from scratch on PneumoniaMNIST (MedMNIST v2, 28x28x1, normal vs pneumonia).

The 28x28 images are resized to 64x64 inside the step (config.data.image_size), the size of Medical
MNIST, so this from-scratch baseline and the transfer configs (ImageNet- or Medical-MNIST-pretrained
EfficientNet-Lite0) see the same inputs. MedMNIST's official splits: train 4708 / validation 524 / test
624. For MedMNIST's published ResNet-18 (28) numbers see benchmarks/transfer.py.

Run (from the repo root; the official npz at ../shared/data/medmnist/pneumoniamnist.npz):
  python -m medjax.main --config=configs/pneumoniamnist.py --workdir=workdirs/pneumoniamnist \
    --config.data.manual_dir=../shared/data

Measured (2026-11-30, 2-core CPU, seeds 0/1/2; benchmarks/transfer.py's 'pneumoniamnist / scratch' arm):
test ACC 0.858 ± 0.021, AUC 0.964 ± 0.002 (MedMNIST's ResNet-18 (28): 0.854 / 0.944). The paper CNN at
28x28 (configs/pneumoniamnist_paper_cnn.py) does better: 0.896 ± 0.005 / 0.974 ± 0.002.
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
