"""`make audit`: what is wrong with the data, found in the cached features.

Hand-labelled photo sets hold mistakes: the same photo twice (sometimes once in train
and once in test, which inflates the test score), photos in the wrong class folder,
things that belong to no class. The stage-1 features make finding them nearly free:

1. duplicates: byte-identical files (sha256 of the bytes, folder sources) and
   near-duplicates, row pairs whose L2-normalised features have cosine similarity
   >= `duplicate_threshold` (calibrated on planted copies, see README).
   A blocked similarity search keeps memory at O(block**2), never O(N**2). Pairs
   across splits (leaks) come first; pairs are grouped into clusters (union-find).
2. label errors: confident learning (Northcutt, Jiang & Chuang, "Confident Learning:
   Estimating Uncertainty in Dataset Labels", JAIR 70, 2021) on out-of-fold
   probabilities of the stage-2 logistic head, stratified k-fold over train +
   validation, one C for every fold.
3. outliers: mean cosine distance to the k nearest neighbours (the same blocked
   search), flagged from a robust z-score (Iglewicz & Hoaglin's modified z > 3.5).
4. class overlap: the class pairs the probe confuses most, from the out-of-fold
   confusion matrix.

Output: `<audit_dir>/<feature file stem>/` with `audit.json` (every finding),
`audit.md` and one contact sheet per finding kind, assembled in a temporary folder
and renamed into place. `load_exclusion` reads an audit.json back for
`make head EXCLUDE=...`, which leaves the flagged train rows out.

numpy and scikit-learn only; TensorFlow is imported only to read tfds images back
for the contact sheets (folder images are read with PIL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AUDIT_KINDS, AuditConfig, audit_kinds, fingerprint
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features.store import FeatureSet, key_diff, read_features

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
FORMAT_VERSION = 1
#: Split order of the stacked rows (and of the "first copy" kept by EXCLUDE).
SPLIT_ORDER = ("train", "validation", "test")
#: Pairs above the threshold beyond which the search stops: a threshold this loose
#: (or thousands of identical images) is better fixed than listed.
MAX_PAIRS = 5_000_000
_THUMBNAIL = 160


# ------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Rows:
    """Every split of a feature file stacked: `features` (N, D) float32 and per row
    its `labels`, `ids`, `splits` (split name) and `index` (position in the split)."""

    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    splits: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def stack_splits(cached: FeatureSet) -> Rows:
    names = [s for s in SPLIT_ORDER if s in cached.splits] + [s for s in cached.splits if s not in SPLIT_ORDER]
    parts = [cached.splits[s] for s in names]
    return Rows(
        features=np.concatenate([p.features for p in parts]).astype(np.float32, copy=False),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        ids=np.concatenate([p.ids for p in parts]),
        splits=np.array([s for s, p in zip(names, parts) for _ in range(len(p))], dtype=object),
        index=np.concatenate([p.index for p in parts]).astype(np.int64),
    )


# ----------------------------------------------------------- similarity search
def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (N, D): their dot products are cosines.

    Not centred: on cats_and_dogs_filtered (MobileNetV2, 160 px) centring on the mean
    row lowered altered copies more than distinct photos, so raw cosine separates
    them better (README, *Audit*).
    """
    x = np.asarray(features, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


@dataclass(frozen=True)
class Neighbours:
    """What one blocked pass over all row pairs finds.

    `pairs` (P, 2) int64 rows i < j with cosine `similarity` (P,) >= the threshold;
    `knn_index` / `knn_similarity` (N, k): each row's k nearest other rows, most
    similar first.
    """

    pairs: np.ndarray
    similarity: np.ndarray
    knn_index: np.ndarray
    knn_similarity: np.ndarray


def similarity_search(
    unit: np.ndarray, *, threshold: float, k: int, block: int = 2048, max_pairs: int = MAX_PAIRS
) -> Neighbours:
    """Pairs at cosine >= `threshold` and the k nearest neighbours of every row.

    `unit` (N, D) holds unit rows (`unit_rows`). The (N, N) similarity matrix is
    computed one (block, block) tile at a time over its upper triangle; each tile
    feeds both the pair list and the running top-k of its rows and of its columns,
    so memory is O(block**2 + N*k) and every product is computed once.
    """
    unit = np.asarray(unit, np.float32)
    n = len(unit)
    k = max(0, min(k, n - 1))
    best_sim = np.full((n, k), -np.inf, np.float32)
    best_idx = np.full((n, k), -1, np.int64)
    found_i, found_j, found_s, count = [], [], [], 0
    for a0 in range(0, n, block):
        a = unit[a0 : a0 + block]
        for b0 in range(a0, n, block):
            sim = a @ unit[b0 : b0 + block].T
            if b0 == a0:
                np.fill_diagonal(sim, -np.inf)  # no row is its own neighbour or duplicate
            above = sim >= threshold
            ii, jj = np.nonzero(above) if above.any() else (np.zeros(0, np.int64),) * 2
            if b0 == a0:
                upper = ii < jj
                ii, jj = ii[upper], jj[upper]
            if len(ii):
                count += len(ii)
                if count > max_pairs:
                    raise DataError(
                        f"More than {max_pairs:,} row pairs have cosine similarity >= {threshold} "
                        f"(expected a few near-duplicates). Raise DUPLICATE_THRESHOLD (--duplicate-threshold), "
                        "or look for thousands of identical images (blank frames) in the data."
                    )
                found_i.append(ii + a0)
                found_j.append(jj + b0)
                found_s.append(sim[ii, jj])
            if k:
                _merge_top(best_sim[a0 : a0 + len(a)], best_idx[a0 : a0 + len(a)], sim, b0, k)
                if b0 != a0:
                    _merge_top(best_sim[b0 : b0 + sim.shape[1]], best_idx[b0 : b0 + sim.shape[1]], sim.T, a0, k)
    order = np.argsort(-best_sim, axis=1, kind="stable")
    pairs = (
        np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1) if found_i else np.zeros((0, 2), np.int64)
    )
    return Neighbours(
        pairs=pairs.astype(np.int64),
        similarity=np.concatenate(found_s) if found_s else np.zeros(0, np.float32),
        knn_index=np.take_along_axis(best_idx, order, axis=1),
        knn_similarity=np.take_along_axis(best_sim, order, axis=1),
    )


