"""The HDF5 feature store: self-describing files that survive interruption.

Schema of a finished file (readable with plain h5py, docs/features.md)::

    /                      attrs: format_version, complete, key (JSON), config (JSON),
                                  class_names, backbone, weights, image_size, pooling,
                                  preprocessing, dataset, dataset_version, splits (JSON),
                                  seed, feature_dim, dtype, package_version, created, runtimes,
                                  scan, store, views_store, num_rows, num_skipped
    /<split>/features      (N, D) float32 or float16, chunked, gzip
    /<split>/labels        (N,) int64, index into class_names
    /<split>/ids           (N,) UTF-8 strings: path relative to the image folder, or tfds_id
    /<split>/index         (N,) int64: the example's position in the full split
    /<split>/content_ids   (N,) UTF-8: the row's address in the content store (`sha256:<hex>` of
                           the file, or `tfds:<name>:<version>:<tfds_id>`)
    /<split>               attrs: spec, num_inputs, num_skipped, skipped (JSON list of
                                  {index, id, reason})
    /train/views/features  (K*N, D) augmented views of the train rows, view-major: row
                           v*N + r is view v of train row r (only with AUG_VIEWS=K)
    /train/views/labels    (K*N,) int64, the label of the source row
    /train/views/index     (K*N,) int64, the source example's `index`
    /train/views/view      (K*N,) int64, the view number v in [0, K)
    /train/views           attrs: num_views, seed, augment (JSON), config (JSON),
                                  seconds, seconds_per_view, bytes, bytes_per_view

Writing goes to `<name>.partial` in HDF5's SWMR mode, readable however the writer dies;
every batch is appended and flushed, then a commit counter is advanced and flushed, so
the rows up to the counter are always whole batches. The finished file is written
afresh and renamed into place: a file at the final path is always complete.

Format 2 (this one) is an assembly: `pipeline.features.extract` materializes it from
the content store (`pipeline.features.contentstore`) for the current scan and records
the scan's fingerprint (`scan`), the store folder (`store`, `views_store`) and the row
count (`num_rows`). Format-1 files (features keyed by the file list) are refused with a
message saying how to rebuild them.

Views are not part of the key. Adding views to a finished file copies its rows into a
new partial file (nothing is recomputed), appends the views there with the same
commit protocol, and replaces the finished file at the end; views with another
augmentation or seed are never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import CacheError
from pipeline.features.tables import (
    FEATURES,
    IDS,
    INDEX,
    LABELS,
    SPLIT_COLUMNS,
    VIEW,
    VIEW_COLUMNS,
    Column,
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

FORMAT_VERSION = 2
PARTIAL_SUFFIX = ".partial"
_STR = h5py.string_dtype("utf-8")
#: The only split that gets augmented views; validation and test are never augmented.
VIEWS_SPLIT = "train"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class SplitArrays:
    """One split's rows, in memory."""

    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) object array of str
    index: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FeatureSet:
    """A finished feature file, loaded: its attributes and every split's rows."""

    path: Path
    attrs: dict[str, Any]
    splits: dict[str, SplitArrays]
    split_attrs: dict[str, dict[str, Any]]
    #: The attributes of /train/views (num_views, seed, augment, ...); None without views.
    view_attrs: dict[str, Any] | None = None

    @property
    def num_views(self) -> int:
        return int(self.view_attrs["num_views"]) if self.view_attrs else 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.attrs["class_names"])

    @property
    def key(self) -> dict[str, Any]:
        return self.attrs["key"]

    @property
    def config(self) -> dict[str, Any]:
        return self.attrs["config"]


# --- tables -------------------------------------------------------------------------
#
# A split and its views are both tables of rows: one column spec each, and one
# create/append/read path for both, in a partial file (grown under SWMR) or a finished one.


# --- writing ------------------------------------------------------------------------


