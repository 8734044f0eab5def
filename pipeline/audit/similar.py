"""`make similar`: query a feature file's neighbour graph by image.

The given images go through the feature file's own frozen backbone with stage 1's
preprocessing (`features.extractor.build_extractor` + `features.forward.compiled_forward`
on `images.decode_and_resize`), then through the graph's index: the faiss PCA + IVF
index of an approximate graph (memory-mapped, read-only), or an exact scan of the unit
rows below its size. Either way the candidates are re-scored with the exact cosine
against the graph's float16 unit rows (memory-mapped), so the printed similarities are
exact. Every match at or above the duplicate threshold is marked a copy: asking for a
bad image lists every copy of it in the data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.graph import _top_k, blocks, unit_block
from pipeline.audit.graphstore import load_graph, open_unit_rows, read_meta

log = logging.getLogger(__name__)

#: Candidates per wanted match taken from the IVF index before exact re-scoring: one
#: query is cheap, so more than the graph's own `rerank`.
QUERY_RERANK = 8
SHEET = "similar.png"


@dataclass
class DatasetIndex:
    """The persisted graph of a feature file, opened for queries: unit rows (N, D) float16
    memory-mapped, and the faiss index (None for an exact graph)."""

    folder: Path
    rows: np.ndarray
    index: Any
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: Path) -> DatasetIndex:
        graph = load_graph(folder, with_index=True)
        return cls(Path(folder), open_unit_rows(folder), graph.index, graph.meta)

    def unit_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored unit rows at `rows`, float32 (a query by a row of the data, for tests and benchmarks)."""
        return np.asarray(self.rows[np.asarray(rows)], np.float32)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, k) row ids and exact cosines of the nearest rows to each query (M, D), most similar first."""
        query = unit_block(np.atleast_2d(query))
        k = min(k, len(self.rows))
        if self.index is None:
            return self._scan(query, k)
        import faiss

        faiss.extract_index_ivf(self.index).nprobe = max(self.meta.get("nprobe", 8), 16)
        _, candidates = self.index.search(query, min(len(self.rows), k * QUERY_RERANK))
        ids, sims = [], []
        for q, cand in zip(query, candidates):
            cand = np.unique(cand[cand >= 0])
            exact = np.asarray(self.rows[cand], np.float32) @ q
            order = np.argsort(-exact, kind="stable")[:k]
            ids.append(cand[order])
            sims.append(exact[order])
        return np.stack(ids), np.stack(sims)

    def _scan(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_s = np.full((len(query), 0), -np.inf, np.float32)
        best_i = np.zeros((len(query), 0), np.int64)
        for a, b in blocks(len(self.rows), 65_536):
            sims, cols = _top_k(query @ np.asarray(self.rows[a:b], np.float32).T, k)
            merged_s = np.concatenate([best_s, sims], axis=1)
            merged_i = np.concatenate([best_i, cols + a], axis=1)
            best_s, order = _top_k(merged_s, k)
            best_i = np.take_along_axis(merged_i, order, axis=1)
        return best_i, best_s


def features_of_images(features_config, paths: Sequence[Path]) -> tuple[list[Path], np.ndarray]:
    """The images of `paths` that can be read (`export.readable_images`), and their (M, D)
    features by the feature file's backbone, preprocessed as stage 1 does."""
    import itertools

    import tensorflow as tf

    from pipeline.export import readable_images
    from pipeline.features.backbones import input_resize
    from pipeline.features.extractor import build_extractor
    from pipeline.features.forward import compiled_forward
    from pipeline.images import decode_and_resize

    size = features_config.image_size
    model = build_extractor(
        features_config.backbone, image_size=size, weights=features_config.weights_arg, pooling=features_config.pooling
    )
    forward = compiled_forward(model, size, features_config.batch_size)
    resize = input_resize(features_config)
    decoded = readable_images(list(paths), lambda data: decode_and_resize(data, resize))
    kept, out = [], []
    while batch := list(itertools.islice(decoded, features_config.batch_size)):
        kept += [path for path, _ in batch]
        out.append(np.asarray(forward(tf.stack([image for _, image in batch]))))
    return kept, np.concatenate(out)


