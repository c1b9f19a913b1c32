"""The paper's CNN: blocks of conv -> batch norm -> ReLU -> max-pool, then a dropout + dense head."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models import normalization


class PaperCNN(nn.Module):
    """Plain convolutional classifier; returns float32 logits (softmax lives in the loss)."""

    num_classes: int
    features: Sequence[int] = (16, 32, 64, 128)
    dense_features: int = 128
    dropout_rate: float = 0.3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            conv = layers.Conv(width, (3, 3), use_bias=False, dtype=self.dtype, name=f"conv{i}")
            conv_input, x = x, conv(x)
            x = normalization.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                activation=nn.relu,
                max_pool=layers.MaxPool((2, 2), (2, 2)),
                name=f"bn{i}",
            )(x, conv=conv, conv_input=conv_input)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.dense_features, dtype=self.dtype, name="fc")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
