"""Classification metrics computed exactly on the host from gathered, unpadded predictions."""

from typing import Sequence

import numpy as np


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None if one class is absent."""
    positives = positives.astype(bool)
    num_pos = int(positives.sum())
    num_neg = len(positives) - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average the 1-based ranks of each run of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(scores)]])
    for start, stop in zip(starts, stops):
        ranks[order[start:stop]] = (start + stop + 1) / 2.0
    rank_sum = ranks[positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, one-vs-rest macro AUC, per-class precision/recall/F1/AUC/support, confusion matrix.

    `macro_auc` averages the classes whose one-vs-rest AUC is defined (both present and absent in
    `labels`); `auc_classes` names them, so a folder holding a subset of classes is reported honestly.
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
    labels = labels.astype(np.int64)
    predictions = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class = {}
    aucs = {}
    for k, name in enumerate(class_names):
        true_pos = matrix[k, k]
        predicted = matrix[:, k].sum()
        support = matrix[k, :].sum()
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        auc = roc_auc(probs[:, k], labels == k)
        if auc is not None:
            aucs[name] = auc
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "auc": auc,
            "support": int(support),
        }
    return {
        "accuracy": float((predictions == labels).mean()),
        "macro_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "auc_classes": list(aucs),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
        "num_examples": int(len(labels)),
    }
