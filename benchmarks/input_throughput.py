r"""Images/s that medjax's training input pipeline delivers on the real training split, vs the train step.

  python benchmarks/input_throughput.py --manual_dir=../shared/data [--tfds_dir=DIR]

Measures, alternating within each round: the tf.data pipeline (`input_pipeline.train_dataset`) with
and without augmentation, and a plain in-memory NumPy gather of the same batches (the floor that an
on-device pipeline could reach: no decode, no augmentation). Then the compiled train step of
`--model` (benchmarks/train_throughput.py, medjax's default CPU path) in a subprocess. Prints one JSON
object per measurement and, last, a summary with the pipeline / train-step ratios.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from configs import base  # noqa: E402
from medjax import ops  # noqa: E402


def _pipeline_rate(data, config, augment: bool, num_batches: int, start_step: int) -> float:
    """Images/s drawn from a fresh tf.data pipeline (after a few warm-up batches)."""
    from medjax import input_pipeline

    aug = config.augment.copy_and_resolve_references()
    aug.enabled = augment
    warmup = 5
    ds = input_pipeline.train_dataset(
        data["image"],
        data["label"],
        seed=config.seed,
        global_batch_size=config.train.batch_size,
        start_step=start_step,
        num_steps=num_batches + warmup,
        aug=aug,
    )
    it = ds.as_numpy_iterator()
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    count = sum(len(batch["label"]) for batch in it)
    return count / (time.perf_counter() - t0)


def _numpy_rate(data, batch_size: int, num_batches: int, seed: int) -> float:
    import numpy as np

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        index = rng.permutation(len(data["label"]))[:batch_size]
        batch = {"image": data["image"][index], "label": data["label"][index]}
    del batch
    return num_batches * batch_size / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manual_dir", default=None, help="config.data.manual_dir")
    parser.add_argument("--tfds_dir", default=None, help="config.data.tfds_dir")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=100, help="Timed batches per pipeline run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="paper_cnn", help="train_throughput.py model to compare with.")
    parser.add_argument("--skip_train_step", action="store_true")
    args = parser.parse_args()
    process_settings = ops.tune_process(base.get_config())  # As medjax.main does: tf.data runs under them.

    from medjax import train

    print(
        json.dumps(
            {
                "loadavg_start": os.getloadavg(),
                "cpu_count": os.cpu_count(),
                "process_settings": process_settings,
            }
        ),
        flush=True,
    )
    config = base.get_config()
    config.data.manual_dir = args.manual_dir
    config.data.tfds_dir = args.tfds_dir
    config.train.batch_size = args.batch_size
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TensorFlow Datasets prints its progress on stdout.
        data, _ = train.load_data(config)
    data = data["train"]
    print(
        json.dumps({"data_load_s": time.perf_counter() - t0, "train_examples": len(data["label"])}),
        flush=True,
    )

    rates = {"tf_data_augment": [], "tf_data_no_augment": [], "numpy_in_memory": []}
    for r in range(args.rounds):
        for name in rates:
            if name == "numpy_in_memory":
                rate = _numpy_rate(data, args.batch_size, args.num_batches, r)
            else:
                rate = _pipeline_rate(data, config, name == "tf_data_augment", args.num_batches, r * 1000)
            rates[name].append(rate)
            print(
                json.dumps(
                    {"round": r, "pipeline": name, "images_per_second": rate, "loadavg": os.getloadavg()}
                )
            )

    summary = {"summary": True, "images_per_second": {k: statistics.median(v) for k, v in rates.items()}}
    if not args.skip_train_step:
        import train_throughput

        spec = {
            "model": args.model,
            "variant": "medjax",
            "ops": "cpu",
            "batch_size": args.batch_size,
            "steps": train_throughput.MODELS[args.model][2],
            "warmup": train_throughput.MODELS[args.model][3],
        }
        step = train_throughput.measure(spec)
        print(json.dumps(step), flush=True)
        if "error" not in step:
            step_rate = step["images_per_second"]
            summary["images_per_second"][f"train_step_{args.model}"] = step_rate
            summary["pipeline_over_train_step"] = {
                k: v / step_rate for k, v in summary["images_per_second"].items() if k in rates
            }
    summary["loadavg"] = os.getloadavg()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
