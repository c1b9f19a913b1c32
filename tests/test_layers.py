"""The CPU fast path of medjax.models.layers against flax's native ops: values, gradients, parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quick
from medjax import models, native, runtime
from medjax.models import layers, winograd

# The kernel-gradient method where medjax's fused C++ kernel applies (tests/test_native.py checks that it
# is built wherever a C++ compiler is found).
FUSED = "fused" if native.available() else "patches"


def _assert_close(actual, expected, rtol=1e-5):
    """Elementwise, relative to the largest magnitude of `expected` (sums reorder rounding errors)."""
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * scale)


def _vjps(fns, *args):
    """For each fn: its output and the gradients of <fn(*args), r> for a fixed, varied cotangent r.

    Everything is one compiled call, traced here, so under the caller's layers.implementation.
    """

    def run(*args):
        results = []
        for fn in fns:
            out, pullback = jax.vjp(fn, *args)
            cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32) * 0.7).reshape(out.shape)
            results.append((out, pullback(cotangent.astype(out.dtype))))
        return results

    return jax.jit(run)(*args)


CONV_CASES = [
    # (input shape, Conv kwargs)
    ((2, 9, 9, 3), dict(features=4, kernel_size=(3, 3))),
    ((2, 9, 9, 3), dict(features=4, kernel_size=(3, 3), strides=2, use_bias=False)),
    ((2, 8, 8, 5), dict(features=6, kernel_size=(1, 1), strides=(2, 2), padding="VALID")),
    ((2, 11, 7, 3), dict(features=4, kernel_size=(5, 5), strides=(1, 1), padding="VALID")),
    ((2, 11, 7, 3), dict(features=4, kernel_size=(5, 5), strides=2, padding="SAME")),
    ((2, 13, 13, 1), dict(features=8, kernel_size=(7, 7), strides=(2, 2), padding=3, use_bias=False)),
    ((2, 13, 12, 1), dict(features=8, kernel_size=(7, 7), strides=2, padding=((3, 2), (3, 3)))),
    ((3, 10, 9, 4), dict(features=6, kernel_size=(3, 3), padding=((0, 2), (1, 0)), strides=(2, 1))),
    ((2, 9, 9, 4), dict(features=8, kernel_size=(3, 3), feature_group_count=2)),
    ((2, 9, 9, 6), dict(features=6, kernel_size=(3, 3), strides=2, feature_group_count=6, use_bias=False)),
    ((2, 9, 9, 3), dict(features=6, kernel_size=(5, 5), feature_group_count=3, padding="VALID")),
    ((2, 9, 9, 3), dict(features=4, kernel_size=(3, 3), padding="CIRCULAR")),
    # Outputs smaller than the kernel (patches @ kernel for the forward pass and input gradient).
    ((2, 2, 2, 5), dict(features=4, kernel_size=(3, 3), padding=1)),
    ((2, 4, 3, 5), dict(features=4, kernel_size=(3, 3), strides=2, padding=1, use_bias=False)),
    ((2, 6, 6, 2), dict(features=3, kernel_size=(5, 5), strides=2, padding="VALID")),
    ((2, 9, 9, 3), dict(features=4, kernel_size=3, kernel_dilation=2)),
    # Winograd F(2x2, 3x3) input gradient (32 channels, 8x8).
    ((2, 8, 8, 32), dict(features=32, kernel_size=(3, 3), use_bias=False)),
    # Few input channels (forward pass as a sum over kernel taps).
    ((3, 12, 12, 1), dict(features=16, kernel_size=(3, 3), use_bias=False)),
    ((2, 11, 10, 1), dict(features=5, kernel_size=(5, 5), strides=2, padding="VALID")),
    ((2, 10, 9, 2), dict(features=4, kernel_size=(3, 3), strides=(2, 1), padding=((0, 2), (1, 0)))),
]


@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,plan",
    [
        ((128, 64, 64, 1), (3, 3, 1, 16), (1, 1), ("taps", "native", FUSED)),  # Paper CNN, first layer.
        ((128, 64, 64, 3), (3, 3, 3, 32), (2, 2), ("taps", "native", FUSED)),
        ((128, 64, 64, 1), (7, 7, 1, 64), (2, 2), ("native", "native", FUSED)),  # 7x7 stem: 49 terms.
        ((128, 32, 32, 16), (3, 3, 16, 32), (1, 1), ("native", "native", FUSED)),
        ((128, 32, 32, 16), (1, 1, 16, 96), (1, 1), ("native", "native", "patches")),  # 1x1: a matmul.
        ((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), ("patches", "patches", "patches")),
        # Winograd where it measured faster: the paper CNN's third and fourth layers, ResNet-18's stages.
        ((128, 16, 16, 32), (3, 3, 32, 64), (1, 1), ("native", "winograd2", "winograd4")),
        ((128, 8, 8, 64), (3, 3, 64, 128), (1, 1), ("native", "winograd2", "winograd4")),
        ((128, 16, 16, 64), (3, 3, 64, 64), (1, 1), ("native", "winograd4", "winograd4")),
        ((128, 8, 8, 128), (3, 3, 128, 128), (1, 1), ("native", "native", "winograd4")),
        ((128, 16, 16, 256), (3, 3, 256, 256), (1, 1), ("winograd4", "winograd4", "winograd4")),
        ((128, 8, 8, 512), (3, 3, 512, 512), (1, 1), ("winograd4", "winograd4", "winograd4")),
        ((128, 4, 4, 256), (3, 3, 256, 256), (1, 1), ("native", "native", "patches")),
        # ResNet-18 with the 3x3 stem: 32x32 and 64x64 maps.
        ((128, 32, 32, 128), (3, 3, 128, 128), (1, 1), ("winograd4", "winograd4", "winograd4")),
        ((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), ("winograd4", "winograd4", "winograd4")),
        ((128, 64, 64, 64), (3, 3, 64, 64), (1, 1), ("winograd4", "winograd4", "winograd4")),
        ((128, 64, 64, 16), (3, 3, 16, 16), (1, 1), ("native", "native", FUSED)),
        ((128, 16, 16, 64), (3, 3, 64, 128), (2, 2), ("native", "native", "patches")),  # Strided.
    ],
)
def test_conv_plan_choice(x_shape, kernel_shape, strides, plan):
    pads = ((1, 1), (1, 1))
    assert layers.conv_plan(x_shape, kernel_shape, strides, pads) == layers.ConvPlan(*plan)


def test_winograd_only_for_float32_and_when_allowed():
    args = ((128, 16, 16, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
    direct = layers.ConvPlan("native", "native", "patches")
    assert layers.conv_plan(*args, dtype=jnp.bfloat16) == direct
    with layers.winograd_set_to(False):
        assert layers.conv_plan(*args) == direct
    assert layers.conv_plan(*args).input_grad == "winograd4"
    assert layers.conv_plan(args[0], args[1], args[2], ((3, 3), (1, 1))) == direct  # Pad > 2.


@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,plan",
    [
        ((128, 16, 16, 64), (3, 3, 64, 128), (2, 2), ("native", "native", "native")),  # ResNet-18 7x7.
        ((128, 4, 4, 256), (3, 3, 256, 256), (1, 1), ("native", "native", "native")),
        ((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), ("patches", "patches", "native")),
        ((128, 32, 32, 16), (3, 3, 16, 32), (1, 1), ("native", "native", FUSED)),  # Paper CNN.
        ((128, 16, 16, 64), (1, 1, 64, 128), (2, 2), ("native", "native", "patches")),  # 1x1.
        ((128, 64, 64, 1), (7, 7, 1, 64), (2, 2), ("native", "native", FUSED)),
        ((128, 16, 16, 64), (3, 3, 64, 64), (1, 1), ("native", "winograd4", "winograd4")),
    ],
)
def test_kernel_gradient_is_xla_s_own_where_it_measured_faster(
    monkeypatch, x_shape, kernel_shape, strides, plan
):
    """Only with XLA's own convolution kernels (as runtime.tune_xla sets); YNNPACK's were slower."""
    pads = {1: ((0, 0),) * 2, 3: ((1, 1),) * 2, 7: ((3, 3),) * 2}[kernel_shape[0]]
    monkeypatch.setenv("XLA_FLAGS", runtime.XLA_CPU_FLAGS)
    assert layers.conv_plan(x_shape, kernel_shape, strides, pads) == layers.ConvPlan(*plan)
    monkeypatch.delenv("XLA_FLAGS")
    without = layers.conv_plan(x_shape, kernel_shape, strides, pads)
    assert without == layers.ConvPlan(*plan[:2], "patches" if plan[2] == "native" else plan[2])


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((2, 9, 9, 64), dict(features=8, kernel_size=(3, 3), strides=2)),
        ((2, 2, 2, 64), dict(features=8, kernel_size=(3, 3), padding=1, use_bias=False)),  # Patches forward.
    ],
)
def test_native_kernel_gradient_matches_flax_conv(monkeypatch, shape, kwargs):
    monkeypatch.setenv("XLA_FLAGS", runtime.XLA_CPU_FLAGS)
    x = jax.random.normal(jax.random.key(0), shape)
    native, ours = nn.Conv(**kwargs), layers.Conv(**kwargs)
    strides = layers._pairs(kwargs.get("strides", 1), 2)
    pads = layers._explicit_padding(kwargs.get("padding", "SAME"), shape[1:3], (3, 3), strides)
    plan = layers.conv_plan(shape, (3, 3, shape[3], 8), strides, pads)
    assert plan.kernel_grad == "native", plan
    variables = native.init(jax.random.key(1), x)
    with layers.implementation("fast"):
        (out, grads), (ref_out, ref_grads) = _vjps([ours.apply, native.apply], variables, x)
    _assert_close(out, ref_out)
    jax.tree_util.tree_map(_assert_close, grads, ref_grads)


def test_unfused_is_the_identity_computed_apart():
    """Bit for bit (signed zeros, infinities, NaN), and through a conditional this XLA keeps: if a jaxlib
    dropped it, its producer would be recomputed inside the transpose again (see layers._unfused)."""
    x = jnp.array([[0.0, -0.0, 1.5], [jnp.inf, -jnp.inf, jnp.nan]], jnp.float32)
    fn = jax.jit(lambda x: layers._unfused(jnp.maximum(x, -1.0) * 2).T)
    np.testing.assert_array_equal(
        np.asarray(fn(x)).view(np.uint32), np.asarray(jnp.maximum(x, -1.0) * 2).T.view(np.uint32)
    )
    assert " conditional(" in fn.lower(x).compile().as_text()


@pytest.mark.parametrize("tile", ["winograd2", "winograd4"])
@pytest.mark.parametrize(
    "x_shape,cout,pads",
    [
        ((2, 9, 7, 3), 4, ((1, 1), (1, 1))),  # Outputs not a whole number of tiles.
        ((2, 8, 8, 5), 6, ((0, 0), (2, 1))),
        ((3, 5, 6, 4), 3, ((2, 0), (1, 2))),
        ((1, 3, 3, 2), 2, ((0, 0), (0, 0))),  # One output pixel.
    ],
)
def test_winograd_conv_matches_native(tile, x_shape, cout, pads):
    """Forward pass, input and kernel gradients of a Winograd plan against XLA's convolution."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, x_shape[3], cout)), jnp.float32)
    plan = layers.ConvPlan(tile, tile, tile)
    (out, grads), (ref_out, ref_grads) = _vjps(
        [
            lambda x, k: layers._fast_conv(x, k, (1, 1), pads, None, plan),
            lambda x, k: layers._native_conv(x, k, (1, 1), pads),
        ],
        x,
        kernel,
    )
    assert out.shape == ref_out.shape
    rtol = 1e-6 if tile == "winograd2" else 1e-5  # F(4x4, 3x3)'s transforms round more.
    _assert_close(out, ref_out, rtol=rtol)
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, rtol=rtol), grads, ref_grads)


