"""The audit's rows: every split of a feature file stacked into one table, and what names a row.

A finding refers to rows by their place in this table; `describe` turns those
places back into ids, paths, splits and class names for audit.json.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (N, D): their dot products are cosines.

    Not centred: centring on the mean row separates altered copies from distinct
    photos less well than raw cosine does (docs/performance.md).
    """
    x = np.asarray(features, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def check_rows(cached: FeatureSet, rows: Rows) -> None:
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
