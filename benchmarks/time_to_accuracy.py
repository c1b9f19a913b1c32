r"""Wall time from launch to a validation accuracy target (default 99.9%) with medjax's own training loop.

  python benchmarks/time_to_accuracy.py --config=configs/fast.py --config.data.manual_dir=../shared/data

Runs `medjax.train.train_and_evaluate` in a fresh work dir with `config.train.stop_at_eval_accuracy`
(configs/fast.py sets 0.999 and evaluates every 100 steps), and times it from this script's first line.
Data preparation and the first step (compilation included) are reported apart; evaluation time stays in
the total, as in a real run. Prints one JSON object per evaluation and, last, a JSON summary.

Smoke test (seconds; the image fixture cannot reach the target):
  python benchmarks/time_to_accuracy.py --config=configs/quick.py \
    --config.data.manual_dir=tests/fixtures --config.train.eval_every_steps=2 --target=0.999
"""

import time

LAUNCH = time.time()

import contextlib  # noqa: E402
import json  # noqa: E402
import logging as std_logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medjax import ops  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir (default: a fresh temporary one).")
_TARGET = flags.DEFINE_float("target", None, "Overrides config.train.stop_at_eval_accuracy.")
config_flags.DEFINE_config_file("config", "configs/fast.py", "Training configuration file.")

# Messages of medjax/train.py that mark the milestones.
_PATTERNS = {
    "data": re.compile(r"Data ready in ([\d.]+)s"),
    "first_step": re.compile(r"First step \(compile included\) done in ([\d.]+)s"),
    "eval": re.compile(r"step (\d+): \S+ accuracy=([\d.]+)"),
    "stop": re.compile(r"Stopping early at step (\d+)"),
}


class _Milestones(std_logging.Handler):
    """Records (seconds since launch, kind, match) for train.py's milestone log lines."""

    def __init__(self, out):
        super().__init__()
        self.events = []
        self.out = out

    def emit(self, record):
        message = record.getMessage()
        for kind, pattern in _PATTERNS.items():
            match = pattern.search(message)
            if match:
                self.events.append((record.created - LAUNCH, kind, match.groups()))
                if kind == "eval":
                    step, accuracy = int(match.group(1)), float(match.group(2))
                    print(
                        json.dumps({"step": step, "accuracy": accuracy, "seconds": record.created - LAUNCH}),
                        file=self.out,
                        flush=True,
                    )


def main(argv):
    del argv
    config = flags.FLAGS.config
    process_settings = ops.tune_process(config)  # As medjax.main does, before JAX starts.
    import jax
    import tensorflow as tf

    from medjax import train

    tf.config.set_visible_devices([], "GPU")
    if _TARGET.value is not None:
        config.train.stop_at_eval_accuracy = _TARGET.value
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="medjax_tta_")
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} already has checkpoints; time-to-accuracy needs a fresh work dir.")
    milestones = _Milestones(sys.stdout)
    std_logging.getLogger("absl").addHandler(milestones)
    start = time.time() - LAUNCH
    # stdout carries only JSON lines: TensorFlow Datasets prints its progress there.
    with contextlib.redirect_stdout(sys.stderr):
        reports = train.train_and_evaluate(config, workdir)
    total = time.time() - LAUNCH

    first = {kind: (t, groups) for t, kind, groups in reversed(milestones.events)}  # Earliest of each.
    target = config.train.stop_at_eval_accuracy
    reached = [
        (t, groups) for t, kind, groups in milestones.events if kind == "eval" and float(groups[1]) >= target
    ]
    summary = {
        "summary": True,
        "target_accuracy": target,
        "reached": bool(reached),
        "time_to_accuracy_s": reached[0][0] if reached else None,
        "steps_to_accuracy": int(reached[0][1][0]) if reached else None,
        "imports_s": start,
        "data_preparation_s": float(first["data"][1][0]) if "data" in first else None,
        "first_step_with_compile_s": float(first["first_step"][1][0]) if "first_step" in first else None,
        "total_wall_s_with_final_evaluation": total,
        "final_reports": {
            split: {"accuracy": r["accuracy"], "macro_auc": r["macro_auc"]} for split, r in reports.items()
        },
        "batch_size": config.train.batch_size,
        "model": config.model.name,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "workdir": workdir,
        "loadavg": os.getloadavg(),
        "process_settings": process_settings,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    app.run(main)
