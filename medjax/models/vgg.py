"""VGG with batch norm (Simonyan & Zisserman, 2015), as torchvision's vgg11_bn / vgg16_bn.

The features end in PyTorch-style adaptive average pooling to 7x7, so the 25088-wide classifier (and
the parameter count) is the published one at any input size; at 64x64 the 2x2 map is spread over 7x7.
"""

import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any

# Channels of each 3x3 conv; "M" is a 2x2 stride-2 max-pool. Configurations A and D of the paper.
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """conv3x3(+bias)-BN-ReLU stacks with max-pools, adaptive 7x7 pool, 4096-4096-class head with dropout.

    The i-th conv layer is submodule `conv{i}` (its `conv` and `bn`), counting from 1."""

    num_classes: int
    layout: Sequence[Union[int, str]] = VGG11
    dense_features: int = 4096
    pool_size: int = 7
    dropout_rate: float = 0.5
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        # torchvision keeps the conv bias in front of batch norm.
        conv = functools.partial(self.conv, use_bias=True, dtype=self.dtype)
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        x = x.astype(self.dtype)
        num_convs = 0
        for item in self.layout:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            num_convs += 1
            x = blocks.ConvBN(item, 3, conv=conv, norm=norm, padding=1, name=f"conv{num_convs}")(x)
        x = blocks.adaptive_avg_pool(x, self.pool_size).reshape((x.shape[0], -1))
        for i in range(2):
            x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype, name=f"fc{i + 1}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
