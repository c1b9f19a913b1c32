"""Faults a run must survive or report clearly: bad configs, a busy workdir, a wrong manual dir, a diverged
loss, damaged checkpoints and preemption by SIGTERM/SIGINT."""

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quick
from etils import epath

from medjax import checkpointing, checks, datasets, evaluate, files, guard, preemption, train, workdir
from tests import multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")
TOTAL_STEPS = 150  # 50 epochs of 3 steps (the fixture's training split at batch 8).


def _config(tfds_dir, **train_fields):
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    config.train.num_epochs = 50.0
    config.train.eval_every_steps = 10**6
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 50
    config.train.max_checkpoints_to_keep = 3
    for key, value in train_fields.items():
        config.train[key] = value
    return config


def _final_state(workdir_path):
    step = checkpointing.create_manager(workdir_path, read_only=True).latest_step()
    return step, multiprocess.numpy_state(workdir_path, step)


def _assert_same_state(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def _steps(workdir_path):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir_path, "checkpoints")) if d.isdigit())


def _array_files(workdir_path, step):
    """The files holding a checkpoint's array bytes, largest first."""
    files = glob.glob(
        os.path.join(workdir_path, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True
    )
    return sorted(files, key=os.path.getsize, reverse=True)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir):
    """An uninterrupted run: (config, workdir) with checkpoints at steps 50, 100 and 150."""
    config = _config(tfds_dir)
    path = str(tmp_path_factory.mktemp("reference") / "run")
    train.train_and_evaluate(config, path)
    assert _steps(path) == [50, 100, TOTAL_STEPS]
    return config, path


# Config checks.


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.num_epochs", 0.0),
        ("train.num_epochs", -1),
        ("train.learning_rate", 0.0),
        ("train.learning_rate", float("nan")),
        ("train.learning_rate", float("inf")),
        ("train.batch_size", 0),
        ("eval.batch_size", -8),
        ("train.checkpoint_every_steps", 0),
        ("train.log_every_steps", 0),
        ("train.max_checkpoints_to_keep", 0),
        ("model.dropout_rate", 1.0),
        ("data.std", 0.0),
    ],
)
def test_nonsensical_config_values_are_errors_naming_the_field_before_any_work(tmp_path, field, value):
    config = _config(tmp_path / "tfds")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=f"config.{field}="):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


def test_every_shipped_config_passes_the_checks():
    for path in glob.glob(os.path.join(REPO, "configs", "*.py")):
        name = os.path.basename(path)[:-3]
        if name != "__init__":
            module = __import__(f"configs.{name}", fromlist=["get_config"])
            assert checks.problems(module.get_config()) == [], name


# Workdir lock.


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_workdir_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    path = workdir.acquire(str(tmp_path))
    holder = json.loads(path.read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()}"):
        workdir.acquire(str(tmp_path))
    workdir.release(path)
    assert not path.exists()
    with workdir.lock(str(tmp_path)) as held:
        assert held.exists()
    assert not held.exists()


def test_stale_lock_of_a_dead_process_is_taken_over_and_another_host_s_is_not(tmp_path, caplog):
    lock_file = tmp_path / workdir.LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "start_time": None}))
    with caplog.at_level("WARNING"):
        path = workdir.acquire(str(tmp_path))
    assert "stale lock" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    workdir.release(path)
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid()}))
    with pytest.raises(workdir.WorkdirLockedError, match="host 'elsewhere'"):
        workdir.acquire(str(tmp_path))


def test_training_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / workdir.LOCK_NAME).write_text(
            json.dumps({"host": socket.gethostname(), "pid": sleeper.pid})
        )
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {sleeper.pid}"):
            train.train_and_evaluate(_config(tmp_path / "tfds"), str(tmp_path / "run"))
        assert not (tmp_path / "tfds").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# Manual dir.


