"""Entry point: `python -m medjax.main --config=configs/base.py --workdir=DIR [--config.x.y=...]`."""

from medjax import runtime

if __name__ == "__main__":  # Not on import: it may re-execute the process (see runtime.py).
    runtime.tune_process()  # Before JAX and TensorFlow start their threads.

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from medjax import train  # noqa: E402

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and reports.", required=True
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host TPU/GPU; auto-detected cluster).",
)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # tf.data only feeds the host; keep TensorFlow off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info(
        "Allocator: %s; XLA: %s; dispatch: %s", runtime.status, runtime.xla_status, runtime.dispatch_status
    )
    logging.info(
        "JAX process %d of %d; local devices %s; global device count %d.",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )
    train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
