"""Classification metrics, computed the same way for every head and stage."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm


def classification_metrics(proba: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, mean per-class accuracy, log loss, per-class P/R/F1 and the confusion matrix.

    `proba` is (N, K) with K == len(class_names); `labels` (N,) int. Classes absent
    from `labels` count in the matrix and per-class table but not in the mean
    per-class accuracy, which would otherwise be dragged down by empty classes.
    """
    k = len(class_names)
    predicted = proba.argmax(axis=1)
    everything = list(range(k))
    matrix = skm.confusion_matrix(labels, predicted, labels=everything)
    present = matrix.sum(axis=1) > 0
    recall_per_class = np.divide(np.diag(matrix), matrix.sum(axis=1), out=np.zeros(k), where=present)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=everything, zero_division=0
    )
    clipped = np.clip(proba, 1e-7, 1.0)
    return {
        "n": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "mean_per_class_accuracy": float(recall_per_class[present].mean()),
        "loss": float(skm.log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=everything)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),
    }
