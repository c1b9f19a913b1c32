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


def test_train_throughput_times_blocks_in_live_workers():
    command = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "train_throughput.py"),
        "--models=conv32_64_cnn",
        "--variants=medjax",
        "--rounds=1",
        "--blocks=2",
        "--steps=2",
        "--warmup=0",
        "--batch_size=16",
    ]
    records = _json_records(command)
    (record,) = [r for r in records if r.get("variant") == "medjax"]
    assert "error" not in record, record.get("error")
    assert len(record["block_images_per_second"]) == 2 and min(record["block_images_per_second"]) > 0
    # Both blocks' steps count: the median step time lies within the blocks' range.
    assert min(record["block_images_per_second"]) <= record["images_per_second"]
    assert record["images_per_second"] <= max(record["block_images_per_second"])
    assert record["peak_rss_mb"] >= record["rss_at_start_mb"] > 0 and record["compile_s"] > 0
    assert len(record["core_round_trip_ns"]) == 2
    if len(os.sched_getaffinity(0)) >= 2:
        assert all(ns > 0 for ns in record["core_round_trip_ns"])


def _record(variant, round_, block_ips, round_trips, **extra):
    return dict(
        model="paper_cnn",
        variant=variant,
        round=round_,
        block_images_per_second=block_ips,
        core_round_trip_ns=round_trips,
        images_per_second=sorted(block_ips)[len(block_ips) // 2],
        peak_rss_mb=100.0 if variant == "medjax" else 200.0,
        compile_s=1.0,
        num_params=10,
        **extra,
    )


def test_train_throughput_pairs_ratios_by_round_and_block():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_throughput

    near, far = train_throughput.NEAR_ROUND_TRIP_NS / 2, train_throughput.NEAR_ROUND_TRIP_NS * 2
    results = [
        _record("medjax", 0, [300.0, 200.0], [near, far]),
        _record("torch", 0, [100.0, 200.0], [near, far]),
        _record("medjax", 1, [150.0, 400.0, 120.0], [far, near, far]),
        _record("torch", 1, [100.0, 100.0, 100.0], [far, near, far]),
        # A round whose reference failed pairs with nothing.
        _record("medjax", 2, [900.0], [near]),
        dict(model="paper_cnn", variant="torch", round=2, error="worker exited"),
    ]
    summary = train_throughput.summarize(results)
    # Block ratios: round 0 -> 3.0 (near), 1.0 (far); round 1 -> 1.5 (far), 4.0 (near), 1.2 (far).
    assert summary["ratio_vs_torch_paired"]["paper_cnn"]["medjax"] == 1.5
    by_cores = summary["ratio_vs_torch_paired_by_cores"]
    assert by_cores["near"]["paper_cnn"]["medjax"] == {"ratio": 3.5, "blocks": 2}
    assert by_cores["far"]["paper_cnn"]["medjax"] == {"ratio": 1.2, "blocks": 3}
    assert summary["errors"] == 1
    assert summary["core_round_trip_ns"]["far_share"] == 3 / 6
    assert summary["ratio_vs_torch"]["paper_cnn"]["medjax_peak_rss"] == 0.5
