"""Only what changed goes through the backbone: the rows the store lacks, handed to an engine.

The engines (`pipeline.features.engines`, `ray_engine`) fill splits of a data source in
order through a writer. Here each split is restricted to the images whose content the
store lacks (`SplitSource.restricted`, numbered 0..k-1, each image once even when its
bytes sit at several paths), and `StoreSink` plays the writer: it maps the engine's
rows back to content ids and appends them to a new store segment. The engines need not
know about content at all, and a cluster's workers receive only the missing rows.

Views work the same way, one view number at a time: the sink says views 0..v-1 are
done, so an engine computes exactly view v of the images that lack it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import FeaturesConfig, ViewsConfig
from pipeline.features.backbones import input_resize
from pipeline.features.contentstore import PLAIN, ContentStore, SegmentWriter
from pipeline.features.scan import Scan, ScanSplit, view_key
from pipeline.features.sources import DataSource, SplitSource
from pipeline.images import Resize

log = logging.getLogger(__name__)


class StoreSink:
    """The writer interface the engines' runners use (see `engines.Runner`), backed by a segment.

    Before each restricted split, `begin` (plain) or `begin_views` (view v) says which
    content ids its rows 0..k-1 are.
    """

    def __init__(self, segment: SegmentWriter, dataset_version: str) -> None:
        self.segment = segment
        self.attrs: dict[str, Any] = {"dataset_version": dataset_version}
        self.content: list[str] = []
        self.written: list[int] = []
        self.view = 0
        self.view_seconds = 0.0

    def begin(self, content: list[str]) -> None:
        self.content, self.written = content, []

    def begin_views(self, content: list[str], view: int) -> None:
        self.content, self.view = content, view

    def committed(self, split: str) -> tuple[int, int]:
        return len(self.written), self.written[-1] if self.written else -1

    def written_index(self, split: str) -> np.ndarray:
        return np.arange(len(self.content), dtype=np.int64)

    def views_committed(self) -> int:
        return self.view * len(self.content)

    def append(self, split: str, features: np.ndarray, labels, index: np.ndarray, ids) -> None:
        rows = np.asarray(index).tolist()
        self.segment.append([self.content[r] for r in rows], np.full(len(rows), PLAIN, np.int64), features)
        self.written += rows

    def append_views(self, features: np.ndarray, labels, index: np.ndarray, view: np.ndarray, seconds: float) -> None:
        self.segment.append([self.content[r] for r in np.asarray(index).tolist()], view, features)
        self.view_seconds += seconds


@dataclass(frozen=True)
class Missing:
    """Per split, the positions and content ids of the images to extract (each content once)."""

    splits: dict[str, tuple[list[int], list[str]]]

    @property
    def count(self) -> int:
        return sum(len(c) for _, c in self.splits.values())


def _mine(content_id: str, config: FeaturesConfig) -> bool:
    """Shard I of N extracts the contents whose view key is I modulo N."""
    return config.num_shards == 1 or view_key(content_id) % config.num_shards == config.shard_index


def plan_missing(scan: Scan, store: ContentStore, config: FeaturesConfig) -> Missing:
    """The images whose content has neither a row nor a recorded failure in `store`."""
    seen: set[str] = set()
    splits = {}
    for name, split in scan.splits.items():
        positions, content = [], []
        for position in np.flatnonzero(store.locate(split.content_ids) < 0).tolist():
            cid = split.content_ids[position]
            if cid in seen or store.reason(cid) is not None or not _mine(cid, config):
                continue
            seen.add(cid)
            positions.append(position)
            content.append(cid)
        splits[name] = (positions, content)
    return Missing(splits)


def extract_missing(runner, source: DataSource, missing: Missing, sink: StoreSink, config: FeaturesConfig, progress):
    """Runs the missing images of every split through `runner`; returns the rows computed.

    Images the engine could not decode are decoded once more, alone, for the reason,
    and stored as failures.
    """
    images = 0
    for name, (positions, content) in missing.splits.items():
        if not positions:
            continue
        split = source.splits[name].restricted(positions, [view_key(c) for c in content])
        sink.begin(content)
        images += runner.extract_split(split, sink, progress=progress)
        lost = sorted(set(range(len(content))) - set(sink.written))
        for row, reason in failure_reasons(split, lost, input_resize(config)):
            sink.segment.fail(content[row], reason)
    return images


def missing_views(scan_split: ScanSplit, store: ContentStore, views_store: ContentStore, view: int, config):
    """(positions, content ids) of the train images with plain features but without view `view`."""
    seen: set[str] = set()
    positions, content = [], []
    for position, cid in enumerate(scan_split.content_ids):
        if cid in seen or (cid, PLAIN) not in store or (cid, view) in views_store or not _mine(cid, config):
            continue
        seen.add(cid)
        positions.append(position)
        content.append(cid)
    return positions, content


def extract_missing_views(
    runner,
    split: SplitSource,
    scan_split: ScanSplit,
    stores: tuple[ContentStore, ContentStore],
    sink: StoreSink,
    views: ViewsConfig,
    config: FeaturesConfig,
    progress: bool,
) -> int:
    """Every view of every train image that lacks it, view by view; returns the rows computed."""
    store, views_store = stores
    rows = 0
    for view in range(views.num_views):
        positions, content = missing_views(scan_split, store, views_store, view, config)
        if not positions:
            continue
        restricted = split.restricted(positions, [view_key(c) for c in content])
        sink.begin_views(content, view)
        done, _ = runner.extract_views(
            restricted, sink, dataclasses.replace(views, num_views=view + 1), progress=progress
        )
        rows += done
    return rows


def failure_reasons(split: SplitSource, rows: list[int], resize: Resize) -> list[tuple[int, str]]:
    """(row, the decoder's reason) for each row of `split` at `rows`: why it was left out."""
    if not rows:
        return []
    import tensorflow as tf

    from pipeline.images import decode_and_resize, tf_error_message

    reasons = []
    for record in split.at(rows).records(0):
        try:
            decode_and_resize(record["image"], resize)
            reason = "could not be read"  # decodes alone, so it failed on I/O in the pipeline
        except tf.errors.OpError as err:
            reason = tf_error_message(err)
        reasons.append((int(record["index"]), reason))
    return reasons
