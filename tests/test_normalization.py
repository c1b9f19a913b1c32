"""medjax.models.normalization.BatchNorm against flax's nn.BatchNorm: variables, numerics and memory."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import blocks
from medjax.models import layers
from medjax.models import normalization

KEY = jax.random.key(0)


def _random_like(tree, seed):
    """Values that differ from the initializers (so a swapped scale/bias or mean/var would show)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5) for k, x in zip(keys, leaves)]
    )


def _outputs_and_grads(module, activation, variables, x, cotangent):
    """Jitted output, batch_stats updates and gradients w.r.t. params and input of `module` (+ activation)."""

    def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        if activation is not None:
            y = activation(y)
        return jnp.sum(y.astype(jnp.float32) * cotangent), (y, updates)

    (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables.get("params", {}), x
    )
    return y, updates, grads


def _assert_trees_close(actual, expected, rtol, atol):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "activation,dtype,options",
    [
        (None, jnp.float32, {}),
        (nn.relu, jnp.float32, {}),
        (nn.relu6, jnp.float32, {}),
        (nn.relu, jnp.bfloat16, {}),
        (nn.relu, jnp.float32, {"use_scale": False, "use_bias": False}),
        (nn.relu, jnp.float32, {"axis": 1, "use_fast_variance": False}),
        (nn.relu, jnp.float32, {"rematerialize": False}),
    ],
)
def test_matches_flax_batch_norm(train, activation, dtype, options):
    """Outputs, running-statistics updates and gradients (input, scale, bias) as flax's, in both modes."""
    x = (jax.random.normal(KEY, (8, 6, 5, 4)) * 3 + 1).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    common = dict(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype)
    flax_options = {k: v for k, v in options.items() if k != "rematerialize"}
    reference = nn.BatchNorm(**common, **flax_options)
    ours = normalization.BatchNorm(**common, activation=activation, **options)
    variables = _random_like(reference.init(KEY, x), seed=2)
    expected = _outputs_and_grads(reference, activation, variables, x, cotangent)
    actual = _outputs_and_grads(ours, None, variables, x, cotangent)
    # The same jnp operations: float32 results agree to rounding, bfloat16 ones to its precision.
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    _assert_trees_close(actual, expected, **tolerance)
    # Training moves the running statistics (as checked above, exactly as flax does); evaluation doesn't.
    moved = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), actual[1]["batch_stats"], variables["batch_stats"]
    )
    assert moved == {"mean": train, "var": train}


def test_float32_train_step_is_bitwise_identical_to_flax():
    """Not only close: the same operations give the same bits (forward, statistics, gradients)."""
    x = jax.random.normal(KEY, (16, 8, 8, 3)) * 2 - 1
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    reference = nn.BatchNorm(use_running_average=False, momentum=0.9)
    ours = normalization.BatchNorm(use_running_average=False, momentum=0.9, activation=nn.relu)
    variables = _random_like(reference.init(KEY, x), seed=3)
    expected = _outputs_and_grads(reference, nn.relu, variables, x, cotangent)
    actual = _outputs_and_grads(ours, None, variables, x, cotangent)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("scale_init", [nn.initializers.ones, nn.initializers.zeros])
def test_same_variables_and_initial_values(scale_init):
    x = jnp.ones((2, 3, 3, 5))
    kwargs = dict(use_running_average=False, scale_init=scale_init)
    expected = nn.BatchNorm(**kwargs).init(KEY, x)
    actual = normalization.BatchNorm(**kwargs, activation=nn.relu).init(KEY, x)
    _assert_trees_close(actual, expected, rtol=0, atol=0)
    assert set(actual["params"]) == {"scale", "bias"} and set(actual["batch_stats"]) == {"mean", "var"}


def test_auto_names_and_loading_flax_variables():
    """Unnamed, it is `BatchNorm_0` like nn.BatchNorm, so variables move between the two unchanged."""

    class Net(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x):
            return self.norm(use_running_average=True)(nn.Dense(4)(x))

    x = jax.random.normal(KEY, (3, 2))
    flax_variables = _random_like(Net(nn.BatchNorm).init(KEY, x), seed=4)
    ours = Net(normalization.BatchNorm)
    assert jax.tree_util.tree_structure(ours.init(KEY, x)) == jax.tree_util.tree_structure(flax_variables)
    assert "BatchNorm_0" in flax_variables["params"]
    np.testing.assert_array_equal(ours.apply(flax_variables, x), Net(nn.BatchNorm).apply(flax_variables, x))