@pytest.mark.parametrize("shape,kwargs", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_matches_flax_conv(shape, kwargs):
    x = jax.random.normal(jax.random.key(0), shape)
    native, ours = nn.Conv(**kwargs), layers.Conv(**kwargs)
    shapes = jax.eval_shape(native.init, jax.random.key(2), x)
    assert jax.eval_shape(ours.init, jax.random.key(2), x) == shapes  # Same names, shapes and dtypes.
    rng = np.random.default_rng(0)  # Cheaper than compiling each initializer; those are tested below.
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    with layers.implementation("fast"):
        (out, (d_vars, d_x)), (ref_out, (ref_d_vars, ref_d_x)) = _vjps(
            [ours.apply, native.apply], variables, x
        )
    _assert_close(out, ref_out)
    _assert_close(d_x, ref_d_x)
    jax.tree_util.tree_map(_assert_close, d_vars, ref_d_vars)


def test_conv_xla_path_is_flax_conv():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    kwargs = dict(features=4, kernel_size=(3, 3), strides=2, padding=((1, 0), (2, 1)))
    native, ours = nn.Conv(**kwargs), layers.Conv(**kwargs)
    variables, own_variables = jax.jit(lambda k: (native.init(k, x), ours.init(k, x)))(jax.random.key(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, own_variables, variables)  # Same initial values.
    with layers.implementation("xla"):
        (out, grads), (ref_out, ref_grads) = _vjps([ours.apply, native.apply], variables, x)
    np.testing.assert_array_equal(out, ref_out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, grads, ref_grads)


def test_conv_auto_names_match_flax():
    class Net(nn.Module):
        conv: type

        @nn.compact
        def __call__(self, x):
            return self.conv(3, (3, 3))(self.conv(2, (1, 1), use_bias=False)(x))

    x = jnp.ones((1, 5, 5, 2))
    ours = jax.tree_util.tree_map(jnp.shape, Net(layers.Conv).init(jax.random.key(0), x))
    theirs = jax.tree_util.tree_map(jnp.shape, Net(nn.Conv).init(jax.random.key(0), x))
    assert (
        ours
        == theirs
        == {"params": {"Conv_0": {"kernel": (3, 3, 2, 3), "bias": (3,)}, "Conv_1": {"kernel": (1, 1, 2, 2)}}}
    )


DEPTHWISE_CASES = [
    # (input shape, Conv kwargs); features == feature_group_count == input channels.
    ((2, 9, 9, 6), dict(kernel_size=(3, 3))),
    ((2, 8, 8, 6), dict(kernel_size=(3, 3), strides=2, padding=((0, 1), (0, 1)))),  # TF 'SAME', even.
    ((3, 9, 7, 4), dict(kernel_size=(3, 3), strides=2, padding="SAME", use_bias=False)),
    ((2, 10, 10, 5), dict(kernel_size=(5, 5), padding=((2, 2), (2, 2)))),
    ((2, 9, 10, 5), dict(kernel_size=(5, 5), strides=2, padding=((2, 2), (1, 2)))),  # TF 'SAME'.
    ((2, 11, 8, 3), dict(kernel_size=(5, 5), strides=(2, 1), padding=((0, 3), (1, 0)))),
    ((2, 7, 7, 4), dict(kernel_size=(3, 3), padding="VALID")),
    ((2, 2, 2, 8), dict(kernel_size=(5, 5), padding=((2, 2), (2, 2)))),  # Map smaller than the kernel.
    ((2, 5, 6, 3), dict(kernel_size=(2, 2), strides=3, padding=((0, 1), (1, 0)))),  # Taps skip pixels.
]


@pytest.mark.parametrize("shape,kwargs", DEPTHWISE_CASES, ids=[str(i) for i in range(len(DEPTHWISE_CASES))])
def test_depthwise_conv_fast_path_matches_xla(shape, kwargs):
    c = shape[-1]
    conv = layers.Conv(features=c, feature_group_count=c, **kwargs)
    x = jax.random.normal(jax.random.key(0), shape)
    shapes = jax.eval_shape(conv.init, jax.random.key(2), x)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    results = {}
    for name in ("fast", "xla"):
        with layers.implementation(name):
            [results[name]] = _vjps([conv.apply], variables, x)
            jaxpr = str(jax.make_jaxpr(jax.grad(lambda v, x: conv.apply(v, x).sum(), (0, 1)))(variables, x))
        assert ("conv_general_dilated" in jaxpr) == (name == "xla")  # The fast path took it, gradients too.
    (out, (d_vars, d_x)), (ref_out, (ref_d_vars, ref_d_x)) = results["fast"], results["xla"]
    _assert_close(out, ref_out)
    _assert_close(d_x, ref_d_x)
    jax.tree_util.tree_map(_assert_close, d_vars, ref_d_vars)  # Kernel and (if any) bias.


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((2, 9, 9, 4), dict(features=8, feature_group_count=4)),  # Channel multiplier 2.
        ((2, 9, 9, 4), dict(features=4, feature_group_count=2)),
    ],
)
def test_other_grouped_convs_stay_native(shape, kwargs):
    conv = layers.Conv(kernel_size=(3, 3), **kwargs)
    x = jax.random.normal(jax.random.key(0), shape)
    variables = conv.init(jax.random.key(1), x)
    with layers.implementation("fast"):
        jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
        (out, grads), (ref_out, ref_grads) = _vjps(
            [conv.apply, nn.Conv(kernel_size=(3, 3), **kwargs).apply], variables, x
        )
    assert f"feature_group_count={kwargs['feature_group_count']}" in jaxpr
    np.testing.assert_array_equal(out, ref_out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, grads, ref_grads)


