"""Classification metrics computed exactly on the host from gathered, unpadded predictions.

The point metrics are scikit-learn's. The bootstrap intervals resample the examples with replacement and
evaluate every resample at once as example weights (`_weighted_auc`), which gives the same AUC as
scikit-learn on the resampled examples.
"""

from typing import Sequence
import warnings

import numpy as np
from sklearn import metrics as skm

CALIBRATION_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95
ROC_MAX_POINTS = 101


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (tied scores count one half); None if one class is absent."""
    positives = np.asarray(positives).astype(bool)
    if positives.all() or not positives.any():
        return None
    return float(skm.roc_auc_score(positives, scores))


def roc_curve(scores: np.ndarray, positives: np.ndarray, max_points: int = ROC_MAX_POINTS) -> dict:
    """{'fpr', 'tpr'}: the ROC curve's corners, thinned to at most `max_points` spread along its length."""
    fpr, tpr, _ = skm.roc_curve(np.asarray(positives).astype(bool), scores)
    if len(fpr) > max_points:
        # fpr + tpr grows along the curve from 0 to 2: pick the first corner past each of evenly spaced
        # lengths, so the steep start of a good classifier's curve keeps its detail.
        length = fpr + tpr
        keep = np.unique(np.searchsorted(length, np.linspace(0.0, length[-1], max_points - 1)))
        keep = np.union1d(keep, [0, len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": np.round(fpr, 6).tolist(), "tpr": np.round(tpr, 6).tolist()}


def calibration(probs: np.ndarray, labels: np.ndarray, num_bins: int = CALIBRATION_BINS) -> dict:
    """Top-label expected calibration error and the reliability bins it is computed from.

    The confidence of an example is its largest probability; bin i holds confidences in
    (i / num_bins, (i + 1) / num_bins]. ECE = sum over bins of count / N * |accuracy - mean confidence|.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    conf_sums = np.bincount(index, weights=confidence, minlength=num_bins)
    correct_sums = np.bincount(index, weights=correct, minlength=num_bins)
    bins, ece = [], 0.0
    for i in range(num_bins):
        n = int(counts[i])
        mean_conf = conf_sums[i] / n if n else None
        accuracy = correct_sums[i] / n if n else None
        if n:
            ece += n / len(labels) * abs(accuracy - mean_conf)
        bins.append(
            {
                "lower": i / num_bins,
                "upper": (i + 1) / num_bins,
                "confidence": None if mean_conf is None else float(mean_conf),
                "accuracy": None if accuracy is None else float(accuracy),
                "count": n,
            }
        )
    return {"ece": float(ece), "bins": bins}


def bootstrap_counts(num_examples: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_examples]: how often each example is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_examples, size=(resamples, num_examples))
    draws += np.arange(resamples)[:, None] * num_examples
    counts = np.bincount(draws.ravel(), minlength=resamples * num_examples)
    return counts.astype(np.int32).reshape(resamples, num_examples)


def _weighted_auc(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of each row of `weights` [R, N] (example multiplicities), tied scores counting one half; NaN
    where a row holds no positive or no negative."""
    order = np.argsort(scores, kind="stable")
    scores, positives, weights = scores[order], positives[order], weights[:, order]
    # Columns [start, stop) of each run of tied scores, for every example.
    new_run = np.concatenate([[True], np.diff(scores) != 0])
    starts = np.flatnonzero(new_run)
    stops = np.append(starts[1:], len(scores))
    run = np.cumsum(new_run) - 1
    neg_weights = np.where(positives, 0, weights)
    neg_cum = np.zeros((len(weights), len(scores) + 1), weights.dtype)
    np.cumsum(neg_weights, axis=1, dtype=weights.dtype, out=neg_cum[:, 1:])
    pos_cols = np.flatnonzero(positives)
    below = neg_cum[:, starts[run[pos_cols]]]
    tied = neg_cum[:, stops[run[pos_cols]]] - below
    pos_weights = weights[:, pos_cols]
    wins = (pos_weights * (2 * below + tied)).sum(axis=1, dtype=np.int64) / 2.0
    pairs = pos_weights.sum(axis=1, dtype=np.int64) * neg_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


def bootstrap(
    probs: np.ndarray,
    labels: np.ndarray,
    auc_classes: Sequence[int],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CONFIDENCE_LEVEL,
) -> dict:
    """Percentile bootstrap intervals of the accuracy and of the macro AUC over `auc_classes`.

    Each resample draws N examples with replacement; a class that a resample leaves without positives or
    negatives is left out of that resample's macro average, as in the point estimate.
    """
    counts = bootstrap_counts(len(labels), resamples, seed)
    correct = probs.argmax(axis=1) == labels
    accuracy = counts @ correct / len(labels)
    quantiles = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    result = {
        "method": "percentile",
        "resamples": resamples,
        "seed": seed,
        "level": level,
        "accuracy": np.percentile(accuracy, quantiles).tolist(),
        "macro_auc": None,
    }
    if auc_classes:
        aucs = np.stack([_weighted_auc(probs[:, k], labels == k, counts) for k in auc_classes], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # A resample with no defined AUC: NaN.
            macro = np.nanmean(aucs, axis=1)
        macro = macro[~np.isnan(macro)]
        result["macro_auc"] = np.percentile(macro, quantiles).tolist() if len(macro) else None
    return result


def classification_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Accuracy, AUCs, per-class metrics, confusion matrix, calibration, bootstrap intervals, ROC curves.

    The predicted class is the argmax of `probs` (ties: the lowest class index). A class never predicted
    has precision 0, a class absent from `labels` recall 0 and AUC None. `macro_auc` averages the classes
    whose one-vs-rest AUC is defined (both present and absent in `labels`); `auc_classes` names them, so a
    folder holding a subset of classes is reported honestly. `balanced_accuracy` averages the recall of the
    classes present. `micro_auc` is the AUC of all (example, class) one-vs-rest scores pooled.
    """
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"probs has shape {probs.shape}; expected [N, {num_classes}] for classes {list(class_names)}"
        )
    if len(labels) != len(probs):
        raise ValueError(f"{len(labels)} labels for {len(probs)} predictions")
    if len(labels) == 0:
        raise ValueError("No examples to evaluate.")
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    predictions = probs.argmax(axis=1)
    class_ids = np.arange(num_classes)
    matrix = skm.confusion_matrix(labels, predictions, labels=class_ids)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=class_ids, zero_division=0
    )
    one_vs_rest = skm.multilabel_confusion_matrix(labels, predictions, labels=class_ids)
    true_neg, false_pos = one_vs_rest[:, 0, 0], one_vs_rest[:, 0, 1]
    negatives = true_neg + false_pos
    specificity = np.divide(true_neg, negatives, out=np.zeros(num_classes), where=negatives > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Predictions of a class absent from the labels.
        balanced_accuracy = skm.balanced_accuracy_score(labels, predictions)

    per_class, aucs, curves, auc_ids = {}, {}, {}, []
    for k, name in enumerate(class_names):
        auc = roc_auc(probs[:, k], labels == k)
        if auc is not None:
            aucs[name] = auc
            auc_ids.append(k)
            curves[name] = roc_curve(probs[:, k], labels == k)
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "sensitivity": float(recall[k]),
            "specificity": float(specificity[k]),
            "f1": float(f1[k]),
            "auc": auc,
            "support": int(support[k]),
        }
    one_hot = np.eye(num_classes, dtype=bool)[labels]
    calibrated = calibration(probs, labels)
    return {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy),
        "macro_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "micro_auc": roc_auc(probs.ravel(), one_hot.ravel()),
        "auc_classes": list(aucs),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
        "num_examples": int(len(labels)),
        "ece": calibrated["ece"],
        "reliability": {
            "binning": f"{len(calibrated['bins'])} equal-width bins of the top-label confidence",
            "bins": calibrated["bins"],
        },
        "bootstrap": bootstrap(probs, labels, auc_ids, resamples=bootstrap_resamples, seed=bootstrap_seed),
        "roc_curves": curves,
    }
