"""Convolution for XLA:CPU: nn.Conv whose 2-D convolutions, where the input or output is smaller than the
kernel (ResNet's last stage at 64x64), run as patches @ kernel and its transpose: XLA:CPU's convolution
falls off its fast path there. Anything else is XLA's convolution, exactly as nn.Conv computes it.
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.cpu.pool import explicit_padding, pad_spatial, window_slices

NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


class ConvOptions(NamedTuple):
    """Which CPU methods `conv_general_dilated` may use (all on by default; off: XLA's convolution)."""

    small_patches: bool = True  # Patches where the input or output is smaller than the kernel.


def _out_size(n, k, s):
    return (n - k) // s + 1


def _xla_conv(x, kernel, strides, pads, precision=None):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC, precision=precision)


def _patches_conv(x, kernel, strides, pads, precision=None):
    """The convolution as patches [n * oh * ow, kh * kw * cin] @ kernel."""
    kh, kw, cin, cout = kernel.shape
    xp = pad_spatial(x, pads)
    out = tuple(_out_size(xp.shape[1 + d], kernel.shape[d], strides[d]) for d in range(2))
    pieces = [piece for _, _, piece in window_slices(xp, (kh, kw), strides, out)]
    patches = jnp.stack(pieces, axis=3).reshape(-1, kh * kw * cin)
    y = lax.dot_general(patches, kernel.reshape(-1, cout), (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape((x.shape[0],) + out + (cout,))


def _unfused(x):
    """x read from its own buffer by its consumers: XLA:CPU would otherwise recompute a cheap producer
    inside the transpose that its kernel-gradient convolution adds. A conditional (fusion never crosses
    one; its branches differ in form only) keeps it apart where an optimization barrier does not."""
    first = x[(0,) * x.ndim]
    return lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


class _Plan(NamedTuple):
    forward: str  # 'xla' or 'patches'
    input_grad: str  # 'xla' or 'patches'


def plan(x_shape, kernel_shape, strides, pads, options: ConvOptions) -> _Plan:
    """Which method computes each pass of this convolution."""
    kh, kw = kernel_shape[:2]
    out = [_out_size(x_shape[1 + d] + sum(pads[d]), kernel_shape[d], strides[d]) for d in range(2)]
    if options.small_patches and min(x_shape[1], x_shape[2], *out) < max(kh, kw):
        return _Plan("patches", "patches")
    return _Plan("xla", "xla")


def _forward(x, kernel, strides, pads, precision, plan):
    if plan.forward == "patches":
        return _patches_conv(x, kernel, strides, pads, precision)
    return _xla_conv(x, kernel, strides, pads, precision)


def _fwd(x, kernel, strides, pads, precision, plan):
    return _forward(x, kernel, strides, pads, precision, plan), (x, kernel)


def _bwd(strides, pads, precision, plan, residuals, g):
    x, kernel = residuals
    method = _patches_conv if plan.input_grad == "patches" else _xla_conv
    dx = jax.vjp(lambda x: method(x, kernel, strides, pads, precision), x)[1](g)[0]
    x_whole = _unfused(x)
    dk = jax.vjp(lambda k: _xla_conv(x_whole, k, strides, pads, precision), kernel)[1](g)[0]
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv = jax.custom_vjp(_forward, nondiff_argnums=(2, 3, 4, 5))
_conv.defvjp(_fwd, _bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    options: ConvOptions = ConvOptions(),
):
    """lax.conv_general_dilated as nn.Conv calls it, with the CPU methods for ungrouped, undilated 2-D
    NHWC/HWIO convolutions; anything else is XLA's."""
    dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
    strides = tuple(window_strides)
    pads = None
    if lhs.ndim == 4 and feature_group_count == 1 and not dilated and dimension_numbers == NHWC:
        pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    if pads is None:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
        )
    conv_plan = plan(lhs.shape, rhs.shape, strides, pads, options)
    return _conv(lhs, rhs, strides, pads, precision, conv_plan)


class Conv(nn.Conv):
    """nn.Conv (the same fields, parameters and auto-generated names) computing its convolutions with
    `conv_general_dilated` unless that field says otherwise."""

    conv_general_dilated: Any = conv_general_dilated


def conv_with(options: ConvOptions):
    """A Conv class-like factory using `options`."""
    return functools.partial(
        Conv, conv_general_dilated=functools.partial(conv_general_dilated, options=options)
    )
