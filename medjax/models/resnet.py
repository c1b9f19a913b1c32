"""ResNet v1.5 (He et al., 2016; stride on the 3x3 conv of bottlenecks), as torchvision's resnet18/34/50."""

from typing import Any, Sequence, Type

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks
from medjax.models import layers

STEMS = ("imagenet", "small")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a projection shortcut when the shape changes."""

    features: int
    strides: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    def _conv_bn(self, *args, **kwargs) -> blocks.ConvBN:
        return blocks.ConvBN(
            *args, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype, **kwargs
        )

    def _last_scale_init(self):
        # Zero-init makes each residual branch start as the identity (Goyal et al., 2017).
        return nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones

    def _shortcut(self, x: jnp.ndarray, out_features: int, train: bool) -> jnp.ndarray:
        if self.strides == 1 and x.shape[-1] == out_features:
            return x
        return self._conv_bn(out_features, 1, self.strides, activation=None, name="downsample")(
            x, train=train
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = self._conv_bn(self.features, 3, self.strides, padding=1, name="conv_bn1")(x, train=train)
        y = self._conv_bn(
            self.features,
            3,
            padding=1,
            activation=None,
            bn_scale_init=self._last_scale_init(),
            name="conv_bn2",
        )(y, train=train)
        return nn.relu(y + self._shortcut(x, self.features, train))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a projection shortcut when the shape changes."""

    expansion = 4  # Output channels per base width.

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        out_features = self.features * self.expansion
        y = self._conv_bn(self.features, 1, name="conv_bn1")(x, train=train)
        y = self._conv_bn(self.features, 3, self.strides, padding=1, name="conv_bn2")(y, train=train)
        y = self._conv_bn(
            out_features, 1, activation=None, bn_scale_init=self._last_scale_init(), name="conv_bn3"
        )(y, train=train)
        return nn.relu(y + self._shortcut(x, out_features, train))


class ResNet(nn.Module):
    """Stem, four stages (64, 128, 256, 512 base widths; stride 2 from the second), global pool, dense.

    `stem='imagenet'` is the published 7x7/2 conv + 3x3/2 max-pool (4x downsampling); `stem='small'` is a
    3x3/1 conv without max-pool, for small inputs (as for CIFAR): every stage then sees 16x the pixels
    (ResNet-18 at 64x64: 4.1 instead of 0.21 GFLOPs). Parameter counts differ only by the stem kernel.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: Type[BasicBlock] = BasicBlock
    stem: str = "imagenet"
    width: int = 64
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.stem not in STEMS:
            raise ValueError(f"Unknown ResNet stem={self.stem!r}; known: {STEMS}")
        x = x.astype(self.dtype)
        bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
        if self.stem == "imagenet":
            # Plain autodiff for this batch norm: replaying it in the backward pass (as every other one)
            # made XLA:CPU materialise the nine window pieces of the max-pool gradient, and ResNet-18 at
            # 64x64, batch 128, took 7% longer per step with 438 instead of 390 MiB of XLA temp buffers.
            x = blocks.ConvBN(self.width, 7, 2, padding=3, bn_rematerialize=False, name="stem", **bn)(
                x, train=train
            )
            x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = blocks.ConvBN(self.width, 3, 1, padding=1, name="stem", **bn)(x, train=train)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block(
                    self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                    **bn,
                )(x, train=train)
        x = blocks.global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
