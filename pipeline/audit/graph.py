"""The audit's neighbour graph: every row's k nearest other rows by cosine similarity.

Every check of the audit (duplicates, leaks, outliers, the kNN label vote) and
`make similar` read this one graph, so the O(N**2) comparison is paid once, and at a
million rows not at all:

* exact, below `exact_below` rows: the full-width unit rows multiplied in
  (`EXACT_TILE`, N) tiles with numpy's BLAS, top k by argpartition. It beats
  faiss's `IndexFlatIP` 3-5x on this machine (docs/performance.md), and is exact.
* approximate, from `exact_below` rows on: a PCA of the unit rows to `pca_dim`
  (fitted with numpy, stored as a `faiss.LinearTransform`) in front of a
  `faiss.IndexIVFFlat` (L2 in PCA space: the PCA centres the rows, which keeps
  differences, not inner products, and for unit rows L2 ranks like cosine). Each
  row's `k * rerank + 1` candidates are re-scored with the exact full-width cosine,
  so every similarity in the graph is exact and only membership is approximate;
  `recall_at_k` measures how approximate on sampled rows against exact search.

`features` is an (N, D) float16 or float32 array of raw rows in memory (float16
halves a million rows to 2.5 GiB); every pass normalises one block at a time, so no
(N, D) float32 copy and no (N, N) matrix is ever held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Row count from which the approximate index is used: the measured crossover of exact
#: tiles and PCA + IVF at 1280 features is 20-30k rows (docs/performance.md).
EXACT_BELOW = 20_000
#: Query rows per exact tile: a (2048, N) float32 product, 160 MiB at 20k rows.
EXACT_TILE = 2048
#: Rows the PCA and the k-means lists are trained on (a seeded sample): 1280 covariances
#: and 256-d centroids are settled well before that.
TRAIN_ROWS = 65_536
#: Rows per block of every streamed pass (normalising, PCA, IVF add and search).
BLOCK_ROWS = 32_768


@dataclass(frozen=True)
class GraphSettings:
    """How the graph is built; every field is recorded in its metadata and checked on reuse."""

    k: int = 10
    exact_below: int = EXACT_BELOW
    pca_dim: int = 256
    nprobe: int = 8
    rerank: int = 2
    recall_queries: int = 1000
    block_rows: int = BLOCK_ROWS
    seed: int = 0

    def nlist(self, n: int) -> int:
        """IVF lists: a power of two near 2 sqrt(N), in [64, 4096] (about 250 rows a list at 1M)."""
        return int(min(4096, max(64, 2 ** round(np.log2(2 * np.sqrt(n))))))


@dataclass
class Graph:
    """`indices` (N, k) int32 nearest other rows, most similar first (-1 where fewer
    than k exist); `similarity` (N, k) float32 exact cosine; `meta` how it was built
    (method, index, recall, seconds); `index` the faiss index of the approximate path
    (None for exact), what `make similar` queries."""

    indices: np.ndarray
    similarity: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    index: Any = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def unit_block(x: np.ndarray) -> np.ndarray:
    """Rows as C-contiguous float32 scaled to unit L2 norm (a copy; faiss needs float32)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


