"""Batch norm that keeps fewer activations for the backward pass than flax's `nn.BatchNorm`.

JAX's autodiff of `nn.BatchNorm` followed by a ReLU saves, per layer, the centred input `x - mean`, the
`2 x` of the variance's `x ** 2` and the ReLU's mask besides the BN input, where PyTorch keeps the BN
input and the conv input (which JAX keeps too; PyTorch's ReLU runs in place). `BatchNorm` here computes
exactly what `nn.BatchNorm` computes (the same jnp operations in the same order, flax's own statistics
function), optionally followed by an activation such as `nn.relu`, but its backward pass keeps only
the inputs (BN input, scale, bias) and replays the forward function to differentiate it: `jax.vjp` of
the same function, so gradients are autodiff's through `nn.BatchNorm`, not a hand-written batch-norm
gradient. The replay is elementwise work fused into the gradient's own passes over the input, plus the
per-channel mean and mean square (which XLA may reuse from the forward pass).

`jax.checkpoint` gives the same residuals, but XLA:CPU drops optimization barriers before scheduling,
ran the recomputation early, in the forward pass, and kept `x - mean` alive until the backward pass:
ResNet-18 (3x3/1 stem, batch 128, 64x64) needed 3,375 MiB of XLA temp buffers with it, 2,757 MiB with
this VJP and 3,957 MiB with `nn.BatchNorm`. Here the replay normalises with the statistics plus a zero
computed from the output cotangent, a data dependency that no XLA pass removes, so it cannot run before
the backward pass reaches the layer.

The replay is on for every backend, not only for the CPU path of `layers`: the memory saved does not
depend on the backend, and the recomputed work is elementwise on a tensor that the backward pass reads
anyway (cuDNN's and PyTorch's batch norm also save only the input and per-channel statistics). On this
project's 2-core CPU the train step got no slower (same-process A/B against plain autodiff of the same
function: ResNet-18 at 64x64, batch 128, 5% faster with the 3x3/1 stem and 2.5% with the 7x7/2 stem;
paper CNN equal). It has not been timed on a GPU or TPU, where batch norm's backward pass is
memory-bound: fewer saved tensors should mean fewer bytes moved, but the recompute could cost a little
there. `rematerialize=False` gives plain autodiff (and allows forward-mode `jax.jvp`, which JAX does
not support through a custom VJP); ResNet's 7x7/2 stem uses it, see `resnet.py`: XLA's fusion choices
around the max-pool gradient that follows it made the replay there slower and bigger.

`max_pool=layers.MaxPool(...)` also max-pools the output, pooling first (see `_pool_first`): the
normalise, the activation and their gradients then run on the pooled quarter of the tensor. The paper
CNN's batch norm + ReLU + 2x2 pool (batch 128, forward and backward, ms): 23.4 -> 12.6 at 64x64x16, 8.9 ->
4.9 at 32x32x32, 3.1 -> 1.7 at 16x16x64; its train step 1.13-1.33x faster. With overlapping windows
(ResNet's 3x3/2 stem pool) XLA:CPU fused the pool gradient's window comparisons into each of its nine
summed pieces and the block took 89 instead of 39 ms, so ResNet keeps that pool separate.

Given the convolution before it (`conv=`, `conv_input=`; the paper CNN's blocks pass them), a training
batch norm with a 2x2/2 `max_pool` on the CPU runs the convolution too where `native.conv_bn_pool`
takes it (`_fusable_conv_kernel`: float32, a 3x3 stride-1 'SAME' kernel on 1 or 3 input channels, a
multiple of 16 output channels, no bias): one C++ pass over the images computes the pooled output and the
batch moments, and one more the kernel gradient, so the full-size convolution output and its gradient are
never stored; the normalise, the activation and the statistics' gradients are autodiff's on the pooled
quarter. The paper CNN's first block (64x64x16, batch 128) went from ~15 to ~8 ms of op time a step, the
whole step 1.12x faster (alternating live workers, 12 of 12 blocks), peak RSS 424 vs 433 MiB.

Variables are those of `nn.BatchNorm` (params `scale`/`bias`, batch_stats `mean`/`var`, same shapes,
dtypes and initializers) and the class is also named `BatchNorm`, so auto-named modules keep their names
(`BatchNorm_0`) and checkpoints and converted weights load into either.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from flax.linen import normalization as flax_normalization
from jax import lax

from medjax import native
from medjax.models import layers

# Monotone non-decreasing in float arithmetic, so max-pooling commutes with them.
_POOL_COMMUTING_ACTIVATIONS = (None, nn.relu)


def _normalize(
    x, mean, var, scale, bias, *, reduction_axes, feature_shape, epsilon, dtype, param_dtype, cast
):
    """flax's `_normalize` without its parameter creation: (x - mean) * rsqrt(var + eps) * scale + bias."""
    mean = jnp.expand_dims(mean, reduction_axes)
    var = jnp.expand_dims(var, reduction_axes)
    y = x - mean
    mul = lax.rsqrt(var + epsilon)
    args = [x]
    if scale is not None:
        scale = scale.reshape(feature_shape)
        if cast:
            scale = jnp.asarray(scale, param_dtype)
        mul *= scale
        args.append(scale)
    y *= mul
    if bias is not None:
        bias = bias.reshape(feature_shape)
        if cast:
            bias = jnp.asarray(bias, param_dtype)
        y += bias
        args.append(bias)
    return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=dtype))


