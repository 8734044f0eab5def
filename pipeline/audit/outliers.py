"""Outliers: rows far from every other row, scored by kNN distance and flagged by robust z."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.audit.graph import BLOCK_ROWS, blocks, unit_block
from pipeline.audit.neighbours import Neighbours
from pipeline.audit.rows import Rows
from pipeline.config import AuditConfig


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


def centroid_distance(features: np.ndarray, labels: np.ndarray, n_classes: int, block: int = BLOCK_ROWS) -> np.ndarray:
    """(N,) cosine distance of each row to the nearest class centroid (given labels), in blocks of rows."""
    sums = np.zeros((n_classes, features.shape[1]), np.float64)
    for a, b in blocks(len(features), block):
        sums += (labels[a:b] == np.arange(n_classes)[:, None]).astype(np.float32) @ unit_block(features[a:b])
    centroids = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    out = np.empty(len(features), np.float64)
    for a, b in blocks(len(features), block):
        out[a:b] = 1.0 - (unit_block(features[a:b]) @ centroids.T).max(axis=1)
    return out


def outlier_findings(
    rows: Rows, near: Neighbours, class_names: list[str], config: AuditConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows far from every other row: mean cosine distance to the k nearest, flagged by robust z."""
    distance = 1.0 - near.knn_similarity.astype(np.float64).mean(axis=1)
    z = robust_z(distance)
    centroid = centroid_distance(rows.features, rows.labels, len(class_names))
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
