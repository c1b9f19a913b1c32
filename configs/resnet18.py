r"""ResNet-18 (ImageNet stem) on 64x64x1 Medical MNIST, 3 epochs.

Run (from the repo root):
  python -m medjax.main --config=configs/resnet18.py --workdir=workdirs/resnet18 \
    --config.data.manual_dir=../shared/data

Expected: one epoch gives 99.93% test accuracy (~9 min on a 2-core CPU); the full recipe is not yet measured.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-18 configuration."""
    config = base.get_config()
    config.model = ml_collections.ConfigDict()  # Fields of medjax.models.ResNet.
    config.model.name = "resnet18"
    # 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, no max-pool).
    config.model.stem = "imagenet"
    config.model.width = 64  # Channels of the stem and the first stage (doubling per stage).
    # Start each residual block's last batch-norm scale at 0 (Goyal et al., 2017).
    config.model.zero_init_residual = False
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.dtype = "float32"
    config.train.num_epochs = 3.0
    config.train.learning_rate = 1e-3
    return config
