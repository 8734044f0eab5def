"""Near-duplicate pairs and each row's nearest rows, read off the neighbour graph (`audit.graph`).

Every pair at cosine >= the threshold is an edge of the k-nearest-neighbour graph as
long as neither row has more than k copies; a row with more (its k-th neighbour is
itself above the threshold, `saturated`) still joins the cluster of all its copies,
since each copy links to some others, but not every pair of the cluster is listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.audit.graph import Graph, GraphSettings, build_graph
from pipeline.errors import DataError

#: Pairs above the threshold beyond which the audit stops: a threshold this loose
#: (or thousands of identical images) is better fixed than listed.
MAX_PAIRS = 5_000_000


@dataclass(frozen=True)
class Neighbours:
    """What the checks read of the graph.

    `pairs` (P, 2) int64 rows i < j with cosine `similarity` (P,) >= the threshold;
    `knn_index` / `knn_similarity` (N, k): each row's k nearest other rows, most
    similar first; `saturated`: rows whose k nearest are all above the threshold.
    """

    pairs: np.ndarray
    similarity: np.ndarray
    knn_index: np.ndarray
    knn_similarity: np.ndarray
    saturated: int = 0


def pairs_above(graph: Graph, threshold: float, *, max_pairs: int = MAX_PAIRS) -> Neighbours:
    """The graph's edges at cosine >= `threshold` as unique pairs i < j, with the kNN lists."""
    sim, idx = graph.similarity, graph.indices
    rows, cols = np.nonzero((sim >= threshold) & (idx >= 0))
    if len(rows) > 2 * max_pairs:
        raise DataError(
            f"More than {max_pairs:,} row pairs have cosine similarity >= {threshold} "
            f"(expected a few near-duplicates). Raise DUPLICATE_THRESHOLD (--duplicate-threshold), "
            "or look for thousands of identical images (blank frames) in the data."
        )
    i, j = rows.astype(np.int64), idx[rows, cols].astype(np.int64)
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    if len(pairs) > max_pairs:
        raise DataError(
            f"More than {max_pairs:,} row pairs have cosine similarity >= {threshold} "
            f"(expected a few near-duplicates). Raise DUPLICATE_THRESHOLD (--duplicate-threshold), "
            "or look for thousands of identical images (blank frames) in the data."
        )
    saturated = int((sim[:, -1] >= threshold).sum()) if sim.shape[1] else 0
    return Neighbours(
        pairs=pairs.reshape(-1, 2),
        similarity=sim[rows, cols][first].astype(np.float32),
        knn_index=idx.astype(np.int64),
        knn_similarity=sim,
        saturated=saturated,
    )


def similarity_search(
    unit: np.ndarray, *, threshold: float, k: int, max_pairs: int = MAX_PAIRS, exact_below: int | None = None
) -> Neighbours:
    """Pairs at cosine >= `threshold` and the k nearest other rows of every row of `unit` (N, D).

    Builds a graph in memory (exact below `exact_below` rows, else approximate); the
    audit itself reads the persisted one (`audit.graphstore`).
    """
    settings = GraphSettings(k=k) if exact_below is None else GraphSettings(k=k, exact_below=exact_below)
    return pairs_above(build_graph(np.asarray(unit), settings), threshold, max_pairs=max_pairs)
