r"""PneumoniaMNIST fine-tuned from a medjax Medical MNIST workdir (medical -> medical transfer).

The source is EfficientNet-Lite0 trained on Medical MNIST by configs/efficientnet_lite0.py (64x64x1,
normalised with mean 0.5 / std 0.25, as here); PneumoniaMNIST's 28x28 images are resized to that 64x64.
The backbone is restored from the source's latest checkpoint and the 6-class head replaced by a 2-class
one; everything is fine-tuned at a lower learning rate than from scratch (as benchmarks/transfer.py does).

Run (from the repo root):
  python -m medjax.main --config=configs/efficientnet_lite0.py --workdir=workdirs/efficientnet_lite0 \
    --config.data.manual_dir=../shared/data
  python -m medjax.main --config=configs/transfer_medical_to_pneumonia.py \
    --workdir=workdirs/transfer_medical_to_pneumonia --config.data.manual_dir=../shared/data \
    --config.init_from=workdirs/efficientnet_lite0

Other transfer modes: --config.transfer.mode=linear_probe | per_group_lr
(--config.transfer.backbone_lr_multiplier=0.1) | frozen_stages (--config.transfer.frozen_stages=3).

Measured (2026-11-30, 2-core CPU, seeds 0/1/2; benchmarks/transfer.py's 'pneumoniamnist / medical' arm,
this recipe): test ACC 0.849 ± 0.008, AUC 0.962 ± 0.003 — no better than from scratch
(configs/pneumoniamnist.py: 0.858 ± 0.021 / 0.964 ± 0.002). See README's transfer study.
"""

import ml_collections

from configs import pneumoniamnist


def get_config() -> ml_collections.ConfigDict:
    """Returns the Medical MNIST -> PneumoniaMNIST fine-tuning configuration."""
    config = pneumoniamnist.get_config()
    config.init_from = "workdirs/efficientnet_lite0"
    config.transfer.mode = "full"
    config.train.learning_rate = 5e-4
    return config
