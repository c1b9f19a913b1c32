"""The command-line tools run as a user runs them (`python -m ...`), checked through what they write.

One quick training run (medjax.main) with non-default preprocessing is shared by the evaluation checks.
Each subprocess pays the imports (seconds), so there are few of them.
"""

import functools
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax import datasets, metrics, steps, transfer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")  # Holds medical_mnist/<Class>/*.jpeg (64x64 gray).
# Far from configs/base.py's mean 0.5, std 0.25, image_size 0 and channels 0 (as stored: 64x64x1).
MEAN, STD, IMAGE_SIZE, CHANNELS = 0.1, 0.9, 40, 3
PRINTED_KEYS = {"accuracy", "macro_auc", "num_examples", "checkpoint_step"}


def _run(module, *args, check=True):
    run = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert run.returncode == 0, f"{module} {args} failed:\n{run.stderr[-4000:]}"
    return run


def _printed_json(run) -> dict:
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, checkpoint steps, {file name: report}) of a quick run with overridden preprocessing.

    The final reports the run wrote under workdir/eval/ are read and removed, so that a later file there
    is the evaluation job's own.
    """
    root = tmp_path_factory.mktemp("cli")
    workdir = root / "run"
    _run(
        "medjax.main",
        "--config=configs/quick.py",
        f"--workdir={workdir}",
        f"--config.data.manual_dir={FIXTURE_ROOT}",
        f'--config.data.tfds_dir={root / "tfds"}',
        f"--config.data.mean={MEAN}",
        f"--config.data.std={STD}",
        f"--config.data.image_size={IMAGE_SIZE}",
        f"--config.data.channels={CHANNELS}",
        "--config.train.num_epochs=1",
        "--config.train.checkpoint_every_steps=2",
    )
    checkpoints = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    reports = {}
    for name in os.listdir(workdir / "eval"):
        if name.endswith(".json"):  # The rest are the reports' plots.
            reports[name] = json.load(open(workdir / "eval" / name))
        os.remove(workdir / "eval" / name)
    return workdir, checkpoints, reports


def _reference_reports(workdir, split, *cases):
    """The report of each (step, mean, std) on `split`, computed here without medjax.evaluate."""
    source = transfer.open_source(str(workdir))
    data = source.metadata["config"]["data"]
    arrays = datasets.load_split(datasets.prepare(data["name"], data["tfds_dir"]), split)

    @functools.partial(jax.jit, static_argnums=0)  # Equal models: one compilation for every case.
    def probabilities(model, variables, mean, std):
        inputs = steps.preprocess(
            arrays["image"], mean=mean, std=std, image_size=IMAGE_SIZE, channels=CHANNELS
        )
        return jax.nn.softmax(model.apply(variables, inputs, train=False), axis=-1)

    reports = []
    for step, mean, std in cases:
        _, model, variables = transfer.load_source(str(workdir), step)
        probs = np.asarray(probabilities(model, variables, mean, std))
        reports.append(metrics.classification_report(probs, arrays["label"], source.class_names))
    return reports


def _assert_same_numbers(report, expected, auc_abs=0.0):
    for key in ("accuracy", "auc_classes", "confusion_matrix", "num_examples"):
        assert report[key] == expected[key], key
    assert report["macro_auc"] == pytest.approx(expected["macro_auc"], abs=auc_abs)
    for name, row in expected["per_class"].items():
        assert report["per_class"][name] == pytest.approx(row, abs=auc_abs), name


def test_main_cli_records_config_overrides(trained):
    workdir, checkpoints, reports = trained
    assert len(checkpoints) >= 2, checkpoints
    last = checkpoints[-1]
    assert set(reports) == {f"validation_step{last}.json", f"test_step{last}.json"}
    saved = json.load(open(workdir / "config.json"))
    data = saved["config"]["data"]
    assert (data["mean"], data["std"], data["image_size"], data["channels"]) == (
        MEAN,
        STD,
        IMAGE_SIZE,
        CHANNELS,
    )
    prep = saved["preprocessing"]
    assert (prep["mean"], prep["std"], prep["image_size"], prep["channels"]) == (
        MEAN,
        STD,
        IMAGE_SIZE,
        CHANNELS,
    )
    assert prep["image_shape"] == [64, 64, 1]
    for step in checkpoints:  # Every checkpoint carries the same recipe.
        source = transfer.open_source(str(workdir), step)
        assert source.preprocessing["mean"] == MEAN and source.preprocessing["std"] == STD
        assert source.input_shape == (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)


def test_evaluate_cli_reproduces_training_report_with_any_batch_size(trained, tmp_path):
    """The job reads mean/std/image_size/channels back from the checkpoint: its numbers on the test split
    equal the training run's final report, with a batch size that does not divide the split."""
    workdir, checkpoints, reports = trained
    last = checkpoints[-1]
    expected = reports[f"test_step{last}.json"]
    batch_size = 4
    assert expected["num_examples"] % batch_size, "the batch size must leave a partial last batch"
    output = tmp_path / "sub" / "report.json"
    run = _run(
        "medjax.evaluate",
        f"--workdir={workdir}",
        "--split=test",
        f"--batch_size={batch_size}",
        f"--output={output}",
    )
    written = json.load(open(workdir / "eval" / f"test_step{last}.json"))
    assert json.load(open(output)) == written
    printed = _printed_json(run)
    assert set(printed) == PRINTED_KEYS
    assert printed == {k: written[k] for k in PRINTED_KEYS}
    assert written["checkpoint_step"] == last and written["split"] == "test"
    _assert_same_numbers(written, expected)


