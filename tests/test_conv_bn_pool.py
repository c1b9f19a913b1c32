"""medjax.native's fused first block (convolution + batch-norm moments + 2x2 max pool) against XLA's ops,
and where `normalization.BatchNorm` uses it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax import native
from medjax.models import layers, normalization, paper_cnn
from tests.test_native import _require_kernel, needs_kernel

pytestmark = needs_kernel


def _reference(x, kernel, sign):
    """What `native.conv_bn_pool` computes, in XLA: the pooled sign-flipped maximum and the moments."""
    y = lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    n, h, w, c = y.shape
    pooled = jnp.max((y * sign).reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4)) * sign
    return pooled, jnp.stack([jnp.mean(y, (0, 1, 2)), jnp.mean(y * y, (0, 1, 2))])


@pytest.mark.parametrize(
    "x_shape,cout",
    [((3, 8, 6, 1), 16), ((2, 10, 12, 3), 32), ((1, 2, 2, 1), 48)],  # Odd batch; RGB; one window.
)
def test_forward_and_kernel_gradient_match_xla(x_shape, cout):
    _require_kernel()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, x_shape[3], cout), np.float32))
    sign = jnp.asarray(
        np.where(np.arange(cout) % 3 == 1, -1.0, 1.0), jnp.float32
    )  # Some channels pool minima.
    pooled, moments = jax.jit(native.conv_bn_pool)(x, kernel, sign)
    want_pooled, want_moments = _reference(x, kernel, sign)
    np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=1e-5)
    np.testing.assert_allclose(moments, want_moments, rtol=1e-5, atol=1e-5)

    pooled_cotangent = jnp.asarray(rng.standard_normal(pooled.shape, np.float32))
    moments_cotangent = jnp.asarray(rng.standard_normal(moments.shape, np.float32))
    count = x_shape[0] * x_shape[1] * x_shape[2]
    alpha, beta = moments_cotangent[0] / count, 2 * moments_cotangent[1] / count
    got = jax.jit(native.conv_bn_pool_kernel_grad)(x, kernel, sign, pooled_cotangent, alpha, beta)
    want = jax.vjp(lambda k: _reference(x, k, sign), kernel)[1]((pooled_cotangent, moments_cotangent))[0]
    assert got.shape == kernel.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_unsupported_shapes_are_refused():
    assert native.supports_conv_bn_pool((2, 8, 8, 1), (3, 3, 1, 16), jnp.float32)
    assert not native.supports_conv_bn_pool((2, 8, 8, 2), (3, 3, 2, 16), jnp.float32)  # 2 channels.
    assert not native.supports_conv_bn_pool((2, 8, 8, 1), (5, 5, 1, 16), jnp.float32)
    assert not native.supports_conv_bn_pool((2, 8, 8, 1), (1, 9, 1, 16), jnp.float32)  # 9 rows, not 3x3.
    assert not native.supports_conv_bn_pool((2, 8, 8, 1), (3, 3, 1, 24), jnp.float32)
    assert not native.supports_conv_bn_pool((2, 7, 8, 1), (3, 3, 1, 16), jnp.float32)  # Odd height.
    assert not native.supports_conv_bn_pool((2, 8, 8, 1), (3, 3, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"conv_bn_pool: unsupported input \(2, 7, 8, 1\)"):
        native.conv_bn_pool(jnp.zeros((2, 7, 8, 1)), jnp.zeros((3, 3, 1, 16)), jnp.ones(16))


def test_the_kernel_itself_refuses_mismatched_shapes():
    _require_kernel()
    shapes = (jax.ShapeDtypeStruct((1, 3, 3, 16), jnp.float32), jax.ShapeDtypeStruct((2, 16), jnp.float32))
    call = jax.ffi.ffi_call(native.BN_POOL_TARGET, shapes)
    with pytest.raises(Exception, match="padded input 8x8x1, 3x3 kernel \\[9, 16\\], sign \\[8\\]"):
        call(jnp.zeros((1, 8, 8, 1)), jnp.zeros((9, 16)), jnp.ones(8), kh=3, kw=3).block_until_ready()


class _Block(nn.Module):
    """One paper-CNN block and a dense head: conv -> batch norm + ReLU + 2x2 max pool -> dense."""

    cin_stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = layers.Conv(16, (3, 3), strides=self.cin_stride, use_bias=False, name="conv0")
        conv_input, x = x, conv(x)
        x = normalization.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            activation=nn.relu,
            max_pool=layers.MaxPool((2, 2), (2, 2)),
        )(x, conv=conv, conv_input=conv_input)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _loss(model, variables, x, implementation, train=True):
    with layers.implementation(implementation):
        out, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
    return jnp.sum(out * jnp.arange(3.0)), (out, updates)


def _uses_fused_block(model, variables, x, implementation="auto", train=True) -> bool:
    grad = jax.grad(lambda v: _loss(model, v, x, implementation, train)[0])
    return native.BN_POOL_TARGET in jax.jit(grad).lower(variables).as_text()


def _variables(model, x):
    variables = model.init(jax.random.key(0), x, train=False)
    params = variables["params"]
    scale = params["BatchNorm_0"]["scale"].at[3].set(-0.7)  # A negative scale: that channel pools minima.
    params = {**params, "BatchNorm_0": {**params["BatchNorm_0"], "scale": scale}}
    return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("cin,blocky", [(1, False), (3, False), (1, True)])
def test_batch_norm_fused_with_its_conv_matches_xla(cin, blocky):
    """Outputs, running statistics and the gradients of every parameter and of the input. Blocky: images
    of constant 8x8 blocks, whose inner windows tie (the first of equal elements takes the pooled
    cotangent, as in XLA's max-pool gradient)."""
    _require_kernel()
    rng = np.random.default_rng(2)
    if blocky:
        x = np.repeat(np.repeat(rng.random((5, 2, 2, cin)), 8, axis=1), 8, axis=2)[:, :12, :10]
    else:
        x = rng.random((5, 12, 10, cin))
    x = jnp.asarray(x, jnp.float32)
    model = _Block()
    variables = _variables(model, x)
    assert _uses_fused_block(model, variables, x)
    assert not _uses_fused_block(model, variables, x, implementation="xla")

    def run(implementation):
        grad = jax.grad(functools.partial(_loss, model, implementation=implementation), (0, 1), has_aux=True)
        return jax.jit(grad)(variables, x)

    (got_grads, (got_out, got_stats)), (want_grads, (want_out, want_stats)) = run("auto"), run("xla")
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((got_stats, got_grads)), jax.tree.leaves((want_stats, want_grads))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(want)))))


def test_fused_only_when_training_on_a_stride_1_conv():
    _require_kernel()
    x = jnp.ones((2, 8, 8, 1), jnp.float32)
    model = _Block()
    variables = _variables(model, x)
    assert not _uses_fused_block(model, variables, x, train=False)  # Running statistics: XLA's ops.
    strided = _Block(cin_stride=2)
    assert not _uses_fused_block(strided, _variables(strided, x), x)
    wide = jnp.ones((2, 8, 8, 2), jnp.float32)  # Two input channels: not compiled for.
    assert not _uses_fused_block(model, _variables(model, wide), wide)


def test_paper_cnn_uses_it_for_its_first_block_only():
    _require_kernel()
    model = paper_cnn.PaperCNN(num_classes=6, features=(16, 32))
    x = jnp.ones((2, 16, 16, 1), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        with layers.implementation("auto"):
            out, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)},
            )
        return jnp.sum(out)

    text = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
    assert text.count(f"@{native.BN_POOL_TARGET}(") == 1
    assert text.count(f"@{native.BN_POOL_GRAD_TARGET}(") == 1
