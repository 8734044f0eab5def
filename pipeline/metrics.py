"""Classification metrics and the numerics behind them, the same for every head and stage.

numpy only: the logistic head's fast path should not pay for importing scikit-learn
(about a second) to count a confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Probabilities are clipped to [LOG_LOSS_EPS, 1] (and rows renormalized) before the log:
#: float32 probabilities hold nothing finer, and one confident mistake must not make the
#: loss infinite.
LOG_LOSS_EPS = 1e-7


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits `(N, U)` -> float32 class probabilities `(N, K)`, rows summing to 1.

    U == 1 is a binary head's single logit z: the columns are `[1 - sigmoid(z),
    sigmoid(z)]`. Otherwise a softmax over the K == U logits. Computed in float64
    without overflow for any finite logit.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[1] == 1:
        e = np.exp(-np.abs(z[:, 0]))  # exp of a non-positive number only
        p = np.where(z[:, 0] >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true labels (cross-entropy), clipped as above."""
    clipped = np.clip(np.asarray(proba, dtype=np.float64), LOG_LOSS_EPS, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(clipped[np.arange(len(labels)), np.asarray(labels, np.int64)])))


def accuracy(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(proba).argmax(axis=1) == labels))


def classification_metrics(proba: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, mean per-class accuracy, log loss, per-class P/R/F1 and the confusion matrix.

    `proba` is (N, K) with K == len(class_names); `labels` (N,) int. Classes absent
    from `labels` count in the matrix and per-class table but not in the mean
    per-class accuracy, which would otherwise be dragged down by empty classes.
    """
    k = len(class_names)
    labels = np.asarray(labels, np.int64)
    predicted = proba.argmax(axis=1)
    # Counted in numpy rather than with sklearn.metrics, whose import costs a `make head` ~1 s.
    matrix = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    support = matrix.sum(axis=1)
    present = support > 0
    true_positives = np.diag(matrix).astype(np.float64)
    recall_per_class = np.divide(true_positives, support, out=np.zeros(k), where=present)
    predicted_counts = matrix.sum(axis=0)
    precision = np.divide(true_positives, predicted_counts, out=np.zeros(k), where=predicted_counts > 0)
    recall = recall_per_class
    f1_denominator = support + predicted_counts  # 2 TP + FP + FN
    f1 = np.divide(2 * true_positives, f1_denominator, out=np.zeros(k), where=f1_denominator > 0)
    return {
        "n": int(len(labels)),
        "accuracy": accuracy(proba, labels),
        "mean_per_class_accuracy": float(recall_per_class[present].mean()),
        "loss": log_loss(proba, labels),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),
    }
