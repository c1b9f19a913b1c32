"""Building blocks shared by the model zoo: conv-BN-activation, PyTorch/TensorFlow padding rules and
adaptive pooling. Convolution and pooling go through `medjax.models.layers`, batch norm through
`medjax.models.normalization`."""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medjax.models import layers
from medjax.models import normalization

Padding = Any  # An int (symmetric), a string ('SAME'/'VALID') or ((lo, hi), (lo, hi)).


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def batch_norm(
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    dtype: Any,
    activation: Optional[Callable] = None,
    name: Optional[str] = None,
    **kwargs,
) -> normalization.BatchNorm:
    """Batch norm (then `activation`, if any) that uses batch statistics in training and running
    averages otherwise; `nn.BatchNorm`'s variables, rematerialised in the backward pass."""
    return normalization.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        activation=activation,
        name=name,
        **kwargs,
    )


class ConvBN(nn.Module):
    """Conv -> batch norm -> activation (submodules `conv`, `bn`, like torchvision's BasicConv2d)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Padding = 0
    use_bias: bool = False
    feature_group_count: int = 1
    activation: Optional[Callable] = nn.relu
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_scale_init: Callable = nn.initializers.ones
    bn_rematerialize: bool = True  # See medjax.models.normalization; False: plain autodiff.
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = layers.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=_pair(self.strides),
            padding=self.padding,
            use_bias=self.use_bias,
            feature_group_count=self.feature_group_count,
            dtype=self.dtype,
            name="conv",
        )(x)
        return batch_norm(
            train=train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            scale_init=self.bn_scale_init,
            activation=self.activation,  # Inside the batch norm's rematerialised function.
            rematerialize=self.bn_rematerialize,
            name="bn",
        )(x)


def tf_same_padding(spatial_shape, kernel_size, strides) -> tuple[tuple[int, int], ...]:
    """TensorFlow 'SAME' padding as explicit pairs: output ceil(n / stride), extra pixel at the end."""
    pads = []
    for n, k, s in zip(spatial_shape, _pair(kernel_size), _pair(strides)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def max_pool_ceil(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
    """PyTorch `MaxPool2d(window, stride, padding, ceil_mode=True)`: a partial last window is kept."""
    pads = []
    for n in x.shape[1:3]:
        out = math.ceil((n + 2 * padding - window) / stride) + 1
        if (out - 1) * stride >= n + padding:  # The last window must start inside the input.
            out -= 1
        pads.append((padding, (out - 1) * stride + window - n - padding))
    return layers.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of PyTorch's adaptive pooling bins."""
    matrix = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def adaptive_avg_pool(x: jnp.ndarray, output_size) -> jnp.ndarray:
    """PyTorch `AdaptiveAvgPool2d` on NHWC input.

    Evenly divisible sizes (global pooling, or an identity) are a plain average pool; otherwise each
    output cell averages its PyTorch bin (bins may overlap, or repeat input cells when upsampling, as
    with AlexNet's 1x1 -> 6x6 at 64x64 inputs), written as two small averaging matrices.
    """
    (h, w), (oh, ow) = x.shape[1:3], _pair(output_size)
    if h % oh == 0 and w % ow == 0:
        if (h, w) == (oh, ow):
            return x
        return layers.avg_pool(x, (h // oh, w // ow), strides=(h // oh, w // ow))
    rows = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    cols = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """[N, H, W, C] -> [N, C]."""
    return adaptive_avg_pool(x, 1).reshape((x.shape[0], -1))