class _FlaxConvBN(nn.Module):
    """blocks.ConvBN as it was before medjax.models.normalization: nn.BatchNorm, then the activation."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        return nn.relu(x)


@pytest.mark.parametrize("train", [True, False])
def test_conv_bn_matches_flax_conv_batch_norm_relu(train):
    x = jax.random.normal(KEY, (4, 8, 8, 3))
    ours = blocks.ConvBN(8, 3, padding=1)
    reference = _FlaxConvBN()
    variables = _random_like(ours.init(KEY, x, train=False), seed=5)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        reference.init(KEY, x, train=False)
    )

    def loss(module, params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=train,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * jnp.cos(y)), (y, updates)

    grad = lambda m: jax.jit(jax.grad(functools.partial(loss, m), argnums=(0, 1), has_aux=True))
    actual, expected = grad(ours)(variables["params"], x), grad(reference)(variables["params"], x)
    _assert_trees_close(actual, expected, rtol=2e-5, atol=2e-5)  # Convolutions may differ (CPU path).


LAYERS, BATCH, SIZE, CHANNELS = 4, 16, 32, 16
ACTIVATION_BYTES = BATCH * SIZE * SIZE * CHANNELS * 4  # One float32 activation of the stack below.


class _ConvBNStack(nn.Module):
    """LAYERS 3x3 conv -> batch norm -> ReLU layers, with flax's batch norm or medjax's."""

    ours: bool

    @nn.compact
    def __call__(self, x):
        for _ in range(LAYERS):
            x = nn.Conv(CHANNELS, (3, 3), padding=1, use_bias=False)(x)
            if self.ours:
                x = normalization.BatchNorm(use_running_average=False, momentum=0.9, activation=nn.relu)(x)
            else:
                x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9)(x))
        return jnp.mean(x)


def _stack_loss(ours):
    module = _ConvBNStack(ours)
    x = jax.random.normal(KEY, (BATCH, SIZE, SIZE, CHANNELS))
    variables = module.init(KEY, x)

    def loss(params, x):
        y, _ = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return y

    return loss, variables["params"], x


def test_saves_only_conv_and_batch_norm_inputs():
    """Residuals per layer: the conv input and the BN input (as PyTorch), where flax's keep over four."""

    def residual_bytes(ours):
        loss, params, x = _stack_loss(ours)
        _, pullback = jax.vjp(loss, params, x)
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(pullback))

    ours, theirs = residual_bytes(True), residual_bytes(False)
    assert ours < (2 * LAYERS + 0.5) * ACTIVATION_BYTES, ours / ACTIVATION_BYTES  # + parameters.
    assert theirs - ours > 1.5 * LAYERS * ACTIVATION_BYTES, (ours, theirs)


def test_compiled_gradient_needs_less_temporary_memory_than_flax():
    """XLA's buffers for the jitted gradient. Measured: 10 activations (two per layer + two) vs flax's 13;
    with `jax.checkpoint` instead of the custom VJP, XLA:CPU hoisted the recompute and needed 13 too."""

    def temp_bytes(ours):
        loss, params, x = _stack_loss(ours)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    ours, theirs = temp_bytes(True), temp_bytes(False)
    assert ours < (2 * LAYERS + 2.5) * ACTIVATION_BYTES, ours / ACTIVATION_BYTES
    assert theirs - ours > 0.5 * LAYERS * ACTIVATION_BYTES, (ours, theirs)


POOLS = [
    layers.MaxPool((2, 2), (2, 2)),  # The paper CNN's and VGG's.
    layers.MaxPool((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's and DenseNet's stems (overlapping).
]


@pytest.mark.parametrize("implementation", ["fast", "xla"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(
    "train,activation,options",
    [
        (True, nn.relu, {}),
        (False, nn.relu, {}),
        (True, None, {}),
        (True, nn.relu, {"rematerialize": False}),
        (True, nn.relu, {"use_scale": False}),
    ],
)
def test_fused_max_pool_matches_pooling_the_output(implementation, pool, train, activation, options):
    """BatchNorm(max_pool=p) pools before normalising; it equals p applied to its unpooled output: the
    same output bits and running statistics, gradients to rounding. Channels with a negative scale pool
    the window minimum. (A zero scale ties every window after normalising: the output is the same, the
    scale's gradient is another valid subgradient, from the window maximum instead of its first element.)"""
    x = jnp.round(jax.random.normal(KEY, (4, 8, 8, 4)) * 4) / 4 + 0.5  # Ties within windows.
    cotangent = jax.random.normal(jax.random.key(1), (4, 4, 4, 4))
    common = dict(use_running_average=not train, momentum=0.9, activation=activation, **options)
    unpooled = normalization.BatchNorm(**common)
    fused = normalization.BatchNorm(**common, max_pool=pool)
    variables = _random_like(unpooled.init(KEY, x), seed=6)
    if "scale" in variables["params"]:
        variables["params"]["scale"] = jnp.asarray([0.7, -1.3, 0.2, -0.4])
    with layers.implementation(implementation):
        expected = _outputs_and_grads(unpooled, pool, variables, x, cotangent)
        actual = _outputs_and_grads(fused, None, variables, x, cotangent)
    assert actual[0].shape == (4, 4, 4, 4)
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1]["batch_stats"]["mean"], expected[1]["batch_stats"]["mean"])
    np.testing.assert_array_equal(actual[1]["batch_stats"]["var"], expected[1]["batch_stats"]["var"])
    _assert_trees_close(actual[2], expected[2], rtol=1e-5, atol=1e-5)


def test_fused_max_pool_rejects_activations_it_does_not_commute_with():
    x = jnp.ones((2, 4, 4, 3))
    pool = layers.MaxPool((2, 2), (2, 2))
    with pytest.raises(ValueError, match="bn.*activation None or nn.relu.*gelu"):
        normalization.BatchNorm(use_running_average=False, activation=nn.gelu, max_pool=pool, name="bn").init(
            KEY, x
        )
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*axis=1"):
        normalization.BatchNorm(use_running_average=False, axis=1, max_pool=pool).init(KEY, x)
