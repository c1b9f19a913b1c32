"""Max pooling for XLA:CPU: a max over strided window slices with a custom gradient.

XLA:CPU's max-pool gradient (reduce-window with argmax, then a scatter) is one of the slowest ops of a CNN
train step on CPU. Here the forward pass is a max of window slices (a reshape when windows tile the
input), and the gradient sends each output's cotangent to the first maximum of its window, as XLA's does,
with elementwise compares and pads that XLA fuses.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def window_slices(x, window, strides, out_shape):
    """Yields (i, j, x[:, i::sh, j::sw, :] cropped to out_shape) for each window offset, row-major."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out_shape
    for i in range(kh):
        for j in range(kw):
            end = (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3])
            yield i, j, lax.slice(x, (0, i, j, 0), end, (1, sh, sw, 1))


def pad_spatial(x, pads, value=0):
    """NHWC x padded by pads ((top, bottom), (left, right)) with `value`."""
    if all(lo == hi == 0 for lo, hi in pads):
        return x
    config = ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def explicit_padding(padding, in_shape, window, strides):
    """'SAME'/'VALID'/int/pairs -> ((lo, hi), ...); None for paddings this module does not handle."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None
        return tuple(tuple(p) for p in lax.padtype_to_pads(in_shape, window, strides, padding.upper()))
    return tuple((int(lo), int(hi)) for lo, hi in nn.linear.canonicalize_padding(padding, len(window)))


def _tiles(x_shape, window, strides, pads) -> bool:
    """Whether the windows tile the input exactly (pooling is then a reshape)."""
    unpadded = all(lo == hi == 0 for lo, hi in pads)
    return window == strides and unpadded and x_shape[1] % window[0] == 0 and x_shape[2] % window[1] == 0


def _forward(x, window, strides, pads, sign=None):
    n, h, w, c = x.shape
    if sign is not None:
        x = x * sign
    if _tiles(x.shape, window, strides, pads) and sign is None:
        kh, kw = window
        return jnp.max(x.reshape(n, h // kh, kh, w // kw, kw, c), axis=(2, 4))
    xp = pad_spatial(x, pads, -jnp.inf)
    out = tuple((xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(2))
    y = None
    for _, _, piece in window_slices(xp, window, strides, out):
        y = piece if y is None else jnp.maximum(y, piece)
    return y if sign is None else y * sign


def _backward(x, y, g, window, strides, pads):
    """Each output's cotangent goes to the first element of its window equal to the output."""
    n, h, w, c = x.shape
    if _tiles(x.shape, window, strides, pads):
        # The offset of each window's first hit, then one elementwise pass in x's own layout.
        (kh, kw), (oh, ow) = window, y.shape[1:3]
        xr = x.reshape(n, oh, kh, ow, kw, c)
        first = jnp.full(y.shape, kh * kw, jnp.int32)
        for k in reversed(range(kh * kw)):
            first = jnp.where(xr[:, :, k // kw, :, k % kw, :] == y, k, first)
        offset = (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)[None, :]).reshape(1, 1, kh, 1, kw, 1)
        dx = jnp.where(offset == first[:, :, None, :, None, :], g[:, :, None, :, None, :], 0)
        return dx.astype(g.dtype).reshape(x.shape)
    xp = pad_spatial(x, pads, -jnp.inf)
    (sh, sw), (_, hp, wp, _), (oh, ow) = strides, xp.shape, y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = None
    for i, j, piece in window_slices(xp, window, strides, (oh, ow)):
        hit = (piece == y) & ~taken
        taken = taken | hit
        config = ((0, 0, 0), (i, hp - i - sh * (oh - 1) - 1, sh - 1), (j, wp - j - sw * (ow - 1) - 1, sw - 1))
        part = lax.pad(
            jnp.where(hit, g, jnp.zeros((), g.dtype)), jnp.zeros((), g.dtype), config + ((0, 0, 0),)
        )
        dxp = part if dxp is None else dxp + part
    (top, _), (left, _) = pads
    return lax.slice(dxp, (0, top, left, 0), (n, top + h, left + w, c))


_max_pool = jax.custom_vjp(_forward, nondiff_argnums=(1, 2, 3))


def _max_pool_fwd(x, window, strides, pads, sign):
    y = _forward(x, window, strides, pads, sign)
    return y, (x, y, sign)


def _max_pool_bwd(window, strides, pads, residuals, g):
    # y holds x's selected elements themselves, so x == y finds them (sign * x is never kept).
    x, y, sign = residuals
    return _backward(x, y, g, window, strides, pads), None if sign is None else jnp.zeros_like(sign)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs, window_shape, strides=None, padding="VALID", sign=None):
    """nn.max_pool for NHWC inputs (other ranks and paddings fall back to it). `sign`, a [C] array of +-1,
    makes the -1 channels take the window minimum instead."""
    window = tuple(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    pads = explicit_padding(padding, inputs.shape[1:3], window, strides) if inputs.ndim == 4 else None
    if pads is None or len(window) != 2:
        if sign is None:
            return nn.max_pool(inputs, window, strides=strides, padding=padding)
        return nn.max_pool(inputs * sign, window, strides=strides, padding=padding) * sign
    return _max_pool(inputs, window, strides, pads, None if sign is None else jnp.asarray(sign, inputs.dtype))