class FeatureWriter:
    """Appends feature batches to a partial file and turns it into a finished one.

    Use as a context manager; `committed(split)` tells where to resume. `attrs` must
    hold a JSON-able `key`: a partial file with another key is refused, not mixed.

    `views` (the attributes of /train/views: `num_views`, `seed`, `augment`,
    `config`) adds a views table, filled by `append_views`. `extend` names a finished
    file whose rows (and views of the same augmentation and seed) seed a new partial
    file, so views can be added without recomputing anything.
    """

    def __init__(
        self,
        path: Path,
        *,
        attrs: Mapping[str, Any],
        splits: Mapping[str, Mapping[str, Any]],
        feature_dim: int,
        dtype: str,
        views: Mapping[str, Any] | None = None,
        extend: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.attrs = dict(attrs)
        self.split_attrs = {name: dict(a) for name, a in splits.items()}
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self.views = dict(views) if views else None
        if self.views is not None and VIEWS_SPLIT not in self.split_attrs:
            raise CacheError(
                f"Augmented views need a '{VIEWS_SPLIT}' split. Received splits: {', '.join(self.split_attrs)}."
            )
        self.extend = Path(extend) if extend is not None else None
        self._file: h5py.File | None = None

    def __enter__(self) -> FeatureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self._file = open_partial(self.partial, self._recover)
        elif self.extend is not None:
            self._file = open_partial(self.partial, lambda fresh: self._recover(fresh, self.extend))
        else:
            self._file = open_partial(self.partial, self._create)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _create(self, target: Path) -> Path:
        layout = Layout(self.feature_dim, self.dtype, finished=False)
        with h5py.File(target, "w", libver="latest") as f:
            _write_attrs(f.attrs, {**self.attrs, "complete": False})
            for name, split_attrs in self.split_attrs.items():
                group = f.create_group(name)
                _write_attrs(group.attrs, split_attrs)
                create_table(group, SPLIT_COLUMNS, layout)
            if self.views is not None:
                views = f[VIEWS_SPLIT].create_group("views")
                _write_attrs(views.attrs, self.views)
                create_table(views, VIEW_COLUMNS, layout)
                views.create_dataset("seconds", data=np.zeros(1, np.float64))
        return target

    def _recover(self, fresh: Path, source: Path | None = None) -> None:
        """Copies the committed rows of a partial file (perhaps crashed) into `fresh`.

        With `source`, a finished file is copied instead (to add views to it).
        """
        finished = source is not None
        source = source if finished else self.partial
        try:
            old = h5py.File(source, "r", swmr=not finished, libver="latest")
        except OSError as err:
            raise CacheError(
                f"Cannot read the {'feature' if finished else 'unfinished feature'} file {source} ({err}). "
                "Delete it to start over."
            ) from err
        with old:
            stored = _read_attrs(old.attrs).get("key")
            if stored != self.attrs["key"]:
                raise CacheError(
                    f"The {'feature' if finished else 'unfinished feature'} file {source} was started with other "
                    f"settings ({key_diff(stored, self.attrs['key'])}); it is not mixed "
                    "with this run. Delete it, or rerun with its settings."
                )
            self._create(fresh)
            with h5py.File(fresh, "a", libver="latest") as new:
                for name in self.split_attrs:
                    rows = stored_rows(old[name], finished=finished) if name in old else 0
                    new[name]["committed"][0] = fill_table(
                        new[name], SPLIT_COLUMNS, row_chunks(old[name], SPLIT_COLUMNS, rows)
                    )
                    log.info(
                        "%s %s: %d %s rows already written",
                        "Extending" if finished else "Resuming",
                        self.path.name,
                        rows,
                        name,
                    )
                self._carry_views(old, new, source, finished=finished)

    def _carry_views(self, old: h5py.File, new: h5py.File, source: Path, *, finished: bool) -> None:
        """Copies the views of `old` that this run can keep: same augmentation and seed.

        Views of another augmentation or seed are refused, never mixed; views beyond
        the `num_views` asked are dropped (they are recomputed identically if asked again).
        """
        group = old[VIEWS_SPLIT].get("views") if VIEWS_SPLIT in old else None
        if group is None:
            return
        stored = _read_attrs(group.attrs)
        rows = stored_rows(group, finished=finished)
        if self.views is None:
            if rows:
                log.info("Dropping %d view rows of %s: no views asked in this run.", rows, source.name)
            return
        if views_identity(stored) != views_identity(self.views):
            raise CacheError(
                f"{source} holds views made with other settings "
                f"({key_diff(views_identity(stored), views_identity(self.views))}); they are never "
                "mixed. Rerun with its AUG_* settings and SEED, or delete the file to rebuild."
            )
        rows = min(rows, int(self.views["num_views"]) * int(new[VIEWS_SPLIT]["committed"][0]))
        target = new[VIEWS_SPLIT]["views"]
        target["committed"][0] = fill_table(target, VIEW_COLUMNS, row_chunks(group, VIEW_COLUMNS, rows))
        target["seconds"][0] = float(stored.get("seconds", 0.0)) if finished else float(group["seconds"][0])
        log.info("%s %s: %d view rows already written", "Extending" if finished else "Resuming", self.path.name, rows)

    def committed(self, split: str) -> tuple[int, int]:
        """(rows written, last written `index` or -1) for `split`."""
        group = self._file[split]
        n = int(group["committed"][0])
        return n, int(group["index"][n - 1]) if n else -1

    def written_index(self, split: str) -> np.ndarray:
        """The `index` of every committed row of `split`."""
        n, _ = self.committed(split)
        return self._file[split]["index"][:n]

    def views_committed(self) -> int:
        """View rows written so far (view-major: row v*N + r is view v of train row r)."""
        return int(self._file[VIEWS_SPLIT]["views"]["committed"][0])

    def append_views(
        self, features: np.ndarray, labels: np.ndarray, index: np.ndarray, view: np.ndarray, seconds: float
    ) -> None:
        """Appends one batch of views, adds the `seconds` it took, and makes both durable."""
        self._commit(
            self._file[VIEWS_SPLIT]["views"],
            VIEW_COLUMNS,
            (features.astype(self.dtype, copy=False), labels, index, view),
            seconds=seconds,
        )

    def append(
        self, split: str, features: np.ndarray, labels: np.ndarray, index: np.ndarray, ids: Sequence[bytes]
    ) -> None:
        """Appends one batch and makes it durable before returning."""
        self._commit(self._file[split], SPLIT_COLUMNS, (features.astype(self.dtype, copy=False), labels, index, ids))

    def _commit(
        self, group: h5py.Group, columns: Sequence[Column], values: tuple, *, seconds: float | None = None
    ) -> None:
        """Appends and flushes a batch, then advances the commit counter (and the seconds
        spent) and flushes again, so the rows up to the counter are always whole batches."""
        append_rows(group, *values, columns=columns)
        self._file.flush()
        if seconds is not None:
            group["seconds"][0] = float(group["seconds"][0]) + seconds
        group["committed"][0] = table_rows(group)
        self._file.flush()

    def finish(self, skipped: Mapping[str, list[dict[str, Any]]]) -> Path:
        """Writes the finished file from the partial one and removes the partial."""
        self.__exit__()
        self.attrs["num_skipped"] = sum(len(items) for items in skipped.values())
        with h5py.File(self.partial, "r", libver="latest") as old:
            splits = {}
            for name, split_attrs in self.split_attrs.items():
                items = skipped.get(name, [])
                splits[name] = (
                    row_chunks(old[name], SPLIT_COLUMNS, stored_rows(old[name], finished=False)),
                    {**split_attrs, "num_skipped": len(items), "skipped": items},
                )
            views = None
            if self.views is not None:
                group = old[VIEWS_SPLIT]["views"]
                rows = stored_rows(group, finished=False)
                expected = int(self.views["num_views"]) * int(old[VIEWS_SPLIT]["committed"][0])
                if rows != expected:
                    raise CacheError(
                        f"{self.partial} holds {rows} view rows, expected {expected}; "
                        "rerun the same command to finish them."
                    )
                seconds = float(group["seconds"][0])
                views = (
                    row_chunks(group, VIEW_COLUMNS, rows),
                    {
                        **self.views,
                        "seconds": round(seconds, 3),
                        "seconds_per_view": round(seconds / int(self.views["num_views"]), 3),
                    },
                )
            write_features(
                self.path, attrs=self.attrs, splits=splits, feature_dim=self.feature_dim, dtype=self.dtype, views=views
            )
        self.partial.unlink()
        return self.path


def views_identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two sets of views compatible, from their attributes (as `ViewsConfig.identity`)."""
    return {"augment": attrs.get("augment"), "seed": attrs.get("seed")}


def write_features(
    path: Path,
    *,
    attrs: Mapping[str, Any],
    splits: Mapping[str, tuple[Iterable[tuple], Mapping[str, Any]]],
    feature_dim: int,
    dtype: np.dtype,
    views: tuple[Iterable[tuple], Mapping[str, Any]] | None = None,
    content_ids: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Writes a finished file from per-split chunks of (features, labels, index, ids).

    `content_ids`: per split, every row's content id (the /<split>/content_ids column).

    `views`: chunks of (features, labels, index, view) and the attributes of
    /train/views, whose storage size (`bytes`, `bytes_per_view`) is measured here.
    Written under a temporary name and renamed, so the final path never holds a
    half-written file; memory stays flat because rows arrive in chunks.
    """
    layout = Layout(feature_dim, np.dtype(dtype), finished=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _write_attrs(f.attrs, {**attrs, "complete": False})
        for name, (chunks, split_attrs) in splits.items():
            group = f.create_group(name)
            _write_attrs(group.attrs, split_attrs)
            create_table(group, SPLIT_COLUMNS, layout)
            fill_table(group, SPLIT_COLUMNS, chunks)
            if content_ids is not None:
                ids = np.array(list(content_ids[name]), dtype=object)
                chunks = (max(1, min(16384, len(ids))),)
                group.create_dataset(
                    "content_ids", data=ids, dtype=_STR, maxshape=(None,), chunks=chunks, compression="gzip"
                )
        if views is not None:
            chunks, view_attrs = views
            group = f[VIEWS_SPLIT].create_group("views")
            create_table(group, VIEW_COLUMNS, layout)
            fill_table(group, VIEW_COLUMNS, chunks)
            stored = sum(d.id.get_storage_size() for c in VIEW_COLUMNS for d in c.datasets(group))
            num_views = int(view_attrs["num_views"])
            _write_attrs(
                group.attrs, {**view_attrs, "bytes": int(stored), "bytes_per_view": int(round(stored / num_views))}
            )
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


# --- reading ------------------------------------------------------------------------


def _write_attrs(target: h5py.AttributeManager, values: Mapping[str, Any]) -> None:
    """Scalars and string lists as native HDF5 attributes; anything nested as JSON."""
    for name, value in values.items():
        if isinstance(value, (dict, list, tuple)) and not _is_str_list(value):
            target[name] = json.dumps(value, sort_keys=True)
        elif _is_str_list(value):
            target.create(name, data=list(value), dtype=_STR)
        elif value is None:
            target[name] = "null"
        else:
            target[name] = value


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


_JSON_ATTRS = frozenset({"key", "config", "splits", "skipped", "class_counts", "augment"})


def _read_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, np.generic):
            value = value.item()
        if name in _JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, str) and value == "null":
            value = None
        out[name] = value
    return out


