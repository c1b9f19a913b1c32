r"""The paper CNN from scratch on PneumoniaMNIST (MedMNIST v2) at its native 28x28.

Run (from the repo root):
  python -m medjax.main --config=configs/pneumoniamnist_paper_cnn.py \
    --workdir=workdirs/pneumoniamnist_paper_cnn --config.data.manual_dir=../shared/data

Expected: test ACC 0.896 ± 0.005, AUC 0.974 ± 0.002 over 3 seeds, ~1 min a run on a 2-core CPU.
"""

import ml_collections

from configs import base
from configs import pneumoniamnist


def get_config() -> ml_collections.ConfigDict:
    """Returns the PneumoniaMNIST paper-CNN configuration."""
    config = pneumoniamnist.get_config()
    config.model = base.paper_cnn_model()
    config.data.image_size = 0  # Native 28x28.
    return config
