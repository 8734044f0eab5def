"""The content store: feature rows addressed by the image's content, per model key.

Layout (one folder per model key, see `pipeline.config.store_dir_name`)::

    features/store/<backbone>__<size>px__<pooling>[__<precision>]__<model-key hash>/
        segment-<time>-<pid>-<n>.h5            plain features, one segment per run
        segment-<...>.h5.partial               a run's segment while it writes (or after a kill)
        views__<views-identity hash>/segment-*.h5   augmented views (augmentation + views seed)

A segment is an append-only table (`tables.SEGMENT_COLUMNS`): features, the content id
(`sha256:<hex>` of the file, or `tfds:<name>:<version>:<tfds_id>`) and the view number
(-1 for plain features). Root attributes name the format and the store's identity (the
model key, plus the views identity in a views store); a segment of another identity or
format is refused, never read as this one. Images that could not be decoded are kept as
failures with their reason (`/failures`, JSON), so a broken file is not tried again until
its bytes change.

A segment is written with the feature file's commit protocol: put in place as `.partial`
once opened under SWMR, every batch appended and flushed, then a commit counter advanced
and flushed, so a killed run leaves whole committed batches. The store's writer holds the
lock on the store folder (`pipeline.locks.exclusive`), so a `.partial` it finds belongs to
a dead run: `open_store` turns its committed rows into a finished segment before anything
else (and drops a `.partial.new` that died before its first batch), and the next run
reuses them and writes a new segment.

Rows are never rewritten: an unchanged image keeps the bits it was stored with.
`compact` (run by `make gc`, and automatically when dead rows pass
`AUTO_COMPACT_FRACTION`) copies the rows still referenced into one new segment and
drops the rest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.config import fingerprint
from pipeline.errors import CacheError
from pipeline.features.tables import (
    SEGMENT_COLUMNS,
    UNBORN_SUFFIX,
    Layout,
    append_rows,
    create_table,
    fill_table,
    open_partial,
    read_rows,
    row_chunks,
    stored_rows,
    table_rows,
)

log = logging.getLogger(__name__)

FORMAT = "pipeline-content-store"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
#: A store whose dead rows (referenced by no current feature file) pass this fraction of
#: its rows is compacted at the end of a `make features` run.
AUTO_COMPACT_FRACTION = 0.5
PLAIN = -1  # the `view` of a plain feature row
#: A row's location is `segment << SEGMENT_SHIFT | row`.
SEGMENT_SHIFT = 40
_ROW_MASK = (1 << SEGMENT_SHIFT) - 1
_BLOCK = 4096
#: HDF5's chunk cache per segment while reading rows (the default 1 MiB holds 8 chunks of a 32-wide table).
_READ_CACHE = 64 << 20
_counter = itertools.count()

Key = tuple[str, int]  # (content id, view)


def views_dir(store_dir: Path, views_identity: Mapping[str, Any]) -> Path:
    return Path(store_dir) / f"views__{fingerprint(dict(views_identity))}"


class ContentStore:
    """The rows of one store folder, indexed by view and content id: `located[view][content_id]`
    is the row's location, `segment << SEGMENT_SHIFT | row` (one int, so a split's rows are
    looked up into one array).

    Open with `open_store` while holding the store folder's lock.
    """

    def __init__(self, directory: Path, identity: Mapping[str, Any], *, feature_dim: int, dtype: str) -> None:
        self.directory = Path(directory)
        self.identity = dict(identity)
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self.segments: list[Path] = []
        self.located: dict[int, dict[str, int]] = {}
        self.failures: dict[str, str] = {}
        self._datasets: dict[int, h5py.Dataset] | None = None  # the open segments, inside `reading`

    def __contains__(self, key: Key) -> bool:
        content, view = key
        return content in self.located.get(view, ())

    def __len__(self) -> int:
        return sum(len(where) for where in self.located.values())

    def keys(self) -> Iterator[Key]:
        """Every (content id, view) with a row."""
        for view, where in self.located.items():
            for content in where:
                yield content, view

    def reason(self, content_id: str) -> str | None:
        """Why the image of `content_id` could not be read, or None."""
        return self.failures.get(content_id)

    def locate(self, content_ids: Sequence[str], view: int = PLAIN) -> np.ndarray:
        """`(N,)` int64: the location of each content's row of `view`, -1 where the store has none."""
        where = self.located.get(view, {})
        return np.fromiter(map(where.get, content_ids, itertools.repeat(-1)), np.int64, count=len(content_ids))

    def _index(self) -> None:
        self.segments = []
        self.located, self.failures = {}, {}
        for segment in sorted(self.directory.glob("segment-*.h5")):
            self._add(segment)

    def _add(self, segment: Path) -> None:
        """Indexes one more finished segment (its rows lose to copies already indexed)."""
        number = len(self.segments)
        self.segments.append(segment)
        with self._open(segment) as f:
            table = read_rows(f["rows"], SEGMENT_COLUMNS[2:], 0, table_rows(f["rows"]))
            views = table["view"]
            for view in np.unique(views).tolist():
                rows = np.flatnonzero(views == view)
                content = table["content_ids"][rows].tolist()
                # Reversed, so that the first copy in the segment wins; then the copies indexed before win: stable.
                found = dict(zip(reversed(content), reversed(((number << SEGMENT_SHIFT) + rows).tolist())))
                found.update(self.located.get(view, {}))
                self.located[view] = found
            if "failures" in f:
                for content, reason in json.loads(f["failures"][()]).items():
                    self.failures.setdefault(content, reason)

    def _open(self, segment: Path, **cache) -> h5py.File:
        try:
            f = h5py.File(segment, "r", **cache)
        except OSError as err:
            raise CacheError(
                f"Cannot read store segment {segment} ({str(err).splitlines()[0]}). Delete it; its rows "
                "are extracted again by the next `make features`."
            ) from err
        check_segment(f, segment, self.identity)
        return f

    @contextlib.contextmanager
    def reading(self) -> Iterator[ContentStore]:
        """Keeps every segment open for the reads inside, each with its chunk cache, so the splits
        of an assembly, read one after the other, decompress a chunk they share once."""
        with contextlib.ExitStack() as stack:
            self._datasets = {number: self._features(stack, number) for number in range(len(self.segments))}
            try:
                yield self
            finally:
                self._datasets = None

    def read(self, locations: np.ndarray, *, chunk: int = _BLOCK) -> Iterator[np.ndarray]:
        """The rows at `locations` (from `locate`, none -1), `chunk` at a time: `(<= chunk, D)` in the
        store's dtype, as stored (bit for bit). Each segment is opened once (or kept open by `reading`)."""
        locations = np.asarray(locations, np.int64)
        if len(locations) and locations.min() < 0:
            raise CacheError(
                f"The store {self.directory} lacks {int((locations < 0).sum())} of the rows asked for; the run "
                "that should have made them was interrupted. Rerun `make features`."
            )
        with contextlib.ExitStack() as stack:
            opened = self._datasets
            if opened is None:
                needed = np.unique(locations >> SEGMENT_SHIFT).tolist()
                opened = {number: self._features(stack, number) for number in needed}
            for start in range(0, len(locations), chunk):
                yield self._read(locations[start : start + chunk], opened)

    def _features(self, stack: contextlib.ExitStack, number: int) -> h5py.Dataset:
        """The features of segment `number`, open until `stack` closes, with a chunk cache large enough
        that rows read in another order than stored decompress each chunk once."""
        return stack.enter_context(self._open(self.segments[number], rdcc_nbytes=_READ_CACHE))["rows"]["features"]

    def _read(self, locations: np.ndarray, opened: Mapping[int, h5py.Dataset]) -> np.ndarray:
        out = np.empty((len(locations), self.feature_dim), self.dtype)
        segments, rows_of = locations >> SEGMENT_SHIFT, locations & _ROW_MASK
        for number in np.unique(segments).tolist():
            chosen = np.flatnonzero(segments == number)
            order = chosen[np.argsort(rows_of[chosen], kind="stable")]
            rows = rows_of[order]
            dataset = opened[number]
            start = 0
            while start < len(rows):  # contiguous spans of at most _BLOCK rows, each read once
                stop = int(np.searchsorted(rows, rows[start] + _BLOCK))
                low = int(rows[start])
                out[order[start:stop]] = dataset[low : int(rows[stop - 1]) + 1][rows[start:stop] - low]
                start = stop
        return out

    def writer(self) -> SegmentWriter:
        return SegmentWriter(self)

    @property
    def runtimes_path(self) -> Path:
        return self.directory / "runtimes.json"

    def runtimes(self) -> list[str]:
        """The runtimes that wrote rows of this store, oldest first (`Forward.record()`)."""
        path = self.runtimes_path
        return list(json.loads(path.read_text())) if path.exists() else []

    def add_runtimes(self, runtimes: Sequence[str]) -> None:
        """Records the runtimes of a run that wrote rows here (under the store's lock, atomically)."""
        merged = list(dict.fromkeys([*self.runtimes(), *runtimes]))
        tmp = self.runtimes_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, self.runtimes_path)

    def compact(self, live: set[Key], live_failures: set[str]) -> tuple[int, int]:
        """Keeps only the rows of `live` (and failures of `live_failures`) in one new segment.

        Rows are copied as stored. Returns (rows kept, rows dropped).
        """
        keep = sorted(
            (location, (content, view))
            for view, where in self.located.items()
            for content, location in where.items()
            if (content, view) in live
        )
        dropped = len(self) - len(keep)
        failures = {c: r for c, r in self.failures.items() if c in live_failures}
        if not dropped and len(failures) == len(self.failures) and len(self.segments) <= 1:
            return len(keep), 0
        old = list(self.segments)
        keys = [key for _, key in keep]
        rows = self.read(np.array([location for location, _ in keep], np.int64))
        chunks = (
            (features, np.arange(i, i + len(part)), [k[1] for k in part], [k[0] for k in part])
            for i, features in zip(range(0, len(keys), _BLOCK), rows)
            for part in [keys[i : i + _BLOCK]]
        )
        if keys or failures:
            write_segment(self.directory / new_segment_name(), self.identity, chunks, failures, self.layout(True))
        for segment in old:
            segment.unlink()
        self._index()
        return len(keep), dropped

    def layout(self, finished: bool) -> Layout:
        return Layout(self.feature_dim, self.dtype, finished=finished)


