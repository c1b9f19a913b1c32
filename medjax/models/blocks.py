"""Plain flax helpers shared by the model zoo: conv -> norm -> activation, and the PyTorch / TensorFlow
padding and pooling rules that the published models use (ceil-mode max-pooling, adaptive average
pooling, TensorFlow 'SAME' padding)."""

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ModuleDef = Any


def pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
    """conv -> norm -> activation as submodules `conv` and `bn`, like torchvision's BasicConv2d.

    `conv` and `norm` arrive bound to the model's dtype, bias and batch-norm settings (partials of the
    model's own `conv` and `norm` fields)."""

    features: int
    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    padding: Any = 0  # An int (symmetric), 'SAME'/'VALID' or ((lo, hi), (lo, hi)).
    activation: Optional[Callable] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.conv(
            self.features,
            pair(self.kernel_size),
            strides=pair(self.strides),
            padding=self.padding,
            name="conv",
        )(x)
        x = self.norm(name="bn")(x)
        return x if self.activation is None else self.activation(x)


def tf_same_padding(spatial_shape, kernel_size, strides) -> tuple[tuple[int, int], ...]:
    """TensorFlow 'SAME' padding as explicit pairs: output ceil(n / stride), extra pixel at the end."""
    pads = []
    for n, k, s in zip(spatial_shape, pair(kernel_size), pair(strides)):
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
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


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
    (h, w), (oh, ow) = x.shape[1:3], pair(output_size)
    if h % oh == 0 and w % ow == 0:
        if (h, w) == (oh, ow):
            return x
        return nn.avg_pool(x, (h // oh, w // ow), strides=(h // oh, w // ow))
    rows = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    cols = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """[N, H, W, C] -> [N, C]."""
    return adaptive_avg_pool(x, 1).reshape((x.shape[0], -1))