def similar_images(
    features_path: Path, images: Sequence[Path], *, audit_dir: Path, top: int, threshold: float, out: Path | None
) -> tuple[list[dict[str, Any]], dict[str, float], Path | None]:
    """Each image's `top` nearest dataset rows (id, path, split, label, cosine, copy?), the seconds
    (backbone apart from the search), and the contact sheet written to `out` (None: none)."""
    from pipeline.audit.graphstore import graph_dir
    from pipeline.audit.rows import folder_root
    from pipeline.config import FeaturesConfig
    from pipeline.errors import CacheError
    from pipeline.features.store import read_features

    folder = graph_dir(audit_dir, features_path)
    if read_meta(folder) is None:
        raise CacheError(
            f"No neighbour graph for {features_path} in {folder}. Run `make audit` with the same feature "
            "variables (and AUDIT_DIR) first."
        )
    seconds = {}
    started = time.perf_counter()
    cached = read_features(features_path, splits=())
    config = FeaturesConfig.from_dict(cached.config)
    images, query = features_of_images(config, list(images))
    seconds["backbone"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    index = DatasetIndex.open(folder)
    ids, sims = index.search(query, top)
    seconds["search"] = round(time.perf_counter() - started, 4)
    rows = _row_names(features_path)
    root = folder_root(cached)
    results = []
    for image, row_ids, row_sims in zip(images, ids, sims):
        matches = [
            {
                "id": rows["ids"][r],
                "path": str(root / rows["ids"][r]) if root is not None else None,
                "split": rows["splits"][r],
                "label": cached.class_names[rows["labels"][r]],
                "cosine": round(float(s), 4),
                "copy": bool(s >= threshold),
            }
            for r, s in zip(row_ids.tolist(), row_sims.tolist())
        ]
        results.append({"image": str(image), "matches": matches})
    sheet = _sheet(results, cached, out) if out is not None else None
    return results, seconds, sheet


def _row_names(features_path: Path) -> dict[str, list]:
    """Ids, splits and labels of the stacked rows (as `audit.rows` stacks them), features left in the file."""
    from pipeline.audit.rows import SPLIT_ORDER
    from pipeline.errors import CacheError
    from pipeline.features.store import open_rows

    out: dict[str, list] = {"ids": [], "splits": [], "labels": []}
    for split in SPLIT_ORDER:
        try:
            part = open_rows(features_path, split)
        except CacheError:
            continue
        out["ids"] += [str(i) for i in part.ids]
        out["splits"] += [split] * len(part)
        out["labels"] += part.labels.tolist()
    return out


def _sheet(results: list[dict[str, Any]], cached, out: Path) -> Path:
    """One row per query image: the image, then its matches (copies in red captions)."""
    from pipeline import plots
    from pipeline.images import read_image_file

    def thumb(path):
        try:
            return read_image_file(Path(path), 160) if path else None
        except (OSError, ValueError):
            return None

    groups, captions, colors = [], [], []
    for result in results:
        groups.append([thumb(result["image"])] + [thumb(m["path"]) for m in result["matches"]])
        best = result["matches"][0] if result["matches"] else None
        captions.append(
            f"{Path(result['image']).name}: "
            + (f"nearest {best['id']} ({best['split']}, {best['label']}) cosine {best['cosine']:.3f}" if best else "-")
            + f"; {sum(m['copy'] for m in result['matches'])} copies"
        )
        colors.append("red" if best and best["copy"] else "black")
    out.parent.mkdir(parents=True, exist_ok=True)
    return plots.contact_sheet(groups, captions, out, title="Nearest dataset images (query first)", colors=colors)
