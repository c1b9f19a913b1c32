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


def _forward(x, scale, bias, mean, var, *, statistics: Optional[dict], activation, normalize, zero=None):
    """Normalised (and activated) `x` and the statistics used: the batch's when `statistics` says how to
    compute them, else `mean` and `var`. A `zero` is added to the statistics that normalise `x`."""
    if statistics is not None:
        mean, var = flax_normalization._compute_stats(x, **statistics)
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


class BatchNorm(nn.Module):
    """`nn.BatchNorm` (same fields, variables and numerics; no `mask`) with an optional fused
    `activation`, by default replayed in the backward pass instead of saving its intermediates."""

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

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: Optional[bool] = None) -> jnp.ndarray:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes = flax_normalization._canonicalize_axes(x.ndim, self.axis)
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
        forward = functools.partial(
            _forward, statistics=statistics, activation=self.activation, normalize=normalize
        )
        if self.rematerialize:
            forward = _replayed(forward)  # Saves x, scale, bias (and running statistics) only.
        y, mean, var = forward(x, scale, bias, mean, var)

        if not use_running_average and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
