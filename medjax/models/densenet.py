"""DenseNet-BC (Huang et al., 2017), as torchvision's densenet121 (7,978,856 params at 224x224x3/1000)."""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any


class DenseNet(nn.Module):
    """7x7/2 conv stem + 3x3/2 max-pool, dense blocks of pre-activation BN-ReLU-conv1x1-BN-ReLU-conv3x3
    layers joined by BN-ReLU-conv1x1-avgpool transitions that halve the channels, then BN-ReLU, global
    pool and a dense classifier. Submodules mirror torchvision's: stem (conv0/norm0),
    denseblock{b}_layer{l}_{norm1,conv1,norm2,conv2}, transition{b}_{norm,conv}, norm5, classifier."""

    num_classes: int
    block_sizes: Sequence[int] = (6, 12, 24, 16)
    growth_rate: int = 32
    bn_size: int = 4  # Bottleneck width as a multiple of the growth rate.
    init_features: int = 64
    dropout_rate: float = 0.0  # After each dense layer, as torchvision's drop_rate.
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )

        def bn_relu_conv(x, features, kernel, prefix, suffix=""):
            x = nn.relu(norm(name=f"{prefix}norm{suffix}")(x))
            return conv(features, (kernel, kernel), padding=kernel // 2, name=f"{prefix}conv{suffix}")(x)

        x = x.astype(self.dtype)
        x = blocks.ConvBN(self.init_features, 7, conv=conv, norm=norm, strides=2, padding=3, name="stem")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for b, num_layers in enumerate(self.block_sizes):
            for i in range(num_layers):
                prefix = f"denseblock{b + 1}_layer{i + 1}_"
                y = bn_relu_conv(x, self.bn_size * self.growth_rate, 1, prefix, "1")
                y = bn_relu_conv(y, self.growth_rate, 3, prefix, "2")
                y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
                x = jnp.concatenate([x, y], axis=-1)
            if b < len(self.block_sizes) - 1:
                x = bn_relu_conv(x, x.shape[-1] // 2, 1, f"transition{b + 1}_")
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(norm(name="norm5")(x))
        x = blocks.global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)
