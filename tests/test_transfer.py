"""Transfer learning: restore + head replacement, channel adaptation, freezing, per-group learning rates,
mismatch errors, and a tiny end-to-end fine-tune from a quick Medical MNIST workdir to a MedMNIST dataset."""

import functools
import importlib
import json
import os

import flax
import jax
import numpy as np
import pytest

from configs import lenet5
from configs import quick
from medjax import checkpointing, evaluate, models, sharding, steps, train, transfer
from tests.step_runner import synthetic_batch
from tests.test_medmnist import write_npz

FIXTURE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SIX = ["a", "b", "c", "d", "e", "f"]


def _config(**model):
    config = quick.get_config()
    config.model.dropout_rate = 0.0
    config.train.schedule = "constant"
    config.train.warmup_steps = 0
    config.model.update(model)
    return config


def _init(model, tx, key, image_shape):
    # Eager: for these tiny models that is much cheaper than compiling.
    return steps.init_state(model, tx, key, image_shape)


def make_source(workdir, config, image_shape=(64, 64, 1), class_names=SIX, seed=0):
    """A workdir with one checkpoint (step 3) of a freshly initialised model, as training writes it."""
    model = models.create_model(config.model, len(class_names))
    tx = steps.create_optimizer(config.train, 10)
    state = _init(model, tx, jax.random.key(seed), image_shape)
    manager = checkpointing.create_manager(str(workdir))
    checkpointing.save(manager, 3, state, train.checkpoint_metadata(config, class_names, image_shape))
    manager.wait_until_finished()
    return jax.device_get(state)


def make_target(config, num_classes, image_shape, total_steps=10):
    """(model, tx, state initialised from config.init_from, input_shape) as medjax.train builds them."""
    prep = transfer.preprocessing(config)
    input_shape = steps.model_input_shape(image_shape, prep["image_size"], prep["channels"])
    model = models.create_model(config.model, num_classes)
    tx = transfer.create_optimizer(config, total_steps, input_shape)
    state = _init(model, tx, jax.random.key(1), input_shape)
    replicated = sharding.replicated(sharding.create_mesh())
    return model, tx, transfer.init_from(config, state, tx, input_shape, replicated), input_shape


def _flat(tree):
    return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_restore_keeps_backbone_and_reinitialises_head(tmp_path):
    source = make_source(tmp_path / "src", _config())
    config = _config()
    config.init_from = str(tmp_path / "src")
    config.data.image_size = 64  # 28x28 images resized to the source's 64x64 (paper_cnn's dense layer).
    _, _, state, input_shape = make_target(config, 2, (28, 28, 1))
    assert input_shape == (64, 64, 1) and int(state.step) == 0
    fresh = _init(
        models.create_model(config.model, 2),
        steps.create_optimizer(config.train, 1),
        jax.random.key(1),
        input_shape,
    )
    for collection in ("params", "batch_stats"):
        restored, original = _flat(getattr(state, collection)), _flat(getattr(source, collection))
        for path, value in restored.items():
            if path.startswith("head/"):
                np.testing.assert_array_equal(value, _flat(fresh.params)[path])
                assert value.shape[-1] == 2 and original[path].shape[-1] == 6
            else:
                np.testing.assert_array_equal(value, original[path])
    assert transfer.head_names(config.model, input_shape) == ("head",)


@pytest.mark.parametrize("source_channels, target_channels", [(3, 1), (1, 3)])
def test_sum_adapter_rewrites_the_first_kernel(tmp_path, source_channels, target_channels):
    source = make_source(tmp_path / "src", _config(), image_shape=(64, 64, source_channels))
    config = _config()
    config.init_from = str(tmp_path / "src")
    _, _, state, _ = make_target(config, 2, (64, 64, target_channels))
    kernel = np.asarray(state.params["block0"]["conv"]["kernel"])
    original = source.params["block0"]["conv"]["kernel"]
    assert kernel.shape[2] == target_channels
    if target_channels == 1:  # A gray image x through the summed kernel == the RGB image (x, x, x).
        np.testing.assert_allclose(kernel, original.sum(axis=2, keepdims=True), rtol=1e-6)
    else:  # An RGB image (x, x, x) through the repeated kernel / 3 == the gray image x.
        np.testing.assert_allclose(kernel, np.repeat(original, 3, axis=2) / 3, rtol=1e-6)
    np.testing.assert_array_equal(
        state.params["block1"]["conv"]["kernel"], source.params["block1"]["conv"]["kernel"]
    )