def group_attrs(group: h5py.Group | h5py.File) -> dict[str, Any]:
    """The attributes of an open group (or file) of a feature file, JSON ones decoded."""
    return _read_attrs(group.attrs)


def read_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of a feature file (finished or not)."""
    with h5py.File(path, "r", swmr=path.name.endswith(PARTIAL_SUFFIX)) as f:
        return _read_attrs(f.attrs)


def read_features(
    path: Path,
    *,
    expect: Mapping[str, Any] | None = None,
    splits: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> FeatureSet:
    """Loads a finished feature file, refusing incomplete or unexpected ones.

    `splits` are the splits to load (default: all), less those in `exclude` (read
    those with `open_rows`, block by block).

    `expect` maps key fields (see `FeaturesConfig.key`) to the values the caller
    needs; any difference raises `CacheError` naming each field, so stage 2 never
    trains on features built with another backbone, size or dataset.
    """
    path = Path(path)
    if not path.exists():
        hint = (
            " An unfinished file is beside it: rerun `make features` with the same variables to resume."
            if partial_path(path).exists()
            else " Run `make features` with the same variables first."
        )
        raise CacheError(f"Feature file not found: {path}.{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"Cannot open feature file {path}: {err}. Delete it and rerun `make features`.") from err
    with f:
        attrs = _read_attrs(f.attrs)
        check_format(path, attrs)
        if not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{path} is not a complete feature file of format {FORMAT_VERSION} "
                f"(complete={attrs.get('complete')}, format_version={attrs.get('format_version')}). "
                "Delete it and rerun `make features`."
            )
        if expect:
            diff = key_diff(attrs["key"], {**attrs["key"], **expect})
            if diff:
                raise CacheError(
                    f"{path} was built with other settings than asked: {diff}. Run "
                    "`make features` with the settings you want, or change them to match."
                )
        wanted = [k for k in (list(splits) if splits is not None else f.keys()) if k not in exclude]
        missing = [s for s in wanted if s not in f]
        if missing:
            raise CacheError(f"{path} has no split {', '.join(missing)}. Available: {', '.join(f.keys())}.")
        loaded = {name: SplitArrays(**read_rows(f[name], SPLIT_COLUMNS, 0, table_rows(f[name]))) for name in wanted}
        split_attrs = {name: _read_attrs(f[name].attrs) for name in wanted}
        view_attrs = _view_attrs(f)
    return FeatureSet(path=path, attrs=attrs, splits=loaded, split_attrs=split_attrs, view_attrs=view_attrs)


def check_format(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuses a feature file of the first format (rows keyed by the file list) in one line."""
    if attrs.get("format_version") == 1:
        raise CacheError(
            f"{path} is a feature file of format 1 (an older version, features keyed by the file list). "
            "Rerun `make features` with the same variables to rebuild it in format 2; `make gc` then deletes it."
        )