def _merge_top(best_sim: np.ndarray, best_idx: np.ndarray, sim: np.ndarray, offset: int, k: int) -> None:
    """Merges the columns of one tile into the running top-k of its rows, in place.

    Only entries above their row's current k-th best can enter. Early on that is
    most of the tile, merged by partitioning whole rows; once every row has met a
    few thousand others it is a small minority, merged by sorting just those
    candidates (partitioning every row of every tile would cost as much as the
    matrix product itself).
    """
    hit = sim > best_sim.min(axis=1)[:, None]
    count = np.count_nonzero(hit)
    if not count:
        return
    if count > sim.size // 16:
        rows = np.flatnonzero(hit.any(axis=1))
        sub = sim[rows]
        width = sub.shape[1]
        top = (
            np.argpartition(sub, width - k, axis=1)[:, width - k :]
            if width > k
            else np.broadcast_to(np.arange(width), sub.shape)
        )
        cand_sim = np.concatenate([best_sim[rows], np.take_along_axis(sub, top, axis=1)], axis=1)
        cand_idx = np.concatenate([best_idx[rows], top + offset], axis=1)
        keep = np.argpartition(cand_sim, cand_sim.shape[1] - k, axis=1)[:, cand_sim.shape[1] - k :]
        best_sim[rows] = np.take_along_axis(cand_sim, keep, axis=1)
        best_idx[rows] = np.take_along_axis(cand_idx, keep, axis=1)
        return
    r, c = np.nonzero(hit)
    rows = np.unique(r)
    cand_row = np.concatenate([np.repeat(rows, k), r])
    cand_sim = np.concatenate([best_sim[rows].ravel(), sim[r, c]])
    cand_idx = np.concatenate([best_idx[rows].ravel(), c + offset])
    order = np.lexsort((-cand_sim, cand_row))  # by row, most similar first
    take = order[(np.searchsorted(cand_row[order], rows)[:, None] + np.arange(k)).ravel()]
    best_sim[rows] = cand_sim[take].reshape(-1, k)
    best_idx[rows] = cand_idx[take].reshape(-1, k)


def file_digests(root: Path, ids: Sequence[str]) -> list[str | None]:
    """sha256 of each file `root/id`; None (logged) for a file that cannot be read."""
    digests: list[str | None] = []
    missing = []
    for i in ids:
        try:
            digests.append(hashlib.sha256((root / i).read_bytes()).hexdigest())
        except OSError:
            digests.append(None)
            missing.append(i)
    if missing:
        log.warning(
            "audit: %d files under %s cannot be read (moved since extraction?), no byte check for them: %s",
            len(missing),
            root,
            ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
        )
    return digests


def byte_identical_pairs(digests: Sequence[str | None]) -> np.ndarray:
    """(P, 2) int64 row pairs i < j with the same file digest."""
    groups: dict[str, list[int]] = {}
    for row, digest in enumerate(digests):
        if digest is not None:
            groups.setdefault(digest, []).append(row)
    pairs = [(a, b) for members in groups.values() for x, a in enumerate(members) for b in members[x + 1 :]]
    return np.array(pairs, np.int64).reshape(-1, 2)


