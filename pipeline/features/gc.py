"""`make gc`: drop the store rows no feature file uses any more, and old-format feature files.

A row is live while a current feature file (format 2) in the features folder refers to
its content: its store (`store` attribute) and its /<split>/content_ids, or its views
store (`views_store`) and the train rows' views. Everything else (images deleted from
the folder, views of an augmentation no file uses) is dead. `make gc` compacts every
store to its live rows and deletes views stores no file uses; `make features` compacts
its own store when dead rows pass `contentstore.AUTO_COMPACT_FRACTION` of it, so a
folder that keeps changing does not grow a store without bound. Feature files of
format 1 (keyed by the file list, from before the content store) are deleted by
`make gc`: a current file of the same settings is rebuilt by `make features`.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from pipeline.features.contentstore import AUTO_COMPACT_FRACTION, PLAIN, ContentStore, open_store
from pipeline.features.store import FORMAT_VERSION, VIEWS_SPLIT, group_attrs
from pipeline.locks import exclusive, is_lock_file

log = logging.getLogger(__name__)


@dataclass
class References:
    """Per store folder (relative to the features folder), the keys its feature files use."""

    live: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    failures: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    old_files: list[Path] = field(default_factory=list)


def references(features_dir: Path) -> References:
    """What every feature file in `features_dir` refers to (files being written are skipped)."""
    refs = References()
    for path in sorted(Path(features_dir).glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                attrs = group_attrs(f)
                if attrs.get("format_version") == 1:
                    refs.old_files.append(path)
                    continue
                if attrs.get("format_version") != FORMAT_VERSION or not attrs.get("complete"):
                    continue
                _add_file(f, attrs, refs)
        except OSError as err:
            log.warning("gc: skipping %s, which cannot be read (%s)", path, err)
    return refs


def _add_file(f: h5py.File, attrs: dict, refs: References) -> None:
    store, views_store = attrs.get("store"), attrs.get("views_store")
    for name in f:
        content = f[name]["content_ids"].asstr()[:].tolist() if "content_ids" in f[name] else []
        refs.live[store].update((c, PLAIN) for c in content)
        if name == VIEWS_SPLIT and views_store and "views" in f[name]:
            views = int(f[name]["views"].attrs["num_views"])
            refs.live[views_store].update((c, v) for c in content for v in range(views))
    for name in f:
        for item in group_attrs(f[name]).get("skipped", []):
            refs.failures[store].add(item.get("content_id"))


def _store_of(directory: Path) -> ContentStore:
    """A store opened with the identity its own segments carry (gc knows no config)."""
    import json

    segments = sorted(directory.glob("segment-*.h5")) + sorted(directory.glob("segment-*.h5.partial"))
    with h5py.File(segments[0], "r", swmr=segments[0].name.endswith(".partial")) as f:
        identity = json.loads(f.attrs["identity"])
        dim, dtype = f["rows"]["features"].shape[1], f["rows"]["features"].dtype
    return open_store(directory, identity, feature_dim=dim, dtype=str(dtype))


def compact_if_dead(features_dir: Path, store: ContentStore, views_store: ContentStore | None, live_here) -> None:
    """Compacts the run's stores when dead rows pass `AUTO_COMPACT_FRACTION` of them (under their lock).

    `live_here(store)` counts the store's rows the file just written uses: a lower bound of the live rows.
    """
    refs = None
    for each in (store, views_store):
        if each is None or len(each) - live_here(each) <= AUTO_COMPACT_FRACTION * len(each):
            continue  # even if every other row were dead: no need to read every feature file
        refs = refs or references(features_dir)
        name = each.directory.relative_to(features_dir).as_posix()
        dead = sum(key not in refs.live[name] for key in each.keys())
        if dead > AUTO_COMPACT_FRACTION * len(each):
            kept, dropped = each.compact(refs.live[name], refs.failures[name])
            log.info("Store %s compacted: %d rows kept, %d dropped", name, kept, dropped)


def collect_garbage(features_dir: Path) -> dict[str, int]:
    """`make gc`: every store compacted to its live rows; returns counts for the report."""
    features_dir = Path(features_dir)
    report = {"stores": 0, "rows_kept": 0, "rows_dropped": 0, "views_stores_deleted": 0, "old_files_deleted": 0}
    root = features_dir / "store"
    for directory in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        with exclusive(directory, what="feature store"):
            refs = references(features_dir)  # under the lock: no run of this store is assembling now
            for sub in [directory, *sorted(p for p in directory.glob("views__*") if p.is_dir())]:
                name = sub.relative_to(features_dir).as_posix()
                if sub != directory and not refs.live[name]:
                    shutil.rmtree(sub)
                    report["views_stores_deleted"] += 1
                    continue
                if not any(sub.glob("segment-*")):
                    continue
                kept, dropped = _store_of(sub).compact(refs.live[name], refs.failures[name])
                report["stores"] += 1
                report["rows_kept"] += kept
                report["rows_dropped"] += dropped
    for path in references(features_dir).old_files:
        path.unlink()
        for extra in path.parent.glob(path.name + ".*"):
            if is_lock_file(extra) or extra.name.endswith((".partial", ".tmp")):
                extra.unlink(missing_ok=True)
        report["old_files_deleted"] += 1
    return report