def _pool_first(x, scale, max_pool: Callable):
    """The values of `x` that `max_pool` would select after normalising: per channel, the window maximum
    where the normalising multiplier `scale * rsqrt(var + eps)` is positive, the minimum where negative.

    Subtracting the mean, multiplying by the multiplier, adding the bias and a ReLU are each monotone in
    float arithmetic too (rounding is monotone), so max_pool(relu(normalize(x))) equals
    relu(normalize(this)) exactly, and the full-size normalise and activation (and their gradients)
    shrink to the pooled size. Gradients are the unfused ones except where a window ties after
    normalising but not before (a zero scale, or rounding): then the window maximum of `x` gets the
    cotangent, not the window's first element; both are valid subgradients.
    """
    if scale is None:
        return max_pool(x)
    sign = jnp.where(scale < 0, -1, 1).astype(x.dtype)  # rsqrt(var + eps) > 0: the multiplier's sign.
    return max_pool(x, sign=sign)


def _forward(
    x, scale, bias, mean, var, *, statistics: Optional[dict], activation, normalize, max_pool=None, zero=None
):
    """Normalised (activated, max-pooled) `x` and the statistics used: the batch's when `statistics` says
    how to compute them, else `mean` and `var`. A `zero` is added to the statistics that normalise `x`."""
    if statistics is not None:
        mean, var = flax_normalization._compute_stats(x, **statistics)
    if max_pool is not None:
        x = _pool_first(x, scale, max_pool)
    if zero is None:
        y = normalize(x, mean, var, scale, bias)
    else:
        y = normalize(x, mean + zero.astype(mean.dtype), var + zero.astype(var.dtype), scale, bias)
    if activation is not None:
        y = activation(y)
    return y, mean, var


def _replayed(forward: Callable) -> Callable:
    """`forward` (as `_forward`, its keywords bound) differentiated by replaying it in the backward pass.

    The VJP keeps only the arguments (x, scale, bias, running statistics). The backward pass recomputes
    `forward` from them and applies `jax.vjp(forward, ...)` to the cotangents, so gradients are
    autodiff's. The replay normalises with statistics plus a zero computed from the output cotangent
    (m + 0 == m): that orders every full-size recomputation after the cotangent exists (XLA:CPU ignores
    `lax.optimization_barrier` when it schedules) and keeps XLA from merging it with the forward pass.
    A non-finite first element of the output cotangent therefore makes all of this layer's gradients
    NaN, not only its channel's (the convolution before it mixes the channels anyway).
    """

    @jax.custom_vjp
    def replayed(*args):
        return forward(*args)

    def replayed_fwd(*args):
        return forward(*args), args

    def replayed_bwd(args, cotangents):
        zero = cotangents[0].reshape(-1)[0] * 0
        return jax.vjp(functools.partial(forward, zero=zero), *args)[1](cotangents)

    replayed.defvjp(replayed_fwd, replayed_bwd)
    return replayed