def test_a_json_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "eval" / "best.json"
    files.write_json(str(path), {"step": 1})
    write_text = epath.Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(epath.Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_json(str(path), {"step": 2, "metric": "accuracy"})
    assert json.loads(path.read_text()) == {"step": 1}


def test_empty_or_wrong_manual_dir_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"Manual dir '{empty}' is empty"):
        datasets.prepare("medical_mnist", str(tmp_path / "tfds"), str(empty))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"No Medical MNIST images found in manual dir '{wrong}'"):
        datasets.prepare("medical_mnist", str(tmp_path / "tfds"), str(wrong))


# Non-finite guard.


def test_non_finite_loss_stops_training_before_any_checkpoint_of_that_state(tmp_path, tfds_dir):
    config = _config(tfds_dir, learning_rate=1e6, checkpoint_every_steps=1, log_every_steps=100)
    path = str(tmp_path / "run")
    with pytest.raises(
        guard.NonFiniteError, match=r"Non-finite loss or gradient norm at step (\d+)"
    ) as error:
        train.train_and_evaluate(config, path)
    bad_step = int(error.value.args[0].split("at step ")[1].split(" ")[0])
    saved = _steps(path)
    assert saved and max(saved) < bad_step, (saved, bad_step)
    manager = checkpointing.create_manager(path, read_only=True)
    for step in saved:
        state = manager.restore(step).state
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state)), step
    assert not os.path.exists(os.path.join(path, workdir.LOCK_NAME))


def test_guard_reports_the_first_non_finite_step():
    nonfinite = guard.NonFiniteGuard()
    for step, loss in [(1, 2.0), (2, math.inf), (3, math.nan)]:
        nonfinite.update(step, {"loss": np.float32(loss), "grad_norm": np.float32(1.0), "accuracy": 0.5})
    with pytest.raises(guard.NonFiniteError, match="at step 2 "):
        nonfinite.check(3)
    finite = guard.NonFiniteGuard()
    finite.update(1, {"loss": np.float32(1.0), "grad_norm": np.float32(math.nan)})
    with pytest.raises(guard.NonFiniteError, match="at step 1 "):
        finite.check(1)


# Checkpoint integrity.


