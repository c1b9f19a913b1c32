"""Quick training on the image fixture, exact resume, and the evaluation job on splits and folders."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import quick
from medjax import evaluate, ops, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")  # Holds medical_mnist/<Class>/*.jpeg.
REPORT_KEYS = {"accuracy", "macro_auc", "per_class", "confusion_matrix", "num_examples", "checkpoint_step"}


def _config(tfds_dir):
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    config.train.checkpoint_every_steps = 2
    config.train.num_epochs = 2.0
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished quick run on the fixture: (config, workdir, reports)."""
    root = tmp_path_factory.mktemp("e2e")
    config = _config(root / "tfds")
    workdir = str(root / "run")
    reports = train.train_and_evaluate(config, workdir)
    return config, workdir, reports


def test_training_writes_checkpoints_reports_and_metadata(trained):
    config, workdir, reports = trained
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] >= 4 and steps[-1] % 2 == 0
    assert set(reports) == {"validation", "test"}
    for split, report in reports.items():
        assert REPORT_KEYS <= set(report)
        assert report["checkpoint_step"] == steps[-1]
        assert os.path.exists(os.path.join(workdir, "eval", f"{split}_step{steps[-1]}.json"))
        for plot in ("confusion", "roc", "reliability"):
            assert os.path.exists(os.path.join(workdir, "eval", f"{split}_step{steps[-1]}_{plot}.png")), plot
    assert os.path.exists(os.path.join(workdir, "eval", "training_curves.png"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["class_names"] == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    assert saved["preprocessing"]["mean"] == config.data.mean
    assert saved["config"]["model"]["features"] == list(config.model.features)


def test_final_checkpoint_has_calibrated_batch_norm_statistics(trained):
    _, workdir, _ = trained
    from medjax import checkpointing

    manager = checkpointing.create_manager(workdir, read_only=True)
    last, earlier = sorted(manager.all_steps())[-2:][::-1]
    assert checkpointing.restore_metadata(manager, last)["batch_stats"].startswith("calibrated on 2 clean")
    assert checkpointing.restore_metadata(manager, earlier)["batch_stats"] == "running averages"


def test_training_and_evaluation_jit_with_the_model_s_cpu_options(trained, tmp_path, monkeypatch):
    """train.py's step and batch-norm calibration and the evaluation predictor (both jobs) are compiled
    with the compiler options of the ops that config.ops chooses for the configured model."""
    config, workdir, _ = trained
    expected = ops.resolve(config).compiler_options(config.model.name)
    assert expected  # The quick config's paper CNN has CPU options.
    seen, real_jit = [], jax.jit

    def recording_jit(fun, *args, **kwargs):
        seen.append((getattr(fun, "func", fun).__name__, kwargs.get("compiler_options")))
        return real_jit(fun, *args, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    train.train_and_evaluate(_config(tmp_path / "tfds"), str(tmp_path / "run"))
    training = {name for name, options in seen if options == expected}
    seen.clear()
    evaluate.evaluate_checkpoint(workdir, split="test")
    evaluation = {name for name, options in seen if options == expected}
    assert {"train_step", "batch_statistics", "eval_step"} <= training, training
    assert "eval_step" in evaluation, seen


def test_resume_continues_from_the_saved_step_exactly(trained, tmp_path):
    config, workdir, _ = trained
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    last, earlier = steps[-1], steps[-2]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(last)))  # As if the run died after `earlier`.
    train.train_and_evaluate(config, resumed)
    from medjax import checkpointing

    states = []
    for w in (workdir, resumed):
        manager = checkpointing.create_manager(w, read_only=True)
        states.append(manager.restore(last).state)
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_split_matches_training_report(trained):
    _, workdir, reports = trained
    report = evaluate.evaluate_checkpoint(workdir, split="test")
    assert report["num_examples"] == reports["test"]["num_examples"]
    assert report["accuracy"] == reports["test"]["accuracy"]
    assert report["confusion_matrix"] == reports["test"]["confusion_matrix"]


def test_evaluate_folder_cli_writes_the_same_fields(trained, tmp_path):
    _, workdir, _ = trained
    folder = tmp_path / "unseen"
    for cls in ("CXR", "Hand"):
        shutil.copytree(os.path.join(FIXTURE_ROOT, "medical_mnist", cls), folder / cls)
    output = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medjax.evaluate",
            f"--workdir={workdir}",
            f"--folder={folder}",
            f"--output={output}",
        ],
        check=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
    )
    # The job builds its model with the ops that config.ops chooses (medjax.cpu's on a CPU host).
    assert "Ops: medjax.cpu ops (config.ops='auto' on the cpu backend" in run.stderr, run.stderr[-2000:]
    report = json.load(open(output))
    assert REPORT_KEYS <= set(report)
    expected = sum(len(os.listdir(folder / c)) for c in ("CXR", "Hand"))
    assert report["num_examples"] == expected
    assert report["per_class"]["CXR"]["support"] + report["per_class"]["Hand"]["support"] == expected
    assert report["auc_classes"] == ["CXR", "Hand"]
    assert os.path.exists(os.path.join(workdir, "eval", f'unseen_step{report["checkpoint_step"]}.json'))
    for plot in ("confusion", "roc", "reliability"):
        assert os.path.exists(tmp_path / f"report_{plot}.png"), plot
        assert os.path.exists(
            os.path.join(workdir, "eval", f'unseen_step{report["checkpoint_step"]}_{plot}.png')
        )


def test_evaluate_rejects_a_folder_with_unknown_classes(trained, tmp_path):
    _, workdir, _ = trained
    (tmp_path / "bad" / "Knee").mkdir(parents=True)
    shutil.copy(
        os.path.join(
            FIXTURE_ROOT,
            "medical_mnist",
            "Hand",
            sorted(os.listdir(os.path.join(FIXTURE_ROOT, "medical_mnist", "Hand")))[0],
        ),
        tmp_path / "bad" / "Knee",
    )
    with pytest.raises(ValueError, match="Knee"):
        evaluate.evaluate_checkpoint(workdir, folder=str(tmp_path / "bad"))
