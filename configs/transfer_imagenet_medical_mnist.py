r"""EfficientNet-Lite0 fine-tuned on Medical MNIST from converted ImageNet weights.

Run (from the repo root):
  python -m medjax.convert --model=efficientnet_lite0 --output=workdirs/imagenet_efficientnet_lite0
  python -m medjax.main --config=configs/transfer_imagenet_medical_mnist.py \
    --workdir=workdirs/transfer_imagenet_medical_mnist --config.data.manual_dir=../shared/data

Expected: 100.00% test accuracy on each of 3 seeds (from scratch: 99.14%).
"""

import ml_collections

from configs import efficientnet_lite0


def get_config() -> ml_collections.ConfigDict:
    """Returns the ImageNet -> Medical MNIST fine-tuning configuration."""
    config = efficientnet_lite0.get_config()
    config.init_from = "workdirs/imagenet_efficientnet_lite0"
    config.data.mean = 127.0 / 255.0
    config.data.std = 128.0 / 255.0
    config.transfer.mode = "full"
    config.transfer.input_adapter = "sum"
    config.train.learning_rate = 5e-4
    return config