def read_content_ids(path: Path, split: str) -> np.ndarray:
    """The content id of every row of `split` of a finished feature file (object array of str)."""
    with h5py.File(path, "r") as f:
        return np.array(f[split]["content_ids"].asstr()[:], dtype=object)


def read_view_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes of a finished file's /train/views, or None when it has no views."""
    with h5py.File(path, "r") as f:
        return _view_attrs(f)


def _view_attrs(f: h5py.File) -> dict[str, Any] | None:
    views = f[VIEWS_SPLIT].get("views") if VIEWS_SPLIT in f else None
    return _read_attrs(views.attrs) if views is not None else None


def load_views(cached: FeatureSet, count: int) -> np.ndarray:
    """The first `count` augmented views of the train rows of `cached`: `(count, N, D)`.

    `views[v, r]` is view v of train row r, so `cached.splits["train"].labels[r]` is
    its label. The stored source index, view number and label of every row are
    checked against the train split, so a view can never be paired with the wrong
    example.
    """
    if count > cached.num_views:
        raise CacheError(
            f"{cached.path} has {cached.num_views} augmented views, {count} asked. "
            f"Run `make features AUG_VIEWS={count}` with the same settings first."
        )
    train = cached.splits.get(VIEWS_SPLIT)
    if train is None:
        raise CacheError(f"Views belong to the '{VIEWS_SPLIT}' split; load it too (splits=None).")
    n = len(train)
    if count == 0:
        return np.zeros((0, n, train.features.shape[1]), train.features.dtype)
    with h5py.File(cached.path, "r") as f:
        table = read_rows(f[VIEWS_SPLIT]["views"], VIEW_COLUMNS, 0, count * n)
        features = table["features"].reshape(count, n, -1)
        index, view, labels = (table[c].reshape(count, n) for c in ("index", "view", "labels"))
    if not (
        (index == train.index).all() and (labels == train.labels).all() and (view == np.arange(count)[:, None]).all()
    ):
        raise CacheError(
            f"{cached.path}: the stored views do not line up with the train rows (source index, "
            "label or view number differ). The file is inconsistent; rebuild it."
        )
    return features