def _moments_to_variance(mean, mean_sq):
    """flax's fast variance from the first two moments: E[x^2] - E[x]^2, clipped at zero."""
    return jnp.maximum(0.0, mean_sq - lax.square(mean))


@jax.custom_vjp
def _conv_pool_moments(x, kernel, sign):
    """(pooled, mean, mean_sq) of y = conv(x, kernel) ('SAME', stride 1): the 2x2/2 max pool of y * sign,
    times sign, and y's per-channel mean and mean square, by `native.conv_bn_pool` (y never stored)."""
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

    # The input's cotangent, with the convolution's output materialised; XLA drops all of it when the
    # input needs no gradient (a first layer), and nothing else here keeps it.
    def conv(inputs):
        return lax.conv_general_dilated(
            inputs, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y, conv_vjp = jax.vjp(conv, x)
    pooled = layers._max_pool_forward(y, (2, 2), (2, 2), ((0, 0), (0, 0)), sign)
    dy = layers._max_pool_backward(y, pooled, pooled_cotangent, (2, 2), (2, 2), ((0, 0), (0, 0)))
    dy = dy + alpha + beta * y
    return conv_vjp(dy)[0], kernel_cotangent, jnp.zeros_like(sign)


_conv_pool_moments.defvjp(_conv_pool_moments_fwd, _conv_pool_moments_bwd)


def _fusable_conv_kernel(conv, conv_input, x) -> Optional[jnp.ndarray]:
    """The kernel of `conv` if conv(conv_input) = x can run fused into the batch norm after it
    (`native.conv_bn_pool`): a bound `layers.Conv`, float32, stride 1, 'SAME' padding, no bias, dilation,
    groups or mask, on the CPU backend with the native kernels built. Else None."""
    if not (isinstance(conv, layers.Conv) and layers.use_fast_path() and jax.default_backend() == "cpu"):
        return None
    kernel = conv.variables.get("params", {}).get("kernel")
    if kernel is None or kernel.ndim != 4 or conv_input is None or conv_input.ndim != 4:
        return None
    same = tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2])
    if not (
        conv.feature_group_count == 1
        and not conv.use_bias
        and conv.mask is None
        and conv.precision in (None, lax.Precision.HIGHEST)
        and conv.dtype in (None, jnp.float32)
        and layers._pairs(conv.strides, 2) == (1, 1)
        and layers._pairs(conv.input_dilation, 2) == layers._pairs(conv.kernel_dilation, 2) == (1, 1)
        and layers._explicit_padding(conv.padding, conv_input.shape[1:3], kernel.shape[:2], (1, 1)) == same
        and kernel.dtype == conv_input.dtype == x.dtype == jnp.float32
        and x.shape == conv_input.shape[:3] + kernel.shape[3:]
        and native.supports_conv_bn_pool(conv_input.shape, kernel.shape, kernel.dtype)
    ):
        return None
    return kernel if native.available() else None


