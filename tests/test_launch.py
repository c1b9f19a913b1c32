"""The launch scripts build the right commands (checked with DRY_RUN=1: nothing runs)."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script, *args, **environ):
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", script), *args],
        env=dict(os.environ, DRY_RUN="1", **environ),
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout


def test_tpu_create_picks_the_runtime_for_the_accelerator_and_delete_is_quiet():
    code, out = _dry_run("tpu_vm.sh", "create", "my-tpu", "us-west4-a")
    assert code == 0
    assert out.split() == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--version=v2-alpha-tpuv5-lite",
    ]
    _, out = _dry_run("tpu_vm.sh", "create", "my-tpu", "z", "v6e-16")
    assert "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e" in out
    _, out = _dry_run("tpu_vm.sh", "create", "my-tpu", "z", "v4-32", RUNTIME_VERSION="my-runtime")
    assert "--version=my-runtime" in out
    code, out = _dry_run("tpu_vm.sh", "delete", "my-tpu", "z")
    assert code == 0 and out.split() == "gcloud compute tpus tpu-vm delete my-tpu --zone=z --quiet".split()


def test_tpu_train_runs_on_all_workers_with_distributed_init():
    code, out = _dry_run(
        "tpu_vm.sh", "train", "my-tpu", "us-central2-b", "configs/base.py", "gs://b/w", "--config.seed=3"
    )
    assert code == 0
    assert "--worker=all" in out and "--zone=us-central2-b" in out
    assert (
        "medjax.main\\ --distributed\\ --config=configs/base.py\\ --workdir=gs://b/w\\ --config.seed=3" in out
    )


def test_tpu_eval_runs_on_one_worker():
    code, out = _dry_run("tpu_vm.sh", "eval", "my-tpu", "z", "gs://b/w", "--split=test")
    assert code == 0
    assert "--worker=0" in out and "medjax.evaluate\\ --workdir=gs://b/w\\ --split=test" in out


def test_tpu_watch_evaluates_continuously_on_one_worker():
    code, out = _dry_run("tpu_vm.sh", "watch", "my-tpu", "z", "gs://b/w", "--timeout=60")
    assert code == 0
    assert "--worker=0" in out and "medjax.evaluate\\ --workdir=gs://b/w\\ --watch\\ --timeout=60" in out


def test_gpu_host_runs_one_process_without_distributed_init():
    code, out = _dry_run(
        "gpu_host.sh", "train", "configs/resnet18.py", "workdirs/r18", "--config.model.dtype=bfloat16"
    )
    assert code == 0
    assert out.split() == [
        ".venv/bin/python",
        "-m",
        "medjax.main",
        "--config=configs/resnet18.py",
        "--workdir=workdirs/r18",
        "--config.model.dtype=bfloat16",
    ]
    _, out = _dry_run("gpu_host.sh", "eval", "workdirs/r18", "--split=test", PYTHON="python3")
    assert out.split() == ["python3", "-m", "medjax.evaluate", "--workdir=workdirs/r18", "--split=test"]
    _, out = _dry_run("gpu_host.sh", "setup", JAX_CUDA="cuda13")
    assert "jax\\[cuda13\\]==0.10.2" in out


def test_slurm_job_runs_one_task_per_gpu_with_distributed_init_and_requeues_on_preemption():
    code, out = _dry_run(
        "slurm.sh",
        "train",
        "2",
        "8",
        "configs/resnet18.py",
        "/shared/w",
        "--config.seed=1",
        SBATCH_ARGS="--partition=gpu",
    )
    assert code == 0
    submit, script = out.split("<<'EOF'\n")
    assert submit.split() == [
        "sbatch",
        "--job-name=medjax",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--signal=TERM@120",
        "--requeue",
        "--open-mode=append",
        f"--chdir={REPO}",
        "--partition=gpu",
    ]
    lines = script.splitlines()
    assert lines[1] == (
        "srun --kill-on-bad-exit=1 .venv/bin/python -m medjax.main --distributed --config=configs/resnet18.py "
        "--workdir=/shared/w --config.seed=1"
    )
    assert 'if [ $status -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in lines
    assert lines[-1] == "EOF"


def test_slurm_eval_is_one_task_on_one_gpu():
    code, out = _dry_run("slurm.sh", "eval", "/shared/w", "--split=test")
    assert code == 0
    assert out.split() == [
        "srun",
        "--nodes=1",
        "--ntasks=1",
        "--gpus=1",
        f"--chdir={REPO}",
        ".venv/bin/python",
        "-m",
        "medjax.evaluate",
        "--workdir=/shared/w",
        "--split=test",
    ]


@pytest.mark.parametrize(
    "script, args",
    [
        ("tpu_vm.sh", ["train", "my-tpu"]),
        ("tpu_vm.sh", ["deploy", "my-tpu", "z"]),
        ("tpu_vm.sh", ["delete", "my-tpu", "z", "extra"]),
        ("gpu_host.sh", ["train", "configs/base.py"]),
        ("gpu_host.sh", ["deploy"]),
        ("slurm.sh", ["train", "2", "8", "configs/base.py"]),
        ("slurm.sh", []),
    ],
)
def test_bad_usage_is_an_error(script, args):
    code, out = _dry_run(script, *args)
    assert code == 2 and out == ""
