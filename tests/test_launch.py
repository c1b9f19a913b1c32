"""The TPU VM launch script builds the right gcloud commands (checked with DRY_RUN=1, nothing runs)."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")


def _dry_run(*args):
    result = subprocess.run(
        ["bash", SCRIPT, *args], env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True
    )
    return result.returncode, result.stdout


def test_train_runs_on_all_workers_with_distributed_init():
    code, out = _dry_run("train", "my-tpu", "us-central2-b", "configs/base.py", "gs://b/w", "--config.seed=3")
    assert code == 0
    assert "--worker=all" in out and "--zone=us-central2-b" in out
    assert (
        "medjax.main\\ --distributed\\ --config=configs/base.py\\ --workdir=gs://b/w\\ --config.seed=3" in out
    )


def test_eval_runs_on_one_worker():
    code, out = _dry_run("eval", "my-tpu", "z", "gs://b/w", "--split=test")
    assert code == 0
    assert "--worker=0" in out and "medjax.evaluate\\ --workdir=gs://b/w\\ --split=test" in out


def test_bad_usage_is_an_error():
    code, _ = _dry_run("train", "my-tpu")
    assert code == 2
    code, _ = _dry_run("deploy", "my-tpu", "z")
    assert code == 2
