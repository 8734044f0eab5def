"""The neighbour search of the audit: near-duplicate pairs and each row's nearest rows.

One function, `similarity_search`, is all the findings call, so another search
(an index such as faiss) can replace this exact blocked one behind the same
`Neighbours` result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError

#: Pairs above the threshold beyond which the search stops: a threshold this loose
#: (or thousands of identical images) is better fixed than listed.
MAX_PAIRS = 5_000_000


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