def test_evaluate_cli_step_scores_that_checkpoint(trained):
    """--step=N reports N and N's numbers (the training split: more examples than the held-out ones)."""
    workdir, checkpoints, _ = trained
    earlier, last = checkpoints[0], checkpoints[-1]
    run = _run("medjax.evaluate", f"--workdir={workdir}", "--split=train", f"--step={earlier}")
    written = json.load(open(workdir / "eval" / f"train_step{earlier}.json"))
    assert not os.path.exists(workdir / "eval" / f"train_step{last}.json")
    assert _printed_json(run) == {k: written[k] for k in PRINTED_KEYS}
    assert written["checkpoint_step"] == earlier
    expected, latest, default_preprocessing = _reference_reports(
        workdir, "train", (earlier, MEAN, STD), (last, MEAN, STD), (earlier, 0.5, 0.25)
    )
    _assert_same_numbers(written, expected, auc_abs=1e-6)
    # The check can tell the checkpoints apart, and the preprocessing.
    assert expected["per_class"] != latest["per_class"]
    assert expected["per_class"] != default_preprocessing["per_class"]


# ----------------------------------------------------------------------------------------------------
# medjax.convert


def _random_resnet18_state_dict(torch) -> dict:
    """A torchvision-layout ResNet-18 state dict with random values (no torchvision needed)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=generator) - 0.5

    def bn(prefix, c):
        return {
            f"{prefix}.weight": rand(c) + 1,
            f"{prefix}.bias": rand(c),
            f"{prefix}.running_mean": rand(c),
            f"{prefix}.running_var": rand(c) + 1,
            f"{prefix}.num_batches_tracked": torch.tensor(0),
        }

    state = {"conv1.weight": rand(64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        for j in range(2):
            p = f"layer{i + 1}.{j}"
            state |= {f"{p}.conv1.weight": rand(planes, inplanes if j == 0 else planes, 3, 3)}
            state |= bn(f"{p}.bn1", planes) | {f"{p}.conv2.weight": rand(planes, planes, 3, 3)}
            state |= bn(f"{p}.bn2", planes)
            if j == 0 and i > 0:
                state |= {f"{p}.downsample.0.weight": rand(planes, inplanes, 1, 1)} | bn(
                    f"{p}.downsample.1", planes
                )
        inplanes = planes
    return state | {"fc.weight": rand(1000, 512), "fc.bias": rand(1000)}


def test_convert_cli_writes_a_checkpoint_once(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[convert]')")
    state = _random_resnet18_state_dict(torch)
    weights = tmp_path / "resnet18.pth"
    torch.save(state, weights)
    output = tmp_path / "converted"
    run = _run("medjax.convert", "--model=resnet18", f"--weights={weights}", f"--output={output}")
    printed = _printed_json(run)
    assert printed["output"] == str(output)
    assert printed["source"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert os.listdir(output / "checkpoints") == ["0"]
    metadata = json.load(open(output / "config.json"))
    assert metadata["config"]["model"]["name"] == "resnet18" and len(metadata["class_names"]) == 1000
    _, _, variables = transfer.load_source(str(output))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].numpy().T)
    np.testing.assert_array_equal(
        variables["params"]["stem"]["conv"]["kernel"], state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer4_0"]["downsample"]["bn"]["var"],
        state["layer4.0.downsample.1.running_var"].numpy(),
    )

    again = _run(
        "medjax.convert", "--model=resnet18", f"--weights={weights}", f"--output={output}", check=False
    )
    assert again.returncode != 0
    assert "already holds a checkpoint" in again.stderr and str(output) in again.stderr, again.stderr[-2000:]
    assert json.load(open(output / "config.json")) == metadata
    assert os.listdir(output / "checkpoints") == ["0"]
