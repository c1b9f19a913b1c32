"""Checkpoints round-trip bit-identically; restoring into a different model is an error."""

import functools

import jax
import numpy as np
import pytest

from configs import quick
from medjax import checkpointing, models, sharding, steps
from tests import step_runner


def _abstract_like(state, mesh):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), state
    )


def test_round_trip_is_bit_identical(tmp_path):
    _, state = step_runner.run(num_steps=2)
    state = jax.device_put(state)
    manager = checkpointing.create_manager(str(tmp_path))
    metadata = {"class_names": ["a", "b"], "preprocessing": {"mean": 0.5}}
    checkpointing.save(manager, 2, state, metadata)
    manager.wait_until_finished()

    reader = checkpointing.create_manager(str(tmp_path), read_only=True)
    assert checkpointing.resolve_step(reader, None) == 2
    assert checkpointing.restore_metadata(reader, 2) == metadata
    restored = checkpointing.restore_state(reader, 2, _abstract_like(state, sharding.create_mesh()))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_into_another_model_is_an_error(tmp_path):
    _, state = step_runner.run(num_steps=1)
    manager = checkpointing.create_manager(str(tmp_path))
    checkpointing.save(manager, 1, jax.device_put(state), {})
    manager.wait_until_finished()

    config = quick.get_config()
    config.model.features = (4, 8, 16)  # One more block than the checkpoint's model.
    model = models.create_model(config.model, 6)
    tx = steps.create_optimizer(config.train, 1)
    other = jax.eval_shape(
        functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)), jax.random.key(0)
    )
    with pytest.raises(
        ValueError, match=r"(?s)does not match the model.*missing in checkpoint: .*block2.*conv"
    ):
        checkpointing.restore_state(manager, 1, _abstract_like(other, sharding.create_mesh()))


def test_missing_checkpoints_and_steps_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints directory"):
        checkpointing.create_manager(str(tmp_path / "nowhere"), read_only=True)
    _, state = step_runner.run(num_steps=1)
    manager = checkpointing.create_manager(str(tmp_path))
    checkpointing.save(manager, 1, jax.device_put(state), {})
    manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"No checkpoint for step 7 .* saved steps: \[1\]"):
        checkpointing.resolve_step(manager, 7)
