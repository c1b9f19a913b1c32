r"""configs/base.py under its model name, for the model zoo (benchmarks/zoo.py --models=paper_cnn).

Run (from the repo root):
  python -m medjax.main --config=configs/paper_cnn.py --workdir=workdirs/paper_cnn \
    --config.data.manual_dir=../shared/data

Expected: ~99.98% test accuracy (99.976% ± 0.011% over 3 seeds), ~2 min on a 2-core CPU.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the paper CNN configuration (the base configuration)."""
    return base.get_config()
