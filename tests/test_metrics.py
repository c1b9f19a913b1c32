"""Metrics must equal scikit-learn's on fixed predictions, ties included.

Conventions checked here (medjax/metrics.py):
- the predicted class is the argmax of the probabilities; tied maxima go to the lowest class index;
- a class never predicted has precision 0 (and F1 0), a class absent from the labels recall 0 and AUC None;
- tied scores share their average rank in every one-vs-rest AUC;
- the macro AUC is the unweighted mean over the classes whose AUC is defined;
- balanced accuracy averages the recall of the classes present in the labels;
- the ECE bins the top-label confidence into 15 equal-width bins (lower edge excluded, upper included);
- bootstrap intervals are percentiles over resamples of the examples; a resample's macro AUC averages the
  classes defined in that resample.
"""

import json

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


def test_specificity_sensitivity_and_balanced_accuracy_match_sklearn(tied):
    probs, labels, report = tied
    predictions = probs.argmax(1)
    for k, name in enumerate(CLASSES):
        row = report["per_class"][name]
        # Specificity of class k is the recall of "not k".
        assert row["specificity"] == pytest.approx(skm.recall_score(labels != k, predictions != k), abs=1e-12)
        assert row["sensitivity"] == row["recall"]
    assert report["per_class"]["a"]["specificity"] != report["per_class"]["b"]["specificity"]
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predictions))
    assert abs(report["balanced_accuracy"] - report["accuracy"]) > 1e-3


def test_balanced_accuracy_leaves_out_absent_classes(tied):
    probs, labels, _ = tied
    keep = labels != 1
    report = metrics.classification_report(probs[keep], labels[keep], CLASSES)
    recalls = [report["per_class"][n]["recall"] for n in ("a", "c", "d")]
    assert report["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-12)


def test_micro_auc_matches_sklearn(tied):
    probs, labels, report = tied
    one_hot = np.eye(len(CLASSES))[labels]
    assert report["micro_auc"] == pytest.approx(skm.roc_auc_score(one_hot, probs, average="micro"), abs=1e-12)
    assert abs(report["micro_auc"] - report["macro_auc"]) > 1e-4


def test_expected_calibration_error_by_hand():
    """Confidences 0.9 (right), 0.9 (wrong), 0.7, 0.7 (right), 1.0 (right) and 0.6 = 9/15 (right), which
    lies on a bin edge and belongs to the bin below it.

    ECE = 2/6 |0.5 - 0.9| + 2/6 |1 - 0.7| + 1/6 |1 - 1.0| + 1/6 |1 - 0.6| = (0.8 + 0.6 + 0 + 0.4) / 6 = 0.3.
    """
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3], [0.0, 1.0], [0.6, 0.4]])
    report = metrics.classification_report(probs, np.array([0, 1, 1, 0, 1, 0]), ["a", "b"])
    assert report["ece"] == pytest.approx(0.3, abs=1e-12)
    bins = report["reliability"]["bins"]
    assert len(bins) == 15 and report["reliability"]["binning"].startswith("15 equal-width")
    filled = {i: b for i, b in enumerate(bins) if b["count"]}
    assert sorted(filled) == [8, 10, 13, 14]  # (8/15, 9/15], (10/15, 11/15], (13/15, 14/15], (14/15, 1].
    assert filled[13] == pytest.approx(
        {"lower": 13 / 15, "upper": 14 / 15, "confidence": 0.9, "accuracy": 0.5, "count": 2}
    )
    assert filled[10]["confidence"] == pytest.approx(0.7) and filled[10]["accuracy"] == 1.0
    assert filled[14]["count"] == 1 and filled[14]["confidence"] == 1.0
    assert filled[8]["count"] == 1 and filled[8]["confidence"] == 0.6
    assert all(
        b["confidence"] is None and b["accuracy"] is None for i, b in enumerate(bins) if i not in filled
    )


def test_expected_calibration_error_matches_reliability_bins():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(CLASSES)), 500)
    labels = rng.integers(0, len(CLASSES), 500)
    report = metrics.classification_report(probs, labels, CLASSES)
    bins = [b for b in report["reliability"]["bins"] if b["count"]]
    assert sum(b["count"] for b in bins) == 500
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins)
    assert report["ece"] == pytest.approx(ece, abs=1e-12)
    confidence = probs.max(1)
    for b in bins:
        inside = (confidence > b["lower"]) & (confidence <= b["upper"])
        assert b["count"] == inside.sum() and b["confidence"] == pytest.approx(confidence[inside].mean())