def check_segment(f: h5py.File, path: Path, identity: Mapping[str, Any]) -> None:
    """Refuses a segment of another format or identity: never read as this store's."""
    fmt, version = f.attrs.get("format"), f.attrs.get("format_version")
    stored = f.attrs.get("identity")
    stored = json.loads(stored) if isinstance(stored, (str, bytes)) else None
    if fmt != FORMAT or version != FORMAT_VERSION or stored != json.loads(json.dumps(dict(identity))):
        what = (
            f"format {fmt!r} version {version!r}"
            if fmt != FORMAT or version != FORMAT_VERSION
            else "another model key or views setting"
        )
        raise CacheError(
            f"{path} is not a segment of this feature store ({what}; expected {FORMAT} {FORMAT_VERSION}). "
            f"Delete the folder {path.parent} to rebuild the store."
        )


def new_segment_name() -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"segment-{stamp}-{os.getpid()}-{next(_counter)}.h5"


def _write_root(f: h5py.File, identity: Mapping[str, Any]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["identity"] = json.dumps(dict(identity), sort_keys=True)


def write_segment(
    path: Path, identity: Mapping[str, Any], chunks: Iterable[tuple], failures: Mapping[str, str], layout: Layout
) -> Path:
    """A finished segment from chunks of (features, index, view, content ids), written and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _write_root(f, identity)
        create_table(f.create_group("rows"), SEGMENT_COLUMNS, layout)
        fill_table(f["rows"], SEGMENT_COLUMNS, chunks)
        f.create_dataset("failures", data=json.dumps(dict(failures), sort_keys=True))
    os.replace(tmp, path)
    return path


def _finish_partial(
    partial: Path, identity: Mapping[str, Any], failures: Mapping[str, str], layout: Layout, *, recovered: bool
) -> None:
    """The committed rows of a partial segment (`recovered`: of a killed run) as a finished segment."""
    try:
        old = h5py.File(partial, "r", swmr=True, libver="latest")
    except OSError as err:
        raise CacheError(
            f"Cannot read the unfinished store segment {partial} ({str(err).splitlines()[0]}). Delete it; "
            "its rows are extracted again."
        ) from err
    with old:
        check_segment(old, partial, identity)
        rows = stored_rows(old["rows"], finished=False)
        if rows or failures:
            write_segment(
                partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)]),
                identity,
                row_chunks(old["rows"], SEGMENT_COLUMNS, rows),
                failures,
                layout,
            )
    partial.unlink()
    if rows and recovered:
        log.info("Store %s: %d rows of an interrupted run kept", partial.parent.name, rows)


def open_store(directory: Path, identity: Mapping[str, Any], *, feature_dim: int, dtype: str) -> ContentStore:
    """The store at `directory`, its interrupted segments finished first. Hold the folder's lock."""
    store = ContentStore(directory, identity, feature_dim=feature_dim, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    for unborn in directory.glob("segment-*.h5" + PARTIAL_SUFFIX + UNBORN_SUFFIX):
        unborn.unlink()
    for partial in sorted(directory.glob("segment-*.h5" + PARTIAL_SUFFIX)):
        _finish_partial(partial, identity, {}, store.layout(True), recovered=True)
    store._index()
    return store


class SegmentWriter:
    """Appends rows of one run to a new segment of `store`; a context manager.

    The partial file is created at the first row, so a run with nothing to compute
    leaves nothing behind. On a clean exit the segment is finished (with its failures);
    after an exception the partial stays, and the next `open_store` keeps its rows.
    """

    def __init__(self, store: ContentStore) -> None:
        self.store = store
        self.path = store.directory / new_segment_name()
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.failures: dict[str, str] = {}
        self.rows = 0
        self._file: h5py.File | None = None

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if kind is None:
            self.finish()

    def _start(self) -> h5py.File:
        self._file = open_partial(self.partial, self._create)
        return self._file

    def _create(self, target: Path) -> None:
        with h5py.File(target, "w", libver="latest") as f:
            _write_root(f, self.store.identity)
            create_table(f.create_group("rows"), SEGMENT_COLUMNS, self.store.layout(False))

    def append(self, content_ids: Sequence[str], views: Sequence[int], features: np.ndarray) -> None:
        """Appends one batch and makes it durable before returning."""
        f = self._file or self._start()
        group = f["rows"]
        start = table_rows(group)
        index = np.arange(start, start + len(content_ids), dtype=np.int64)
        append_rows(
            group,
            features.astype(self.store.dtype, copy=False),
            index,
            views,
            list(content_ids),
            columns=SEGMENT_COLUMNS,
        )
        f.flush()
        group["committed"][0] = table_rows(group)
        f.flush()
        self.rows += len(content_ids)

    def fail(self, content_id: str, reason: str) -> None:
        self.failures[content_id] = reason

    def finish(self) -> None:
        if self.partial.exists():
            _finish_partial(self.partial, self.store.identity, self.failures, self.store.layout(True), recovered=False)
        elif self.failures:
            write_segment(self.path, self.store.identity, [], self.failures, self.store.layout(True))
        if self.path.exists():
            self.store._add(self.path)
