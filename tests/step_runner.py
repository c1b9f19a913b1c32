"""Runs a few train steps on a fixed synthetic batch over all visible devices; used by tests.

Usage: python tests/step_runner.py OUT.npz NUM_STEPS   (set XLA_FLAGS to fake several CPU devices)
"""

import functools
import sys

import jax
import numpy as np

from configs import quick
from medjax import models, sharding, steps


def synthetic_batch(batch_size=16, seed=0):
    """Images whose brightness pattern depends on the label, so a model can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, batch_size).astype(np.int32)
    images = rng.integers(0, 60, (batch_size, 64, 64, 1))
    for i, label in enumerate(labels):
        images[i, label * 10 : label * 10 + 10] += 150
    return {"image": images.astype(np.uint8), "label": labels}


def model_config(dtype="float32"):
    """The quick config's model without dropout, computing in `dtype`."""
    config = quick.get_config()
    config.model.dropout_rate = 0.0
    config.model.dtype = dtype
    return config


def run(num_steps, batch=None, dtype="float32"):
    """Returns (losses, final state as numpy) after `num_steps` steps on one fixed batch."""
    config = model_config(dtype)
    batch = batch or synthetic_batch()
    mesh = sharding.create_mesh()
    model = models.create_model(config.model, 6)
    tx = steps.create_optimizer(config.train, num_steps)
    state = jax.jit(
        functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)),
        out_shardings=sharding.replicated(mesh),
    )(jax.random.key(0))
    step_fn = jax.jit(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            dropout_key=jax.random.key(1),
            mean=0.5,
            std=0.25,
            label_smoothing=0.0,
        ),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, sharding.to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


if __name__ == "__main__":
    losses, state = run(int(sys.argv[2]))
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}
    np.savez(sys.argv[1], losses=losses, devices=jax.device_count(), **flat)
