"""ResNet v1.5 (He et al., 2016; stride on the 3x3 conv of bottlenecks), as torchvision's resnet18/34/50."""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any
STEMS = ("imagenet", "small")


def _shortcut(x, out_features: int, strides: int, conv: ModuleDef, norm: ModuleDef) -> jnp.ndarray:
    """x itself, or a 1x1 conv-BN projection (`downsample`) when the block changes the shape."""
    if strides == 1 and x.shape[-1] == out_features:
        return x
    return blocks.ConvBN(
        out_features, 1, conv=conv, norm=norm, strides=strides, activation=None, name="downsample"
    )(x)


def _last_norm(norm: ModuleDef, zero_init_residual: bool) -> ModuleDef:
    # Zero-init makes each residual branch start as the identity (Goyal et al., 2017).
    return functools.partial(norm, scale_init=nn.initializers.zeros) if zero_init_residual else norm


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers (`conv_bn1`, `conv_bn2`), plus the shortcut, then ReLU."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv_bn = functools.partial(blocks.ConvBN, conv=self.conv, norm=self.norm)
        y = conv_bn(self.features, 3, strides=self.strides, padding=1, name="conv_bn1")(x)
        y = conv_bn(
            self.features,
            3,
            norm=_last_norm(self.norm, self.zero_init_residual),
            padding=1,
            activation=None,
            name="conv_bn2",
        )(y)
        return nn.relu(y + _shortcut(x, self.features, self.strides, self.conv, self.norm))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (`conv_bn1..3`), plus the shortcut, then ReLU."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False
    expansion = 4  # Output channels per base width.

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv_bn = functools.partial(blocks.ConvBN, conv=self.conv, norm=self.norm)
        out_features = self.features * self.expansion
        y = conv_bn(self.features, 1, name="conv_bn1")(x)
        y = conv_bn(self.features, 3, strides=self.strides, padding=1, name="conv_bn2")(y)
        y = conv_bn(
            out_features,
            1,
            norm=_last_norm(self.norm, self.zero_init_residual),
            activation=None,
            name="conv_bn3",
        )(y)
        return nn.relu(y + _shortcut(x, out_features, self.strides, self.conv, self.norm))


class ResNet(nn.Module):
    """Stem, four stages (64, 128, 256, 512 base widths; stride 2 from the second), global pool, dense.

    `stem='imagenet'` is the published 7x7/2 conv + 3x3/2 max-pool (4x downsampling); `stem='small'` is a
    3x3/1 conv without max-pool, for small inputs (as for CIFAR): every stage then sees 16x the pixels
    (ResNet-18 at 64x64: 4.1 instead of 0.21 GFLOPs). Parameter counts differ only by the stem kernel.
    Submodules: `stem` (conv, bn), `layer{stage}_{block}` (stages from 1), `fc`.
    """

    num_classes: int
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    stem: str = "imagenet"
    width: int = 64
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    max_pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.stem not in STEMS:
            raise ValueError(f"Unknown ResNet stem={self.stem!r}; known: {STEMS}")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = blocks.ConvBN(self.width, 7, conv=conv, norm=norm, strides=2, padding=3, name="stem")(x)
            x = self.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = blocks.ConvBN(self.width, 3, conv=conv, norm=norm, strides=1, padding=1, name="stem")(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    features=self.width * 2**i,
                    conv=conv,
                    norm=norm,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{i + 1}_{j}",
                )(x)
        x = blocks.global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