def _continuous(seed, n=300, classes=len(CLASSES), margin=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + margin * np.eye(classes)[labels]
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels


def test_bootstrap_is_seeded_and_contains_the_estimate():
    probs, labels = _continuous(0, n=1000)
    report = metrics.classification_report(probs, labels, CLASSES, bootstrap_seed=7)
    again = metrics.classification_report(probs, labels, CLASSES, bootstrap_seed=7)
    other = metrics.classification_report(probs, labels, CLASSES, bootstrap_seed=8)
    assert report["bootstrap"] == again["bootstrap"]
    assert report["bootstrap"]["seed"] == 7 and report["bootstrap"]["resamples"] == 1000
    for key in ("accuracy", "macro_auc"):
        low, high = report["bootstrap"][key]
        assert low < report[key] < high, key
        assert 0.005 < high - low < 0.2, key
        assert other["bootstrap"][key] != report["bootstrap"][key], key


def test_bootstrap_auc_equals_sklearn_on_the_resampled_examples(tied):
    """The weighted AUC of each resample is scikit-learn's AUC of the examples it draws (ties included)."""
    probs, labels, _ = tied
    counts = metrics.bootstrap_counts(len(labels), 4, seed=3)
    assert counts.sum(1).tolist() == [len(labels)] * 4 and counts.max() > 1
    for k in range(len(CLASSES)):
        aucs = metrics._weighted_auc(probs[:, k], labels == k, counts)
        for r in range(4):
            drawn = np.repeat(np.arange(len(labels)), counts[r])
            expected = skm.roc_auc_score(labels[drawn] == k, probs[drawn, k])
            assert aucs[r] == pytest.approx(expected, abs=1e-12), (k, r)


def test_bootstrap_intervals_match_a_resample_loop():
    """Percentiles of accuracy and macro AUC recomputed resample by resample with scikit-learn. Class "d"
    has one example in 20, so many resamples lack it and average the other classes only."""
    probs, labels = _continuous(1, n=20)
    labels[labels == 3] = 0
    labels[0] = 3
    counts = metrics.bootstrap_counts(20, 100, seed=5)
    accuracy, macro = [], []
    for row in counts:
        drawn = np.repeat(np.arange(20), row)
        y, p = labels[drawn], probs[drawn]
        accuracy.append(skm.accuracy_score(y, p.argmax(1)))
        aucs = [skm.roc_auc_score(y == k, p[:, k]) for k in range(4) if 0 < (y == k).sum() < len(y)]
        macro.append(np.mean(aucs))
    assert (counts[:, 0] == 0).sum() > 15  # Resamples without class "d" were drawn.
    result = metrics.bootstrap(probs, labels, range(4), resamples=100, seed=5)
    np.testing.assert_allclose(result["accuracy"], np.percentile(accuracy, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(result["macro_auc"], np.percentile(macro, [2.5, 97.5]), atol=1e-12)


def test_roc_curves_are_sklearn_s_thinned_to_a_bounded_number_of_points(tied):
    probs, labels, report = tied
    for k, name in enumerate(CLASSES):  # Few distinct scores: every corner is kept.
        fpr, tpr, _ = skm.roc_curve(labels == k, probs[:, k])
        np.testing.assert_allclose(report["roc_curves"][name]["fpr"], fpr, atol=1e-6)
        np.testing.assert_allclose(report["roc_curves"][name]["tpr"], tpr, atol=1e-6)
    probs, labels = _continuous(2, n=4000, margin=0.7)
    report = metrics.classification_report(probs, labels, CLASSES)
    for k, name in enumerate(CLASSES):
        fpr, tpr, _ = skm.roc_curve(labels == k, probs[:, k])
        assert len(fpr) > 3 * metrics.ROC_MAX_POINTS
        curve = np.array([report["roc_curves"][name]["fpr"], report["roc_curves"][name]["tpr"]])
        assert 0.8 * metrics.ROC_MAX_POINTS <= curve.shape[1] <= metrics.ROC_MAX_POINTS
        assert curve[:, 0].tolist() == [0, 0] and curve[:, -1].tolist() == [1, 1]
        assert (np.diff(curve, axis=1) >= 0).all()
        corners = {(round(f, 6), round(t, 6)) for f, t in zip(fpr, tpr)}
        assert {tuple(point) for point in curve.T.tolist()} <= corners
        area = np.sum(np.diff(curve[0]) * (curve[1, 1:] + curve[1, :-1]) / 2)
        assert area == pytest.approx(report["per_class"][name]["auc"], abs=2e-3)


def test_roc_thinning_keeps_sparse_corners_where_corners_are_dense_elsewhere():
    """A staircase of ten 0.05 x 0.05 steps, then ~1,000 tiny corners: thinning by position along the
    curve keeps every step of the staircase and the area under the curve."""
    staircase = np.tile(np.repeat([1, 0], 100), 10)
    rest = np.random.default_rng(0).permutation(np.repeat([1, 0], 1000))
    positives = np.concatenate([staircase, rest])
    scores = -np.arange(len(positives), dtype=float)  # Descending: the staircase scores highest.
    curve = metrics.roc_curve(scores, positives)
    assert len(curve["fpr"]) <= metrics.ROC_MAX_POINTS
    points = set(zip(curve["fpr"], curve["tpr"]))
    for step in range(1, 11):
        assert (round(0.05 * (step - 1), 6), round(0.05 * step, 6)) in points, step
    area = np.sum(np.diff(curve["fpr"]) * (np.array(curve["tpr"][1:]) + curve["tpr"][:-1]) / 2)
    assert area == pytest.approx(skm.roc_auc_score(positives, scores), abs=1e-3)


def test_absent_class_has_no_roc_curve_and_the_report_is_strict_json(tied):
    probs, labels, _ = tied
    keep = labels != 1
    report = metrics.classification_report(probs[keep], labels[keep], CLASSES)
    assert list(report["roc_curves"]) == ["a", "c", "d"]
    json.dumps(report, allow_nan=False)
    single = metrics.classification_report(probs[labels == 0], labels[labels == 0], CLASSES)
    assert (
        single["macro_auc"] is None
        and single["roc_curves"] == {}
        and single["bootstrap"]["macro_auc"] is None
    )
    json.dumps(single, allow_nan=False)
