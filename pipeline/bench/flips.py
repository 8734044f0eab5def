"""Planted label flips on a real feature file: how well the audit's label ranking finds them.

`flips` train rows (half from each of two classes, the other's label given) are
flipped per seed; the audit's label scoring (`audit.labels.label_findings`: logistic
probe out of fold + kNN vote of the neighbour graph, one score) ranks them among the
train + validation rows. Precision among the top N (N = flips) and recall among the
top 2N, as the issue states them, for the combined score and each part alone.

Two labellings of the same photos: the file's own classes (cats vs dogs, near
separable), and bright vs dark (mean luminance above or below the median): a real,
noise-free label the features only partly encode, where a ranking of flips is not to
be trusted and the audit says so (`probe.reliable`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


def _brightness(root: Path, ids) -> np.ndarray:
    from PIL import Image

    out = []
    for i in ids:
        with Image.open(root / i) as image:
            image.draft("L", (80, 80))
            out.append(np.asarray(image.convert("L"), np.float32).mean())
    return np.array(out)


def _margin(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rows = np.arange(len(labels))
    other = proba.copy()
    other[rows, labels] = -np.inf
    return proba[rows, labels] - other.max(axis=1)


def _rank_scores(rows, probe_x, labels, class_names, config, graph) -> dict[str, np.ndarray]:
    """Pool rows (train + validation) ordered most suspicious first, per scoring."""
    from pipeline.audit.labels import knn_probabilities, out_of_fold_probabilities
    from pipeline.audit.neighbours import pairs_above

    noisy = dataclasses.replace(rows, labels=labels)
    pool = np.flatnonzero(np.isin(rows.splits, ["train", "validation"]))
    near = pairs_above(graph, config.duplicate_threshold)
    k = len(class_names)
    p_probe = out_of_fold_probabilities(
        probe_x[pool], labels[pool], n_classes=k, folds=config.folds, C=config.C, seed=config.seed
    )
    p_knn = knn_probabilities(near.knn_index[pool], near.knn_similarity[pool], noisy.labels, k)
    scores = {
        "combined (audit)": _margin((p_probe + p_knn) / 2, labels[pool]),
        "logistic probe alone": _margin(p_probe, labels[pool]),
        "kNN vote alone": _margin(p_knn, labels[pool]),
    }
    accuracy = float((p_probe.argmax(axis=1) == labels[pool]).mean())
    return {name: pool[np.argsort(s, kind="stable")] for name, s in scores.items()}, accuracy


def flip_benchmark(features_path: Path, *, flips: int = 20, seeds: int = 5, C: float = 0.1) -> dict[str, Any]:
    """Precision@N / recall@2N of planted flips, per labelling and scoring, averaged over `seeds`."""
    from pipeline.audit.graph import GraphSettings, build_graph
    from pipeline.audit.graphstore import probe_rows
    from pipeline.audit.rows import folder_root, load_rows
    from pipeline.config import AuditConfig

    cached, rows = load_rows(features_path)
    config = AuditConfig(C=C)
    settings = GraphSettings(k=config.neighbours, recall_queries=100)
    graph = build_graph(rows.features, settings)
    probe_x, _ = probe_rows(rows.features, graph, Path("."), settings)
    labellings = {"cats_vs_dogs": rows.labels.copy()}
    root = folder_root(cached)
    if root is not None and root.exists():
        lum = _brightness(root, rows.ids)
        labellings["bright_vs_dark"] = (lum > np.median(lum)).astype(np.int64)
    train = np.flatnonzero(rows.splits == "train")
    out: dict[str, Any] = {"features": str(features_path), "flips": flips, "seeds": seeds, "C": C, "results": {}}
    for name, truth in labellings.items():
        found: dict[str, list[tuple[float, float]]] = {}
        accuracies = []
        for seed in range(seeds):
            rng = np.random.default_rng(100 + seed)
            flipped = np.concatenate([rng.choice(train[truth[train] == c], flips // 2, replace=False) for c in (0, 1)])
            labels = truth.copy()
            labels[flipped] = 1 - labels[flipped]
            orders, accuracy = _rank_scores(rows, probe_x, labels, ["0", "1"], config, graph)
            accuracies.append(accuracy)
            planted = set(flipped.tolist())
            for scoring, order in orders.items():
                top_n = len(planted & set(order[:flips].tolist())) / flips
                top_2n = len(planted & set(order[: 2 * flips].tolist())) / flips
                found.setdefault(scoring, []).append((top_n, top_2n))
        out["results"][name] = {
            "probe_out_of_fold_accuracy": round(float(np.mean(accuracies)), 4),
            "scorings": {
                s: {
                    f"precision@{flips}": round(float(np.mean([v[0] for v in values])), 3),
                    f"recall@{2 * flips}": round(float(np.mean([v[1] for v in values])), 3),
                }
                for s, values in found.items()
            },
        }
    return out


def flips_table(result: dict[str, Any]) -> str:
    n = result["flips"]
    lines = [
        f"Planted label flips: {n} train rows of `{Path(result['features']).name}` flipped ({n // 2} each way), "
        f"{result['seeds']} seeds, ranked among train + validation; probe C={result['C']}.",
        "",
        f"| labelling | probe out-of-fold accuracy | scoring | precision@{n} | recall@{2 * n} |",
        "|---|---:|---|---:|---:|",
    ]
    for name, res in result["results"].items():
        for scoring, values in res["scorings"].items():
            lines.append(
                f"| {name} | {res['probe_out_of_fold_accuracy']} | {scoring} "
                f"| {values[f'precision@{n}']} | {values[f'recall@{2 * n}']} |"
            )
    return "\n".join(lines) + "\n"