class BatchNorm(nn.Module):
    """`nn.BatchNorm` (same fields, variables and numerics; no `mask`) with an optional fused
    `activation` and `max_pool`, by default replayed in the backward pass instead of saving its
    intermediates."""

    use_running_average: Optional[bool] = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: Optional[str] = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: Optional[Callable] = None  # Applied to the output, inside the replayed function.
    rematerialize: bool = True  # Replay in the backward pass (see the module docstring); else autodiff.
    # Max-pool the (activated) output, pooling before normalising (exact; see `_pool_first` and the
    # module docstring: faster for non-overlapping windows, slower for overlapping ones on XLA:CPU).
    max_pool: Optional[layers.MaxPool] = None

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        use_running_average: Optional[bool] = None,
        *,
        conv: Optional[nn.Module] = None,
        conv_input: Optional[jnp.ndarray] = None,
    ) -> jnp.ndarray:
        """Normalises x. `conv` and `conv_input`, if given, are the bound `layers.Conv` that computed x and
        its input: where `_fusable_conv_kernel` allows (training, 2x2/2 `max_pool`, a first layer's few
        input channels on the CPU), the layer is computed from them in one native pass instead and x is
        left unused (XLA drops the convolution)."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes = flax_normalization._canonicalize_axes(x.ndim, self.axis)
        if self.max_pool is not None:
            self._check_pool_fusable(x.ndim, feature_axes)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        reduced_feature_shape = [x.shape[ax] for ax in feature_axes]
        feature_shape = [x.shape[ax] if ax in feature_axes else 1 for ax in range(x.ndim)]
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), reduced_feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), reduced_feature_shape
        )
        # Parameters in nn.BatchNorm's order: scale, then bias.
        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, reduced_feature_shape, self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, reduced_feature_shape, self.param_dtype)

        normalize = functools.partial(
            _normalize,
            reduction_axes=reduction_axes,
            feature_shape=feature_shape,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            cast=not self.force_float32_reductions,
        )
        if use_running_average:
            mean, var, statistics = ra_mean.value, ra_var.value, None
            if not self.force_float32_reductions:
                mean, var = jnp.asarray(mean, self.param_dtype), jnp.asarray(var, self.param_dtype)
        else:
            mean = var = None
            statistics = dict(
                axes=reduction_axes,
                dtype=self.dtype,
                axis_name=self.axis_name if not self.is_initializing() else None,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance,
                force_float32_reductions=self.force_float32_reductions,
            )
        kernel = None
        if conv is not None and not use_running_average and not self.is_initializing() and self._pools_2x2(x):
            kernel = _fusable_conv_kernel(conv, conv_input, x)
        if kernel is not None:
            # The full-size convolution output and its gradient are never stored; the normalise, the
            # activation and their gradients (autodiff's) run on the pooled quarter.
            sign = jnp.ones(x.shape[-1:], x.dtype) if scale is None else jnp.where(scale < 0, -1.0, 1.0)
            pooled, mean, mean_sq = _conv_pool_moments(conv_input, kernel, sign.astype(x.dtype))
            var = _moments_to_variance(mean, mean_sq)
            y = normalize(pooled, mean, var, scale, bias)
            if self.activation is not None:
                y = self.activation(y)
        else:
            forward = functools.partial(
                _forward,
                statistics=statistics,
                activation=self.activation,
                normalize=normalize,
                max_pool=self.max_pool,
            )
            if self.rematerialize:
                forward = _replayed(forward)  # Saves x, scale, bias (and running statistics) only.
            y, mean, var = forward(x, scale, bias, mean, var)

        if not use_running_average and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y

    def _pools_2x2(self, x) -> bool:
        """Whether this layer normalises float32 statistics of x (as flax's fast variance, unsharded) and
        2x2/2 max-pools its output: what `native.conv_bn_pool` computes."""
        pool = self.max_pool
        return (
            pool is not None
            and tuple(pool.window) == (2, 2)
            and pool.strides is not None
            and tuple(pool.strides) == (2, 2)
            and isinstance(pool.padding, str)
            and pool.padding.upper() == "VALID"
            and self.use_fast_variance
            and self.force_float32_reductions
            and self.axis_name is None
            and self.dtype in (None, jnp.float32)
            and self.param_dtype == jnp.float32
            and x.dtype == jnp.float32
        )

    def _check_pool_fusable(self, ndim: int, feature_axes) -> None:
        if self.activation not in _POOL_COMMUTING_ACTIVATIONS:
            raise ValueError(
                f"BatchNorm {self.name!r}: max_pool={self.max_pool} needs activation None or nn.relu "
                f"(pooling first is exact only for them), got activation={self.activation!r}"
            )
        if ndim != 4 or feature_axes != (3,):
            raise ValueError(
                f"BatchNorm {self.name!r}: max_pool={self.max_pool} needs [N, H, W, C] input normalised "
                f"over its last axis, got a {ndim}-d input with axis={self.axis}"
            )