def inverse_norms(features: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    out = np.empty(len(features), np.float32)
    for a, b in blocks(len(features), block):
        out[a:b] = 1.0 / np.maximum(np.linalg.norm(np.asarray(features[a:b], np.float32), axis=1), 1e-12)
    return out


def set_threads() -> int:
    """faiss's OpenMP pool to every core this process may use (faiss defaults to all of the host's)."""
    import os

    import faiss

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(n)
    return n


def build_graph(features: np.ndarray, settings: GraphSettings) -> Graph:
    """The k-nearest-neighbour graph of `features` (N, D), exact or approximate by size (module docstring)."""
    n = len(features)
    k = max(0, min(settings.k, n - 1))
    started = time.perf_counter()
    if n < settings.exact_below:
        graph = exact_graph(features, k, settings.block_rows)
    else:
        graph = approximate_graph(features, k, settings)
    graph.meta["seconds"]["build"] = round(time.perf_counter() - started, 3)
    step = time.perf_counter()
    graph.meta["recall"] = recall_at_k(graph, features, settings.recall_queries, seed=settings.seed + 1)
    graph.meta["seconds"]["recall"] = round(time.perf_counter() - step, 3)
    log.info("audit: neighbour graph %s, recall@%d %s", graph.meta["index"], k, graph.meta["recall"])
    return graph


def _top_k(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest entries of `sim` and their columns, largest first."""
    k = min(k, sim.shape[1])
    if k < sim.shape[1]:
        cols = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    else:
        cols = np.broadcast_to(np.arange(k), sim.shape).copy()
    vals = np.take_along_axis(sim, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(cols, order, axis=1)


def _drop_self(ids: np.ndarray, sims: np.ndarray, first_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Removes each query's own row (wherever it landed: an exact copy ties with it) and keeps k."""
    own = ids == np.arange(first_row, first_row + len(ids))[:, None]
    sims = np.where(own | (ids < 0), -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int32)
    sims = np.take_along_axis(sims, order, axis=1).astype(np.float32)
    ids[~np.isfinite(sims)] = -1
    return ids, sims


def exact_graph(features: np.ndarray, k: int, block: int = BLOCK_ROWS) -> Graph:
    """Exact k nearest other rows by numpy tiles (module docstring); N below `exact_below`."""
    n = len(features)
    unit = np.concatenate([unit_block(features[a:b]) for a, b in blocks(n, block)]) if n else features
    indices = np.empty((n, k), np.int32)
    similarity = np.empty((n, k), np.float32)
    for a, b in blocks(n, EXACT_TILE):
        sims, ids = _top_k(unit[a:b] @ unit.T, k + 1)
        indices[a:b], similarity[a:b] = _drop_self(ids, sims, a, k)
    meta = {"method": "exact", "index": f"exact cosine, numpy tiles of {EXACT_TILE} rows", "rows": n, "k": k}
    return Graph(indices, similarity, {**meta, "dim": int(features.shape[1]), "seconds": {}})


def pca_transform(sample: np.ndarray, dim: int):
    """A PCA of unit rows as a `faiss.LinearTransform` y = A x + b, which serialises inside the index.

    Fitted with numpy (float32 covariance by sgemm, float64 eigh): faiss's own
    `PCAMatrix.train` runs on its bundled, older BLAS and took 4x as long here.
    """
    import faiss

    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    cov = (centred.T @ centred).astype(np.float64) / max(len(sample) - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    a = np.ascontiguousarray(vectors[:, order].T, dtype=np.float32)
    transform = faiss.LinearTransform(sample.shape[1], dim, True)
    faiss.copy_array_to_vector(a.ravel(), transform.A)
    faiss.copy_array_to_vector((-(a.astype(np.float64) @ mean)).astype(np.float32), transform.b)
    transform.is_trained = True
    return transform, float(values[order].sum() / max(values.sum(), 1e-12))


def train_index(features: np.ndarray, settings: GraphSettings):
    """PCA + IVFFlat trained on a seeded sample of at most `TRAIN_ROWS` rows; returns (empty index, info, seconds)."""
    import faiss

    n, d = features.shape
    dim = min(settings.pca_dim, d)
    nlist = settings.nlist(n)
    rng = np.random.default_rng(settings.seed)
    sample_rows = np.sort(rng.choice(n, size=min(n, TRAIN_ROWS), replace=False))
    sample = np.concatenate([unit_block(features[sample_rows[a:b]]) for a, b in blocks(len(sample_rows), 16_384)])
    started = time.perf_counter()
    pca, variance = pca_transform(sample, dim)
    pca_seconds = time.perf_counter() - started
    reduced = pca.apply(sample)
    del sample
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    ivf.cp.seed, ivf.cp.niter = settings.seed, 10
    started = time.perf_counter()
    ivf.train(reduced[: min(len(reduced), 32 * nlist)])  # k-means: 32 rows a centroid suffice here
    ivf.nprobe = settings.nprobe
    index = faiss.IndexPreTransform(pca, ivf)
    info = {"nlist": nlist, "nprobe": settings.nprobe, "pca_dim": dim, "pca_variance_kept": round(variance, 4)}
    seconds = {"pca_train": round(pca_seconds, 3), "ivf_train": round(time.perf_counter() - started, 3)}
    return index, info, seconds


def index_parts(index):
    """(PCA transform, IVF index) of a PCA + IVF `IndexPreTransform`."""
    import faiss

    return faiss.downcast_VectorTransform(index.chain.at(0)), faiss.extract_index_ivf(index)


def approximate_graph(features: np.ndarray, k: int, settings: GraphSettings) -> Graph:
    """PCA + IVFFlat candidates, re-scored with the exact cosine (module docstring)."""
    n, d = features.shape
    index, info, seconds = train_index(features, settings)
    pca, ivf = index_parts(index)
    started = time.perf_counter()
    reduced = np.empty((n, info["pca_dim"]), np.float32)
    for a, b in blocks(n, settings.block_rows):
        reduced[a:b] = pca.apply(unit_block(features[a:b]))
        _add_assigned(ivf, reduced[a:b])
    seconds["add"] = round(time.perf_counter() - started, 3)
    candidates = min(n, k * max(settings.rerank, 1) + 1)
    step = time.perf_counter()
    found = cell_join(reduced, ivf, settings.nprobe, candidates)
    seconds["search"] = round(time.perf_counter() - step, 3)
    del reduced
    step = time.perf_counter()
    inverse = inverse_norms(features, settings.block_rows)
    indices = np.empty((n, k), np.int32)
    similarity = np.empty((n, k), np.float32)
    for a, b in blocks(n, settings.block_rows):
        sims = rescore(features, inverse, np.arange(a, b), found[a:b])
        indices[a:b], similarity[a:b] = _drop_self(found[a:b], sims, a, k)
    seconds["rescore"] = round(time.perf_counter() - step, 3)
    seconds = {name: round(value, 3) for name, value in seconds.items()}
    meta = {
        "method": "approximate",
        "index": f"PCA({d}->{info['pca_dim']}) + IndexIVFFlat(L2, nlist={info['nlist']}), each list joined with "
        f"its {info['nprobe']} nearest, {candidates} candidates re-scored exactly",
        "rows": n,
        "dim": int(d),
        "k": k,
        "candidates": candidates,
        **info,
        "seconds": seconds,
    }
    return Graph(indices, similarity, meta, index=index)


def _add_assigned(ivf, rows: np.ndarray) -> None:
    """Adds rows to their nearest list, the assignment by numpy's BLAS: `ivf.add` assigns with
    faiss's bundled BLAS, 174 s of a million-row build here (docs/performance.md)."""
    from faiss.contrib.ivf_tools import add_preassigned

    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    distances = np.einsum("ij,ij->i", centroids, centroids)[None, :] - 2 * (rows @ centroids.T)
    add_preassigned(ivf, np.ascontiguousarray(rows), distances.argmin(axis=1).astype(np.int64))


def list_members(ivf) -> list[np.ndarray]:
    """The row ids in each inverted list of a faiss IVF index."""
    import faiss

    lists = ivf.invlists
    return [faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy().astype(np.int64) for c in range(ivf.nlist)]


def cell_join(reduced: np.ndarray, ivf, nprobe: int, candidates: int, chunk: int = 2048) -> np.ndarray:
    """(N, candidates) int64 nearest rows of every row in PCA space (-1 where fewer), itself included.

    The rows of each IVF list are searched together against the lists of the
    `nprobe` centroids nearest to theirs, by one BLAS product per list (L2 ranks as
    2 q.x - |x|^2): faiss's own per-query scan of the same lists ran 10-20x slower
    here. faiss keeps what it does well: the k-means lists and the centroids' search.
    """
    members = list_members(ivf)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, near = ivf.quantizer.search(centroids, min(nprobe, ivf.nlist))
    squared = np.einsum("ij,ij->i", reduced, reduced)
    out = np.full((len(reduced), candidates), -1, np.int64)
    for cell, rows in enumerate(members):
        if not len(rows):
            continue
        pool = np.concatenate([members[c] for c in near[cell] if c >= 0])
        base = reduced[pool]
        for a, b in blocks(len(rows), chunk):
            query = rows[a:b]
            scores = 2 * (reduced[query] @ base.T) - squared[pool]
            _, cols = _top_k(scores, candidates)
            out[query, : cols.shape[1]] = pool[cols]
    return out


def rescore(features: np.ndarray, inverse: np.ndarray, rows: np.ndarray, ids: np.ndarray, sub: int = 1024):
    """(len(rows), c) float32 exact cosine of each row to its candidates `ids` (-inf where -1).

    Gathers the candidate rows from memory `sub` queries at a time: (sub, c, D) float32
    is 100 MiB at c = 21 and D = 1280.
    """
    out = np.full(ids.shape, -np.inf, np.float32)
    for a, b in blocks(len(rows), sub):
        query = np.asarray(features[rows[a:b]], np.float32) * inverse[rows[a:b], None]
        cand = np.maximum(ids[a:b], 0)
        gathered = np.asarray(features[cand.ravel()], np.float32).reshape(cand.shape + (query.shape[1],))
        sims = np.matmul(gathered, query[:, :, None])[..., 0] * inverse[cand]
        out[a:b] = np.where(ids[a:b] >= 0, sims, -np.inf)
    return out


def exact_neighbours(features: np.ndarray, queries: np.ndarray, k: int, block: int = BLOCK_ROWS):
    """Exact top k other rows of the `queries` rows, the database streamed in blocks (faiss.ResultHeap)."""
    import faiss

    query = unit_block(features[queries])
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    for a, b in blocks(len(features), block):
        sims, cols = _top_k(query @ unit_block(features[a:b]).T, k + 1)
        heap.add_result(np.ascontiguousarray(sims, np.float32), np.ascontiguousarray(cols + a, np.int64))
    heap.finalize()
    ids, sims = heap.I, np.where(heap.I == queries[:, None], -np.inf, heap.D)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def recall_at_k(graph: Graph, features: np.ndarray, queries: int, *, seed: int) -> dict[str, Any]:
    """Mean share of each sampled row's exact k nearest that the graph holds, on `queries` rows.

    Ties at the k-th similarity (exact copies) are counted by similarity: a graph
    that holds another row of the same similarity is not wrong.
    """
    n, k = len(features), graph.k
    if not k:
        return {"queries": 0, "recall_at_k": 1.0, "recall_at_1": 1.0}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    ids, sims = exact_neighbours(features, rows, k)
    kth = sims[:, -1:]
    held = (graph.similarity[rows] >= kth - 1e-4).sum(axis=1).clip(max=k)
    return {
        "queries": int(len(rows)),
        "recall_at_k": round(float(held.mean() / k), 4),
        "recall_at_1": round(float(np.mean(graph.similarity[rows, 0] >= sims[:, 0] - 1e-4)), 4),
    }
