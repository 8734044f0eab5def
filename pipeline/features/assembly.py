"""The assembly: the feature file stage 2 reads, materialized from the content store for a scan.

Rows come from the store as stored (bit for bit); which split, label, id and position
each has comes from the scan. Images whose content is a recorded failure are left out
and listed in their split's `skipped` attribute, as before. The file is written under a
temporary name and renamed over the previous assembly of the same settings, so a folder
that changes never leaves an old file beside the new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import CacheError
from pipeline.features.contentstore import ContentStore
from pipeline.features.scan import Scan, ScanSplit
from pipeline.features.store import VIEWS_SPLIT, write_features

_CHUNK = 4096


@dataclass(frozen=True)
class AssembledViews:
    """The views to put in /train/views: their store, attributes and count."""

    store: ContentStore
    attrs: Mapping[str, Any]
    num_views: int


class Assembled(NamedTuple):
    """What `assemble` wrote: per split, the content id of every row, and the images left out."""

    content: dict[str, list[str]]
    skipped: dict[str, list[dict[str, Any]]]


def skipped_items(split: ScanSplit, missing: np.ndarray, store: ContentStore) -> list[dict[str, Any]]:
    """{index, id, reason} of every row of `split` at `missing` (rows without features), its reason from the store."""
    items = []
    for r in missing.tolist():
        c = split.content_ids[r]
        reason = store.reason(c)
        if reason is None:
            raise CacheError(
                f"The store has no row for {split.ids[r]} ({c}); the run that should have made it was "
                "interrupted. Rerun `make features`."
            )
        items.append({"index": r, "id": split.ids[r], "reason": reason, "content_id": c})
    return items


def _split_chunks(split: ScanSplit, rows: np.ndarray, locations: np.ndarray, store: ContentStore) -> Iterator[tuple]:
    """(features, labels, index, ids) of `rows`, `_CHUNK` at a time, the features read at `locations`."""
    for start, features in zip(range(0, len(rows), _CHUNK), store.read(locations, chunk=_CHUNK)):
        part = rows[start : start + _CHUNK]
        yield features, split.labels[part], part, [split.ids[r] for r in part.tolist()]


def _view_chunks(split: ScanSplit, rows: np.ndarray, content: list[str], views: AssembledViews) -> Iterator[tuple]:
    for view in range(views.num_views):
        chunks = views.store.read(views.store.locate(content, view), chunk=_CHUNK)
        for start, features in zip(range(0, len(rows), _CHUNK), chunks):
            part = rows[start : start + _CHUNK]
            yield features, split.labels[part], part, np.full(len(part), view, np.int64)


def assemble(
    path: Path,
    *,
    attrs: Mapping[str, Any],
    scan: Scan,
    store: ContentStore,
    views: AssembledViews | None,
) -> Assembled:
    """Writes the feature file at `path` for `scan`; returns what it wrote."""
    splits, content, skipped = {}, {}, {}
    rows_of = {}
    for name, split in scan.splits.items():
        locations = store.locate(split.content_ids)  # one pass per split: the rest is numpy
        have = locations >= 0
        rows_of[name] = np.flatnonzero(have)
        skipped[name] = skipped_items(split, np.flatnonzero(~have), store)
        content[name] = split.content_ids if have.all() else [split.content_ids[r] for r in rows_of[name].tolist()]
        split_attrs = {
            "spec": split.spec,
            "num_inputs": len(split),
            "num_inputs_all_shards": len(split),
            "num_skipped": len(skipped[name]),
            "skipped": skipped[name],
        }
        splits[name] = (_split_chunks(split, rows_of[name], locations[have], store), split_attrs)
    view_part = None
    if views is not None:
        train = scan.splits[VIEWS_SPLIT]
        view_part = (_view_chunks(train, rows_of[VIEWS_SPLIT], content[VIEWS_SPLIT], views), dict(views.attrs))
    attrs = {
        **attrs,
        "num_skipped": sum(len(items) for items in skipped.values()),
        "num_rows": sum(len(rows) for rows in rows_of.values()),
    }
    with contextlib.ExitStack() as stack:
        for each in (store, views.store if views is not None else None):
            if each is not None:
                stack.enter_context(each.reading())
        write_features(
            path,
            attrs=attrs,
            splits=splits,
            feature_dim=store.feature_dim,
            dtype=store.dtype,
            views=view_part,
            content_ids=content,
        )
    return Assembled(content, skipped)
