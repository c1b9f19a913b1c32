"""The continuous evaluation job (medjax/watch.py) beside a quick training run, and on copies of its
checkpoints with a stand-in evaluation (deleted, half-written and bad checkpoints, ties, timeouts)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from configs import quick
from medjax import checkpointing, files, train, watch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")  # Holds medical_mnist/<Class>/*.jpeg.


def _watcher(workdir, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "medjax.evaluate", f"--workdir={workdir}", "--watch", *flags],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """The workdir, checkpoint steps and final reports of a quick run (checkpoints every 2 steps, all kept),
    the exit status and log of a watcher started before it, and those of a watcher started at the same
    time on a workdir that never gets a checkpoint (idle_*)."""
    root = tmp_path_factory.mktemp("watch")
    workdir = root / "run"
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(root / "tfds")
    config.train.num_epochs = 2.0
    config.train.checkpoint_every_steps = 2
    config.train.max_checkpoints_to_keep = 100
    watcher = _watcher(workdir, "--poll_interval=0.2", "--timeout=60")
    idle = _watcher(root / "never", "--poll_interval=0.1", "--timeout=1")  # For the timeout test.
    try:
        reports = train.train_and_evaluate(config, str(workdir))
        _, log = watcher.communicate(timeout=300)
        idle_log = idle.communicate(timeout=60)[1]
    finally:
        watcher.kill()
        idle.kill()
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    return types.SimpleNamespace(
        workdir=workdir,
        steps=steps,
        reports=reports,
        status=watcher.returncode,
        log=log,
        idle_status=idle.returncode,
        idle_log=idle_log,
    )


def _read(path):
    return json.loads(open(path).read())


def test_watcher_beside_training_evaluates_each_checkpoint_once_until_the_final(watched):
    workdir, steps, log = watched.workdir, watched.steps, watched.log
    assert watched.status == 0, log[-4000:]
    assert len(steps) >= 3, steps
    evaluated = _read(workdir / "eval" / "watch_validation.json")["evaluated"]
    assert sorted(map(int, evaluated)) == steps
    for step in steps:
        assert log.count(f"Evaluated checkpoint {step} on validation") == 1, log[-4000:]
        report = _read(workdir / "eval" / f"validation_step{step}.json")
        assert report["checkpoint_step"] == step and report["split"] == "validation"
    assert f"Checkpoint {steps[-1]} is the final one" in log
    # Training writes the same report file for its final step; the record holds the watcher's numbers.
    final = evaluated[str(steps[-1])]["scalars"]
    assert final == watch.scalars(watched.reports["validation"])


def test_best_json_names_the_best_step(watched):
    workdir, steps = watched.workdir, watched.steps
    accuracies = [_read(workdir / "eval" / f"validation_step{step}.json")["accuracy"] for step in steps]
    best = int(np.argmax(accuracies))  # The first of equals.
    assert _read(workdir / "eval" / "best.json") == {
        "split": "validation",
        "step": steps[best],
        "metric": "accuracy",
        "value": accuracies[best],
    }


def test_tensorboard_scalars_per_step(watched):
    workdir, steps = watched.workdir, watched.steps
    found = {}
    for name in os.listdir(workdir / "eval"):
        if "tfevents" in name:
            for event in tf.compat.v1.train.summary_iterator(str(workdir / "eval" / name)):
                for value in event.summary.value:
                    found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    expected = watch.scalars(_read(workdir / "eval" / f"validation_step{steps[-1]}.json"))
    assert set(found) == {f"validation/{name}" for name in expected}, found
    assert {"validation/accuracy", "validation/macro_auc"} <= set(found)
    for step in steps:
        report = _read(workdir / "eval" / f"validation_step{step}.json")
        assert found["validation/accuracy"][step] == pytest.approx(report["accuracy"])
        assert found["validation/macro_auc"][step] == pytest.approx(report["macro_auc"])
    assert all(sorted(values) == steps for values in found.values())


class StandIn:
    """evaluate(step) -> a report of the given (accuracy, macro_auc); records the steps it is asked."""

    def __init__(self, values, before=None):
        self.values, self.before, self.calls = values, before or {}, []

    def __call__(self, step):
        self.calls.append(step)
        if step in self.before:
            self.before[step]()
        accuracy, auc = self.values[step]
        return {"accuracy": accuracy, "macro_auc": auc, "num_examples": 10, "checkpoint_step": step}


def _json_only(report, paths):
    """The stand-in reports carry no per-class data to plot."""
    for path in paths:
        files.write_json(path, report)


def _copy_checkpoints(watched, tmp_path):
    workdir, steps = watched.workdir, watched.steps
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    return tmp_path, steps


def test_restarted_watcher_evaluates_nothing_again(watched):
    workdir = watched.workdir
    evaluate = StandIn({})
    assert watch.watch(str(workdir), evaluate, write=_json_only, poll_interval=0.01, timeout=5) == 0
    assert evaluate.calls == []


def test_best_ties_go_to_the_earlier_step_for_any_metric(watched, tmp_path):
    workdir, steps = _copy_checkpoints(watched, tmp_path)
    first, middle, last = steps[0], steps[1], steps[-1]
    values = {step: (0.5, 0.5) for step in steps} | {middle: (0.8, 0.7), last: (0.8, 0.9)}
    assert watch.watch(str(workdir), StandIn(values), write=_json_only, poll_interval=0.01, timeout=5) == 0
    assert _read(workdir / "eval" / "best.json") == {
        "split": "validation",
        "step": middle,
        "metric": "accuracy",
        "value": 0.8,
    }
    # A restart with another metric re-picks from the record, evaluating nothing.
    evaluate = StandIn({})
    assert (
        watch.watch(
            str(workdir), evaluate, write=_json_only, best_metric="macro_auc", poll_interval=0.01, timeout=5
        )
        == 0
    )
    assert evaluate.calls == [] and first != last
    assert _read(workdir / "eval" / "best.json")["step"] == last


def test_deleted_and_half_written_checkpoints_are_skipped(watched, tmp_path, caplog):
    """A checkpoint deleted while the watcher evaluates an earlier one, and a newer one that is still
    being written (orbax's temporary folder, here holding a whole final checkpoint), are not evaluated."""
    workdir, steps = _copy_checkpoints(watched, tmp_path)
    first, deleted, last = steps[0], steps[1], steps[-1]
    half = workdir / "checkpoints" / f"{last + 2}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(workdir / "checkpoints" / str(last), half)

    def delete():
        shutil.rmtree(workdir / "checkpoints" / str(deleted))

    evaluate = StandIn({step: (0.5, 0.5) for step in steps}, before={first: delete})
    with caplog.at_level(logging.INFO):
        assert watch.watch(str(workdir), evaluate, write=_json_only, poll_interval=0.01, timeout=5) == 0
    assert evaluate.calls == [s for s in steps if s != deleted]
    assert f"Checkpoint {deleted} was deleted (max_to_keep) before it was evaluated" in caplog.text
    evaluated = _read(workdir / "eval" / "watch_validation.json")["evaluated"]
    assert sorted(map(int, evaluated)) == evaluate.calls
    reports = sorted(n for n in os.listdir(workdir / "eval") if n.startswith("validation_step"))
    assert reports == sorted(f"validation_step{s}.json" for s in evaluate.calls)


def test_bad_checkpoint_is_logged_and_skipped_then_timeout(watched, tmp_path, caplog):
    """Without the final checkpoint the watcher waits, asking a bad checkpoint once, until the timeout."""
    workdir, steps = _copy_checkpoints(watched, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))
    bad = steps[1]

    def damaged():
        raise checkpointing.BadCheckpointError(f"{workdir}/checkpoints/{bad}", "checksum mismatch")

    evaluate = StandIn({step: (0.5, 0.5) for step in steps}, before={bad: damaged})
    with caplog.at_level(logging.INFO):
        status = watch.watch(str(workdir), evaluate, write=_json_only, poll_interval=0.02, timeout=0.5)
    assert status == watch.EXIT_TIMEOUT
    assert evaluate.calls == steps[:-1]
    assert f"Bad checkpoint {workdir}/checkpoints/{bad}: checksum mismatch; skipped" in caplog.text
    assert not os.path.exists(workdir / "eval" / f"validation_step{bad}.json")
    evaluated = _read(workdir / "eval" / "watch_validation.json")["evaluated"]
    assert sorted(map(int, evaluated)) == [s for s in steps[:-1] if s != bad]


def test_watch_cli_times_out_without_checkpoints(watched):
    """Started on a workdir that never gets a checkpoint, the job exits with EXIT_TIMEOUT."""
    assert watched.idle_status == watch.EXIT_TIMEOUT, watched.idle_log[-4000:]
    assert "No new checkpoint" in watched.idle_log