@pytest.mark.parametrize("n,chunk", [(6, 4), (7, 3), (5, 32)])
def test_chunked_depthwise_kernel_gradient(monkeypatch, n, chunk):
    """Chunks of images that divide the batch (6 by 3), a zero-padded batch (7 -> 9) and one chunk."""
    monkeypatch.setattr(layers, "_DEPTHWISE_CHUNK", chunk)
    x = jax.random.normal(jax.random.key(0), (n, 9, 8, 3))
    g = jax.random.normal(jax.random.key(1), (n, 5, 4, 3))
    kernel_shape, strides, pads = (3, 3, 1, 3), (2, 2), ((1, 1), (0, 1))
    grad = jax.jit(lambda x, g: layers._depthwise_kernel_grad(x, g, kernel_shape, strides, pads))(x, g)
    native = lambda k: jax.lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=layers._channels_last(4), feature_group_count=3
    )
    _assert_close(grad, jax.vjp(native, jnp.zeros(kernel_shape))[1](g)[0])


POOL_CASES = [
    # (input shape, window, strides, padding)
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (2, 2), (2, 2), "SAME"),
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),
    ((2, 9, 10, 3), (3, 3), (2, 2), "SAME"),
    ((2, 7, 7, 3), (3, 3), (2, 2), ((0, 1), (1, 0))),
    ((2, 6, 6, 3), (3, 3), None, "SAME"),
    ((2, 6, 6, 2), (2, 3), (1, 2), "VALID"),
]


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_matches_flax(kind, shape, window, strides, padding):
    # Rounded values make ties, which must go to the first maximum of a window, as XLA's gradient does.
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2.0) / 2.0
    ours = {"max": layers.max_pool, "avg": layers.avg_pool}[kind]
    native = {"max": nn.max_pool, "avg": nn.avg_pool}[kind]
    with layers.implementation("fast"):
        (out, (d_x,)), (ref_out, (ref_d_x,)) = _vjps(
            [lambda x: ours(x, window, strides, padding), lambda x: native(x, window, strides, padding)], x
        )
    _assert_close(out, ref_out)
    _assert_close(d_x, ref_d_x)


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES[:4])
@pytest.mark.parametrize("name", ["fast", "xla"])
def test_signed_max_pool_takes_window_minimum_where_sign_is_negative(name, shape, window, strides, padding):
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2.0) / 2.0  # Ties, as above.
    sign = jnp.asarray([1.0, -1.0, -1.0][: shape[-1]])
    maximum = nn.max_pool(x, window, strides, padding)
    minimum = -nn.max_pool(-x, window, strides, padding)
    with layers.implementation(name):
        (out, (d_x,)), (ref_out, (ref_d_x,)) = _vjps(
            [
                lambda x: layers.max_pool(x, window, strides, padding, sign=sign),
                lambda x: nn.max_pool(x * sign, window, strides, padding) * sign,
            ],
            x,
        )
    np.testing.assert_array_equal(out, jnp.where(sign > 0, maximum, minimum))
    _assert_close(d_x, ref_d_x)
    assert float(jnp.abs(d_x[..., 1:]).sum()) > 0  # The min-pooled channels get their gradient too.