def _damage(workdir_path, step, how):
    if how == "overwritten":  # Every array file, so that the parameters' bytes are hit wherever they lie.
        for target in _array_files(workdir_path, step):
            with open(target, "r+b") as f:
                for i in range(1, 10):
                    f.seek(os.path.getsize(target) * i // 10)
                    f.write(b"\x7f" * 64)
    elif how == "rewritten":  # Valid array files holding other values: only the checksums can tell.
        state_dir = os.path.join(workdir_path, "checkpoints", str(step), "state")
        checkpointer = ocp.StandardCheckpointer()
        state = checkpointer.restore(state_dir)
        state["params"] = jax.tree_util.tree_map(lambda p: p + np.float32(0.01), state["params"])
        checkpointer.save(state_dir + ".new", state)
        checkpointer.wait_until_finished()
        shutil.rmtree(state_dir)
        os.rename(state_dir + ".new", state_dir)
    elif how == "truncated":
        for target in _array_files(workdir_path, step):
            os.truncate(target, os.path.getsize(target) // 3)
    else:  # Missing array files.
        for target in _array_files(workdir_path, step):
            os.remove(target)


@pytest.mark.parametrize("how", ["overwritten", "rewritten", "truncated", "missing"])
def test_evaluating_a_damaged_checkpoint_fails_in_one_line_naming_it(reference, tmp_path, how):
    _, source = reference
    path = str(tmp_path / "run")
    shutil.copytree(source, path)
    _damage(path, TOTAL_STEPS, how)
    with pytest.raises(checkpointing.BadCheckpointError) as error:
        evaluate.evaluate_checkpoint(path, step=TOTAL_STEPS, split="test")
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(f"Bad checkpoint {os.path.join(path, 'checkpoints', str(TOTAL_STEPS))}: ")
    # Without a step, the newest good checkpoint is evaluated.
    report = evaluate.evaluate_checkpoint(path, split="test")
    assert report["checkpoint_step"] == 100


def test_training_sets_a_damaged_checkpoint_aside_and_resumes_from_the_newest_good_one(reference, tmp_path):
    _, source = reference
    path = str(tmp_path / "run")
    shutil.copytree(source, path)
    shutil.rmtree(os.path.join(path, "checkpoints", str(TOTAL_STEPS)))
    _damage(path, 100, "rewritten")  # The newest checkpoint is bad; 50 is the last good one.
    config = _config(reference[0].data.tfds_dir, max_checkpoints_to_keep=2)
    train.train_and_evaluate(config, path)
    assert os.listdir(os.path.join(path, "bad_checkpoints")) == ["100"]
    assert _steps(path) == [100, TOTAL_STEPS]
    step, state = _final_state(path)
    assert step == TOTAL_STEPS
    _assert_same_state(state, _final_state(reference[1])[1])


def test_training_with_only_damaged_checkpoints_is_an_error(reference, tmp_path):
    config, source = reference
    path = str(tmp_path / "run")
    shutil.copytree(source, path)
    for step in _steps(path):
        _damage(path, step, "truncated")
    with pytest.raises(checkpointing.BadCheckpointError, match="no good checkpoint left"):
        train.train_and_evaluate(config, path)


# Preemption.


DRIVER = """
import sys
from absl import logging
from medjax import train
from tests import test_faults
logging.set_verbosity(logging.INFO)
train.train_and_evaluate(test_faults._config(sys.argv[1]), sys.argv[2])
"""


def test_sigterm_saves_a_checkpoint_exits_75_and_the_resumed_run_ends_identical(reference, tmp_path):
    """A run in another process gets SIGTERM once it has saved step 50; the rerun must finish exactly as
    the uninterrupted reference did."""
    config, source = reference
    path = str(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, config.data.tfds_dir, path],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stderr=subprocess.PIPE,
        text=True,
    )
    while not os.path.isdir(os.path.join(path, "checkpoints", "50")) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=120)
    assert process.returncode == preemption.EXIT_PREEMPTED, log[-3000:]
    steps = _steps(path)
    assert 50 < steps[-1] < TOTAL_STEPS, steps
    assert f"SIGTERM: checkpoint for step {steps[-1]} committed" in log
    assert not os.path.exists(os.path.join(path, workdir.LOCK_NAME))
    train.train_and_evaluate(config, path)
    step, state = _final_state(path)
    assert step == TOTAL_STEPS
    _assert_same_state(state, _final_state(source)[1])


def test_sigint_stops_after_the_step_and_a_second_sigint_interrupts():
    with preemption.handler() as stopper:
        assert not stopper.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.reached(2) and stopper.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


TWO_PROCESS_DRIVER = """
from medjax import train
from tests import test_faults
train.train_and_evaluate(test_faults._config(sys.argv[3]), sys.argv[4])
"""


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_one_process_resumes(reference, tmp_path):
    """Two CPU processes (one device each, jax.distributed) train the reference config; SIGTERM reaches
    only process 1. Both must stop at the same step with one checkpoint and exit 75; their step-50
    checkpoint must match the one-process run's (float tolerance: batch-norm statistics are summed across
    processes), and one process must resume it to the end."""
    config, source = reference
    path = str(tmp_path / "run")
    processes = multiprocess.start(TWO_PROCESS_DRIVER, [config.data.tfds_dir, path])
    try:
        while not os.path.isdir(os.path.join(path, "checkpoints", "50")) and processes[1].poll() is None:
            time.sleep(0.01)
        processes[1].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=180)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [preemption.EXIT_PREEMPTED] * 2, (
        logs[0][-2000:] + logs[1][-2000:]
    )
    steps = _steps(path)
    assert 50 < steps[-1] < TOTAL_STEPS, steps
    for log in logs:
        assert f"SIGTERM: checkpoint for step {steps[-1]} committed" in log
    two, one = multiprocess.numpy_state(path, 50), multiprocess.numpy_state(source, 50)
    assert jax.tree_util.tree_structure(two) == jax.tree_util.tree_structure(one)
    for a, b in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    train.train_and_evaluate(config, path)
    assert _final_state(path)[0] == TOTAL_STEPS
