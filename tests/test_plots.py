"""Report plots and training curves are written as PNGs from the report dict and the event files alone."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from medjax import metrics
from medjax import plots

CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]


def _report(labels_present=None, n=600, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    if labels_present is not None:
        labels = np.asarray(labels_present)[labels % len(labels_present)]
    logits = rng.normal(size=(n, len(CLASSES))) + 3.0 * np.eye(len(CLASSES))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # Through JSON, as a plot drawn from a report file sees it.
    return json.loads(json.dumps(metrics.classification_report(probs, labels, CLASSES)))


def _assert_png(path, min_side=300, max_side=2500):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path, image.size)
    assert 10_000 < os.path.getsize(path) < 300_000, path
    assert pixels.std() > 10, path  # Drawn on, not blank.


@pytest.mark.parametrize(
    "present", [None, [2, 4], [1]], ids=["all classes", "two classes", "one class (no AUC)"]
)
def test_report_plots_are_pngs_next_to_the_prefix(tmp_path, present):
    report = _report(present)
    prefix = str(tmp_path / "eval" / "test_step8")
    paths = plots.save_report_plots(report, prefix)
    assert paths == [f"{prefix}_confusion.png", f"{prefix}_roc.png", f"{prefix}_reliability.png"]
    for path in paths:
        _assert_png(path)


def test_report_figures_draw_the_report_s_numbers():
    report = _report([0, 2, 5])
    panels = {axes.get_title(): axes for axes in plots.confusion_figure(report).axes}
    counts, normalised = panels["Counts (600 examples)"], panels["Normalised by true class"]
    np.testing.assert_array_equal(counts.images[0].get_array(), report["confusion_matrix"])
    matrix = np.array(report["confusion_matrix"], float)
    rows = normalised.images[0].get_array()
    for k, name in enumerate(CLASSES):
        expected = matrix[k] / matrix[k].sum() if matrix[k].sum() else np.zeros(len(CLASSES))
        np.testing.assert_allclose(rows[k], expected, err_msg=name)
    roc = plots.roc_figure(report).axes[0]
    curves = {line.get_label().split(" (")[0]: line for line in roc.lines if "AUC" in line.get_label()}
    assert list(curves) == ["AbdomenCT", "CXR", "HeadCT"]
    for name, line in curves.items():
        np.testing.assert_array_equal(line.get_xdata(), report["roc_curves"][name]["fpr"])
        np.testing.assert_array_equal(line.get_ydata(), report["roc_curves"][name]["tpr"])
    assert "95% CI" in roc.get_title()
    report["bootstrap"]["macro_auc"] = None  # No interval: the title leaves it out.
    assert "CI" not in plots.roc_figure(report).axes[0].get_title()
    top, bottom = plots.reliability_figure(report).axes
    bars = [(p.get_x(), p.get_height()) for p in top.patches]
    filled = [b for b in report["reliability"]["bins"] if b["count"]]
    np.testing.assert_allclose(bars, [(b["lower"], b["accuracy"]) for b in filled])
    assert f'{report["ece"]:.4f}' in top.get_title()
    assert [p.get_height() for p in bottom.patches] == [b["count"] for b in report["reliability"]["bins"]]


def _write_events(workdir, points, resumed=()):
    """clu's TensorBoard writer, as medjax.train uses it; `resumed` is logged by a second writer."""
    from clu import metric_writers

    for batch in (points, resumed):
        writer = metric_writers.SummaryWriter(str(workdir))
        for step, scalars in batch:
            writer.write_scalars(step, scalars)
        writer.close()


TRAIN = [
    (s, {"train/loss": 2.0 / s, "train/accuracy": 1 - 1.0 / (s + 1), "train/epoch": s / 4}) for s in (2, 4, 6)
]


def test_read_scalars_reads_clu_summaries_and_keeps_a_resumed_run_s_values(tmp_path):
    resumed = [
        (6, {"train/loss": 0.25, "train/accuracy": 0.9}),
        (8, {"train/loss": 0.2, "train/accuracy": 0.95}),
    ]
    _write_events(tmp_path, TRAIN + [(4, {"eval/accuracy": 0.5}), (6, {"test/accuracy": 0.6})], resumed)
    scalars = plots.read_scalars(str(tmp_path))
    assert {"train/loss", "train/accuracy", "train/epoch", "eval/accuracy", "test/accuracy"} <= set(scalars)
    steps, loss = scalars["train/loss"]
    assert steps.tolist() == [2, 4, 6, 8]
    np.testing.assert_allclose(loss, [1.0, 0.5, 0.25, 0.2], rtol=1e-6)
    np.testing.assert_allclose(scalars["train/accuracy"][1], [2 / 3, 0.8, 0.9, 0.95], rtol=1e-6)
    assert scalars["eval/accuracy"][0].tolist() == [4]


def test_read_scalars_reads_legacy_simple_values(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(tmp_path))
    for step, value in ((1, 0.5), (2, 0.25)):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="train/loss", simple_value=value)])
        writer.add_event(event_pb2.Event(step=step, wall_time=float(step), summary=summary))
    writer.close()
    steps, values = plots.read_scalars(str(tmp_path))["train/loss"]
    assert steps.tolist() == [1, 2] and values.tolist() == [0.5, 0.25]


def test_training_curves_plot_accuracy_and_loss_against_the_iteration(tmp_path):
    _write_events(
        tmp_path, TRAIN + [(4, {"eval/accuracy": 0.5}), (6, {"eval/accuracy": 0.7, "test/accuracy": 0.6})]
    )
    path = plots.save_training_curves(str(tmp_path), str(tmp_path / "eval" / "training_curves.png"))
    _assert_png(path)
    figure = plots.training_figure(plots.read_scalars(str(tmp_path)))
    accuracy, loss = figure.axes
    lines = {(axes.get_title(), line.get_label()): line for axes in figure.axes for line in axes.lines}
    assert set(lines) == {
        ("Accuracy", "train"),
        ("Accuracy", "validation"),
        ("Accuracy", "test (final)"),
        ("Loss", "train"),
    }
    expected = {
        ("Accuracy", "train"): ([2, 4, 6], [2 / 3, 0.8, 6 / 7]),
        ("Accuracy", "validation"): ([4, 6], [0.5, 0.7]),
        ("Accuracy", "test (final)"): ([6], [0.6]),
        ("Loss", "train"): ([2, 4, 6], [1.0, 0.5, 1 / 3]),
    }
    for key, (steps, values) in expected.items():
        np.testing.assert_array_equal(lines[key].get_xdata(), steps, err_msg=str(key))
        np.testing.assert_allclose(lines[key].get_ydata(), values, rtol=1e-6, err_msg=str(key))
    assert accuracy.get_xlabel() == loss.get_xlabel() == "iteration"


def test_training_curves_without_training_scalars_is_an_error(tmp_path):
    _write_events(tmp_path, [(1, {"eval/accuracy": 0.5})])
    with pytest.raises(ValueError, match="No train/loss or train/accuracy"):
        plots.save_training_curves(str(tmp_path), str(tmp_path / "curves.png"))