def test_max_pool_gradient_goes_to_first_maximum_only():
    x = jnp.zeros((1, 4, 4, 1))  # Every window is one big tie.
    with layers.implementation("fast"):
        grad = jax.grad(lambda x: layers.max_pool(x, (2, 2), strides=(2, 2)).sum())(x)
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1.0
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)


@pytest.mark.parametrize("n", [6, 7])
def test_chunked_weight_gradient_matches_one_chunk(n):
    x = jax.random.normal(jax.random.key(0), (n, 10, 9, 3))
    g = jax.random.normal(jax.random.key(1), (n, 5, 5, 4))
    kernel_shape, strides, pads = (3, 3, 3, 4), (2, 2), ((1, 1), (2, 1))
    per_image = 5 * 5 * 9 * 3 * 4  # Bytes of one image's patches.
    results = []
    # One chunk; 2 images a chunk (divides 6; 7 gets a zero image); 1 image a chunk, also below that.
    for limit in (n * per_image, 2 * per_image, per_image, 1):
        with layers.patch_bytes_limit_set_to(limit):
            grad = jax.jit(lambda x, g: layers.conv_weight_grad(x, g, kernel_shape, strides, pads))
            results.append(grad(x, g))
    ref = jax.vjp(lambda k: layers._native_conv(x, k, strides, pads), jnp.zeros(kernel_shape))[1](g)[0]
    for result in results:
        _assert_close(result, ref)


