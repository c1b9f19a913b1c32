"""Shared layers for every model: convolution and pooling, with a fast path for XLA:CPU.

On GPU/TPU these are XLA's native ops. On CPU, profiling the train step (jax 0.10.2) showed that XLA's
max-pool gradient (reduce-window with argmax indices, then scatter) and its convolution kernel gradient
dominate, while its forward convolution and input gradient are as fast as patches + matmul. The
CPU ("fast") path therefore uses:

* max-pool: a max over strided window slices (a reshape when window == strides and the shape divides),
  with a custom gradient that sends each output's cotangent to the first maximum of its window, as
  XLA does;
* avg-pool: a sum of strided window slices (or a reshape-sum);
* convolution: XLA's forward and input gradient, and the kernel gradient as patches + one matmul,
  chunked over the batch so that a chunk's patches never exceed `patch_bytes_limit()` bytes (grouped
  and dilated convolutions stay native).

The path is chosen when a function is traced: 'fast' on CPU (`jax.default_backend()`), 'xla'
elsewhere, unless `implementation('xla' | 'fast' | 'auto')` (a context manager) or `set_implementation`
says otherwise. A jitted function keeps the path it was traced with. `Conv` has exactly nn.Conv's
parameters, initializers and auto-generated names, so checkpoints move freely between the paths.
"""

import contextlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "xla", "fast")
# Kernel-gradient patches of a few MiB stay in cache (measured faster than bigger or smaller chunks).
_settings = {"implementation": "auto", "patch_bytes_limit": 8 * 2**20}


