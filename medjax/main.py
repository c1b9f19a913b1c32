"""Entry point: `python -m medjax.main --config=configs/base.py --workdir=DIR [--config.x.y=...]`."""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from medjax import ops
from medjax import train

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
    config = flags.FLAGS.config
    # Before anything starts a JAX backend; a no-op unless the CPU ops run (config.cpu.malloc turns it off).
    process_settings = ops.tune_process(config)
    train.quiet_library_logs()
    # tf.data only feeds the host; keep TensorFlow off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info(
        "JAX process %d of %d; local devices %s; global device count %d; %s.",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
        process_settings,
    )
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