def test_bfloat16_compute_with_float32_params():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    kwargs = dict(features=4, kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16)
    variables = nn.Conv(**kwargs).init(jax.random.key(1), x)
    with layers.implementation("fast"):
        (out, (d_vars, _)), (ref_out, (ref_d_vars, _)) = _vjps(
            [layers.Conv(**kwargs).apply, nn.Conv(**kwargs).apply], variables, x
        )
        pooled = layers.max_pool(out, (2, 2), strides=(2, 2))
    assert out.dtype == pooled.dtype == jnp.bfloat16
    assert d_vars["params"]["kernel"].dtype == jnp.float32
    _assert_close(out, ref_out, rtol=2e-2)
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, rtol=3e-2), d_vars, ref_d_vars)


def test_implementation_is_chosen_at_trace_time():
    x = jnp.ones((1, 4, 4, 1))

    def primitives(name):
        with layers.implementation(name):
            jaxpr = jax.make_jaxpr(jax.grad(lambda x: layers.max_pool(x, (2, 2), (2, 2)).sum()))(x)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    assert "reduce_window_max" not in primitives("fast")
    assert "reduce_window_max" in str(primitives("xla")) or "select_and_scatter_add" in primitives("xla")
    assert layers.use_fast_path() == (jax.default_backend() == "cpu")
    # A 2x2 map under a 3x3 kernel: patches @ kernel instead of XLA:CPU's slow path for it.
    conv = layers.Conv(4, (3, 3), padding=1)
    variables = jax.eval_shape(conv.init, jax.random.key(0), jnp.ones((1, 2, 2, 3)))
    with layers.implementation("fast"):
        jaxpr = jax.make_jaxpr(conv.apply)(variables, jnp.ones((1, 2, 2, 3)))
    assert "conv_general_dilated" not in str(jaxpr) and "dot_general" in str(jaxpr)
    with pytest.raises(ValueError, match="Unknown layers implementation"):
        layers.set_implementation("im2col")


