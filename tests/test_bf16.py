"""bfloat16 compute (config.model.dtype='bfloat16'): training, checkpoints and evaluation.

Weights, optimizer state and batch-norm statistics stay float32; activations are rounded to bfloat16,
whose 8-bit significand holds a value to within 2^-9 (0.2%) of itself. The quick model rounds its input
and the output of each of its two convolution blocks and two dense layers, so its logits may drift by a
few of those roundings: logits are compared to float32 within 2^-6 (1.6%) of the largest logit (0.7% on
the test's weights), and probabilities within half that, since a softmax moves no probability by more than
half the largest change of a logit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import checkpointing, evaluation, models, sharding, steps
from tests import step_runner

MEAN, STD = 0.5, 0.25


@pytest.fixture(scope="module")
def trained():
    """(losses, state) of 10 bfloat16 steps on one batch."""
    return step_runner.run(num_steps=10, dtype="bfloat16")


def _infer(model, variables, images):
    """Inference-mode logits (jit-compiled: op by op the model is slow)."""
    return jax.jit(functools.partial(model.apply, train=False))(variables, images)


def _model(dtype):
    return models.create_model(step_runner.model_config(dtype).model, 6)


def test_train_step_learns_with_float32_weights(trained):
    losses, state = trained
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.dtype != jnp.bfloat16
        assert np.all(np.isfinite(leaf))
    for leaf in jax.tree_util.tree_leaves((state.params, state.batch_stats)):
        assert leaf.dtype == np.float32


def _abstract(state, mesh):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), state
    )


@pytest.fixture(scope="module")
def restored(trained, tmp_path_factory):
    _, state = trained
    workdir = str(tmp_path_factory.mktemp("bf16"))
    manager = checkpointing.create_manager(workdir)
    checkpointing.save(manager, 10, jax.device_put(state), {"config": {"model": {"dtype": "bfloat16"}}})
    manager.wait_until_finished()
    reader = checkpointing.create_manager(workdir, read_only=True)
    return checkpointing.restore_state(reader, 10, _abstract(state, sharding.create_mesh()))


def test_checkpoint_round_trip_is_bit_identical(trained, restored):
    _, state = trained
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluation_matches_float32_within_bfloat16_rounding(restored):
    variables = {"params": restored.params, "batch_stats": restored.batch_stats}
    data = step_runner.synthetic_batch(7, seed=5)
    images = steps.normalize(jnp.asarray(data["image"]), MEAN, STD)
    logits = {
        d: np.asarray(_infer(_model(d), variables, images), np.float32) for d in ("bfloat16", "float32")
    }
    scale = np.abs(logits["float32"]).max()
    assert scale > 1.0  # Trained logits, not near-zero ones.
    error = np.abs(logits["bfloat16"] - logits["float32"]).max()
    assert 0 < error <= 2**-6 * scale, (error, scale)  # Not 0: the computation really is bfloat16.

    mesh = sharding.create_mesh()
    probs = {
        d: evaluation.Predictor(_model(d), mesh, mean=MEAN, std=STD).predict(
            variables, data["image"], data["label"], 4
        )
        for d in ("bfloat16", "float32")
    }
    assert probs["bfloat16"].dtype == np.float32
    np.testing.assert_allclose(probs["bfloat16"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs["bfloat16"], probs["float32"], atol=2**-7 * scale)
