"""The paper's CNN: blocks of conv -> batch norm -> ReLU -> max-pool, then a dropout + dense head."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class ConvBlock(nn.Module):
    """3x3 conv (no bias) -> batch norm -> ReLU -> 2x2/2 max-pool."""

    features: int
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="bn",
        )(x)
        x = nn.relu(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class PaperCNN(nn.Module):
    """`block` per entry of `features` (block0, block1, ...), flatten, dropout, dense + ReLU, dropout,
    dense head; returns float32 logits (softmax lives in the loss)."""

    num_classes: int
    features: Sequence[int] = (16, 32, 64, 128)
    dense_features: int = 128
    dropout_rate: float = 0.3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    block: ModuleDef = ConvBlock

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = self.block(
                width,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                dtype=self.dtype,
                name=f"block{i}",
            )(x, train=train)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.dense_features, dtype=self.dtype, name="fc")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
