"""AlexNet (torchvision's single-tower variant) and ZFNet (Zeiler & Fergus, 2013): one module, two specs.

Both keep their published layers and end with PyTorch-style adaptive average pooling to a 6x6 grid, so
the 9216-wide classifier (and the parameter count) is the published one at any input size; at 64x64 the
last feature map is 1x1 and is repeated over the grid, exactly as torchvision's AlexNet does.
"""

import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any


class ConvSpec(NamedTuple):
    features: int
    kernel: int
    stride: int
    padding: int
    pool: Optional[str] = None  # After the ReLU: None, 'floor' or 'ceil' 3x3 stride-2 max-pooling.


# torchvision.models.alexnet (Krizhevsky, "One weird trick", 2014): 61,100,840 params at 224x224x3/1000.
ALEXNET = (
    ConvSpec(64, 11, 4, 2, "floor"),
    ConvSpec(192, 5, 1, 2, "floor"),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(256, 3, 1, 1),
    ConvSpec(256, 3, 1, 1, "floor"),
)

# ZFNet, Fig. 3 of arXiv:1311.2901: 96 7x7/2, 256 5x5/2, 384, 384, 256 3x3/1. Paddings and ceil-mode pools
# reproduce the figure's maps at 224x224: 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6. Its local contrast
# normalisation (no parameters) is left out, as torchvision leaves out AlexNet's.
ZFNET = (
    ConvSpec(96, 7, 2, 1, "ceil"),
    ConvSpec(256, 5, 2, 0, "ceil"),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(256, 3, 1, 1, "floor"),
)


class AlexNet(nn.Module):
    """Conv-ReLU(-max-pool) features, adaptive 6x6 average pool, dropout-4096-dropout-4096-class head."""

    num_classes: int
    convs: Sequence[ConvSpec] = ALEXNET
    dense_features: int = 4096
    pool_size: int = 6
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        x = x.astype(self.dtype)
        for i, spec in enumerate(self.convs):
            x = conv(
                spec.features,
                (spec.kernel, spec.kernel),
                strides=(spec.stride, spec.stride),
                padding=spec.padding,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)
            if spec.pool == "floor":
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
            elif spec.pool == "ceil":
                x = blocks.max_pool_ceil(x, 3, 2)
        x = blocks.adaptive_avg_pool(x, self.pool_size).reshape((x.shape[0], -1))
        for i in range(2):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
