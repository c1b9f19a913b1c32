r"""The paper CNN under its model name, for the zoo (`benchmarks/zoo.py --models=paper_cnn`).

Identical to configs/base.py (the main job): 4 epochs of AdamW 3e-3 with a cosine schedule and augmentation.

Run:
  python -m medjax.main --config=configs/paper_cnn.py --workdir=workdirs/paper_cnn \
    --config.data.manual_dir=../shared/data

Measured result: see README's model-zoo table.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the paper CNN configuration (the base configuration)."""
    return base.get_config()
