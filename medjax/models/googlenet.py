"""GoogLeNet / Inception v1 (Szegedy et al., 2015), matching torchvision's googlenet without auxiliary heads.

Like torchvision (6,624,904 params at 224x224x3/1000), every conv is conv-BN-ReLU (BN epsilon 1e-3, which
the paper predates), the "5x5" branch uses a 3x3 kernel (a known torchvision quirk kept for its weights),
the max-pools use ceil mode, and the auxiliary classifiers (training-only in the paper) are omitted.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any

# (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) output channels per Inception module.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1-3x3; 1x1-3x3; 3x3 max-pool-1x1."""

    widths: tuple
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        def conv_bn(features, kernel, name):
            return blocks.ConvBN(
                features, kernel, conv=self.conv, norm=self.norm, padding=kernel // 2, name=name
            )

        c1, c3r, c3, c5r, c5, cp = self.widths
        b1 = conv_bn(c1, 1, "branch1")(x)
        b2 = conv_bn(c3r, 1, "branch2_0")(x)
        b2 = conv_bn(c3, 3, "branch2_1")(b2)
        b3 = conv_bn(c5r, 1, "branch3_0")(x)
        b3 = conv_bn(c5, 3, "branch3_1")(b3)
        b4 = blocks.max_pool_ceil(x, 3, 1, padding=1)
        b4 = conv_bn(cp, 1, "branch4_1")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(nn.Module):
    """Stem (7x7/2, pool, 1x1, 3x3, pool), Inception 3a-3b, pool, 4a-4e, pool, 5a-5b, pool, dropout, fc."""

    num_classes: int
    dropout_rate: float = 0.2
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3
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
        conv_bn = functools.partial(blocks.ConvBN, conv=conv, norm=norm)
        x = x.astype(self.dtype)
        x = conv_bn(64, 7, strides=2, padding=3, name="conv1")(x)
        x = blocks.max_pool_ceil(x, 3, 2)
        x = conv_bn(64, 1, name="conv2")(x)
        x = conv_bn(192, 3, padding=1, name="conv3")(x)
        x = blocks.max_pool_ceil(x, 3, 2)
        # Inception stages, each followed by a ceil-mode max-pool (window, stride) except the last.
        for stage, pool in (
            (("3a", "3b"), (3, 2)),
            (("4a", "4b", "4c", "4d", "4e"), (2, 2)),
            (("5a", "5b"), None),
        ):
            for name in stage:
                x = Inception(INCEPTION[name], conv=conv, norm=norm, name=f"inception{name}")(x)
            if pool:
                x = blocks.max_pool_ceil(x, *pool)
        x = blocks.global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
