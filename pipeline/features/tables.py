"""The row tables inside a feature file: columns, their chunking and compression, appending and reading.

A table is an HDF5 group of equal-length datasets (features, labels, index, ids or view);
`pipeline.features.store` owns the file and its commit protocol, this module the shape of
its tables, and `open_partial`, the one way both writers (`store.FeatureWriter`,
`contentstore.SegmentWriter`) put a partial file in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

_STR = h5py.string_dtype("utf-8")
_COPY_ROWS = 4096
#: A partial file being built, before `open_partial` renames it into place.
UNBORN_SUFFIX = ".new"


def open_partial(partial: Path, build: Callable[[Path], object]) -> h5py.File:
    """The partial file, open for SWMR appends, after `build` has written it under a
    temporary name. It is renamed into place only once in SWMR mode, so a process reading
    the partial file (a progress probe) never holds the lock that the writer's open needs."""
    fresh = partial.with_name(partial.name + UNBORN_SUFFIX)
    build(fresh)
    f = h5py.File(fresh, "a", libver="latest")
    f.swmr_mode = True
    os.replace(fresh, partial)
    return f


@dataclass(frozen=True)
class Layout:
    """How a table is stored: a partial file grows under SWMR in small uncompressed
    chunks; a finished file is written once, in larger gzip chunks."""

    feature_dim: int
    dtype: np.dtype
    finished: bool

    @property
    def feature_chunks(self) -> tuple[int, int]:
        """About 1 MiB of features a chunk, at most 256 (partial) or 1024 (finished) rows."""
        cap = 1024 if self.finished else 256
        return max(1, min(cap, (1 << 20) // (self.feature_dim * self.dtype.itemsize))), self.feature_dim

    def options(self, *, features: bool = False) -> dict[str, Any]:
        if not self.finished:
            return {"chunks": self.feature_chunks if features else (4096,)}
        if features:
            # gzip level 1: nearly level 4's size at two thirds of its time (docs/performance.md).
            return {"chunks": self.feature_chunks, "compression": "gzip", "compression_opts": 1, "shuffle": True}
        return {"chunks": (16384,), "compression": "gzip"}


def extend(dataset: h5py.Dataset, start: int, values) -> None:
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


@dataclass(frozen=True)
class Column:
    """An `(N,)` int64 column of a rows table."""

    name: str

    def create(self, group: h5py.Group, layout: Layout) -> None:
        group.create_dataset(self.name, shape=(0,), maxshape=(None,), dtype=np.int64, **layout.options())

    def datasets(self, group: h5py.Group) -> list[h5py.Dataset]:
        return [group[self.name]]

    def append(self, group: h5py.Group, start: int, values) -> None:
        extend(group[self.name], start, np.asarray(values, np.int64))

    def read(self, group: h5py.Group, start: int, stop: int):
        return group[self.name][start:stop]


@dataclass(frozen=True)
class FeaturesColumn(Column):
    """The `(N, D)` features, in the file's feature dtype."""

    def create(self, group: h5py.Group, layout: Layout) -> None:
        dim = layout.feature_dim
        group.create_dataset(
            self.name, shape=(0, dim), maxshape=(None, dim), dtype=layout.dtype, **layout.options(features=True)
        )

    def append(self, group: h5py.Group, start: int, values) -> None:
        extend(group[self.name], start, values)


@dataclass(frozen=True)
class TextColumn(Column):
    """`(N,)` UTF-8 strings, stored two ways. A finished file holds variable-length
    strings (`name`); a partial file, which SWMR cannot grow with variable-length data,
    holds every string's bytes (`blob`) and where each ends in them (`ends`). Which one
    a group holds is read from the group, so both encodings share one column. Reading
    gives str (finished) or bytes (partial); appending takes either."""

    ends: str = ""
    blob: str = ""

    def _partial(self, group: h5py.Group) -> bool:
        return self.ends in group

    def create(self, group: h5py.Group, layout: Layout) -> None:
        if layout.finished:
            group.create_dataset(self.name, shape=(0,), maxshape=(None,), dtype=_STR, **layout.options())
            return
        for name, dtype in ((self.ends, np.int64), (self.blob, np.uint8)):
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, **layout.options())

    def datasets(self, group: h5py.Group) -> list[h5py.Dataset]:
        return [group[self.ends], group[self.blob]] if self._partial(group) else [group[self.name]]

    def append(self, group: h5py.Group, start: int, values) -> None:
        if not self._partial(group):
            extend(
                group[self.name],
                start,
                np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object),
            )
            return
        encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, count=len(encoded))
        end = int(group[self.ends][start - 1]) if start else 0
        extend(group[self.ends], start, end + np.cumsum(lengths))
        extend(group[self.blob], group[self.blob].shape[0], np.frombuffer(b"".join(encoded), np.uint8))

    def read(self, group: h5py.Group, start: int, stop: int):
        if not self._partial(group):
            return np.array(group[self.name].asstr()[start:stop], dtype=object)
        if stop <= start:
            return []
        ends = group[self.ends][start:stop]
        first = int(group[self.ends][start - 1]) if start else 0
        blob = group[self.blob][first : int(ends[-1])].tobytes()
        bounds = np.concatenate([[0], ends - first])
        return [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


FEATURES = FeaturesColumn("features")


LABELS = Column("labels")


INDEX = Column("index")


IDS = TextColumn("ids", ends="id_ends", blob="id_bytes")


VIEW = Column("view")


CONTENT = TextColumn("content_ids", ends="content_ends", blob="content_bytes")


#: The columns of a split, in the order of the row tuples (features, labels, index, ids).
SPLIT_COLUMNS = (FEATURES, LABELS, INDEX, IDS)


#: The columns of /train/views, in the order of the row tuples (features, labels, index, view).
VIEW_COLUMNS = (FEATURES, LABELS, INDEX, VIEW)


#: The columns of a content-store segment (features, index, view, content_ids): `index` is the
#: row's place in the run that wrote it, `view` -1 for plain features or the view number.
SEGMENT_COLUMNS = (FEATURES, INDEX, VIEW, CONTENT)


def create_table(group: h5py.Group, columns: Sequence[Column], layout: Layout) -> None:
    """The empty columns; a partial table also gets its commit counter."""
    for column in columns:
        column.create(group, layout)
    if not layout.finished:
        group.create_dataset("committed", data=np.zeros(1, np.int64))


def table_rows(group: h5py.Group) -> int:
    """Rows appended to a table (committed or not)."""
    return group[INDEX.name].shape[0]


def stored_rows(group: h5py.Group, *, finished: bool) -> int:
    """The rows of a table worth reading: all of a finished file's, the committed ones of a partial one's."""
    return table_rows(group) if finished else int(group["committed"][0])


def append_rows(group: h5py.Group, *values, columns: Sequence[Column] = SPLIT_COLUMNS) -> None:
    """Appends one batch: `values` in the order of `columns`."""
    if len(values) != len(columns):
        raise ValueError(
            f"Expected {len(columns)} columns ({', '.join(c.name for c in columns)}). Received {len(values)}."
        )
    start = table_rows(group)
    for column, value in zip(columns, values):
        column.append(group, start, value)


def read_rows(group: h5py.Group, columns: Sequence[Column], start: int, stop: int) -> dict[str, Any]:
    """Rows start..stop-1 of `columns`, by column name."""
    return {column.name: column.read(group, start, stop) for column in columns}


def row_chunks(group: h5py.Group, columns: Sequence[Column], stop: int) -> Iterator[tuple]:
    """Rows 0..stop-1 as tuples in the order of `columns`, `_COPY_ROWS` at a time (flat memory)."""
    for start in range(0, stop, _COPY_ROWS):
        yield tuple(read_rows(group, columns, start, min(stop, start + _COPY_ROWS)).values())


def fill_table(group: h5py.Group, columns: Sequence[Column], chunks: Iterable[tuple]) -> int:
    """Appends every chunk of rows to a table; returns its rows."""
    for chunk in chunks:
        append_rows(group, *chunk, columns=columns)
    return table_rows(group)
