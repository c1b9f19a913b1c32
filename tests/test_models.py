"""Model shapes, registry errors and train/eval behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quick
from medjax import models


def _model_and_variables(dtype="float32"):
    config = quick.get_config()
    config.model.dtype = dtype
    model = models.create_model(config.model, num_classes=6)
    x = jnp.zeros((2, 64, 64, 1), jnp.uint8)
    return model, model.init(jax.random.key(0), x, train=False)


def test_output_shape_and_variables():
    model, variables = _model_and_variables()
    x = jax.random.uniform(jax.random.key(1), (3, 64, 64, 1))
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, 6) and logits.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["conv0"]["kernel"].shape == (3, 3, 1, 4)
    assert variables["params"]["head"]["kernel"].shape[-1] == 6


def test_train_mode_uses_dropout_and_batch_statistics():
    model, variables = _model_and_variables()
    x = jax.random.uniform(jax.random.key(1), (8, 64, 64, 1))
    eval_a = model.apply(variables, x, train=False)
    eval_b = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
    )
    train_b, _ = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
    )
    assert not np.allclose(train_a, train_b)  # Different dropout masks.
    old_mean = variables["batch_stats"]["bn0"]["mean"]
    assert not np.allclose(updates["batch_stats"]["bn0"]["mean"], old_mean)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, variables = _model_and_variables("bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
    logits = model.apply(variables, jnp.ones((2, 64, 64, 1)), train=False)
    assert logits.dtype == jnp.float32


def test_unknown_names_are_errors():
    config = quick.get_config()
    config.model.name = "nope"
    with pytest.raises(ValueError, match="config.model.name='nope'"):
        models.create_model(config.model, 6)
    config = quick.get_config()
    config.model.dtype = "float8"
    with pytest.raises(ValueError, match="config.model.dtype='float8'"):
        models.create_model(config.model, 6)
