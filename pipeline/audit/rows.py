"""The audit's rows: every split of a feature file stacked into one table, and what names a row.

A finding refers to rows by their place in this table; `describe` turns those
places back into ids, paths, splits and class names for audit.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.features.store import FeatureSet

#: Split order of the stacked rows (and of the "first copy" kept by EXCLUDE).
SPLIT_ORDER = ("train", "validation", "test")


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


#: Feature values from which the audit keeps its rows as float16 (halving a million
#: rows of 1280 to 2.4 GiB); the graph measures its recall against the same rows.
FLOAT16_FROM = 2**28


def load_rows(path: Path, *, expect: Mapping[str, Any] | None = None, block: int = 65_536) -> tuple[FeatureSet, Rows]:
    """Every split of a feature file stacked, its features read `block` rows at a time.

    The returned `FeatureSet` holds the file's attributes, no split arrays (the rows
    are in `Rows`). Features stay float32 up to `FLOAT16_FROM` values, then become
    float16: one float32 copy of a million rows would take 4.9 GiB on its own.
    """
    from pipeline.errors import CacheError
    from pipeline.features.store import open_rows, read_features

    cached = read_features(path, expect=expect, splits=())
    names, parts = [], []
    for split in SPLIT_ORDER:  # the splits stage 1 writes
        try:
            parts.append(open_rows(path, split))
        except CacheError:
            continue
        names.append(split)
    if not parts:
        raise DataError(f"{path} holds none of the splits {', '.join(SPLIT_ORDER)}; rebuild it with `make features`.")
    total, width = sum(len(p) for p in parts), parts[0].n_features
    features = np.empty((total, width), np.float16 if total * width > FLOAT16_FROM else np.float32)
    at = 0
    for part in parts:
        for a in range(0, len(part), block):
            chunk = part.read(a, min(a + block, len(part)))[0]
            features[at : at + len(chunk)] = chunk
            at += len(chunk)
    rows = Rows(
        features=features,
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        ids=np.concatenate([p.ids for p in parts]),
        splits=np.array([s for s, p in zip(names, parts) for _ in range(len(p))], dtype=object),
        index=np.concatenate([p.index for p in parts]).astype(np.int64),
    )
    return cached, rows


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (N, D): their dot products are cosines.

    Not centred: centring on the mean row separates altered copies from distinct
    photos less well than raw cosine does (docs/performance.md).
    """
    x = np.asarray(features, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def check_rows(cached: FeatureSet, rows: Rows) -> None:
    """Labels within the classes, finite features, at least two rows; else a `DataError`."""
    k = len(cached.class_names)
    bad = (rows.labels < 0) | (rows.labels >= k)
    if bad.any():
        raise DataError(
            f"{cached.path}: {int(bad.sum())} labels outside the {k} classes {cached.class_names}. "
            "The file is inconsistent; rebuild it with `make features`."
        )
    if not all(np.isfinite(rows.features[a : a + 65_536]).all() for a in range(0, len(rows), 65_536)):
        raise DataError(
            f"{cached.path}: features hold NaN/inf values. Expected finite floats; re-extract "
            "the features (float16 overflow?)."
        )
    if len(rows) < 2:
        raise DataError(f"{cached.path} holds {len(rows)} row; an audit needs at least 2.")


def folder_root(cached: FeatureSet) -> Path | None:
    data_dir = (cached.config.get("data") or {}).get("data_dir")
    return Path(data_dir) if data_dir else None


def describe(rows: Rows, members: Sequence[int], root: Path | None, class_names: Sequence[str]) -> dict[str, Any]:
    return {
        "ids": [str(rows.ids[r]) for r in members],
        "paths": [str(root / rows.ids[r]) if root is not None else None for r in members],
        "splits": [str(rows.splits[r]) for r in members],
        "labels": [class_names[rows.labels[r]] for r in members],
    }
