r"""The paper CNN trained from scratch on PneumoniaMNIST at its native 28x28 (MedMNIST v2, official splits).

The recipe of configs/pneumoniamnist.py (10 epochs, batch 128, AdamW 2e-3 with cosine decay, augmentation)
with the paper CNN in place of EfficientNet-Lite0 and no resizing: cheap on a CPU (~50 s a run).

Run:
  python -m medjax.main --config=configs/pneumoniamnist_paper_cnn.py \
    --workdir=workdirs/pneumoniamnist_paper_cnn --config.data.manual_dir=../shared/data

Measured (2026-11-26, 2-core CPU, seeds 0/1/2): test ACC 0.896 ± 0.005, AUC 0.974 ± 0.002 (MedMNIST's
published ResNet-18 (28): ACC 0.854, AUC 0.944).
"""

import ml_collections

from configs import pneumoniamnist


def get_config() -> ml_collections.ConfigDict:
    """Returns the PneumoniaMNIST paper-CNN configuration."""
    config = pneumoniamnist.get_config()
    config.model.name = "paper_cnn"
    config.data.image_size = 0  # Native 28x28.
    return config
