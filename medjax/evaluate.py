"""Evaluation job: restores a checkpoint read-only and scores a dataset split or a folder of images.

  python -m medjax.evaluate --workdir=W [--step=N] (--split=test | --folder=DIR) [--output=FILE]
  python -m medjax.evaluate --workdir=W --watch [--split=validation]    # medjax/watch.py

Everything needed (config, class names, preprocessing) is read from the checkpoint's metadata. The
report is written to --output (if given) and to `W/eval/<split or folder name>_step<N>.json`.
"""

import functools
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import tensorflow as tf

from medjax import checkpointing
from medjax import datasets
from medjax import evaluation
from medjax import files
from medjax import ops
from medjax import sharding
from medjax import steps
from medjax import train
from medjax import transfer
from medjax import watch

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: latest).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split to evaluate, e.g. test.")
_FOLDER = flags.DEFINE_string("folder", None, "Folder of class subfolders of images to evaluate.")
_WATCH = flags.DEFINE_bool("watch", False, "Evaluate each new checkpoint until the final one.")
_BEST_METRIC = flags.DEFINE_string("best_metric", "accuracy", "--watch: metric that picks the best step.")
_POLL_INTERVAL = flags.DEFINE_float("poll_interval", 10.0, "--watch: seconds between looks.")
_TIMEOUT = flags.DEFINE_float(
    "timeout", None, "--watch: exit after this many seconds with no new checkpoint."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON report.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Override the dataset manual dir stored in the config.")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "Override the TFDS data dir stored in the config.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Override the global eval batch size.")


def evaluate_checkpoint(
    workdir: str,
    *,
    step: int | None = None,
    split: str | None = None,
    folder: str | None = None,
    manual_dir: str | None = None,
    tfds_dir: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Restores `workdir`'s checkpoint and returns the report for a split or a folder.

    A damaged checkpoint raises checkpointing.BadCheckpointError when `step` names it; without `step`,
    the newest checkpoint that restores and matches its checksums is used (each bad one is logged).
    """
    if (split is None) == (folder is None):
        raise ValueError("Give exactly one of split or folder.")
    manager = checkpointing.create_manager(workdir, read_only=True)
    options = dict(
        split=split, folder=folder, manual_dir=manual_dir, tfds_dir=tfds_dir, batch_size=batch_size
    )
    if step is not None:
        return _evaluate_step(manager, workdir, checkpointing.resolve_step(manager, step), **options)
    candidates = sorted(manager.all_steps(), reverse=True) or [checkpointing.resolve_step(manager, None)]
    for candidate in candidates:
        try:
            return _evaluate_step(manager, workdir, candidate, **options)
        except checkpointing.BadCheckpointError as e:
            if candidate == candidates[-1]:
                raise
            logging.error("%s; trying the next older checkpoint.", e)


def _evaluate_step(manager, workdir, step, *, split, folder, manual_dir, tfds_dir, batch_size) -> dict:
    metadata = checkpointing.restore_metadata(manager, step)
    config = ml_collections.ConfigDict(metadata["config"])
    class_names = metadata["class_names"]
    preprocessing = metadata["preprocessing"]
    image_shape = tuple(preprocessing["image_shape"])

    if folder is not None:
        if config.data.name == "image_folder":  # Decoded, resized and converted as the dataset stores them.
            size, channels = config.data.stored_image_size, config.data.stored_channels
            arrays = datasets.image_folder.read_class_folder(folder, class_names, size, channels)
        else:
            arrays = datasets.read_class_folder(folder, class_names)
        if arrays["image"].shape[1:] != image_shape:
            raise ValueError(
                f'Images in {folder} have shape {arrays["image"].shape[1:]}; the model expects {image_shape}.'
            )
        source = {"folder": files.absolute(folder)}
    else:
        builder = datasets.prepare_config(config.data, tfds_dir, manual_dir)
        arrays = datasets.load_split(builder, split)
        source = {"split": split, "dataset": config.data.name}

    mesh = sharding.create_mesh()
    chosen_ops = ops.resolve(config)
    logging.info("Ops: %s.", chosen_ops.describe())
    model = chosen_ops.create_model(config.model, len(class_names))
    # Only the variables are restored, so any optimizer (e.g. transfer learning's) reads back the same way.
    input_kwargs = {k: preprocessing.get(k, 0) for k in ("image_size", "channels")}
    input_shape = steps.model_input_shape(image_shape, **input_kwargs)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        transfer.abstract_variables(model, input_shape),
    )
    variables = checkpointing.restore_variables(workdir, step, abstract)

    predictor = evaluation.Predictor(
        model,
        mesh,
        mean=preprocessing["mean"],
        std=preprocessing["std"],
        compiler_options=chosen_ops.compiler_options(config.model.name),
        **input_kwargs,
    )
    report = evaluation.evaluate(
        predictor, variables, arrays, class_names, batch_size or config.eval.batch_size
    )
    return report | source | {"checkpoint_step": step, "workdir": files.absolute(workdir)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train.quiet_library_logs()
    tf.config.set_visible_devices([], "GPU")
    if _WATCH.value:
        if _FOLDER.value or _STEP.value is not None or _OUTPUT.value:
            raise app.UsageError("--watch takes --split, not --folder, --step or --output.")
        split = _SPLIT.value or "validation"
        options = dict(manual_dir=_MANUAL_DIR.value, tfds_dir=_TFDS_DIR.value, batch_size=_BATCH_SIZE.value)
        evaluate = functools.partial(evaluate_checkpoint, _WORKDIR.value, split=split, **options)
        sys.exit(
            watch.watch(
                _WORKDIR.value,
                lambda step: evaluate(step=step),
                split=split,
                best_metric=_BEST_METRIC.value,
                poll_interval=_POLL_INTERVAL.value,
                timeout=_TIMEOUT.value,
            )
        )
    try:
        report = evaluate_checkpoint(
            _WORKDIR.value,
            step=_STEP.value,
            split=_SPLIT.value,
            folder=_FOLDER.value,
            manual_dir=_MANUAL_DIR.value,
            tfds_dir=_TFDS_DIR.value,
            batch_size=_BATCH_SIZE.value,
        )
    except checkpointing.BadCheckpointError as e:
        sys.exit(str(e))  # One line on stderr, exit status 1.
    name = _SPLIT.value or os.path.basename(os.path.normpath(_FOLDER.value))
    paths = [os.path.join(_WORKDIR.value, "eval", f'{name}_step{report["checkpoint_step"]}.json')]
    if _OUTPUT.value:
        paths.append(_OUTPUT.value)
    watch.write_report(report, paths)
    logging.info(
        "accuracy=%.5f macro_auc=%s on %d examples; report: %s",
        report["accuracy"],
        report["macro_auc"],
        report["num_examples"],
        paths,
    )
    print(json.dumps({k: report[k] for k in ("accuracy", "macro_auc", "num_examples", "checkpoint_step")}))


if __name__ == "__main__":
    app.run(main)