@dataclass(frozen=True)
class FeatureRows:
    """One split's rows left in a finished file, read a block at a time.

    For training on more rows than fit in memory: labels, index and ids are in
    memory (tens of bytes a row), features and augmented views stay in the file.
    `rows` are the file rows used, sorted (a few-shot subset, or all of them);
    `num_views` is how many augmented views of each row come with it (train only).
    `read(start, stop)` gives float32 `(num_views + 1, stop - start, D)`: version 0 is
    the plain features, version v + 1 view v, of the used rows start..stop-1.
    """

    path: Path
    split: str
    rows: np.ndarray  # (n,) int64 file rows, sorted
    labels: np.ndarray  # (n,) int64
    index: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) object array of str
    n_features: int
    file_rows: int  # rows of the split in the file: the stride of the view-major views table
    block_rows: int  # rows per stored chunk: the unit worth reading at once
    num_views: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """The float32 size of the used rows and their views: what loading them would take."""
        return len(self) * (self.num_views + 1) * self.n_features * 4

    def select(self, rows: np.ndarray) -> FeatureRows:
        """The rows at positions `rows` (sorted) of this selection."""
        rows = np.asarray(rows, np.int64)
        return dataclasses.replace(
            self, rows=self.rows[rows], labels=self.labels[rows], index=self.index[rows], ids=self.ids[rows]
        )

    def with_views(self, count: int) -> FeatureRows:
        """The same rows with their first `count` augmented views, checked against the rows like `load_views`."""
        if count == 0:
            return dataclasses.replace(self, num_views=0)
        with h5py.File(self.path, "r") as f:
            group = f[self.split].get("views")
            have = int(group.attrs["num_views"]) if group is not None else 0
            if count > have:
                raise CacheError(
                    f"{self.path} has {have} augmented views, {count} asked. "
                    f"Run `make features AUG_VIEWS={count}` with the same settings first."
                )
            rows = read_rows(f[self.split], (LABELS, INDEX), 0, self.file_rows)
            for v in range(count):
                stored = read_rows(group, (LABELS, INDEX, VIEW), v * self.file_rows, (v + 1) * self.file_rows)
                if not (
                    (stored["index"] == rows["index"]).all()
                    and (stored["labels"] == rows["labels"]).all()
                    and (stored["view"] == v).all()
                ):
                    raise CacheError(
                        f"{self.path}: the stored views do not line up with the train rows (source index, "
                        "label or view number differ). The file is inconsistent; rebuild it."
                    )
        return dataclasses.replace(self, num_views=count)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Float32 `(num_views + 1, stop - start, D)`: every version of the used rows start..stop-1."""
        rows = self.rows[start:stop]
        if not len(rows):
            return np.zeros((self.num_views + 1, 0, self.n_features), np.float32)
        low, high = int(rows[0]), int(rows[-1]) + 1
        picked = rows - low
        with h5py.File(self.path, "r") as f:
            group = f[self.split]
            out = np.empty((self.num_views + 1, len(rows), self.n_features), np.float32)
            out[0] = FEATURES.read(group, low, high)[picked]
            for v in range(self.num_views):
                offset = v * self.file_rows
                out[v + 1] = FEATURES.read(group["views"], offset + low, offset + high)[picked]
        return out

    def load(self) -> tuple[SplitArrays, np.ndarray | None]:
        """The used rows in memory, and their views as `(num_views, n, D)` (None without views)."""
        parts = [
            self.read(a, min(a + self.block_rows * 16, len(self))) for a in range(0, len(self), self.block_rows * 16)
        ]
        table = (
            np.concatenate(parts, axis=1) if parts else np.zeros((self.num_views + 1, 0, self.n_features), np.float32)
        )
        arrays = SplitArrays(features=table[0], labels=self.labels, ids=self.ids, index=self.index)
        return arrays, (table[1:] if self.num_views else None)


def open_rows(path: Path, split: str) -> FeatureRows:
    """The rows of `split` of a finished feature file, left in the file (see `FeatureRows`)."""
    with h5py.File(path, "r") as f:
        if split not in f:
            raise CacheError(f"{path} has no split {split}. Available: {', '.join(f.keys())}.")
        group = f[split]
        features = group[FEATURES.name]
        n = table_rows(group)
        return FeatureRows(
            path=Path(path),
            split=split,
            rows=np.arange(n, dtype=np.int64),
            **read_rows(group, (LABELS, INDEX, IDS), 0, n),
            n_features=int(features.shape[1]),
            file_rows=n,
            block_rows=int(features.chunks[0]) if features.chunks else 1024,
        )


def key_diff(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str:
    stored = stored or {}
    fields = sorted(set(stored) | set(wanted))
    parts = [
        f"{name}: file has {stored.get(name)!r}, asked {wanted.get(name)!r}"
        for name in fields
        if stored.get(name) != wanted.get(name)
    ]
    return "; ".join(parts)


# --- shards -------------------------------------------------------------------------