def test_model_gradients_same_on_both_paths():
    """The quick paper CNN in training mode (batch norm, max-pool, dropout off): loss and gradients."""
    config = quick.get_config()
    config.model.dropout_rate = 0.0
    model = models.create_model(config.model, 6)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 1)), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    results = {}
    for name in ("fast", "xla"):
        with layers.implementation(name):
            results[name] = jax.jit(jax.value_and_grad(loss))(variables["params"])
    _assert_close(results["fast"][0], results["xla"][0])
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, rtol=1e-4), results["fast"][1], results["xla"][1])


@pytest.mark.parametrize("images_per_chunk", [1, 3])  # 3 does not divide 7: the batch gets zero images.
def test_winograd_chunks_match_whole_batch(images_per_chunk):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 6, 5, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(7, 6, 5, 5)), jnp.float32)
    pads = ((1, 1), (1, 1))
    whole = (winograd.conv(x, kernel, pads, 4), winograd.kernel_grad(x, g, pads, 4))
    tile_bytes = 4 * 36 * 5 * 4  # Per image: 2 x 2 tiles of 6 x 6, 5 channels (the larger), float32.
    with layers.patch_bytes_limit_set_to(images_per_chunk * tile_bytes):
        chunked = jax.jit(
            lambda x, k, g: (layers.winograd_conv(x, k, pads, 4), layers.winograd_kernel_grad(x, g, pads, 4))
        )(x, kernel, g)
        jaxpr = str(jax.make_jaxpr(lambda x, k: layers.winograd_conv(x, k, pads, 4))(x, kernel))
    assert "scan" in jaxpr or "while" in jaxpr  # Really chunked.
    _assert_close(chunked[0], whole[0])  # Compiled separately: rounding may differ slightly.
    _assert_close(chunked[1], whole[1])


def test_winograd_loops_keep_no_extra_buffer_per_layer():
    """Chunked Winograd passes in a deep stack: XLA's temp memory grows by about one activation per layer
    (the saved input), not two (a constant-filled output buffer per loop, copied early, did that)."""
    pads = ((1, 1), (1, 1))
    plan = layers.ConvPlan("winograd4", "winograd4", "winograd4")
    activation_bytes = 16 * 32 * 32 * 32 * 4

    def temp_bytes(depth):
        def loss(x, kernels):
            for kernel in kernels:
                x = jax.nn.relu(layers._fast_conv(x, kernel, (1, 1), pads, None, plan))
            return x.sum()

        x = jax.ShapeDtypeStruct((16, 32, 32, 32), jnp.float32)
        kernels = [jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)] * depth
        with layers.patch_bytes_limit_set_to(2**20):  # Several chunks per pass.
            compiled = jax.jit(jax.grad(loss)).lower(x, kernels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_layer = (temp_bytes(8) - temp_bytes(4)) / 4
    assert per_layer < 1.5 * activation_bytes, per_layer / activation_bytes
