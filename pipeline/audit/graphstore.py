"""The persisted neighbour graph: `<audit_dir>/<feature file stem>.graph/`, its files, reuse and reading.

The graph costs minutes at a million rows, the checks that read it seconds; so it is
built once per feature file and settings, beside the audit (not inside it: the audit
folder is replaced whole on every run), under the usual lock. A rerun of `make audit`
and every `make similar` read it back. The folder holds:

* `graph.npz`: `indices` (N, k) int32 and `similarity` (N, k) float32;
* `meta.json`: how it was built (`graph.Graph.meta`) and `identity`, what it was built
  from (feature file key, row count, a digest of the row ids, the settings); a graph
  whose identity differs from the one asked for is rebuilt, never reused;
* `rows.npy`: the unit rows as float16, memory-mapped by `make similar` to re-score
  candidates exactly without loading the feature file (2.4 GiB at 1M x 1280);
* `index.faiss` (approximate graphs only): the PCA + IVF index, read back memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.graph import (
    Graph,
    GraphSettings,
    blocks,
    build_graph,
    index_parts,
    pca_transform,
    set_threads,
    unit_block,
)
from pipeline.config import AuditConfig
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

GRAPH_FILE = "graph.npz"
META_FILE = "meta.json"
ROWS_FILE = "rows.npy"
INDEX_FILE = "index.faiss"


def graph_dir(audit_dir: Path, features_path: Path) -> Path:
    return Path(audit_dir) / f"{Path(features_path).stem}.graph"


def identity(key: Mapping[str, Any], ids: Sequence[str], dim: int, settings: GraphSettings) -> dict[str, Any]:
    """What a graph is built from: content (key, rows, ids), not the file's name or time."""
    digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]
    return {
        "key": dict(key),
        "rows": len(ids),
        "dim": int(dim),
        "ids": digest,
        "settings": dataclasses.asdict(settings),
    }


def neighbour_graph(
    folder: Path, features: np.ndarray, wanted: Mapping[str, Any], settings: GraphSettings
) -> tuple[Graph, bool]:
    """The graph of `features` stored in `folder`, built and written there first unless current.

    Returns (graph, built). `wanted` is `identity(...)` of the caller's rows.
    """
    from pipeline.locks import exclusive

    folder = Path(folder)
    with exclusive(folder, what="neighbour graph"):
        current = read_meta(folder)
        if current is not None and current.get("identity") == json.loads(json.dumps(wanted)):
            log.info("audit: reusing the neighbour graph in %s", folder)
            return load_graph(folder), False
        set_threads()
        graph = build_graph(features, settings)
        graph.meta["identity"] = dict(wanted)
        _write(folder, graph, features, settings.block_rows)
        return graph, True


def settings_of(config: AuditConfig) -> GraphSettings:
    """The neighbour graph's settings from the audit's options."""
    return GraphSettings(
        k=config.neighbours,
        exact_below=config.exact_below,
        pca_dim=config.pca_dim,
        nprobe=config.nprobe,
        rerank=config.rerank,
        recall_queries=config.recall_queries,
        block_rows=config.block_rows,
        seed=config.seed,
    )


def graph_record(graph: Graph, folder: Path, *, built: bool, saturated: int) -> dict[str, Any]:
    """What audit.json says of the graph: the index used, its measured recall, its cost, where it is."""
    meta = graph.meta
    return {
        "folder": str(folder),
        "built": built,
        "method": meta["method"],
        "index": meta["index"],
        "k": meta["k"],
        "recall": meta["recall"],
        "seconds": meta["seconds"],
        "saturated_rows": saturated,
    }


def probe_rows(features: np.ndarray, graph: Graph, folder: Path, settings: GraphSettings) -> tuple[np.ndarray, str]:
    """The rows the label probe is fitted on, and what they are.

    Features no wider than `pca_dim`, or fewer than 4 * `pca_dim` rows: themselves. Otherwise their PCA to `pca_dim`
    (the approximate graph's own, else one fitted here on up to 100k unit rows),
    (N, pca_dim) float32. A logistic probe on 1280 features took 20-60 s at 10k rows
    and would not fit a million in memory; on the PCA it ranks planted flips as well
    (docs/audit.md).
    """
    # A PCA fitted on fewer rows than a few times its width has near-empty components, which
    # standardizing would blow up into noise; such small data is cheap to probe in full anyway.
    if features.shape[1] <= settings.pca_dim or len(features) < 4 * settings.pca_dim:
        return features, "features"
    if graph.meta["method"] == "approximate":
        index = graph.index if graph.index is not None else load_graph(folder, with_index=True).index
        pca, _ = index_parts(index)
    else:
        rng = np.random.default_rng(settings.seed)
        sample = np.sort(rng.choice(len(features), size=min(len(features), 100_000), replace=False))
        pca, _ = pca_transform(unit_block(features[sample]), settings.pca_dim)
    out = np.empty((len(features), pca.d_out), np.float32)
    for a, b in blocks(len(features), settings.block_rows):
        out[a:b] = pca.apply(unit_block(features[a:b]))
    return out, f"PCA to {pca.d_out} of the unit rows"


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / META_FILE
    if not path.exists() or not (Path(folder) / GRAPH_FILE).exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def load_graph(folder: Path, *, with_index: bool = False) -> Graph:
    """The graph in `folder`; with its faiss index (memory-mapped, read-only) if asked and approximate."""
    meta = read_meta(folder)
    if meta is None:
        raise CacheError(f"No neighbour graph in {folder}. Run `make audit` with the same feature variables first.")
    with np.load(Path(folder) / GRAPH_FILE) as stored:
        graph = Graph(stored["indices"], stored["similarity"].astype(np.float32), meta)
    if with_index and (Path(folder) / INDEX_FILE).exists():
        import faiss

        graph.index = faiss.read_index(str(Path(folder) / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return graph


def open_unit_rows(folder: Path) -> np.ndarray:
    """(N, D) float16 unit rows of the graph, memory-mapped."""
    return np.load(Path(folder) / ROWS_FILE, mmap_mode="r")


def _write(folder: Path, graph: Graph, features: np.ndarray, block: int) -> None:
    """Writes every file into a temporary folder beside `folder`, then renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.savez(work / GRAPH_FILE, indices=graph.indices.astype(np.int32), similarity=graph.similarity)
        unit = np.lib.format.open_memmap(work / ROWS_FILE, mode="w+", dtype=np.float16, shape=features.shape)
        for a, b in blocks(len(features), block):
            unit[a:b] = unit_block(features[a:b])
        unit.flush()
        del unit
        if graph.index is not None:
            import faiss

            faiss.write_index(graph.index, str(work / INDEX_FILE))
        (work / META_FILE).write_text(json.dumps(graph.meta, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
