"""Metrics must equal scikit-learn's on fixed predictions, ties included.

Conventions checked here (medjax/metrics.py):
- the predicted class is the argmax of the probabilities; tied maxima go to the lowest class index;
- a class never predicted has precision 0 (and F1 0), a class absent from the labels recall 0 and AUC None;
- tied scores share their average rank in every one-vs-rest AUC;
- the macro AUC is the unweighted mean over the classes whose AUC is defined.
"""

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import metrics

CLASSES = ["a", "b", "c", "d"]
SUPPORT = [20, 12, 8, 5]  # Unequal, so a support-weighted mean differs from the macro mean.


def _tied_predictions(seed=0):
    """Probabilities in steps of 0.1 (ties within every class's column and across classes in a row).

    Class "d" scores at most 0.1 while the other three share the remaining 0.9, so "d" is never predicted.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), SUPPORT)
    counts = np.zeros((len(labels), len(CLASSES)), np.int64)
    for i, y in enumerate(labels):
        leaning = np.full(3, 0.25) if y == 3 else np.where(np.arange(3) == y, 0.5, 0.25)
        counts[i, 3] = rng.random() < (0.7 if y == 3 else 0.3)
        counts[i, :3] = rng.multinomial(10 - counts[i, 3], leaning)
    return counts / 10.0, labels


@pytest.fixture(scope="module")
def tied():
    probs, labels = _tied_predictions()
    # The fixture really holds what the tests claim to exercise.
    for k in range(len(CLASSES)):
        assert len(np.unique(probs[:, k])) < len(probs) / 3, "expected many ties within each column"
    top = probs.max(1, keepdims=True)
    assert ((probs == top).sum(1) > 1).sum() >= 3, "expected rows whose maximum is tied across classes"
    predictions = probs.argmax(1)
    assert 3 not in predictions
    matrix = skm.confusion_matrix(labels, predictions, labels=range(len(CLASSES)))
    assert not np.array_equal(matrix, matrix.T)
    return probs, labels, metrics.classification_report(probs, labels, CLASSES)


def test_per_class_precision_recall_f1_support_match_sklearn(tied):
    probs, labels, report = tied
    predictions = probs.argmax(1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=range(len(CLASSES)), zero_division=0
    )
    assert not np.allclose(precision, recall)  # A swap of the two would show.
    for k, name in enumerate(CLASSES):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision[k], abs=1e-12), name
        assert row["recall"] == pytest.approx(recall[k], abs=1e-12), name
        assert row["f1"] == pytest.approx(f1[k], abs=1e-12), name
        assert row["support"] == support[k] == SUPPORT[k], name
    assert report["per_class"]["d"]["precision"] == 0.0 and report["per_class"]["d"]["f1"] == 0.0
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
    assert report["num_examples"] == len(labels)
    assert report["class_names"] == CLASSES


def test_confusion_matrix_rows_are_true_classes(tied):
    probs, labels, report = tied
    expected = skm.confusion_matrix(labels, probs.argmax(1), labels=range(len(CLASSES)))
    np.testing.assert_array_equal(report["confusion_matrix"], expected)
    np.testing.assert_array_equal(np.sum(report["confusion_matrix"], 1), SUPPORT)


def test_every_auc_matches_sklearn_with_ties(tied):
    probs, labels, report = tied
    per_class = [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(len(CLASSES))]
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["auc"] == pytest.approx(per_class[k], abs=1e-12), name
    assert len(set(np.round(per_class, 9))) == len(CLASSES)  # Misindexed classes would show.
    assert report["auc_classes"] == CLASSES
    macro = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert report["macro_auc"] == pytest.approx(macro, abs=1e-12)
    weighted = skm.roc_auc_score(labels, probs, multi_class="ovr", average="weighted")
    assert abs(macro - weighted) > 1e-3  # The macro AUC is the unweighted mean.


def test_roc_auc_averages_tied_ranks():
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.1])
    positives = np.array([0, 1, 0, 1, 1, 1])
    # Pairs (positive, negative): 0.4>0.1, 0.4=0.4 (half), 0.8>both, 0.4=0.4 (half), 0.4>0.1, 0.1=0.1 (half).
    assert metrics.roc_auc(scores, positives) == pytest.approx(5.5 / 8, abs=1e-12)
    assert metrics.roc_auc(scores, positives) == pytest.approx(skm.roc_auc_score(positives, scores))
    assert metrics.roc_auc(np.full(5, 0.3), np.array([1, 0, 1, 0, 0])) == 0.5
    assert metrics.roc_auc(scores, np.zeros(6)) is None and metrics.roc_auc(scores, np.ones(6)) is None


def test_tied_maxima_predict_the_lowest_class_index():
    probs = np.array([[0.4, 0.4, 0.1, 0.1], [0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]])
    report = metrics.classification_report(probs, np.array([1, 2, 3]), CLASSES)
    assert report["accuracy"] == 0.0
    assert report["confusion_matrix"] == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_report_matches_sklearn_on_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), 300)
    logits = rng.normal(size=(300, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    report = metrics.classification_report(probs, labels, CLASSES)
    assert report["macro_auc"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["auc"] == pytest.approx(
            skm.roc_auc_score(labels == k, probs[:, k]), abs=1e-12
        )
    f1 = skm.f1_score(labels, probs.argmax(1), average=None, labels=range(len(CLASSES)))
    np.testing.assert_allclose([report["per_class"][n]["f1"] for n in CLASSES], f1, atol=1e-12)


def test_auc_with_absent_class_averages_defined_classes(tied):
    probs, labels, _ = tied
    keep = labels != 1
    report = metrics.classification_report(probs[keep], labels[keep], CLASSES)
    row = report["per_class"]["b"]
    assert row["auc"] is None and row["support"] == 0 and row["recall"] == 0.0
    assert report["auc_classes"] == ["a", "c", "d"]
    expected = np.mean([skm.roc_auc_score(labels[keep] == k, probs[keep][:, k]) for k in (0, 2, 3)])
    assert report["macro_auc"] == pytest.approx(expected, abs=1e-12)
    precision = skm.precision_score(
        labels[keep], probs[keep].argmax(1), labels=range(len(CLASSES)), average=None, zero_division=0
    )
    np.testing.assert_allclose([report["per_class"][n]["precision"] for n in CLASSES], precision, atol=1e-12)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="expected \\[N, 4\\]"):
        metrics.classification_report(np.zeros((3, 2)), np.zeros(3, int), CLASSES)
    with pytest.raises(ValueError, match="2 labels for 3 predictions"):
        metrics.classification_report(np.zeros((3, 4)), np.zeros(2, int), CLASSES)
    with pytest.raises(ValueError, match="No examples"):
        metrics.classification_report(np.zeros((0, 4)), np.zeros(0, int), CLASSES)
