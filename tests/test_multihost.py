"""Two jax.distributed CPU processes (one device each) train, checkpoint and evaluate the quick config as
one process does with the same global batch, and checkpoints move between one and two processes.

One two-process launch serves every test: it trains a fresh workdir, then resumes a copy of the
one-process run's workdir from its step-3 checkpoint."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import quick
from medjax import checkpointing, datasets, evaluate, files, train
from tests import multiprocess

FIXTURE_ROOT = os.path.join(multiprocess.REPO, "tests", "fixtures")
TOTAL_STEPS = 6  # 2 epochs of 3 steps: the fixture's 24 training examples at global batch 8.
RESUME_STEP = 3
# The fixture's validation and test splits hold 6 examples each: their second global batch of 4 holds 2
# examples on process 0 and only padding on process 1.
EVAL_BATCH_SIZE = 4
SPLITS = ("validation", "test")


def _config(tfds_dir):
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    config.train.num_epochs = 2.0
    config.train.eval_every_steps = 10**6
    config.train.log_every_steps = RESUME_STEP
    config.train.checkpoint_every_steps = RESUME_STEP
    config.eval.batch_size = EVAL_BATCH_SIZE
    return config


def two_process_main(tfds_dir, fresh, resumed, out):
    """Run by each of the two processes: trains `fresh` from scratch, then resumes `resumed`; writes the
    final reports of both to `out`/reports<process index>.json."""
    config = _config(tfds_dir)
    reports = {
        "fresh": train.train_and_evaluate(config, fresh),
        "resumed": train.train_and_evaluate(config, resumed),
    }
    files.write_json(os.path.join(out, f"reports{jax.process_index()}.json"), reports)


DRIVER = """
from tests import test_multihost
test_multihost.two_process_main(*sys.argv[3:])
"""


def _assert_close_states(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _assert_same_report(a, b):
    for key in ("num_examples", "confusion_matrix", "accuracy", "checkpoint_step"):
        assert a[key] == b[key], key
    np.testing.assert_allclose(a["macro_auc"], b["macro_auc"], rtol=1e-6)


def _steps(workdir):
    return sorted(checkpointing.create_manager(workdir, read_only=True).all_steps())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(tfds_dir, {split: number of examples}) of the prepared fixture."""
    tfds_dir = tmp_path_factory.mktemp("tfds")
    builder = datasets.prepare("medical_mnist", str(tfds_dir), FIXTURE_ROOT)
    return tfds_dir, {split: len(datasets.load_split(builder, split)["label"]) for split in SPLITS}


@pytest.fixture(scope="module")
def one(tmp_path_factory, data):
    """A one-process run: (workdir, reports)."""
    path = str(tmp_path_factory.mktemp("one") / "run")
    reports = train.train_and_evaluate(_config(data[0]), path)
    assert _steps(path) == [RESUME_STEP, TOTAL_STEPS]
    return path, reports


@pytest.fixture(scope="module")
def two(tmp_path_factory, data, one):
    """The two-process launch: (fresh workdir, resumed workdir, [reports of process 0, 1], [logs])."""
    root = tmp_path_factory.mktemp("two")
    fresh, resumed = str(root / "fresh"), str(root / "resumed")
    shutil.copytree(one[0], resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(TOTAL_STEPS)))
    shutil.rmtree(os.path.join(resumed, "eval"))
    processes = multiprocess.start(DRIVER, [data[0], fresh, resumed, root])
    try:
        logs = [p.communicate(timeout=400)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    reports = [json.load(open(root / f"reports{i}.json")) for i in range(2)]
    return fresh, resumed, reports, logs


def test_two_processes_train_as_one_process_batch_norm_statistics_included(one, two):
    fresh = two[0]
    assert _steps(fresh) == [RESUME_STEP, TOTAL_STEPS]
    for step in (RESUME_STEP, TOTAL_STEPS):  # Running averages at step 3, calibrated statistics at 6.
        two_state, one_state = multiprocess.numpy_state(fresh, step), multiprocess.numpy_state(one[0], step)
        assert two_state["batch_stats"]
        _assert_close_states(two_state, one_state)


def test_two_processes_score_every_example_once_and_report_as_one_process(data, one, two):
    _, sizes = data
    for split in SPLITS:
        # A padded last batch whose slice on process 1 is padding only.
        assert 0 < sizes[split] % EVAL_BATCH_SIZE <= EVAL_BATCH_SIZE // 2, sizes
    for process_reports in two[2]:
        report = process_reports["fresh"]
        assert set(report) == set(SPLITS)
        for split in SPLITS:
            assert report[split]["num_examples"] == sizes[split]
            assert np.sum(report[split]["confusion_matrix"]) == sizes[split]
            _assert_same_report(report[split], one[1][split])
    for split in SPLITS:
        saved = json.load(open(os.path.join(two[0], "eval", f"{split}_step{TOTAL_STEPS}.json")))
        _assert_same_report(saved, two[2][0]["fresh"][split])


def test_a_two_process_checkpoint_evaluates_in_one_process_to_the_same_report(data, two):
    fresh, _, reports, _ = two
    for split in SPLITS:
        report = evaluate.evaluate_checkpoint(fresh, split=split)
        assert report["num_examples"] == data[1][split]
        _assert_same_report(report, reports[0]["fresh"][split])


def test_a_one_process_checkpoint_resumes_in_two_processes_and_ends_as_one_process(one, two):
    _, resumed, reports, logs = two
    for log in logs:
        assert f"Resumed from {os.path.join(resumed, 'checkpoints')} at step {RESUME_STEP}." in log
    assert _steps(resumed) == [RESUME_STEP, TOTAL_STEPS]
    _assert_close_states(
        multiprocess.numpy_state(resumed, TOTAL_STEPS), multiprocess.numpy_state(one[0], TOTAL_STEPS)
    )
    for process_reports in reports:
        for split in SPLITS:
            _assert_same_report(process_reports["resumed"][split], one[1][split])
