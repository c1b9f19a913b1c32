"""The training loop's behaviour, observed from outside: resume, batch-norm calibration, early stop, subsets.

Every run is in-process on the image fixture (24 training, 6 validation, 6 test images) with the quick
config; the module trains once and asserts many times.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quick
from medjax import checkpointing, models, sharding, steps, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")
NUM_TRAIN = 24  # Training examples of the fixture.


def _config(tfds_dir):
    """One global batch = the whole training split, so the clean calibration batches are all of it."""
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    config.train.batch_size = NUM_TRAIN
    config.train.num_epochs = 4.0  # 4 steps, 1 per epoch; evaluations after steps 1, 2 and 3.
    config.train.checkpoint_every_steps = 2
    config.train.bn_calibration_batches = 2
    config.eval.batch_size = 4  # 6 examples: one full batch and one padded half batch.
    config.train.label_smoothing = 0.1  # Not the default, so that the loop must pass it on.
    return config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def run(tfds_dir, tmp_path_factory):
    """A finished run: (config, workdir, reports, keyword arguments of every traced train step)."""
    config = _config(tfds_dir)
    workdir = str(tmp_path_factory.mktemp("train") / "run")
    traced_steps = []

    def recording_train_step(*args, **kwargs):
        traced_steps.append(kwargs)
        return original_train_step(*args, **kwargs)

    original_train_step = steps.train_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "train_step", recording_train_step)
        reports = train.train_and_evaluate(config, workdir)
    return config, workdir, reports, traced_steps


def _abstract(config, num_classes=6):
    model = models.create_model(config.model, num_classes)
    tx = steps.create_optimizer(config.train, 4)
    mesh = sharding.create_mesh()
    shapes = jax.eval_shape(
        functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)), jax.random.key(0)
    )
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), shapes
    )


def _infer(model, variables, images):
    """Inference-mode logits (jit-compiled: op by op the model is slow)."""
    return jax.jit(functools.partial(model.apply, train=False))(variables, images)


def _train_mode(model, variables, images):
    """Train-mode (logits, {'batch_stats': this batch's update})."""
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    return jax.jit(apply)(variables, images, rngs={"dropout": jax.random.key(0)})


def _restore(config, workdir, step):
    manager = checkpointing.create_manager(workdir, read_only=True)
    return jax.device_get(checkpointing.restore_state(manager, step, _abstract(config)))


def _saved_steps(workdir):
    return sorted(checkpointing.create_manager(workdir, read_only=True).all_steps())


def _leaves(tree):
    return [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)]


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_the_step_gets_the_config_s_label_smoothing(run):
    config, _, _, traced_steps = run
    assert traced_steps and all(k["label_smoothing"] == config.train.label_smoothing for k in traced_steps)


def test_run_saves_every_other_step_and_reports_the_final_one(run):
    _, workdir, reports, _ = run
    assert _saved_steps(workdir) == [2, 4]
    assert {r["checkpoint_step"] for r in reports.values()} == {4}
    assert {r["num_examples"] for r in reports.values()} == {6}


def _clean_training_set_statistics(config, state):
    """Batch-norm statistics of one train-mode pass over the whole clean training split."""
    data, _ = train.load_data(config)
    stats_config = config.model.copy_and_resolve_references()
    stats_config.bn_momentum = 0.0
    model = models.create_model(stats_config, 6)
    images = steps.preprocess(jnp.asarray(data["train"]["image"]), mean=config.data.mean, std=config.data.std)
    _, updates = _train_mode(model, {"params": state.params, "batch_stats": state.batch_stats}, images)
    return jax.device_get(updates["batch_stats"])


def test_final_batch_norm_statistics_are_those_of_the_clean_training_set(run):
    """Calibration replaces the running averages (gathered on augmented batches) by the statistics of
    clean training batches; here every calibration batch is the whole clean training split."""
    config, workdir, _, _ = run
    state = _restore(config, workdir, 4)
    expected = _clean_training_set_statistics(config, state)
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(state.batch_stats)
    for want, got in zip(_leaves(expected), _leaves(state.batch_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_intermediate_checkpoints_keep_the_running_averages(run):
    """An exact resume needs the running averages, so checkpoints before the last are not calibrated."""
    config, workdir, _, _ = run
    state = _restore(config, workdir, 2)
    assert _max_abs_diff(state.batch_stats, _clean_training_set_statistics(config, state)) > 1e-2


def test_final_reports_are_the_final_checkpoint_s_predictions(run):
    """The reports of the run are computed with the final (calibrated) variables on every validation and
    test example once, whatever the evaluation batch size."""
    config, workdir, reports, _ = run
    state = _restore(config, workdir, 4)
    data, _ = train.load_data(config)
    model = models.create_model(config.model, 6)
    for role, split in (("eval", "validation"), ("test", "test")):
        images = steps.preprocess(
            jnp.asarray(data[role]["image"]), mean=config.data.mean, std=config.data.std
        )
        logits = _infer(model, {"params": state.params, "batch_stats": state.batch_stats}, images)
        predicted = np.argmax(np.asarray(logits), -1)
        labels = data[role]["label"]
        confusion = np.zeros((6, 6), int)
        np.add.at(confusion, (labels, predicted), 1)
        assert reports[split]["confusion_matrix"] == confusion.tolist(), split
        assert reports[split]["accuracy"] == pytest.approx(np.mean(predicted == labels))


def test_resume_starts_from_the_checkpoint_s_state(run, tmp_path):
    """A workdir whose step-2 checkpoint holds weights the run never had (another initialisation) and
    running averages raised by 10: the resumed run trains steps 3-4 from them, so its final weights stay
    within two optimizer steps of them (AdamW moves a weight by at most a few learning rates a step), far
    from the original run's, and its running averages keep most of the raise."""
    config, workdir, _, _ = run
    checkpoint = _restore(config, workdir, 2)
    model = models.create_model(config.model, 6)
    other = jax.jit(
        functools.partial(
            steps.init_state, model, steps.create_optimizer(config.train, 4), image_shape=(64, 64, 1)
        )
    )(jax.random.key(99))
    planted = checkpoint.replace(
        params=jax.device_get(other.params),
        batch_stats=jax.tree_util.tree_map(lambda x: x + 10.0, checkpoint.batch_stats),
    )
    resumed = str(tmp_path / "resumed")
    manager = checkpointing.create_manager(resumed)
    checkpointing.save(manager, 2, planted, {"batch_stats": "running averages"})
    manager.wait_until_finished()

    config = config.copy_and_resolve_references()
    config.train.bn_calibration_batches = 0  # The final batch-norm statistics are the running averages.
    reports = train.train_and_evaluate(config, resumed)
    assert {r["checkpoint_step"] for r in reports.values()} == {4}
    final = _restore(config, resumed, 4)
    assert int(final.step) == 4
    bound = 2 * 4 * config.train.learning_rate  # Two steps of at most ~3.2 learning rates (Adam, b2=0.999).
    assert _max_abs_diff(final.params, planted.params) < bound
    original = _restore(config, workdir, 4)
    assert _max_abs_diff(original.params, planted.params) > 10 * bound  # The test's premise.
    # Two batch-norm momentum (0.9) steps keep 0.81 of the planted running averages, which are >= 10.
    assert min(float(np.min(x)) for x in _leaves(final.batch_stats)) > 5.0
    # The optimizer state went on from the checkpoint's too (Adam's step count).
    counts = [c for c in jax.tree_util.tree_leaves(final.opt_state) if np.ndim(c) == 0]
    assert counts and all(int(c) == 4 for c in counts), counts


@pytest.fixture(scope="module")
def stopped(tfds_dir, tmp_path_factory):
    """A run on a 16-example subset (2 steps an epoch) that stops at its first evaluation."""
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    config.data.num_train_examples = 16
    config.train.num_epochs = 3.0  # 6 steps if it did not stop.
    config.train.checkpoint_every_steps = 4
    config.train.stop_at_eval_accuracy = 0.0  # Any accuracy reaches it.
    workdir = str(tmp_path_factory.mktemp("stopped") / "run")
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_early_stop_ends_the_run_at_the_first_evaluation(stopped):
    """Evaluations come once an epoch; 16 of the 24 training examples in batches of 8 make an epoch 2
    steps, so the run stops after step 2, saves its final checkpoint there and reports it."""
    _, workdir, reports = stopped
    assert _saved_steps(workdir) == [2]
    assert {r["checkpoint_step"] for r in reports.values()} == {2}
    metadata = checkpointing.restore_metadata(checkpointing.create_manager(workdir, read_only=True), 2)
    assert metadata["batch_stats"].startswith("calibrated")


def test_num_train_examples_is_a_seeded_subset(tfds_dir):
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(tfds_dir)
    full = train.load_data(config)[0]["train"]
    config.data.num_train_examples = 10

    def subset(seed):
        config.seed = seed
        return train.load_data(config)[0]["train"]

    a, again, b = subset(0), subset(0), subset(1)
    assert len(a["label"]) == len(b["label"]) == 10
    np.testing.assert_array_equal(a["image"], again["image"])
    assert not np.array_equal(a["file_name"], b["file_name"])
    for part in (a, b):
        position = {name: i for i, name in enumerate(full["file_name"])}
        index = [position[name] for name in part["file_name"]]
        assert index == sorted(index)  # Kept in the split's order.
        np.testing.assert_array_equal(part["image"], full["image"][index])
        np.testing.assert_array_equal(part["label"], full["label"][index])
    config.data.num_train_examples = NUM_TRAIN + 1
    with pytest.raises(ValueError, match="num_train_examples=25 exceeds the 24"):
        train.load_data(config)
