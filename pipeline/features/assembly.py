"""The assembly: the feature file stage 2 reads, materialized from the content store for a scan.

Rows come from the store as stored (bit for bit); which split, label, id and position
each has comes from the scan. Images whose content is a recorded failure are left out
and listed in their split's `skipped` attribute, as before. The file is written under a
temporary name and renamed over the previous assembly of the same settings, so a folder
that changes never leaves an old file beside the new one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CacheError
from pipeline.features.contentstore import PLAIN, ContentStore
from pipeline.features.scan import Scan, ScanSplit
from pipeline.features.store import VIEWS_SPLIT, write_features

_CHUNK = 4096


@dataclass(frozen=True)
class AssembledViews:
    """The views to put in /train/views: their store, attributes and count."""

    store: ContentStore
    attrs: Mapping[str, Any]
    num_views: int


def kept_rows(split: ScanSplit, store: ContentStore) -> list[int]:
    """The rows of `split` whose content has features in `store`, in split order."""
    return [r for r, c in enumerate(split.content_ids) if (c, PLAIN) in store]


def skipped_items(split: ScanSplit, store: ContentStore) -> list[dict[str, Any]]:
    """{index, id, reason} of every row of `split` left out, its reason from the store."""
    items = []
    for r, c in enumerate(split.content_ids):
        if (c, PLAIN) in store:
            continue
        reason = store.reason(c)
        if reason is None:
            raise CacheError(
                f"The store has no row for {split.ids[r]} ({c}); the run that should have made it was "
                "interrupted. Rerun `make features`."
            )
        items.append({"index": r, "id": split.ids[r], "reason": reason, "content_id": c})
    return items


def _split_chunks(split: ScanSplit, rows: list[int], store: ContentStore) -> Iterator[tuple]:
    for start in range(0, len(rows), _CHUNK):
        part = rows[start : start + _CHUNK]
        features = store.features([(split.content_ids[r], PLAIN) for r in part])
        yield features, split.labels[part], np.asarray(part, np.int64), [split.ids[r] for r in part]


def _view_chunks(split: ScanSplit, rows: list[int], views: AssembledViews) -> Iterator[tuple]:
    for view in range(views.num_views):
        for start in range(0, len(rows), _CHUNK):
            part = rows[start : start + _CHUNK]
            features = views.store.features([(split.content_ids[r], view) for r in part])
            yield features, split.labels[part], np.asarray(part, np.int64), np.full(len(part), view, np.int64)


def assemble(
    path: Path,
    *,
    attrs: Mapping[str, Any],
    scan: Scan,
    store: ContentStore,
    views: AssembledViews | None,
) -> dict[str, list[dict[str, Any]]]:
    """Writes the feature file at `path` for `scan`; returns the skipped images per split."""
    splits, content, skipped = {}, {}, {}
    rows_of = {}
    for name, split in scan.splits.items():
        rows_of[name] = kept_rows(split, store)
        skipped[name] = skipped_items(split, store)
        content[name] = [split.content_ids[r] for r in rows_of[name]]
        split_attrs = {
            "spec": split.spec,
            "num_inputs": len(split),
            "num_inputs_all_shards": len(split),
            "num_skipped": len(skipped[name]),
            "skipped": skipped[name],
        }
        splits[name] = (_split_chunks(split, rows_of[name], store), split_attrs)
    view_part = None
    if views is not None:
        train = scan.splits[VIEWS_SPLIT]
        view_part = (_view_chunks(train, rows_of[VIEWS_SPLIT], views), dict(views.attrs))
    attrs = {
        **attrs,
        "num_skipped": sum(len(items) for items in skipped.values()),
        "num_rows": sum(len(rows) for rows in rows_of.values()),
    }
    write_features(
        path,
        attrs=attrs,
        splits=splits,
        feature_dim=store.feature_dim,
        dtype=store.dtype,
        views=view_part,
        content_ids=content,
    )
    return skipped
