"""The scan: what the data holds now, as (split, id, label, content id) rows.

Features are stored by content (`pipeline.features.contentstore`); which rows form which
split with which label is decided here, from the current listing, every run. An image
folder is listed by `scan_folder` (its layouts, carving and seeds) and each file's
content id comes from the stat cache (`pipeline.features.statcache`), so a no-op scan
reads no image and imports no TensorFlow. A tensorflow-datasets split is read once for
its ids and labels; a tfds version is immutable, so `tfds:<name>:<version>:<tfds_id>`
names the image's content.

`Scan.fingerprint` covers everything an assembled feature file depends on besides
the model: class names, split specs, and every row's id, label and content id. A
feature file recording the same fingerprint is current.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import MAX_VIEW_POSITION, DataConfig
from pipeline.features.sources import FolderScan, scan_folder
from pipeline.features.statcache import content_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanSplit:
    """One split as listed now: per row its id (path or tfds_id), label and content id."""

    spec: str
    ids: list[str]
    labels: np.ndarray  # (N,) int64
    content_ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Scan:
    """The data as it is now; `hashed` counts the files whose bytes were read to name them."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, ScanSplit]
    hashed: int = 0
    version: str | None = None  # a tfds dataset's version; folders are versioned by the scan itself
    #: The folder listing (`sources.FolderScan`) the scan was made from; None for tfds.
    listing: Any = field(default=None, compare=False, repr=False)

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        return {
            name: {self.class_names[k]: n for k, n in sorted(Counter(split.labels.tolist()).items())}
            for name, split in self.splits.items()
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256("\t".join(self.class_names).encode())
        for name, split in self.splits.items():
            digest.update(f"\n#{name}\t{split.spec}\n".encode())
            lines = (f"{i}\t{l}\t{c}" for i, l, c in zip(split.ids, split.labels.tolist(), split.content_ids))
            digest.update("\n".join(lines).encode())
        return "scan-sha256:" + digest.hexdigest()[:32]

    def unique_content(self) -> list[str]:
        """Every content id of the scan once, in split and row order."""
        return list(dict.fromkeys(c for split in self.splits.values() for c in split.content_ids))


def view_key(content_id: str) -> int:
    """The number an augmented view's randomness derives from: a hash of the content id in
    [0, MAX_VIEW_POSITION), so a view follows the image wherever it moves."""
    return int.from_bytes(hashlib.sha256(content_id.encode()).digest()[:8], "big") % MAX_VIEW_POSITION


def scan_data(config: DataConfig, *, seed: int, cache_dir: Path) -> Scan:
    """The `Scan` of an image folder (stat cache under `cache_dir`) or of a tfds dataset."""
    if config.data_dir is None:
        return _scan_tfds(config)
    listing = scan_folder(config, seed=seed)
    paths = [path for entries in listing.splits.values() for path, _ in entries]
    unique = list(dict.fromkeys(paths))
    ids, sizes, hashed, unreadable = content_ids(listing.root, unique, cache_dir=cache_dir)
    listing = dataclasses.replace(listing, sizes=dict(zip(unique, sizes)))  # its fingerprint stats nothing again
    if unreadable:
        listing = _without_unreadable(listing, unreadable)
    by_path = dict(zip(unique, ids))
    if hashed:
        log.info("scan: %d of %d files hashed (new or changed)", hashed, len(unique))
    splits = {
        name: ScanSplit(
            spec=f"folder:{listing.layout}:{name}",
            ids=[p for p, _ in entries],
            labels=np.fromiter((l for _, l in entries), np.int64, count=len(entries)),
            content_ids=[by_path[p] for p, _ in entries],
        )
        for name, entries in listing.splits.items()
    }
    return Scan(
        name=listing.root.resolve().name,
        class_names=listing.class_names,
        splits=splits,
        hashed=hashed,
        listing=listing,
    )


def _without_unreadable(listing: FolderScan, unreadable: dict[str, str]) -> FolderScan:
    """The listing without the files that cannot be read, and a warning that counts them."""
    first = ", ".join(f"{path} ({why})" for path, why in list(unreadable.items())[:3])
    warning = (
        f"{len(unreadable)} {'file' if len(unreadable) == 1 else 'files'} of the listing cannot be read, "
        f"so {'is' if len(unreadable) == 1 else 'are'} left out (first: {first}). Fix the links, or remove them."
    )
    return dataclasses.replace(
        listing,
        splits={name: [e for e in entries if e[0] not in unreadable] for name, entries in listing.splits.items()},
        sizes={path: size for path, size in listing.sizes.items() if path not in unreadable},
        warnings=(*listing.warnings, warning),
    )


def _scan_tfds(config: DataConfig) -> Scan:
    """Reads every split's ids and labels once (images stay encoded and are dropped)."""
    import tensorflow as tf

    from pipeline.features.tfds_data import tfds_source

    source = tfds_source(config)
    splits = {}
    for name, split in source.splits.items():
        ids: list[str] = []
        labels: list[np.ndarray] = []
        pairs = split.records(0).map(tf.autograph.experimental.do_not_convert(lambda r: (r["id"], r["label"])))
        for batch_ids, batch_labels in pairs.batch(4096):
            ids += [i.decode() for i in batch_ids.numpy().tolist()]
            labels.append(batch_labels.numpy())
        prefix = f"tfds:{config.dataset}:{source.version}:"
        splits[name] = ScanSplit(
            spec=split.spec,
            ids=ids,
            labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
            content_ids=[prefix + i for i in ids],
        )
    return Scan(name=source.name, class_names=source.class_names, splits=splits, version=source.version)
