"""LeNet-5 (LeCun et al., 1998) in its common modern form: conv6-pool-conv16-pool-fc120-fc84-fc."""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class LeNet5(nn.Module):
    """5x5 valid convs with 6 and 16 channels, each followed by 2x2 max-pooling, then 120-84-class dense.

    Deviations from the 1998 paper, as in most reimplementations: ReLU instead of scaled tanh, max-pooling
    instead of trainable subsampling, a fully connected C3 and a plain dense output (no RBF units). The
    first dense layer sees the whole final feature map, so its size follows the input: 61,706 parameters at
    the native 32x32x1 with 10 classes; at 64x64 the map is 13x13 instead of 5x5.
    """

    num_classes: int
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train  # No dropout or batch norm.
        conv = functools.partial(self.conv, kernel_size=(5, 5), padding="VALID", dtype=self.dtype)
        x = x.astype(self.dtype)
        x = nn.relu(conv(6, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(16, name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype, name="fc2")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x)
        return x.astype(jnp.float32)
