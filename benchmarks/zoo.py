r"""Model-zoo benchmark: trains configs/<model>.py for each model and seed, then tabulates the results.

  python benchmarks/zoo.py --models=resnet18,vgg11 --seeds=0,1,2 --out=DIR \
    --manual_dir=../shared/data [--tfds_dir=...] [--epochs=0.5]

Each run trains in DIR/<model>/seed<k> through `medjax.train.train_and_evaluate` and leaves its result
in DIR/<model>/seed<k>/benchmark.json; a rerun reuses finished runs and refuses to resume a half-finished
one (delete its folder). Every run is printed as one JSON line and appended to DIR/results.jsonl; then a
final JSON summary line (mean and sample std over seeds per model) is printed and written to
DIR/summary.json, and a markdown table to DIR/results.md.

Columns:
  test accuracy, macro AUC, minimum per-class recall: the final test-split report.
  params: the 'params' collection (batch-norm statistics excluded).
  FLOPs/image: XLA's cost analysis of the compiled eval-mode forward pass at batch 1 on the training image
    shape (a multiply-add counts 2), traced with stock flax ops, not the CPU path's, so that it counts the
    model's arithmetic, not a backend's.
  train images/s: median over the training log intervals (TensorBoard `train/images_per_second`), leaving
    out the first, which includes compilation (unless it is the only one, as in very short runs).
  wall s: the whole train_and_evaluate call (data loading, compilation, evaluations).
  epochs: trained, which early stopping (config.train.stop_at_eval_accuracy) can make fewer than configured.
"""

import glob
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import results  # noqa: E402
from medjax import models  # noqa: E402
from medjax import ops  # noqa: E402
from medjax import train  # noqa: E402

_MODELS = flags.DEFINE_list("models", None, "Model names; each has a configs/<name>.py.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) to train each model with.")
_OUT = flags.DEFINE_string("out", None, "Output folder for workdirs and result tables.", required=True)
_EPOCHS = flags.DEFINE_float("epochs", None, "Override config.train.num_epochs (e.g. 0.01 for a smoke run).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "config.data.manual_dir (else the config's / env).")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "config.data.tfds_dir (else the config's / env).")

METRICS = (
    "test_accuracy",
    "test_macro_auc",
    "test_min_recall",
    "train_images_per_second",
    "wall_seconds",
    "epochs",
)


def load_config(model: str):
    try:
        module = importlib.import_module(f"configs.{model}")
    except ModuleNotFoundError as e:
        if e.name != f"configs.{model}":
            raise
        raise ValueError(f"No configs/{model}.py for --models={model}") from e
    config = module.get_config()
    if _EPOCHS.value is not None:
        config.train.num_epochs = _EPOCHS.value
    if _MANUAL_DIR.value:
        config.data.manual_dir = _MANUAL_DIR.value
    if _TFDS_DIR.value:
        config.data.tfds_dir = _TFDS_DIR.value
    return config


def size_and_flops(config, image_shape, num_classes: int) -> tuple[int, float]:
    """(parameter count, forward FLOPs per image) without running the model."""
    model = models.create_model(config.model, num_classes)
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    forward = jax.jit(lambda v, images: model.apply(v, images, train=False))
    cost = forward.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax returns one dict per device.
    return params, float(cost["flops"])


def logged_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag from the workdir's TensorBoard event files, in step order."""
    points = []
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(raw)
            for value in event.summary.value:
                if value.tag == tag:
                    points.append((event.step, float(tf.make_ndarray(value.tensor))))
    return sorted(points)


def run_one(model: str, seed: int) -> dict:
    workdir = os.path.join(_OUT.value, model, f"seed{seed}")
    record_path = os.path.join(workdir, "benchmark.json")
    if os.path.exists(record_path):
        logging.info("Reusing %s", record_path)
        with open(record_path) as f:
            return json.load(f)
    if os.path.exists(workdir):
        raise RuntimeError(f"{workdir} holds an unfinished run; delete it to rerun {model} seed {seed}.")
    config = load_config(model)
    config.seed = seed
    start = time.time()
    reports = train.train_and_evaluate(config, workdir)
    wall = time.time() - start
    test = reports[config.data.test_split]
    recalls = {name: c["recall"] for name, c in test["per_class"].items()}
    with open(os.path.join(workdir, "config.json")) as f:
        image_shape = json.load(f)["preprocessing"]["image_shape"]
    params, flops = size_and_flops(config, image_shape, len(test["class_names"]))
    speeds = [v for _, v in logged_scalars(workdir, "train/images_per_second")]
    # Early stopping (config.train.stop_at_eval_accuracy) can end a run before its configured epochs.
    last_step, last_epoch = logged_scalars(workdir, "train/epoch")[-1]
    steps = test["checkpoint_step"]
    record = {
        "model": model,
        "seed": seed,
        "test_accuracy": test["accuracy"],
        "test_macro_auc": test["macro_auc"],
        "test_min_recall": min(recalls.values()),
        "min_recall_class": min(recalls, key=recalls.get),
        "params": params,
        "flops_per_image": flops,
        "train_images_per_second": float(np.median(speeds[1:] or speeds)) if speeds else None,
        "wall_seconds": wall,
        "epochs": steps * last_epoch / last_step,
        "configured_epochs": config.train.num_epochs,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "image_shape": image_shape,
        "config": f"configs/{model}.py",
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def summarize(records: list[dict]) -> dict:
    """Per model: mean and sample std (None for one seed) of each metric, plus the fixed columns."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in records):
        runs = [r for r in records if r["model"] == model]
        row = {"seeds": [r["seed"] for r in runs]}
        for key in ("params", "flops_per_image", "configured_epochs"):
            row[key] = runs[0][key]
        for key in METRICS:
            row[key] = results.mean_std(r[key] for r in runs)
        summary[model] = row
    return summary


def markdown_table(summary: dict) -> str:
    def cell(stat, scale=1.0, digits=2):
        return results.format_stat(stat, scale, digits)

    lines = [
        "| model | seeds | test accuracy (%) | macro AUC | min class recall (%) | params | GFLOPs/image "
        "| train images/s | wall (min) | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, row in summary.items():
        lines.append(
            f"| {model} | {len(row['seeds'])} | {cell(row['test_accuracy'], 100)} "
            f"| {cell(row['test_macro_auc'], 1, 4)} | {cell(row['test_min_recall'], 100)} "
            f"| {row['params']:,} | {row['flops_per_image'] / 1e9:.3f} "
            f"| {cell(row['train_images_per_second'], 1, 1)} | {cell(row['wall_seconds'], 1 / 60, 1)} "
            f"| {cell(row['epochs'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for model in _MODELS.value:
        load_config(model)  # Fail on a bad name before hours of training.
    ops.tune_process(load_config(_MODELS.value[0]))  # As medjax.main does, before JAX starts.
    tf.config.set_visible_devices([], "GPU")  # tf.data only feeds the host.
    writer = results.ResultWriter(_OUT.value)
    for model in _MODELS.value:
        for seed in _SEEDS.value:
            writer.add(run_one(model, int(seed)))
    summary = summarize(writer.records)
    writer.finish(summary, markdown_table(summary))


if __name__ == "__main__":
    app.run(main)
