r"""The best recipe measured on Medical MNIST: the paper CNN trained as in configs/base.py.

Run (from the repo root):
  python -m medjax.main --config=configs/best.py --workdir=workdirs/best \
    --config.data.manual_dir=../shared/data

Expected: ~99.98% test accuracy (99.976% ± 0.011% over 3 seeds), ~2 min on a 2-core CPU.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the best measured recipe (currently identical to configs/base.py)."""
    return base.get_config()
