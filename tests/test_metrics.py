"""Metrics must equal scikit-learn's on fixed predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import metrics

CLASSES = ["a", "b", "c", "d"]


def _fixed_predictions(seed=0, n=300, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[labels]
    if ties:
        logits = np.round(logits, 1)  # Many tied scores exercise the rank averaging.
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize("ties", [False, True])
def test_report_matches_sklearn(ties):
    probs, labels = _fixed_predictions(ties=ties)
    report = metrics.classification_report(probs, labels, CLASSES)
    predictions = probs.argmax(1)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
    assert report["macro_auc"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=range(len(CLASSES)), zero_division=0
    )
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["precision"] == pytest.approx(precision[k], abs=1e-12)
        assert report["per_class"][name]["recall"] == pytest.approx(recall[k], abs=1e-12)
        assert report["per_class"][name]["f1"] == pytest.approx(f1[k], abs=1e-12)
        assert report["per_class"][name]["support"] == support[k]
    np.testing.assert_array_equal(
        report["confusion_matrix"], skm.confusion_matrix(labels, predictions, labels=range(len(CLASSES)))
    )
    assert report["num_examples"] == len(labels)


def test_auc_with_absent_class_averages_defined_classes():
    probs, labels = _fixed_predictions(n=200)
    keep = labels != 3
    report = metrics.classification_report(probs[keep], labels[keep], CLASSES)
    assert report["per_class"]["d"]["auc"] is None
    assert report["auc_classes"] == ["a", "b", "c"]
    expected = np.mean([skm.roc_auc_score(labels[keep] == k, probs[keep][:, k]) for k in range(3)])
    assert report["macro_auc"] == pytest.approx(expected, abs=1e-12)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="expected \\[N, 4\\]"):
        metrics.classification_report(np.zeros((3, 2)), np.zeros(3, int), CLASSES)
    with pytest.raises(ValueError, match="2 labels for 3 predictions"):
        metrics.classification_report(np.zeros((3, 4)), np.zeros(2, int), CLASSES)