def set_implementation(name: str) -> None:
    """'auto' (fast on CPU, XLA elsewhere), 'xla' or 'fast', for functions traced from now on."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown layers implementation {name!r}; known: {IMPLEMENTATIONS}")
    _settings["implementation"] = name


@contextlib.contextmanager
def implementation(name: str):
    """Uses implementation `name` for functions traced inside this context."""
    previous = _settings["implementation"]
    set_implementation(name)
    try:
        yield
    finally:
        _settings["implementation"] = previous


def patch_bytes_limit() -> int:
    return _settings["patch_bytes_limit"]


@contextlib.contextmanager
def patch_bytes_limit_set_to(limit: int):
    """Bounds one chunk of kernel-gradient patches to `limit` bytes for functions traced inside."""
    previous = _settings["patch_bytes_limit"]
    _settings["patch_bytes_limit"] = int(limit)
    try:
        yield
    finally:
        _settings["patch_bytes_limit"] = previous


def use_fast_path() -> bool:
    """Whether what is traced now uses the CPU path."""
    name = _settings["implementation"]
    return name == "fast" or (name == "auto" and jax.default_backend() == "cpu")


def _pairs(value, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def _explicit_padding(padding, in_shape, window, strides) -> Optional[tuple[tuple[int, int], ...]]:
    """'SAME'/'VALID'/int/pairs -> ((lo, hi), ...); None for strings that need the native op."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            return None
        return tuple(lax.padtype_to_pads(in_shape, window, strides, padding.upper()))
    pads = nn.linear.canonicalize_padding(padding, len(window))
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _window_slices(x: jnp.ndarray, window, strides, out_shape):
    """Yields (i, j, x[:, i::sh, j::sw, :] cropped to out_shape) for each window offset, row-major."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out_shape
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(
                x,
                (0, i, j, 0),
                (x.shape[0], i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3]),
                (1, sh, sw, 1),
            )


def _unslice(piece: jnp.ndarray, i: int, j: int, strides, padded_shape) -> jnp.ndarray:
    """Transpose of one strided window slice: scatter `piece` back into a zero array of padded_shape."""
    (sh, sw), (n, hp, wp, c) = strides, padded_shape
    oh, ow = piece.shape[1:3]
    config = (
        (0, 0, 0),
        (i, hp - i - sh * (oh - 1) - 1, sh - 1),
        (j, wp - j - sw * (ow - 1) - 1, sw - 1),
        (0, 0, 0),
    )
    return lax.pad(piece, jnp.zeros((), piece.dtype), config)


def _out_size(n: int, k: int, s: int) -> int:
    return (n - k) // s + 1


# ----------------------------------------------------------------------------------------------------
# Pooling.


def _pool_geometry(x, window, strides, padding):
    """Returns (window, strides, pads) when the fast path applies to this call, else None."""
    window = tuple(window)
    if x.ndim != 4 or len(window) != 2:
        return None
    strides = _pairs(strides, 2)
    pads = _explicit_padding(padding, x.shape[1:3], window, strides)
    if pads is None:
        return None
    return window, strides, pads


def _is_reshape_pool(x_shape, window, strides, pads) -> bool:
    return (
        window == strides
        and all(lo == hi == 0 for lo, hi in pads)
        and x_shape[1] % window[0] == 0
        and x_shape[2] % window[1] == 0
    )


def _pad_spatial(x: jnp.ndarray, pads, value) -> jnp.ndarray:
    if all(lo == hi == 0 for lo, hi in pads):
        return x
    config = ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _max_pool_forward(x, window, strides, pads):
    n, h, w, c = x.shape
    if _is_reshape_pool(x.shape, window, strides, pads):
        kh, kw = window
        return jnp.max(x.reshape(n, h // kh, kh, w // kw, kw, c), axis=(2, 4))
    xp = _pad_spatial(x, pads, -jnp.inf)
    out = tuple(_out_size(xp.shape[1 + d], window[d], strides[d]) for d in range(2))
    y = None
    for _, _, piece in _window_slices(xp, window, strides, out):
        y = piece if y is None else jnp.maximum(y, piece)
    return y


def _max_pool_backward(x, y, g, window, strides, pads):
    """Cotangent of max-pool: each output's cotangent goes to the first maximum of its window."""
    n, h, w, c = x.shape
    if _is_reshape_pool(x.shape, window, strides, pads):
        (kh, kw), (oh, ow) = window, y.shape[1:3]
        xr = x.reshape(n, oh, kh, ow, kw, c)
        taken = jnp.zeros(y.shape, bool)
        rows = []
        for i in range(kh):
            cols = []
            for j in range(kw):
                hit = (xr[:, :, i, :, j, :] == y) & ~taken
                taken = taken | hit
                cols.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
            rows.append(jnp.stack(cols, axis=3))  # [n, oh, ow, kw, c]
        return jnp.stack(rows, axis=2).reshape(x.shape)  # [n, oh, kh, ow, kw, c]
    xp = _pad_spatial(x, pads, -jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = None
    for i, j, piece in _window_slices(xp, window, strides, y.shape[1:3]):
        hit = (piece == y) & ~taken
        taken = taken | hit
        part = _unslice(jnp.where(hit, g, jnp.zeros((), g.dtype)), i, j, strides, xp.shape)
        dxp = part if dxp is None else dxp + part
    (top, _), (left, _) = pads
    return lax.slice(dxp, (0, top, left, 0), (n, top + h, left + w, c))


_max_pool_fast = jax.custom_vjp(_max_pool_forward, nondiff_argnums=(1, 2, 3))


def _max_pool_fast_fwd(x, window, strides, pads):
    y = _max_pool_forward(x, window, strides, pads)
    return y, (x, y)


def _max_pool_fast_bwd(window, strides, pads, residuals, g):
    x, y = residuals
    return (_max_pool_backward(x, y, g, window, strides, pads),)


_max_pool_fast.defvjp(_max_pool_fast_fwd, _max_pool_fast_bwd)


def max_pool(x: jnp.ndarray, window, strides=None, padding="VALID") -> jnp.ndarray:
    """nn.max_pool (strides default to 1; padding with -inf)."""
    geometry = _pool_geometry(x, window, strides, padding) if use_fast_path() else None
    if geometry is None:
        return nn.max_pool(x, tuple(window), strides=strides, padding=padding)
    return _max_pool_fast(x, *geometry)


def avg_pool(x: jnp.ndarray, window, strides=None, padding="VALID") -> jnp.ndarray:
    """nn.avg_pool with count_include_pad=True (padding counts as zeros)."""
    geometry = _pool_geometry(x, window, strides, padding) if use_fast_path() else None
    if geometry is None:
        return nn.avg_pool(x, tuple(window), strides=strides, padding=padding)
    window, strides, pads = geometry
    n, h, w, c = x.shape
    size = window[0] * window[1]
    if _is_reshape_pool(x.shape, window, strides, pads):
        kh, kw = window
        return jnp.sum(x.reshape(n, h // kh, kh, w // kw, kw, c), axis=(2, 4)) / size
    xp = _pad_spatial(x, pads, 0)
    out = tuple(_out_size(xp.shape[1 + d], window[d], strides[d]) for d in range(2))
    y = None
    for _, _, piece in _window_slices(xp, window, strides, out):
        y = piece if y is None else y + piece
    return y / size


# ----------------------------------------------------------------------------------------------------
# Convolution.


def _patches(xp: jnp.ndarray, window, strides, out_shape) -> jnp.ndarray:
    """[n, hp, wp, c] (already padded) -> [n * oh * ow, kh * kw * c], in HWIO kernel order."""
    pieces = [piece for _, _, piece in _window_slices(xp, window, strides, out_shape)]
    n, c = xp.shape[0], xp.shape[3]
    return jnp.stack(pieces, axis=3).reshape(n * out_shape[0] * out_shape[1], len(pieces) * c)


def _native_conv(x, kernel, strides, pads, precision=None) -> jnp.ndarray:
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_channels_last(4), precision=precision
    )


def conv_weight_grad(x, g, kernel_shape, strides, pads, precision=None) -> jnp.ndarray:
    """Kernel cotangent of a 2-D NHWC/HWIO convolution: patches(x)^T @ g, chunked over the batch.

    The patches are built channel-major, [kh * kw * cin, images * oh * ow], so that the product is a
    plain row-major matmul (measured 1.3-2x faster than contracting pixel-major patches, and up to 3x
    faster than XLA:CPU's own kernel gradient). One chunk's patches hold at most `patch_bytes_limit()`
    bytes (one image at the least): memory stays bounded and the patches are still in cache when the
    matmul reads them. Partial sums accumulate in float32.
    """
    kh, kw, cin, cout = kernel_shape
    n, oh, ow = g.shape[:3]
    per_image = oh * ow * kh * kw * cin * x.dtype.itemsize
    chunk = max(1, min(n, patch_bytes_limit() // per_image))
    divisor = max(d for d in range(1, chunk + 1) if n % d == 0)
    if 2 * divisor >= chunk:  # Else pad the batch to a multiple of `chunk`.
        chunk = divisor
    num_chunks = -(-n // chunk)
    xp = _pad_spatial(x, pads, 0)
    if num_chunks * chunk != n:  # Zero images (and cotangents) add nothing to the sum.
        xp = jnp.pad(xp, ((0, num_chunks * chunk - n), (0, 0), (0, 0), (0, 0)))
        g = jnp.pad(g, ((0, num_chunks * chunk - n), (0, 0), (0, 0), (0, 0)))
    hp, wp = xp.shape[1:3]
    # [chunks, cin, images, hp, wp]: one transpose of x, then each window slice is channel-major.
    xs = xp.reshape(num_chunks, chunk, hp, wp, cin).transpose(0, 4, 1, 2, 3)
    gs = g.reshape(num_chunks, chunk * oh * ow, cout)
    sh, sw = strides

    def partial_sum(x_chunk, g_chunk):
        pieces = [
            lax.slice(
                x_chunk,
                (0, 0, i, j),
                (cin, chunk, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1),
                (1, 1, sh, sw),
            )
            for i in range(kh)
            for j in range(kw)
        ]
        patches = jnp.stack(pieces).reshape(kh * kw * cin, chunk * oh * ow)
        return lax.dot_general(
            patches,
            g_chunk,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    if num_chunks == 1:
        dk = partial_sum(xs[0], gs[0])
    else:

        def step(total, chunks):
            return total + partial_sum(*chunks), None

        dk, _ = lax.scan(step, jnp.zeros((kh * kw * cin, cout), jnp.float32), (xs, gs))
    return dk.reshape(kernel_shape)


def _patches_conv(x, kernel, strides, pads, precision=None) -> jnp.ndarray:
    """The convolution as patches @ kernel (used where the output is smaller than the kernel)."""
    kh, kw, cin, cout = kernel.shape
    xp = _pad_spatial(x, pads, 0)
    out_shape = tuple(_out_size(xp.shape[1 + d], kernel.shape[d], strides[d]) for d in range(2))
    patches = _patches(xp, (kh, kw), strides, out_shape)
    y = lax.dot_general(
        patches, kernel.reshape(kh * kw * cin, cout), (((1,), (0,)), ((), ())), precision=precision
    )
    return y.reshape((x.shape[0],) + out_shape + (cout,))


def _conv(x, kernel, strides, pads, precision, via_patches):
    if via_patches:
        return _patches_conv(x, kernel, strides, pads, precision)
    return _native_conv(x, kernel, strides, pads, precision)


def _fast_conv_fwd(x, kernel, strides, pads, precision, via_patches):
    return _conv(x, kernel, strides, pads, precision, via_patches), (x, kernel)


def _fast_conv_bwd(strides, pads, precision, via_patches, residuals, g):
    x, kernel = residuals
    _, x_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, pads, precision, via_patches), x)
    dk = conv_weight_grad(x, g, kernel.shape, strides, pads, precision)
    return x_vjp(g)[0], dk.astype(kernel.dtype)


_fast_conv = jax.custom_vjp(_conv, nondiff_argnums=(2, 3, 4, 5))
_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def fast_conv(x, kernel, strides, pads, precision=None) -> jnp.ndarray:
    """2-D NHWC/HWIO convolution for CPU: kernel gradient from `conv_weight_grad`; forward and input
    gradient from XLA, except where a spatial extent of the input or output is smaller than the kernel.
    There XLA:CPU falls off its fast convolution (measured 50-80x slower for ResNet-18's 2x2 last
    stage), and patches @ kernel (and its transpose) are used instead; such patch tensors are small.

    (Unused input gradients, as for the first layer, are pruned by XLA's dead-code elimination.)
    """
    strides, pads = tuple(strides), tuple(pads)
    window = max(kernel.shape[:2])
    out = [_out_size(x.shape[1 + d] + sum(pads[d]), kernel.shape[d], strides[d]) for d in range(2)]
    via_patches = min(x.shape[1], x.shape[2], *out) < window
    return _fast_conv(x, kernel, strides, pads, precision, via_patches)


class Conv(nn.Module):
    """flax.linen.Conv (same fields, parameters, initializers and names) with a fast CPU path.

    The fast path covers 2-D convolutions without groups or dilation; anything else runs XLA's native
    convolution exactly as nn.Conv does. (nn.Conv's deprecated `conv_general_dilated*` fields are not
    supported.)
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: Any = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Optional[jnp.ndarray] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    promote_dtype: Callable = nn.dtypes.promote_dtype

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        rank = len(kernel_size)
        batch_shape = inputs.shape[: inputs.ndim - rank - 1]
        if len(batch_shape) != 1:
            inputs = inputs.reshape((-1,) + inputs.shape[len(batch_shape) :])
        strides = _pairs(self.strides, rank)
        input_dilation = _pairs(self.input_dilation, rank)
        kernel_dilation = _pairs(self.kernel_dilation, rank)

        padding = nn.linear.canonicalize_padding(self.padding, rank)
        if padding in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            if rank != 1:
                raise ValueError("Causal padding is only implemented for 1D convolutions.")
            inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
            padding = "VALID"

        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"in_features={in_features} is not divisible by "
                f"feature_group_count={self.feature_group_count}."
            )
        kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
        if self.mask is not None and self.mask.shape != kernel_shape:
            raise ValueError(f"Mask shape {self.mask.shape} != kernel shape {kernel_shape}.")
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel *= self.mask
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        pads = None
        if (
            use_fast_path()
            and rank == 2
            and input_dilation == kernel_dilation == (1, 1)
            and self.feature_group_count == 1
        ):
            pads = _explicit_padding(padding, inputs.shape[1:3], kernel_size, strides)
        if pads is not None:
            y = fast_conv(inputs, kernel, strides, pads, self.precision)
        else:
            y = lax.conv_general_dilated(
                inputs,
                kernel,
                strides,
                padding,
                lhs_dilation=input_dilation,
                rhs_dilation=kernel_dilation,
                dimension_numbers=_channels_last(inputs.ndim),
                feature_group_count=self.feature_group_count,
                precision=self.precision,
            )
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        if len(batch_shape) != 1:
            y = y.reshape(batch_shape + y.shape[1:])
        return y


def _channels_last(ndim: int) -> lax.ConvDimensionNumbers:
    """NH..WC inputs/outputs and H..WIO kernels, as nn.Conv uses."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        (0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)), (0, ndim - 1) + spatial
    )
