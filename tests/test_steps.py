"""The step functions and the optimizer against computations written out in the test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quick
from medjax import evaluation, metrics, models, sharding, steps
from tests import step_runner

MEAN, STD = 0.5, 0.25


def _model(dropout_rate=0.0):
    config = quick.get_config()
    config.model.dropout_rate = dropout_rate
    return models.create_model(config.model, 6)


@pytest.fixture(scope="module")
def variables():
    """Fresh weights with batch-norm running averages unlike any batch's statistics."""
    state = jax.jit(functools.partial(steps.init_state, _model(), optax.sgd(0.1), image_shape=(64, 64, 1)))(
        jax.random.key(0)
    )
    batch_stats = jax.tree_util.tree_map(lambda x: x * 1.5 + 0.2, state.batch_stats)
    return {"params": state.params, "batch_stats": batch_stats}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _infer(model, variables, images):
    """Inference-mode logits (jit-compiled: op by op the model is slow)."""
    return jax.jit(functools.partial(model.apply, train=False))(variables, images)


def _train_mode(model, variables, images):
    """Train-mode (logits, {'batch_stats': this batch's update}) without dropout."""
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, images)


def _inference_probs(model, variables, images):
    logits = _infer(model, variables, steps.normalize(jnp.asarray(images), MEAN, STD))
    return _softmax(logits)


def test_eval_step_gives_each_example_its_own_class_probabilities(variables):
    model = _model()
    images = step_runner.synthetic_batch(8)["image"]
    eval_step = jax.jit(functools.partial(steps.eval_step, model=model, mean=MEAN, std=STD))
    probs = np.asarray(eval_step(variables, images))
    assert probs.shape == (8, 6) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, _inference_probs(model, variables, images), rtol=1e-4, atol=1e-6)
    alone = np.asarray(eval_step(variables, images[3:4]))
    np.testing.assert_allclose(alone[0], probs[3], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_predictor_returns_every_example_once_in_order(variables, batch_size):
    """7 examples: in batches of 4 the last is padded with one dummy, in batches of 16 with nine."""
    model = _model()
    data = step_runner.synthetic_batch(7, seed=3)
    predictor = evaluation.Predictor(model, sharding.create_mesh(), mean=MEAN, std=STD)
    probs = predictor.predict(variables, data["image"], data["label"], batch_size)
    expected = _inference_probs(model, variables, data["image"])
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    report = evaluation.evaluate(predictor, variables, data, [str(c) for c in range(6)], batch_size)
    assert report == metrics.classification_report(probs, data["label"], [str(c) for c in range(6)])
    assert report["num_examples"] == 7


def _train_step(model, tx, label_smoothing=0.0, dropout_key=1):
    return jax.jit(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            dropout_key=jax.random.key(dropout_key),
            mean=MEAN,
            std=STD,
            label_smoothing=label_smoothing,
        )
    )


def _state(model, tx):
    return jax.jit(functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)))(jax.random.key(0))


def test_train_step_loss_accuracy_and_running_averages():
    """Loss: label-smoothed cross-entropy of the train-mode logits; running averages: one momentum step
    towards the batch's statistics (those of a momentum-0 batch norm)."""
    smoothing = 0.2
    model = _model()
    tx = optax.sgd(0.1)
    state = _state(model, tx)
    batch = step_runner.synthetic_batch(8)
    new_state, got = _train_step(model, tx, smoothing)(state, batch)

    images = steps.normalize(jnp.asarray(batch["image"]), MEAN, STD)
    old = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = _train_mode(model, old, images)
    targets = np.full((8, 6), smoothing / 6)
    targets[np.arange(8), batch["label"]] += 1.0 - smoothing
    loss = np.mean(-np.sum(targets * np.log(_softmax(logits)), -1))
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(got["accuracy"]) == np.mean(np.argmax(logits, -1) == batch["label"])

    config = quick.get_config()
    momentum = config.model.bn_momentum
    config.model.update(dropout_rate=0.0, bn_momentum=0.0)
    _, stats = _train_mode(models.create_model(config.model, 6), old, images)
    for was, this_batch, now in zip(
        _leaves(state.batch_stats), _leaves(stats["batch_stats"]), _leaves(new_state.batch_stats), strict=True
    ):
        np.testing.assert_allclose(now, momentum * was + (1 - momentum) * this_batch, rtol=1e-4, atol=1e-6)


def test_dropout_masks_change_with_the_step_and_are_reproducible():
    model = _model(dropout_rate=0.5)
    tx = optax.sgd(0.1)
    state = _state(model, tx)
    batch = step_runner.synthetic_batch(8)
    step = _train_step(model, tx)
    loss = lambda s: float(step(s, batch)[1]["loss"])  # noqa: E731
    at_0, again, at_1 = loss(state), loss(state), loss(state.replace(step=jnp.ones((), jnp.int32)))
    assert at_0 == again
    assert at_0 != at_1


def _train_config(**overrides):
    config = quick.get_config().train
    config.update(schedule="constant", warmup_steps=0, learning_rate=0.1)
    config.update(overrides)
    return config


def test_sgd_uses_nesterov_momentum():
    config = _train_config(optimizer="sgd", momentum=0.8)
    tx = steps.create_optimizer(config, total_steps=10)
    params = {"w": jnp.ones((3,))}
    opt_state = tx.init(params)
    grads = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0]), np.array([-1.0, 0.0, 2.0])]
    trace = np.zeros(3)
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        trace = g + 0.8 * trace
        np.testing.assert_allclose(updates["w"], -0.1 * (g + 0.8 * trace), rtol=1e-6)


def test_adamw_decays_kernels_but_not_biases_or_scales():
    config = _train_config(optimizer="adamw", weight_decay=0.5)
    tx = steps.create_optimizer(config, total_steps=10)
    params = {
        "conv": {"kernel": jnp.full((3, 3, 1, 2), 2.0)},
        "dense": {"kernel": jnp.full((4, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "bn": {"scale": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)},
    }
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    for leaf in (updates["dense"]["bias"], updates["bn"]["scale"], updates["bn"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_warms_up_linearly_from_zero(schedule):
    config = _train_config(schedule=schedule, warmup_steps=4, learning_rate=0.01)
    lr = steps.learning_rate_schedule(config, total_steps=20)
    np.testing.assert_allclose([lr(0), lr(1), lr(2), lr(4)], [0.0, 0.0025, 0.005, 0.01], rtol=1e-6)
    later = [float(lr(s)) for s in range(4, 21)]
    if schedule == "cosine":
        assert np.all(np.diff(later) < 0) and later[-1] == pytest.approx(0.0, abs=1e-9)
    else:
        np.testing.assert_allclose(later, 0.01)
    # The optimizer follows the schedule: nothing moves on the first step.
    tx = steps.create_optimizer(config, total_steps=20)
    params = {"w": jnp.ones((3,))}
    updates, _ = tx.update({"w": jnp.ones((3,))}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], 0.0)