def test_repeat_adapter_converts_the_images_instead(tmp_path):
    source = make_source(tmp_path / "src", _config(), image_shape=(64, 64, 1))
    config = _config()
    config.init_from = str(tmp_path / "src")
    config.transfer.input_adapter = "repeat"
    assert transfer.preprocessing(config)["channels"] == 1
    _, _, state, input_shape = make_target(config, 2, (64, 64, 3))
    assert input_shape == (64, 64, 1)
    np.testing.assert_array_equal(
        state.params["block0"]["conv"]["kernel"], source.params["block0"]["conv"]["kernel"]
    )
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    gray = steps.preprocess(rgb, mean=0.5, std=0.25, channels=1)
    np.testing.assert_allclose(gray[..., 0], (rgb.mean(-1) / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def _restore_into_abstract(config, num_classes, image_shape):
    """transfer.restore_backbone into a target described by shapes only (no initialisation)."""
    input_shape = steps.model_input_shape(image_shape, config.data.image_size, config.data.channels)
    target = transfer.abstract_variables(models.create_model(config.model, num_classes), input_shape)
    return transfer.restore_backbone(config, target, input_shape)


def test_mismatches_are_errors_listing_them(tmp_path):
    make_source(tmp_path / "src", _config())
    config = _config(features=(4, 16))
    config.init_from = str(tmp_path / "src")
    with pytest.raises(ValueError, match="problems") as error:
        _restore_into_abstract(config, 2, (64, 64, 1))
    message = str(error.value)
    for expected in (
        "shape mismatch at params/block1/conv/kernel: source (3, 3, 4, 8) vs target (3, 3, 4, 16)",
        "params/block1/bn/scale",
        "batch_stats/block1/bn/mean",
    ):
        assert expected in message
    assert "params/head" not in message

    config = _config()
    config.init_from = str(tmp_path / "src")
    _, summary = _restore_into_abstract(config, 2, (64, 64, 1))
    assert summary["reinitialised_head"] == ["head"] and summary["step"] == 3
    with pytest.raises(ValueError, match="config.data.image_size"):  # 28x28 changes the dense layer.
        _restore_into_abstract(config, 2, (28, 28, 1))
    config.data.mean = 0.4
    with pytest.raises(ValueError, match=r"config.data.mean=0.4 but the source was trained with mean=0.5"):
        _restore_into_abstract(config, 2, (64, 64, 1))
    config = _config()
    config.model = lenet5.get_config().model
    config.init_from = str(tmp_path / "src")
    with pytest.raises(ValueError, match="config.model.name: source 'paper_cnn' vs 'lenet5'"):
        _restore_into_abstract(config, 2, (64, 64, 1))
    config = _config()
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _restore_into_abstract(config, 2, (64, 64, 1))
    config.transfer.mode = "probe"
    with pytest.raises(ValueError, match="Unknown config.transfer.mode='probe'"):
        transfer.create_optimizer(config, 10, (64, 64, 1))


def _one_step(tmp_path, mode, **transfer_fields):
    config = _config()
    config.init_from = str(tmp_path / "src")
    config.transfer.mode = mode
    config.transfer.update(transfer_fields)
    model, tx, state, _ = make_target(config, 6, (64, 64, 1))
    before = jax.device_get(state.params)
    step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        dropout_key=jax.random.key(0),
        mean=0.5,
        std=0.25,
        label_smoothing=0.0,
    )
    state, _ = step(state, synthetic_batch(8))
    after = jax.device_get(state.params)
    return {path: after_value - _flat(before)[path] for path, after_value in _flat(after).items()}


def test_freezing_and_per_group_learning_rates(tmp_path):
    make_source(tmp_path / "src", _config())
    full = _one_step(tmp_path, "full")
    assert all(np.abs(delta).max() > 0 for path, delta in full.items())

    probe = _one_step(tmp_path, "linear_probe")
    for path, delta in probe.items():
        if path.startswith("head/"):
            np.testing.assert_allclose(delta, full[path], rtol=1e-5, atol=1e-8)
        else:
            assert not delta.any(), path

    frozen = _one_step(tmp_path, "frozen_stages", frozen_stages=0, backbone_lr_multiplier=1.0)
    for path, delta in frozen.items():
        if path.split("/")[0] == "block0":  # Stage 0: the stem.
            assert not delta.any(), path
        else:
            np.testing.assert_allclose(delta, full[path], rtol=1e-5, atol=1e-8)

    grouped = _one_step(tmp_path, "per_group_lr", backbone_lr_multiplier=0.25)
    for path, delta in grouped.items():
        factor = 1.0 if path.startswith("head/") else 0.25
        np.testing.assert_allclose(delta, factor * full[path], rtol=1e-4, atol=1e-8)


def test_heads_and_stages_of_zoo_models():
    expected = {
        "paper_cnn": ("head",),
        "lenet5": ("fc3",),
        "resnet18": ("fc",),
        "efficientnet_lite0": ("fc",),
    }
    for name, head in expected.items():
        model_config = importlib.import_module(f"configs.{name}").get_config().model
        assert transfer.head_names(model_config, (64, 64, 1)) == head
    stages = [transfer.stage_of("efficientnet_lite0", f"blocks_{i}") for i in range(16)]
    assert stages == [1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7]
    assert transfer.stage_of("efficientnet_lite0", "conv_stem") == 0
    assert transfer.stage_of("resnet50", "layer3_5") == 3
    assert [transfer.stage_of("paper_cnn", name) for name in ("block0", "block3", "fc")] == [0, 3, 1000]
    with pytest.raises(ValueError, match="stage layout of model 'mystery'"):
        transfer.stage_of("mystery", "block0")


def test_end_to_end_fine_tune_from_a_medical_mnist_workdir(tmp_path):
    source_config = quick.get_config()
    source_config.data.manual_dir = FIXTURE_ROOT
    source_config.data.tfds_dir = str(tmp_path / "tfds")
    source_config.train.bn_calibration_batches = 0  # Fewer compilations; calibration is tested elsewhere.
    train.train_and_evaluate(source_config, str(tmp_path / "source"))

    write_npz(
        str(tmp_path / "manual" / "medmnist" / "pneumoniamnist.npz"), sizes={"train": 24, "val": 8, "test": 8}
    )
    config = quick.get_config()
    config.data.name = "pneumoniamnist"
    config.data.manual_dir = str(tmp_path / "manual")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.image_size = 64
    config.init_from = str(tmp_path / "source")
    config.transfer.mode = "linear_probe"
    config.train.bn_calibration_batches = 0
    workdir = str(tmp_path / "target")
    reports = train.train_and_evaluate(config, workdir)
    assert set(reports) == {"validation", "test"} and reports["test"]["num_examples"] == 8
    assert reports["test"]["class_names"] == ["normal", "pneumonia"]

    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["config"]["init_from"] == config.init_from
    assert saved["preprocessing"]["image_size"] == 64 and saved["preprocessing"]["image_shape"] == [28, 28, 1]
    # Linear probe: the backbone's parameters are exactly the source's; the head has 2 classes.
    source_state = checkpointing.create_manager(str(tmp_path / "source"), read_only=True)
    source_params = _flat(source_state.restore(source_state.latest_step()).state["params"])
    target_manager = checkpointing.create_manager(workdir, read_only=True)
    target_params = _flat(target_manager.restore(target_manager.latest_step()).state["params"])
    for path, value in target_params.items():
        if not path.startswith("head/"):
            np.testing.assert_array_equal(value, source_params[path])
    assert target_params["head/kernel"].shape == (16, 2)
    # The evaluation job rebuilds the preprocessing (resize to 64) and restores despite the split optimizer.
    report = evaluate.evaluate_checkpoint(workdir, split="test")
    assert report["accuracy"] == reports["test"]["accuracy"]
