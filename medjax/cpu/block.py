"""The paper CNN's block (3x3 conv -> batch norm -> ReLU -> 2x2/2 max pool) for XLA:CPU.

Pool first: normalising (x - mean) * scale * rsqrt(var + eps) + bias and the ReLU are monotone per
channel (increasing where the scale is positive, decreasing where negative; rounding is monotone too),
so max_pool(relu(bn(x))) == relu(bn(pool(x))) when channels with a negative scale pool the minimum.
The normalise, the activation and their gradients then run on the pooled quarter of the tensor. Batch
statistics are still those of the full-size x. Gradients equal flax's except where a window ties after
normalising but not before (a zero scale, rounding): either element is then a valid subgradient.

Fused first block: in training, a float32 block on 1 or 3 input channels (a multiple of 16 features, even
height and width) runs the convolution, the batch-norm moments and the pool in one C++ pass over the
images (`native.conv_bn_pool`) and its kernel gradient in another, so the full-size convolution output
and its gradient are never stored. Where the C++ kernels are not built, the pool-first path runs.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.cpu import native
from medjax.cpu.conv import ConvOptions, conv_with
from medjax.cpu import pool
from medjax.cpu.pool import max_pool


class BlockOptions(NamedTuple):
    """Which CPU methods `ConvBlock` may use (all on by default)."""

    fused_block: bool = True  # The C++ conv + moments + pool pass where it applies.
    pool_first: bool = True  # Pool before normalising (else nn.BatchNorm, ReLU, max_pool in order).
    conv: ConvOptions = ConvOptions()


@jax.custom_vjp
def _conv_pool_moments(x, kernel, sign):
    """(pooled, mean, mean_sq) of y = conv(x, kernel): the 2x2/2 max pool of y * sign, times sign, and
    y's per-channel first two moments, by `native.conv_bn_pool` (y never stored)."""
    pooled, moments = native.conv_bn_pool(x, kernel, sign)
    return pooled, moments[0], moments[1]


def _conv_pool_moments_fwd(x, kernel, sign):
    return _conv_pool_moments(x, kernel, sign), (x, kernel, sign)


def _conv_pool_moments_bwd(residuals, cotangents):
    x, kernel, sign = residuals
    pooled_cotangent, mean_cotangent, mean_sq_cotangent = cotangents
    count = x.shape[0] * x.shape[1] * x.shape[2]
    alpha, beta = mean_cotangent / count, 2 * mean_sq_cotangent / count
    kernel_cotangent = native.conv_bn_pool_kernel_grad(x, kernel, sign, pooled_cotangent, alpha, beta)

    # The input's cotangent materialises the convolution; XLA drops it all for a first layer's input.
    def conv(inputs):
        return lax.conv_general_dilated(
            inputs, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y, conv_vjp = jax.vjp(conv, x)
    geometry = ((2, 2), (2, 2), ((0, 0), (0, 0)))
    dy = pool._backward(y, pool._forward(y, *geometry, sign), pooled_cotangent, *geometry)
    return conv_vjp(dy + alpha + beta * y)[0], kernel_cotangent, jnp.zeros_like(sign)


_conv_pool_moments.defvjp(_conv_pool_moments_fwd, _conv_pool_moments_bwd)


class _PooledBatchNorm(nn.Module):
    """nn.BatchNorm's variables and statistics, followed by ReLU and a 2x2/2 max pool, pooling first."""

    momentum: float
    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool, conv_input=None, kernel=None):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        sign = jnp.where(scale < 0, -1, 1).astype(x.dtype)  # The normalising multiplier's sign.
        if not train:
            mean, var = ra_mean.value, ra_var.value
            pooled = max_pool(x, (2, 2), (2, 2), sign=sign)
        elif kernel is not None:
            pooled, mean, mean_sq = _conv_pool_moments(conv_input, kernel, sign)
            var = jnp.maximum(0.0, mean_sq - lax.square(mean))
        else:
            x32 = x.astype(jnp.float32)  # flax's fast variance, reduced in float32.
            mean, mean_sq = jnp.mean(x32, axis=(0, 1, 2)), jnp.mean(lax.square(x32), axis=(0, 1, 2))
            var = jnp.maximum(0.0, mean_sq - lax.square(mean))
            pooled = max_pool(x, (2, 2), (2, 2), sign=sign)
        if train and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = (pooled - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
        return nn.relu(jnp.asarray(y, nn.dtypes.canonicalize_dtype(pooled, scale, bias, dtype=self.dtype)))


class ConvBlock(nn.Module):
    """Drop-in for the paper CNN's block: the same fields and variables (conv/kernel, bn/{scale, bias},
    batch_stats bn/{mean, var}) as nn.Conv + nn.BatchNorm + ReLU + nn.max_pool 2x2/2."""

    features: int
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    options = BlockOptions()  # A class attribute, not a field; see `block_with`.

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv = conv_with(self.options.conv)(
            self.features, (3, 3), use_bias=False, dtype=self.dtype, name="conv"
        )
        conv_input, x = x, conv(x)
        if not self.options.pool_first:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                name="bn",
            )(x)
            return max_pool(nn.relu(x), (2, 2), (2, 2))
        kernel = None
        fusable = (
            self.options.fused_block
            and train
            and not self.is_initializing()
            and x.dtype == conv_input.dtype == jnp.float32
            and jax.default_backend() == "cpu"
            and native.supports_conv_bn_pool(
                conv_input.shape, (3, 3, conv_input.shape[-1], self.features), x.dtype
            )
        )
        if fusable and native.available():
            kernel = conv.variables["params"]["kernel"]  # x is then unused: XLA drops the convolution.
        bn = _PooledBatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")
        return bn(x, train, conv_input, kernel)


def block_with(options: BlockOptions) -> type:
    """ConvBlock using `options` (a subclass: the fields stay exactly ConvBlock's)."""
    return type("ConvBlock", (ConvBlock,), {"options": options, "__module__": __name__})
