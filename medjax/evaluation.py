"""Exact evaluation over a mesh: padded, masked batches; predictions gathered from every process."""

import functools
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from medjax import input_pipeline
from medjax import metrics
from medjax import sharding
from medjax import steps


class Predictor:
    """Runs the jitted eval step over a dataset held in memory and returns its class probabilities."""

    def __init__(
        self,
        model: nn.Module,
        mesh: jax.sharding.Mesh,
        *,
        mean: float,
        std: float,
        image_size: int = 0,
        channels: int = 0,
        compiler_options: Optional[dict] = None,
    ):
        self._mesh = mesh
        self._step = jax.jit(
            functools.partial(
                steps.eval_step, model=model, mean=mean, std=std, image_size=image_size, channels=channels
            ),
            in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
            out_shardings=sharding.batch_sharded(mesh),
            compiler_options=compiler_options,
        )

    def predict(
        self, variables: dict, images: np.ndarray, labels: np.ndarray, global_batch_size: int
    ) -> np.ndarray:
        """Probabilities [N, C] for every example exactly once, in the order given."""
        sharding.check_batch_size(global_batch_size, "config.eval.batch_size")
        gathered_probs, gathered_masks = [], []
        for local in input_pipeline.eval_batches(
            images,
            labels,
            global_batch_size=global_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            batch = sharding.to_global(local, self._mesh)
            probs = self._step(variables, batch["image"])
            gathered_probs.append(multihost_utils.process_allgather(probs, tiled=True))
            gathered_masks.append(multihost_utils.process_allgather(batch["mask"], tiled=True))
        probs = np.concatenate(gathered_probs)
        keep = np.concatenate(gathered_masks) > 0
        probs = probs[keep]
        if len(probs) != len(images):
            raise RuntimeError(f"Evaluation produced {len(probs)} predictions for {len(images)} examples.")
        return probs


def evaluate(
    predictor: Predictor, variables: dict, arrays: dict, class_names, global_batch_size: int
) -> dict:
    """The metrics report (see `metrics.classification_report`) for `arrays` {'image', 'label'}."""
    probs = predictor.predict(variables, arrays["image"], arrays["label"], global_batch_size)
    return metrics.classification_report(probs, arrays["label"], class_names)
