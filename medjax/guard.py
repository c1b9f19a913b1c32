"""Stops training at the first non-finite loss or gradient norm, before that state is checkpointed.

Without it a diverged run (say a learning rate of 1e6) trains on, saves NaN checkpoints and lets
max_to_keep delete the good ones. The check costs no extra host sync per step: each step folds
"first step with a non-finite value" into a device-side scalar (a tiny jitted op, dispatched
asynchronously), and the host reads that scalar only at `check`, which the loop calls where it waits
for the device anyway (logging, evaluation) and before every checkpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm."""


@jax.jit
def _fold(first_bad, step, metrics):
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(metrics)]))
    return jnp.where((first_bad < 0) & ~finite, step, first_bad)


class NonFiniteGuard:
    """Watches the train step's scalar metrics (`loss`, `grad_norm`)."""

    KEYS = ("loss", "grad_norm")

    def __init__(self):
        self._first_bad = None
        self._checked_step = None

    def update(self, step: int, metrics: dict) -> None:
        """Folds this step's metrics in (asynchronously)."""
        watched = {k: metrics[k] for k in self.KEYS if k in metrics}
        first_bad = self._first_bad if self._first_bad is not None else np.int32(-1)
        self._first_bad = _fold(first_bad, np.int32(step), watched)

    def check(self, step: int, checkpoint_dir: str | None = None) -> None:
        """Raises NonFiniteError naming the first step (up to `step`) whose loss or gradient norm was not
        finite; nothing of that state has been checkpointed."""
        if self._first_bad is None or self._checked_step == step:
            return
        first_bad = int(jax.device_get(self._first_bad))
        if first_bad >= 0:
            kept = f" The checkpoints in {checkpoint_dir} are from before it." if checkpoint_dir else ""
            raise NonFiniteError(
                f"Non-finite loss or gradient norm at step {first_bad} (found at step {step}); training "
                f"stopped without saving that state.{kept} Lower config.train.learning_rate or check the "
                "data."
            )
        self._checked_step = step
