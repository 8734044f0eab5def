"""Label errors: out-of-fold probabilities of a logistic probe and confident learning on them.

The probe's out-of-fold confusion matrix also gives the class overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.audit.neighbours import Neighbours
from pipeline.audit.rows import Rows
from pipeline.config import AuditConfig
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Rows each fold's logistic probe is fitted on at most: a seeded sample of the fold's
#: other rows. Out-of-fold probabilities of a million rows then cost five fits of
#: 20k rows; a linear probe's fit hardly changes beyond that.
MAX_FIT_ROWS = 20_000
#: Out-of-fold accuracy below which the label scores are reported as unreliable: the
#: probe then disagrees with so many correct labels that flips drown among them
#: (docs/audit.md: a relabelling the features barely encode).
RELIABLE_ACCURACY = 0.9
#: The probe's lbfgs settings: it only ranks rows, so the stage-2 head's tight tol=1e-6
#: and single BLAS thread (made for reproducible C sweeps) would cost 3-5x for nothing.
PROBE_FIT = {"max_iter": 300, "tol": 1e-4, "blas_threads": None}


def _sample(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(rows) <= size:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))


def choose_C(train_x, train_y, val_x, val_y, *, n_classes: int, seed: int) -> float:
    """The C the stage-2 logistic head's validation sweep picks, chosen once (on <= MAX_FIT_ROWS train rows)."""
    from pipeline.heads.logistic import LogisticHead

    fit = _sample(np.arange(len(train_y)), MAX_FIT_ROWS, seed)
    held = _sample(np.arange(len(val_y)), MAX_FIT_ROWS, seed)
    head = LogisticHead(C=None, seed=seed).fit(
        np.asarray(train_x[fit], np.float32), train_y[fit], val_x[held], val_y[held], n_classes=n_classes
    )
    return float(head.params_["C"])


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, folds: int, C: float, seed: int
) -> np.ndarray:
    """(N, K) float64: each row's probabilities from a logistic head fitted without it.

    Stratified, seeded `folds`-fold cross-validation with the stage-2 `LogisticHead`
    at a fixed `C`, each fold fitted on at most `MAX_FIT_ROWS` of its other rows: each
    fold costs one fit, no sweep, and a bounded one at a million rows.
    """
    from sklearn.model_selection import StratifiedKFold

    from pipeline.heads.logistic import LogisticHead

    counts = np.bincount(labels, minlength=n_classes)
    if (counts[counts > 0] < folds).any():  # callers leave such classes out (`checked_rows`)
        raise DataError(f"FOLDS={folds} needs at least {folds} examples of every class it is given.")
    proba = np.zeros((len(labels), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, held_out in splitter.split(np.zeros(len(labels)), labels):
        fit_rows = _sample(fit_rows, MAX_FIT_ROWS, seed)
        head = LogisticHead(C=C, seed=seed, **PROBE_FIT).fit(
            np.asarray(features[fit_rows], np.float32), labels[fit_rows], n_classes=n_classes
        )
        for a in range(0, len(held_out), 65_536):
            part = held_out[a : a + 65_536]
            proba[part] = head.predict_proba(np.asarray(features[part], np.float32))
    return proba


def knn_probabilities(
    knn_index: np.ndarray, knn_similarity: np.ndarray, labels: np.ndarray, n_classes: int, *, smoothing: float = 0.5
) -> np.ndarray:
    """(N, K) similarity-weighted label vote of each row's k nearest other rows (out of sample: never itself).

    `smoothing` spreads half a neighbour's weight over all classes, so that a row
    whose neighbours all disagree still has a non-zero probability for its own label.
    """
    n, k = knn_index.shape
    weight = np.where(knn_index >= 0, np.clip(knn_similarity, 0, None), 0).astype(np.float64)
    voted = labels[np.maximum(knn_index, 0)]
    votes = np.zeros((n, n_classes))
    for c in range(n_classes):
        votes[:, c] = (weight * (voted == c)).sum(axis=1)
    votes += smoothing / n_classes * weight.sum(axis=1, keepdims=True).clip(min=1e-9) / max(k, 1)
    return votes / votes.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LabelIssues:
    """Confident learning's verdict per row (see `confident_learning`).

    `issue` (N,) bool; `suggested` (N,) the most probable class other than the given
    one; `margin` (N,) the normalized margin (p_given - max_other + 1) / 2, low is
    suspicious; `self_confidence` (N,) p_given; `thresholds` (K,); `confident_joint`
    (K, K) calibrated counts, rows given labels, columns estimated true labels.
    """

    issue: np.ndarray
    suggested: np.ndarray
    margin: np.ndarray
    self_confidence: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray

    def ranked(self) -> np.ndarray:
        """Rows flagged as issues, most likely first (lowest normalized margin)."""
        rows = np.flatnonzero(self.issue)
        return rows[np.argsort(self.margin[rows], kind="stable")]


def confident_learning(proba: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Label issues by confident learning, pruned by noise rate (Northcutt et al. 2021).

    1. Per-class thresholds t_j: the mean probability of class j over the rows given j.
    2. Confident joint C[i, j]: rows given i whose probability reaches t_j for some j
       (the most probable such j when several do) are counted at (i, j).
    3. Calibrated so that row i sums to the count of label i and the whole to N.
    4. Prune by noise rate: for each off-diagonal (i, j), the C[i, j] rows given i
       with the largest margin p_j - p_i are issues;
    5. except rows whose given label is still the most probable one.
    The same choices as cleanlab's default `find_label_issues(filter_by=
    "prune_by_noise_rate")`, in a few lines of numpy.
    """
    proba = np.asarray(proba, np.float64)
    labels = np.asarray(labels, np.int64)
    n, k = proba.shape
    rows = np.arange(n)
    counts = np.bincount(labels, minlength=k)
    given = proba[rows, labels]
    thresholds = np.array([given[labels == j].mean() if counts[j] else np.inf for j in range(k)])
    confident = proba >= thresholds - 1e-6
    how_many = confident.sum(axis=1)
    guess = np.where(how_many > 1, proba.argmax(axis=1), confident.argmax(axis=1))
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[how_many > 0], guess[how_many > 0]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    joint = joint / joint.sum(axis=1, keepdims=True) * counts[:, None]
    joint = _round_rows(joint / joint.sum() * n)
    issue = np.zeros(n, bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        for j in range(k):
            if i != j and joint[i, j] > 0 and len(members):
                margin = proba[members, j] - proba[members, i]
                issue[members[np.argsort(-margin, kind="stable")[: joint[i, j]]]] = True
    bumped = proba.copy()
    bumped[rows, labels] += 1e-6
    issue &= bumped.argmax(axis=1) != labels
    others = proba.copy()
    others[rows, labels] = -np.inf
    suggested = others.argmax(axis=1)
    margin = (given - others.max(axis=1) + 1) / 2 if k > 1 else np.ones(n)
    return LabelIssues(
        issue=issue,
        suggested=suggested,
        margin=margin,
        self_confidence=given,
        thresholds=thresholds,
        confident_joint=joint,
    )


def _round_rows(matrix: np.ndarray) -> np.ndarray:
    """Rounds each row to integers that keep the row's (rounded) total (largest remainder)."""
    out = np.floor(matrix).astype(np.int64)
    for r, row in enumerate(matrix):
        short = int(round(row.sum())) - int(out[r].sum())
        if short > 0:
            out[r, np.argsort(-(row - np.floor(row)), kind="stable")[:short]] += 1
    return out


def _probe(rows: Rows, pool: np.ndarray, config: AuditConfig, probe_x: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """The probe's C (given, or chosen on validation) and its out-of-fold probabilities of the `pool` rows."""
    C = config.C
    if C is None:
        train, validation = pool[rows.splits[pool] == "train"], pool[rows.splits[pool] == "validation"]
        if not len(validation):
            raise ConfigError(
                "The feature file has no validation split to choose the probe's C on. Give one: C=1 (--C 1)."
            )
        C = choose_C(
            probe_x[train],
            rows.labels[train],
            probe_x[validation],
            rows.labels[validation],
            n_classes=k,
            seed=config.seed,
        )
    proba = out_of_fold_probabilities(
        probe_x[pool], rows.labels[pool], n_classes=k, folds=config.folds, C=C, seed=config.seed
    )
    return C, proba


def checked_rows(rows: Rows, class_names: Sequence[str], folds: int) -> tuple[np.ndarray, dict[str, int]]:
    """The train + validation rows whose labels can be checked, and the classes left out.

    Out-of-fold probabilities need `folds` examples of a class: with fewer, some fold
    trains without the class and flags every example of it. A long-tailed dataset
    keeps its audit: those classes' images are not checked (logged, and recorded as
    `classes_not_checked`: class -> its examples), unless too few classes are left.
    """
    pool = np.flatnonzero(np.isin(rows.splits, ["train", "validation"]))
    counts = np.bincount(rows.labels[pool], minlength=len(class_names))
    small = {class_names[c]: int(n) for c, n in enumerate(counts) if 0 < n < folds}
    if sum(n >= folds for n in counts) < 2:
        raise DataError(
            f"FOLDS={folds} needs at least {folds} examples of two classes or more in train + validation "
            f"to check labels. Received: {', '.join(f'{c}: {n}' for c, n in list(small.items())[:5])}. "
            "Lower FOLDS (--folds) or label more examples."
        )
    if small:
        shown = ", ".join(f"{c} ({n})" for c, n in list(small.items())[:5]) + (", ..." if len(small) > 5 else "")
        log.warning(
            "audit: %d classes have fewer than FOLDS=%d examples in train + validation, so their %d images are "
            "not checked for label errors: %s. Lower FOLDS (--folds) to check them.",
            len(small), folds, sum(small.values()), shown,
        )  # fmt: skip
    return pool[counts[rows.labels[pool]] >= folds], small


def label_findings(
    rows: Rows, class_names: list[str], config: AuditConfig, probe_x: np.ndarray, near: Neighbours, *, reduced: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Label issues among train + validation rows, every one scored and ranked worst first.

    One score from two out-of-sample views of each row's label: the out-of-fold
    probabilities of the logistic probe on `probe_x` (the features, or their PCA at
    scale: `reduced` says which) and the similarity-weighted vote of its k nearest
    rows in the graph. Their mean goes through confident learning (which rows are
    issues) and its normalized margin ranks them: on cats_and_dogs_filtered with
    planted flips the combination ranks them at least as well as either alone (docs/audit.md).
    """
    k = len(class_names)
    pool, unchecked = checked_rows(rows, class_names, config.folds)
    labels = rows.labels[pool]
    C, p_probe = _probe(rows, pool, config, probe_x, k)
    p_knn = knn_probabilities(near.knn_index[pool], near.knn_similarity[pool], rows.labels, k)
    proba = (p_probe + p_knn) / 2
    issues = confident_learning(proba, labels)
    predicted = p_probe.argmax(axis=1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    accuracy = float((predicted == labels).mean())
    probe = {
        "head": "logistic",
        "features": reduced,
        "C": C,
        "C_chosen_on": "validation" if config.C is None else "given",
        "folds": config.folds,
        "fit_rows_per_fold_at_most": MAX_FIT_ROWS,
        "rows": int(len(pool)),
        "splits": ["train", "validation"],
        "classes_not_checked": unchecked,
        "out_of_fold_accuracy": round(accuracy, 4),
        "knn_accuracy": round(float((p_knn.argmax(axis=1) == labels).mean()), 4),
        "reliable": accuracy >= RELIABLE_ACCURACY,
        "thresholds": [round(float(t), 4) for t in issues.thresholds],
        "confident_joint": issues.confident_joint.tolist(),
        "confusion_matrix": confusion.tolist(),
        "score": "normalized margin (p_given - max_other + 1) / 2 of the mean of the probe's out-of-fold and "
        f"the {near.knn_index.shape[1]} nearest rows' similarity-weighted probabilities; low is suspicious",
        "method": "confident learning (Northcutt, Jiang & Chuang, JAIR 2021), prune by noise rate, "
        "on the mean of the probe's and the kNN vote's probabilities, ranked by normalized margin",
    }
    findings = []
    for rank, local in enumerate(issues.ranked().tolist(), start=1):
        row = int(pool[local])
        findings.append(
            {
                "kind": "label",
                "rows": [row],
                "rank": rank,
                "score": round(float(issues.margin[local]), 5),
                "self_confidence": round(float(issues.self_confidence[local]), 5),
                "given": class_names[rows.labels[row]],
                "suggested": class_names[issues.suggested[local]],
                "suggested_probability": round(float(proba[local, issues.suggested[local]]), 5),
            }
        )
    return probe, findings


def class_overlap(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Class pairs by how often the probe confuses them (both ways), most first; pairs never confused are left out."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    pairs = []
    for a in range(len(class_names)):
        for b in range(a + 1, len(class_names)):
            count = int(confusion[a, b] + confusion[b, a])
            if count:
                pairs.append(
                    {
                        "classes": [class_names[a], class_names[b]],
                        "count": count,
                        "a_as_b": int(confusion[a, b]),
                        "b_as_a": int(confusion[b, a]),
                        "rate": round(count / max(int(totals[a] + totals[b]), 1), 4),
                    }
                )
    return sorted(pairs, key=lambda p: (-p["count"], p["classes"]))
