r"""EfficientNet-Lite0 fine-tuned on Medical MNIST from ImageNet weights (converted from PyTorch).

The ImageNet weights expect RGB with (x - 127) / 128 on 0..255 pixels: here mean = 127/255 and
std = 128/255 ((x / 255 - mean) / std is the same thing). Medical MNIST is grayscale: the first conv
kernel is summed over its RGB input channels (config.transfer.input_adapter='sum'), which on a gray
image equals feeding it as RGB. Images stay at their native 64x64 (cheap on a CPU); ImageNet features
may do better at a larger size, e.g. --config.data.image_size=128 on an accelerator. The 1000-class head
is replaced by a 6-class one and everything is fine-tuned at a lower learning rate than from scratch.

Run (from the repo root; converting needs `pip install '.[convert]'`, once):
  python -m medjax.convert --model=efficientnet_lite0 --output=workdirs/imagenet_efficientnet_lite0
  python -m medjax.main --config=configs/transfer_imagenet_medical_mnist.py \
    --workdir=workdirs/transfer_imagenet_medical_mnist --config.data.manual_dir=../shared/data

Measured (2026-11-30, 2-core CPU, seeds 0/1/2; benchmarks/transfer.py's 'medical_mnist@100 / imagenet'
arm, this recipe): test accuracy 1.0000 on every seed (5,498 of 5,498), macro AUC 1.000000; from scratch
(configs/efficientnet_lite0.py) 0.9914 ± 0.0034. See README's transfer study.
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