def clusters_of(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find) of the rows in `pairs`, each sorted; sizes >= 2."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for row in sorted({r for p in pairs.tolist() for r in p}):
        groups.setdefault(find(row), []).append(row)
    return sorted(groups.values(), key=lambda g: g[0])


# ----------------------------------------------------------------- label errors
def choose_C(train_x, train_y, val_x, val_y, *, n_classes: int, seed: int) -> float:
    """The C the stage-2 logistic head's validation sweep picks, chosen once."""
    from pipeline.heads.logistic import LogisticHead

    head = LogisticHead(C=None, seed=seed).fit(train_x, train_y, val_x, val_y, n_classes=n_classes)
    return float(head.params_["C"])


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, *, n_classes: int, folds: int, C: float, seed: int
) -> np.ndarray:
    """(N, K) float64: each row's probabilities from a logistic head fitted without it.

    Stratified, seeded `folds`-fold cross-validation with the stage-2 `LogisticHead`
    at a fixed `C`: each fold costs one fit, no sweep.
    """
    from sklearn.model_selection import StratifiedKFold

    from pipeline.heads.logistic import LogisticHead

    counts = np.bincount(labels, minlength=n_classes)
    if (counts[counts > 0] < folds).any():
        small = int(counts[counts > 0].min())
        raise DataError(
            f"FOLDS={folds} needs at least {folds} examples of every class in train + validation. "
            f"Received: a class with {small}. Lower FOLDS (--folds) or label more examples."
        )
    proba = np.zeros((len(labels), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, held_out in splitter.split(features, labels):
        head = LogisticHead(C=C, seed=seed).fit(features[fit_rows], labels[fit_rows], n_classes=n_classes)
        proba[held_out] = head.predict_proba(features[held_out])
    return proba


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


# ------------------------------------------------------------- outliers, overlap
def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-score 0.6745 (x - median) / MAD (Iglewicz & Hoaglin 1993).

    When more than half the values are equal (MAD 0), the mean absolute deviation
    (times 1.2533) stands in, as in IBM's and Iglewicz & Hoaglin's variant.
    """
    values = np.asarray(values, np.float64)
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad > 0:
        return 0.6745 * (values - median) / mad
    mean_ad = np.mean(np.abs(values - median))
    return (values - median) / (1.2533 * mean_ad) if mean_ad > 0 else np.zeros_like(values)


def centroid_distance(unit: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) cosine distance of each row to the nearest class centroid (given labels)."""
    centroids = np.zeros((n_classes, unit.shape[1]), np.float32)
    for c in range(n_classes):
        members = unit[labels == c]
        if len(members):
            mean = members.mean(axis=0)
            centroids[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return 1.0 - (unit @ centroids.T).max(axis=1)


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


# ------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class AuditResult:
    """A finished audit: its folder, the counts of every finding kind and the timings."""

    out_dir: Path
    counts: dict[str, Any]
    seconds: dict[str, float]

    def summary(self) -> str:
        c = self.counts
        overlap = c.get("most_confused")
        confused = (
            f"most confused: {overlap['classes'][0]} <-> {overlap['classes'][1]} {overlap['count']} "
            f"({overlap['rate']:.1%})"
            if overlap
            else "no classes confused"
        )
        return (
            f"audit: {c['rows']} rows; duplicates: {c['duplicate_pairs']} pairs in {c['duplicate_clusters']} "
            f"clusters ({c['cross_split_pairs']} across splits, {c['byte_identical_pairs']} byte-identical); "
            f"label issues: {c['label_issues']} ({c['label_issues_train']} in train); outliers: {c['outliers']}; "
            f"{confused} -> {self.out_dir}"
        )


def audit_dir_for(features_path: Path, config: AuditConfig) -> Path:
    return Path(config.audit_dir) / Path(features_path).stem


def audit_features(features_path: Path, config: AuditConfig, *, expect: Mapping[str, Any] | None = None) -> AuditResult:
    """Runs every check on a feature file and writes `<audit_dir>/<stem>/`; see the module docstring."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cached = read_features(features_path, expect=expect)
    rows = stack_splits(cached)
    class_names = list(cached.class_names)
    _check_rows(cached, rows)
    timings["read"] = time.perf_counter() - started

    step = time.perf_counter()
    unit = unit_rows(rows.features)
    near = similarity_search(unit, threshold=config.duplicate_threshold, k=config.neighbours, block=config.block_rows)
    timings["similarity_search"] = time.perf_counter() - step

    step = time.perf_counter()
    root = _folder_root(cached)
    if root is not None:
        exact = byte_identical_pairs(file_digests(root, rows.ids))
    else:
        log.info(
            "audit: %s names no image folder (a tfds dataset?): no byte check; exact copies show as "
            "near-duplicates at cosine 1.0.",
            cached.path,
        )
        exact = np.zeros((0, 2), np.int64)
    duplicates, clusters = _duplicate_findings(rows, unit, near, exact)
    timings["duplicates"] = time.perf_counter() - step

    step = time.perf_counter()
    probe, labels = _label_findings(cached, rows, class_names, config)
    timings["label_errors"] = time.perf_counter() - step

    step = time.perf_counter()
    outliers, scores = _outlier_findings(rows, unit, near, class_names, config)
    timings["outliers"] = time.perf_counter() - step

    overlap = class_overlap(np.array(probe["confusion_matrix"]), class_names)
    findings = duplicates + labels + outliers + [{"kind": "overlap", **o} for o in overlap]
    _name_rows(findings, clusters, rows, root, class_names)
    counts = {
        "rows": len(rows),
        "rows_per_split": {s: int((rows.splits == s).sum()) for s in dict.fromkeys(rows.splits.tolist())},
        "duplicate_pairs": len(duplicates),
        "duplicate_clusters": len(clusters),
        "cross_split_pairs": sum(f["cross_split"] for f in duplicates),
        "byte_identical_pairs": sum(f["match"] == "exact" for f in duplicates),
        "label_issues": len(labels),
        "label_issues_train": sum(f["splits"][0] == "train" for f in labels),
        "outliers": len(outliers),
        "overlapping_class_pairs": len(overlap),
        "most_confused": overlap[0] if overlap else None,
        "exclude": {kind: len(ids) for kind, ids in _excluded_ids(findings, clusters).items()},
    }
    record = {
        "format_version": FORMAT_VERSION,
        "features": str(features_path),
        "features_key": cached.key,
        "class_names": class_names,
        "config": config.to_dict(),
        "counts": counts,
        "probe": probe,
        "outlier_scores": scores,
        "clusters": clusters,
        "findings": findings,
    }
    out_dir = audit_dir_for(features_path, config)
    step = time.perf_counter()
    _write_audit(out_dir, record, cached, rows, config)
    timings["write"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    seconds = {k: round(v, 3) for k, v in timings.items()}
    return AuditResult(out_dir=out_dir, counts=counts, seconds=seconds)


def _check_rows(cached: FeatureSet, rows: Rows) -> None:
    k = len(cached.class_names)
    bad = (rows.labels < 0) | (rows.labels >= k)
    if bad.any():
        raise DataError(
            f"{cached.path}: {int(bad.sum())} labels outside the {k} classes {cached.class_names}. "
            "The file is inconsistent; rebuild it with `make features`."
        )
    if not np.isfinite(rows.features).all():
        raise DataError(
            f"{cached.path}: features hold NaN/inf values. Expected finite floats; re-extract "
            "the features (float16 overflow?)."
        )
    if len(rows) < 2:
        raise DataError(f"{cached.path} holds {len(rows)} row; an audit needs at least 2.")


def _folder_root(cached: FeatureSet) -> Path | None:
    data_dir = (cached.config.get("data") or {}).get("data_dir")
    return Path(data_dir) if data_dir else None


def _describe(rows: Rows, members: Sequence[int], root: Path | None, class_names: Sequence[str]) -> dict[str, Any]:
    return {
        "ids": [str(rows.ids[r]) for r in members],
        "paths": [str(root / rows.ids[r]) if root is not None else None for r in members],
        "splits": [str(rows.splits[r]) for r in members],
        "labels": [class_names[rows.labels[r]] for r in members],
    }


def _duplicate_findings(
    rows: Rows,
    unit: np.ndarray,
    near: Neighbours,
    exact: np.ndarray,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One finding per pair (leaks first, then by similarity) and the clusters they form.

    EXCLUDE keeps one copy of a cluster inside train (the first by split order and
    id) and drops every train copy of a cluster that reaches validation or test: the
    leak is then gone from training; the validation/test copies stay, and are logged.
    """
    exact_set = {tuple(p) for p in exact.tolist()}
    similarity = {tuple(p): float(s) for p, s in zip(near.pairs.tolist(), near.similarity.tolist())}
    for p in exact_set - set(similarity):
        similarity[p] = float(unit[p[0]] @ unit[p[1]])
    pairs = sorted(similarity)
    groups = clusters_of(len(rows), np.array(pairs, np.int64).reshape(-1, 2))
    cluster_of = {r: c for c, members in enumerate(groups) for r in members}
    split_rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    clusters = []
    for c, members in enumerate(groups):
        members = sorted(members, key=lambda r: (split_rank.get(rows.splits[r], 9), rows.ids[r]))
        splits = [str(rows.splits[r]) for r in members]
        train = [r for r in members if rows.splits[r] == "train"]
        leak = len(set(splits)) > 1
        drop = train if (leak and len(train) < len(members)) else train[1:]
        clusters.append(
            {
                "cluster": c,
                "rows": members,
                "splits": splits,
                "cross_split": leak,
                "exclude": [str(rows.ids[r]) for r in drop],
            }
        )
    findings = []
    for i, j in pairs:
        findings.append(
            {
                "kind": "duplicates",
                "match": "exact" if (i, j) in exact_set else "near",
                "rows": [i, j],
                "score": round(similarity[(i, j)], 5),
                "cross_split": bool(rows.splits[i] != rows.splits[j]),
                "cluster": cluster_of[i],
            }
        )
    findings.sort(key=lambda f: (not f["cross_split"], f["match"] != "exact", -f["score"], f["rows"]))
    return findings, clusters


def _label_findings(
    cached: FeatureSet,
    rows: Rows,
    class_names: list[str],
    config: AuditConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Confident learning on out-of-fold probabilities of train + validation rows."""
    k = len(class_names)
    pool = np.flatnonzero(np.isin(rows.splits, ["train", "validation"]))
    C = config.C
    if C is None:
        if "validation" not in cached.splits:
            raise ConfigError(
                f"{cached.path} has no validation split to choose the probe's C on. Give one: C=1 (--C 1)."
            )
        train, validation = cached.splits["train"], cached.splits["validation"]
        C = choose_C(
            train.features, train.labels, validation.features, validation.labels, n_classes=k, seed=config.seed
        )
    proba = out_of_fold_probabilities(
        rows.features[pool], rows.labels[pool], n_classes=k, folds=config.folds, C=C, seed=config.seed
    )
    issues = confident_learning(proba, rows.labels[pool])
    predicted = proba.argmax(axis=1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (rows.labels[pool], predicted), 1)
    probe = {
        "head": "logistic",
        "C": C,
        "C_chosen_on": "validation" if config.C is None else "given",
        "folds": config.folds,
        "rows": int(len(pool)),
        "splits": ["train", "validation"],
        "out_of_fold_accuracy": round(float((predicted == rows.labels[pool]).mean()), 4),
        "thresholds": [round(float(t), 4) for t in issues.thresholds],
        "confident_joint": issues.confident_joint.tolist(),
        "confusion_matrix": confusion.tolist(),
        "method": "confident learning (Northcutt, Jiang & Chuang, JAIR 2021), prune by noise rate, "
        "ranked by normalized margin",
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


def _outlier_findings(
    rows: Rows, unit: np.ndarray, near: Neighbours, class_names: list[str], config: AuditConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows far from every other row: mean cosine distance to the k nearest, flagged by robust z."""
    distance = 1.0 - near.knn_similarity.astype(np.float64).mean(axis=1)
    z = robust_z(distance)
    centroid = centroid_distance(unit, rows.labels, len(class_names))
    order = np.argsort(-distance, kind="stable")
    findings = [
        {
            "kind": "outlier",
            "rows": [int(r)],
            "rank": rank,
            "score": round(float(distance[r]), 5),
            "z": round(float(z[r]), 3),
            "centroid_distance": round(float(centroid[r]), 5),
            "nearest": str(rows.ids[near.knn_index[r, 0]]) if near.knn_index.shape[1] else None,
        }
        for rank, r in enumerate(order[z[order] >= config.outlier_z].tolist(), start=1)
    ]
    scores = {
        "score": f"mean cosine distance to the {near.knn_index.shape[1]} nearest rows",
        "flagged_from_z": config.outlier_z,
        "ranking": [
            {
                "id": str(rows.ids[r]),
                "split": str(rows.splits[r]),
                "score": round(float(distance[r]), 5),
                "z": round(float(z[r]), 3),
            }
            for r in order[: max(config.top, 20)].tolist()
        ],
        "median": round(float(np.median(distance)), 5),
        "quantiles": {q: round(float(np.quantile(distance, float(q))), 5) for q in ("0.5", "0.9", "0.99")},
    }
    return findings, scores


def _excluded_ids(findings: Sequence[Mapping[str, Any]], clusters: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Train ids each excludable kind would leave out of training (see `load_exclusion`)."""
    out = {"duplicates": sorted({i for c in clusters for i in c["exclude"]})}
    for kind in ("label", "outlier"):
        out[kind] = sorted({i for f in findings if f["kind"] == kind for i in f.get("exclude", [])})
    return out


# --------------------------------------------------------------------- writing
def _name_rows(
    findings: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    rows: Rows,
    root: Path | None,
    class_names: Sequence[str],
) -> None:
    """Replaces row numbers by ids, paths, splits and labels; label and outlier
    findings in train get the id EXCLUDE would drop."""
    for finding in findings:
        members = finding.pop("rows", None)
        if members is None:
            continue
        finding.update(_describe(rows, members, root, class_names))
        if finding["kind"] in ("label", "outlier"):
            finding["exclude"] = [i for i, s in zip(finding["ids"], finding["splits"]) if s == "train"]
    for cluster in clusters:
        cluster.update(_describe(rows, cluster.pop("rows"), root, class_names))


def _write_audit(out_dir: Path, record: dict[str, Any], cached: FeatureSet, rows: Rows, config: AuditConfig) -> None:
    """Writes audit.json, audit.md and the contact sheets into a temporary folder, then renames it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (work / AUDIT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        sheets = _contact_sheets(work, record, cached, rows, config)
        (work / "audit.md").write_text(report(record, sheets))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


SHEETS = {"duplicates": "duplicates.png", "label": "label_issues.png", "outlier": "outliers.png"}


def _contact_sheets(
    work: Path, record: Mapping[str, Any], cached: FeatureSet, rows: Rows, config: AuditConfig
) -> list[str]:
    """One PNG per finding kind: the top findings as thumbnails with labels and scores."""
    from pipeline import plots

    if config.top == 0:
        return []
    chosen = {kind: [f for f in record["findings"] if f["kind"] == kind][: config.top] for kind in SHEETS}
    wanted = {(s, i) for fs in chosen.values() for f in fs for s, i in zip(f["splits"], f["ids"])}
    images = read_thumbnails(cached, rows, wanted)
    names = []
    for kind, findings in chosen.items():
        groups, captions, colors = [], [], []
        for f in findings:
            groups.append([images.get((s, i)) for s, i in zip(f["splits"], f["ids"])])
            captions.append(_caption(f))
            colors.append("red" if f.get("cross_split") else "black")
        title = {
            "duplicates": f"Duplicates: top {len(findings)} of {record['counts']['duplicate_pairs']} pairs "
            "(leaks across splits first, in red)",
            "label": f"Label issues: top {len(findings)} of {record['counts']['label_issues']} (given -> suggested)",
            "outlier": f"Outliers: top {len(findings)} of {record['counts']['outliers']} (kNN distance)",
        }[kind]
        plots.contact_sheet(groups, captions, work / SHEETS[kind], title=title, colors=colors)
        names.append(SHEETS[kind])
    return names


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _caption(f: Mapping[str, Any]) -> str:
    if f["kind"] == "duplicates":
        ends = "\n".join(f"{s}: {_short(i, 34)}" for s, i in zip(f["splits"], f["ids"]))
        return f"{f['match']}, cosine {f['score']:.3f}, {' / '.join(f['labels'])}\n{ends}"
    if f["kind"] == "label":
        return (
            f"#{f['rank']} given {f['given']} -> {f['suggested']}\n"
            f"p(given) {f['self_confidence']:.2f}\n{f['splits'][0]}: {_short(f['ids'][0])}"
        )
    return (
        f"#{f['rank']} distance {f['score']:.3f} (z {f['z']:.1f})\n"
        f"{f['labels'][0]}, {f['splits'][0]}\n{_short(f['ids'][0])}"
    )


def read_thumbnails(cached: FeatureSet, rows: Rows, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """(split, id) -> uint8 RGB thumbnail; images that cannot be read are left out (logged).

    Folder images are read with PIL from DATA_DIR (cheap, no TensorFlow); tfds images
    with the stage-2 reader, decoded as the backbone saw them.
    """
    root = _folder_root(cached)
    out: dict[tuple[str, str], np.ndarray] = {}
    failed = []
    if root is not None:
        from pipeline.images import read_image_file

        for split, i in sorted(wanted):
            try:
                out[(split, i)] = read_image_file(root / i, _THUMBNAIL)
            except (OSError, ValueError):
                failed.append(i)
    elif cached.key.get("source") == "tfds":
        from pipeline.config import FeaturesConfig
        from pipeline.images import load_images

        position = {(str(s), str(i)): int(p) for s, i, p in zip(rows.splits, rows.ids, rows.index)}
        for split in sorted({s for s, _ in wanted}):
            mine = sorted(i for s, i in wanted if s == split)
            try:
                images = load_images(
                    FeaturesConfig.from_dict(cached.config), split, np.array([position[(split, i)] for i in mine])
                )
            except Exception as err:  # the sheets are optional; audit.json is not
                log.warning("audit: cannot read the %s images back for the contact sheets (%s).", split, err)
                continue
            for i in mine:
                image = images.get(position[(split, i)])
                if image is None:
                    failed.append(i)
                else:
                    out[(split, i)] = np.clip(image, 0, 255).astype(np.uint8)
    else:
        log.info("audit: %s names no image folder or tfds dataset; contact sheets without images.", cached.path)
    if failed:
        log.warning(
            "audit: %d images cannot be read back for the contact sheets (moved since extraction?): %s",
            len(failed),
            ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else ""),
        )
    return out


def report(record: Mapping[str, Any], sheets: Sequence[str]) -> str:
    """audit.md: the counts, the top findings of each kind as tables, the sheets."""
    c, probe = record["counts"], record["probe"]
    findings = record["findings"]
    lines = [
        "# Data audit",
        "",
        f"Features: `{record['features']}`, {c['rows']} rows "
        f"({', '.join(f'{s} {n}' for s, n in c['rows_per_split'].items())}).",
        "",
        "| finding | count | EXCLUDE drops (train rows) |",
        "|---|---:|---:|",
        f"| duplicate pairs ({c['duplicate_clusters']} clusters; {c['cross_split_pairs']} across splits, "
        f"{c['byte_identical_pairs']} byte-identical) | {c['duplicate_pairs']} | {c['exclude']['duplicates']} |",
        f"| label issues ({c['label_issues_train']} in train) | {c['label_issues']} | {c['exclude']['label']} |",
        f"| outliers | {c['outliers']} | {c['exclude']['outlier']} |",
        f"| confused class pairs | {c['overlapping_class_pairs']} | - |",
        "",
        f"Probe: logistic head, C={probe['C']:g} ({probe['C_chosen_on']}), {probe['folds']}-fold out-of-fold "
        f"accuracy {probe['out_of_fold_accuracy']:.4f} on {probe['rows']} train + validation rows; "
        f"label issues by {probe['method']}.",
        "",
        "Retrain without the flagged train rows: `make head EXCLUDE=<this folder>/audit.json "
        "[EXCLUDE_KINDS=duplicates,label,outlier]` (validation and test rows are never dropped).",
        "",
    ]
    top = int(record["config"]["top"]) or 20
    sections = [
        (
            "duplicates",
            "Duplicates (leaks across splits first)",
            "| match | cosine | splits | ids | labels |",
            lambda f: (
                f"| {f['match']} | {f['score']:.4f} | {' / '.join(f['splits'])} | {' / '.join(f['ids'])} "
                f"| {' / '.join(f['labels'])} |"
            ),
        ),
        (
            "label",
            "Label issues (most likely first)",
            "| # | id | split | given | suggested | p(given) | margin |",
            lambda f: (
                f"| {f['rank']} | {f['ids'][0]} | {f['splits'][0]} | {f['given']} | {f['suggested']} "
                f"| {f['self_confidence']:.3f} | {f['score']:.3f} |"
            ),
        ),
        (
            "outlier",
            "Outliers (farthest first)",
            "| # | id | split | label | kNN distance | z | centroid distance |",
            lambda f: (
                f"| {f['rank']} | {f['ids'][0]} | {f['splits'][0]} | {f['labels'][0]} | {f['score']:.4f} "
                f"| {f['z']:.1f} | {f['centroid_distance']:.4f} |"
            ),
        ),
        (
            "overlap",
            "Class overlap (out-of-fold confusions, both ways)",
            "| classes | count | rate |",
            lambda f: f"| {f['classes'][0]} <-> {f['classes'][1]} | {f['count']} | {f['rate']:.2%} |",
        ),
    ]
    for kind, heading, header, row in sections:
        mine = [f for f in findings if f["kind"] == kind]
        lines += [f"## {heading}", ""]
        if not mine:
            lines += ["None.", ""]
            continue
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        lines += [row(f) for f in mine[:top]]
        if len(mine) > top:
            lines.append(f"\n... and {len(mine) - top} more in audit.json.")
        lines.append("")
    lines += [f"![{s}]({s})" for s in sheets]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- EXCLUDE
@dataclass(frozen=True)
class Exclusion:
    """The train rows an audit says to leave out: `keep` (N_train,) bool, `ids`, `digest`, `leaks`."""

    audit: Path
    kinds: tuple[str, ...]
    keep: np.ndarray
    ids: tuple[str, ...]
    digest: str
    leaks: tuple[dict[str, Any], ...]

    def record(self) -> dict[str, Any]:
        return {
            "audit": str(self.audit),
            "kinds": list(self.kinds),
            "digest": self.digest,
            "excluded": len(self.ids),
            "ids": list(self.ids),
            "leaks_kept": [{"ids": l["ids"], "splits": l["splits"]} for l in self.leaks],
        }


def _read_audit(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(
            f"EXCLUDE must name an audit.json of `make audit`. Received: {str(path)!r} ({err.strerror}). "
            "Run `make audit` with the same feature variables first."
        ) from None
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); rerun `make audit`.") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION or "findings" not in record:
        raise ConfigError(
            f"Expected an audit.json of format {FORMAT_VERSION} written by `make audit`. "
            f"Received: {path}. Rerun `make audit`."
        )
    return record


def _kinds(kinds: str | None) -> tuple[str, ...]:
    return tuple((audit_kinds(kinds, "EXCLUDE_KINDS") if kinds else ",".join(AUDIT_KINDS)).split(","))


def exclusion_ids(record: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    chosen = _excluded_ids(record["findings"], record["clusters"])
    return sorted({i for kind in kinds for i in chosen[kind]})


def exclusion_digest(audit: str | os.PathLike, kinds: str | None) -> str:
    """A short digest of what EXCLUDE leaves out, for the run directory's name."""
    kinds_ = _kinds(kinds)
    ids = exclusion_ids(_read_audit(Path(audit)), kinds_)
    return _exclusion_fingerprint(kinds_, ids)


def _exclusion_fingerprint(kinds: Sequence[str], ids: Sequence[str]) -> str:
    return fingerprint({"kinds": list(kinds), "ids": list(ids)}, length=8)


def load_exclusion(audit: str | os.PathLike, cached: FeatureSet, kinds: str | None, *, train=None) -> Exclusion:
    """The train rows of `cached` that the audit flags (of `kinds`), checked against its key.

    `train` holds the train rows' `ids` and `labels` when `cached` was read without them
    (`store.FeatureRows`, for a split left in the file); `keep` follows its rows.

    An audit of another feature file is an error, never applied by id alone. Only
    train rows are ever left out; flagged validation and test rows (leaks, label
    issues, outliers) are logged for the user to decide.
    """
    record = _read_audit(Path(audit))
    diff = key_diff(record.get("features_key"), cached.key)
    if diff:
        raise CacheError(
            f"{audit} is an audit of another feature file ({diff}). Expected an audit of {cached.path}: "
            "run `make audit` with the same feature variables, or drop EXCLUDE."
        )
    kinds_ = _kinds(kinds)
    ids = exclusion_ids(record, kinds_)
    train = cached.splits["train"] if train is None else train
    position = {str(i): r for r, i in enumerate(train.ids)}
    unknown = [i for i in ids if i not in position]
    if unknown:
        raise CacheError(
            f"{audit} names train ids that {cached.path} does not hold ({', '.join(unknown[:3])}); rerun `make audit`."
        )
    keep = np.ones(len(train), bool)
    keep[[position[i] for i in ids]] = False
    left = np.unique(train.labels[keep])
    if len(left) < 2:
        raise ConfigError(
            f"EXCLUDE={audit} with kinds {','.join(kinds_)} leaves {int(keep.sum())} of {len(train)} train rows "
            f"({len(left)} classes); a head needs 2 classes. Look at the audit's contact sheets (a loose "
            "DUPLICATE_THRESHOLD?) or choose fewer EXCLUDE_KINDS."
        )
    leaks = tuple(c for c in record["clusters"] if c["cross_split"])
    kept = [
        (f["ids"][0], f["splits"][0], f["kind"])
        for f in record["findings"]
        if f["kind"] in kinds_ and f["kind"] != "duplicates" and f["splits"][0] != "train"
    ]
    if leaks and "duplicates" in kinds_:
        log.warning(
            "EXCLUDE: %d duplicate clusters reach validation/test (leaks); their train copies are left out, "
            "the validation/test copies stay (yours to decide): %s",
            len(leaks),
            "; ".join(" = ".join(c["ids"]) for c in leaks[:5]) + ("; ..." if len(leaks) > 5 else ""),
        )
    if kept:
        log.warning(
            "EXCLUDE: %d flagged validation/test rows stay in their splits (yours to decide): %s",
            len(kept),
            ", ".join(f"{i} ({k})" for i, _, k in kept[:5]) + (", ..." if len(kept) > 5 else ""),
        )
    digest = _exclusion_fingerprint(kinds_, ids)
    log.info("EXCLUDE: leaving %d of %d train rows out (%s).", len(ids), len(train), ", ".join(kinds_))
    return Exclusion(audit=Path(audit), kinds=kinds_, keep=keep, ids=tuple(ids), digest=digest, leaks=leaks)
