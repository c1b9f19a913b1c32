"""Benchmark scripts keep their output contract: stdout is one JSON object per line, a summary last."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _json_records(command):
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # Fails on any non-JSON line.
    assert records[-1]["summary"] is True
    return records


def test_time_to_accuracy_prints_only_json_lines(tmp_path):
    # A fresh TFDS dir: preparing the dataset makes TensorFlow Datasets print progress to stdout.
    command = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "time_to_accuracy.py"),
        "--config=" + os.path.join(REPO, "configs", "quick.py"),
        "--config.data.manual_dir=" + os.path.join(REPO, "tests", "fixtures"),
        f"--config.data.tfds_dir={tmp_path / 'tfds'}",
        f"--workdir={tmp_path / 'work'}",
        "--config.train.eval_every_steps=2",
        "--target=0.999",
    ]
    records = _json_records(command)
    assert records[-1]["data_preparation_s"] is not None and records[-1]["reached"] is False
    assert all("step" in r and "accuracy" in r for r in records[:-1]) and len(records) > 1


def test_input_throughput_prints_only_json_lines(tmp_path):
    command = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "input_throughput.py"),
        "--manual_dir=" + os.path.join(REPO, "tests", "fixtures"),
        f"--tfds_dir={tmp_path / 'tfds'}",
        "--batch_size=8",
        "--num_batches=2",
        "--rounds=1",
        "--skip_train_step",
    ]
    records = _json_records(command)
    assert records[-1]["images_per_second"]["tf_data_augment"] > 0
