"""The HDF5 feature store: self-describing files that survive interruption.

Schema of a finished file (readable with plain h5py, see README.md)::

    /                      attrs: format_version, complete, key (JSON), config (JSON),
                                  class_names, backbone, weights, image_size, pooling,
                                  preprocessing, dataset, dataset_version, splits (JSON),
                                  seed, feature_dim, dtype, package_version, created,
                                  shard_index, num_shards, num_skipped
    /<split>/features      (N, D) float32 or float16, chunked, gzip
    /<split>/labels        (N,) int64, index into class_names
    /<split>/ids           (N,) UTF-8 strings: path relative to the image folder, or tfds_id
    /<split>/index         (N,) int64: the example's position in the full split
    /<split>               attrs: spec, num_inputs, num_skipped, skipped (JSON list of
                                  {index, id, reason})

Writing goes to `<name>.partial`, opened in HDF5's SWMR mode, which keeps the file
readable however the writer dies (Ctrl-C, kill -9, power loss); every batch is
appended and flushed, then a commit counter is advanced and flushed, so the rows up
to the counter are always whole batches. HDF5 cannot reopen a crashed SWMR file
for writing, so resuming copies the committed rows into a fresh partial file. The
finished file is written afresh (no SWMR, so older readers can open it) and renamed
into place: a file at the final path is always complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from pipeline.errors import CacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_COPY_ROWS = 4096
_STR = h5py.string_dtype("utf-8")


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

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.attrs["class_names"])

    @property
    def key(self) -> dict[str, Any]:
        return self.attrs["key"]

    @property
    def config(self) -> dict[str, Any]:
        return self.attrs["config"]


# --- writing ------------------------------------------------------------------------


class FeatureWriter:
    """Appends feature batches to a partial file and turns it into a finished one.

    Use as a context manager; `committed(split)` tells where to resume. `attrs` must
    hold a JSON-able `key`: a partial file with another key is refused, not mixed.
    """

    def __init__(
        self,
        path: Path,
        *,
        attrs: Mapping[str, Any],
        splits: Mapping[str, Mapping[str, Any]],
        feature_dim: int,
        dtype: str,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.attrs = dict(attrs)
        self.split_attrs = {name: dict(a) for name, a in splits.items()}
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self._file: h5py.File | None = None

    def __enter__(self) -> FeatureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self._recover()
        else:
            self._create(self.partial)
        self._file = h5py.File(self.partial, "a", libver="latest")
        self._file.swmr_mode = True
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _create(self, target: Path) -> h5py.File:
        with h5py.File(target, "w", libver="latest") as f:
            _write_attrs(f.attrs, {**self.attrs, "complete": False})
            for name, split_attrs in self.split_attrs.items():
                group = f.create_group(name)
                _write_attrs(group.attrs, split_attrs)
                chunk_rows = max(1, min(256, (1 << 20) // (self.feature_dim * self.dtype.itemsize)))
                group.create_dataset(
                    "features", shape=(0, self.feature_dim), maxshape=(None, self.feature_dim),
                    dtype=self.dtype, chunks=(chunk_rows, self.feature_dim),
                )
                for name_, dtype in (("labels", np.int64), ("index", np.int64), ("id_ends", np.int64), ("id_bytes", np.uint8)):
                    group.create_dataset(name_, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
                group.create_dataset("committed", data=np.zeros(1, np.int64))
        return target

    def _recover(self) -> None:
        """Copies the committed rows of a partial file (perhaps crashed) into a new one."""
        try:
            old = h5py.File(self.partial, "r", swmr=True, libver="latest")
        except OSError as err:
            raise CacheError(
                f"Cannot read the unfinished feature file {self.partial} ({err}). "
                "Delete it to start over."
            ) from err
        with old:
            stored = _read_attrs(old.attrs).get("key")
            if stored != self.attrs["key"]:
                raise CacheError(
                    f"The unfinished feature file {self.partial} was started with other "
                    f"settings ({_key_diff(stored, self.attrs['key'])}); it is not mixed "
                    "with this run. Delete it, or rerun with its settings."
                )
            fresh = self.partial.with_name(self.partial.name + ".new")
            self._create(fresh)
            with h5py.File(fresh, "a", libver="latest") as new:
                for name in self.split_attrs:
                    rows = _committed_rows(old[name]) if name in old else _empty_rows(self.feature_dim, self.dtype)
                    _append(new[name], *rows)
                    new[name]["committed"][0] = len(rows[1])
                    log.info("Resuming %s: %d %s rows already written", self.path.name, len(rows[1]), name)
        os.replace(fresh, self.partial)

    def committed(self, split: str) -> tuple[int, int]:
        """(rows written, last written `index` or -1) for `split`."""
        group = self._file[split]
        n = int(group["committed"][0])
        return n, int(group["index"][n - 1]) if n else -1

    def written_index(self, split: str) -> np.ndarray:
        """The `index` of every committed row of `split`."""
        n, _ = self.committed(split)
        return self._file[split]["index"][:n]

    def append(self, split: str, features: np.ndarray, labels: np.ndarray, index: np.ndarray, ids: Sequence[bytes]) -> None:
        """Appends one batch and makes it durable before returning."""
        _append(self._file[split], features.astype(self.dtype, copy=False), labels, index, ids)
        self._file.flush()
        group = self._file[split]
        group["committed"][0] = group["labels"].shape[0]
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
                    _chunks(old[name], int(old[name]["committed"][0])),
                    {**split_attrs, "num_skipped": len(items), "skipped": items},
                )
            write_features(self.path, attrs=self.attrs, splits=splits, feature_dim=self.feature_dim, dtype=self.dtype)
        self.partial.unlink()
        return self.path


def _append(group: h5py.Group, features, labels, index, ids) -> None:
    n = group["labels"].shape[0]
    k = len(labels)
    encoded = [i if isinstance(i, bytes) else str(i).encode() for i in ids]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, count=k)
    end = int(group["id_ends"][n - 1]) if n else 0
    blob = np.frombuffer(b"".join(encoded), np.uint8)
    for name, values in (
        ("features", features),
        ("labels", np.asarray(labels, np.int64)),
        ("index", np.asarray(index, np.int64)),
        ("id_ends", end + np.cumsum(lengths)),
    ):
        group[name].resize(n + k, axis=0)
        group[name][n:] = values
    m = group["id_bytes"].shape[0]
    group["id_bytes"].resize(m + len(blob), axis=0)
    group["id_bytes"][m:] = blob


def _committed_rows(group: h5py.Group):
    n = int(group["committed"][0])
    return (
        group["features"][:n],
        group["labels"][:n],
        group["index"][:n],
        _decode_ids(group, 0, n),
    )


def _empty_rows(dim: int, dtype: np.dtype):
    return np.zeros((0, dim), dtype), np.zeros(0, np.int64), np.zeros(0, np.int64), []


def _decode_ids(group: h5py.Group, start: int, stop: int) -> list[bytes]:
    if stop <= start:
        return []
    ends = group["id_ends"][start:stop]
    first = int(group["id_ends"][start - 1]) if start else 0
    blob = group["id_bytes"][first : int(ends[-1])].tobytes()
    bounds = np.concatenate([[0], ends - first])
    return [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _chunks(group: h5py.Group, n: int) -> Iterator[tuple]:
    for start in range(0, n, _COPY_ROWS):
        stop = min(n, start + _COPY_ROWS)
        yield (
            group["features"][start:stop],
            group["labels"][start:stop],
            group["index"][start:stop],
            _decode_ids(group, start, stop),
        )


def write_features(
    path: Path,
    *,
    attrs: Mapping[str, Any],
    splits: Mapping[str, tuple[Iterable[tuple], Mapping[str, Any]]],
    feature_dim: int,
    dtype: np.dtype,
) -> Path:
    """Writes a finished file from per-split chunks of (features, labels, index, ids).

    Written under a temporary name and renamed, so the final path never holds a
    half-written file; memory stays flat because rows arrive in chunks.
    """
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _write_attrs(f.attrs, {**attrs, "complete": False})
        for name, (chunks, split_attrs) in splits.items():
            group = f.create_group(name)
            _write_attrs(group.attrs, split_attrs)
            datasets = {
                "features": group.create_dataset(
                    "features", shape=(0, feature_dim), maxshape=(None, feature_dim), dtype=dtype,
                    chunks=(max(1, min(1024, (1 << 20) // (feature_dim * np.dtype(dtype).itemsize))), feature_dim),
                    compression="gzip", compression_opts=4, shuffle=True,
                ),
                "labels": group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(16384,), compression="gzip"),
                "ids": group.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(16384,), compression="gzip"),
                "index": group.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(16384,), compression="gzip"),
            }
            n = 0
            for features, labels, index, ids in chunks:
                k = len(labels)
                values = {
                    "features": features,
                    "labels": labels,
                    "index": index,
                    "ids": np.array([i.decode() if isinstance(i, bytes) else i for i in ids], dtype=object),
                }
                for key, dataset in datasets.items():
                    dataset.resize(n + k, axis=0)
                    dataset[n:] = values[key]
                n += k
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


_JSON_ATTRS = frozenset({"key", "config", "splits", "skipped", "class_counts"})


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


def read_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of a feature file (finished or not)."""
    with h5py.File(path, "r", swmr=path.name.endswith(PARTIAL_SUFFIX)) as f:
        return _read_attrs(f.attrs)


def read_features(
    path: Path,
    *,
    expect: Mapping[str, Any] | None = None,
    splits: Sequence[str] | None = None,
) -> FeatureSet:
    """Loads a finished feature file, refusing incomplete or unexpected ones.

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
        if not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{path} is not a complete feature file of format {FORMAT_VERSION} "
                f"(complete={attrs.get('complete')}, format_version={attrs.get('format_version')}). "
                "Delete it and rerun `make features`."
            )
        if expect:
            diff = _key_diff(attrs["key"], {**attrs["key"], **expect})
            if diff:
                raise CacheError(
                    f"{path} was built with other settings than asked: {diff}. Run "
                    "`make features` with the settings you want, or change them to match."
                )
        wanted = list(splits) if splits is not None else [k for k in f.keys()]
        missing = [s for s in wanted if s not in f]
        if missing:
            raise CacheError(
                f"{path} has no split {', '.join(missing)}. Available: {', '.join(f.keys())}."
            )
        loaded = {
            name: SplitArrays(
                features=f[name]["features"][:],
                labels=f[name]["labels"][:],
                ids=np.array(f[name]["ids"].asstr()[:], dtype=object),
                index=f[name]["index"][:],
            )
            for name in wanted
        }
        split_attrs = {name: _read_attrs(f[name].attrs) for name in wanted}
    return FeatureSet(path=path, attrs=attrs, splits=loaded, split_attrs=split_attrs)


def _key_diff(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str:
    stored = stored or {}
    fields = sorted(set(stored) | set(wanted))
    parts = [
        f"{name}: file has {stored.get(name)!r}, asked {wanted.get(name)!r}"
        for name in fields
        if stored.get(name) != wanted.get(name)
    ]
    return "; ".join(parts)


# --- shards -------------------------------------------------------------------------


def merge_shards(paths: Sequence[Path], out: Path) -> Path:
    """Joins the finished shard files of one run into a file equal to a one-process run.

    Every shard must carry the same key but for its shard number, and all N shards
    must be present. Rows are put back in source order by their `index`. The shards
    are joined in memory (a consolidated copy); fine for feature sizes up to a few GB,
    a streaming k-way merge can replace it when the distributed runner needs one.
    """
    if not paths:
        raise CacheError("merge needs at least one shard file.")
    sets = [read_features(Path(p)) for p in paths]
    num_shards = sets[0].attrs["num_shards"]
    shards = sorted(s.attrs["shard_index"] for s in sets)
    if shards != list(range(num_shards)) or any(s.attrs["num_shards"] != num_shards for s in sets):
        raise CacheError(
            f"Expected shard files 0..{num_shards - 1} of one run. Received shards "
            f"{shards} ({', '.join(str(p) for p in paths)})."
        )
    base = {k: v for k, v in sets[0].key.items() if k != "shard"}
    for s in sets[1:]:
        diff = _key_diff(base, {k: v for k, v in s.key.items() if k != "shard"})
        if diff:
            raise CacheError(f"{s.path} belongs to another run than {sets[0].path}: {diff}.")
    attrs = dict(sets[0].attrs)
    attrs.update(shard_index=0, num_shards=1, key={**sets[0].key, "shard": [0, 1]})
    attrs["config"] = {**attrs["config"], "shard_index": 0, "num_shards": 1}
    attrs.pop("complete", None)
    splits = {}
    for name in sets[0].splits:
        parts = [s.splits[name] for s in sets]
        order = np.argsort(np.concatenate([p.index for p in parts]), kind="stable")
        skipped = sorted((i for s in sets for i in s.split_attrs[name]["skipped"]), key=lambda d: d["index"])
        split_attrs = {**sets[0].split_attrs[name], "num_inputs": sum(s.split_attrs[name]["num_inputs"] for s in sets)}
        split_attrs.update(num_skipped=len(skipped), skipped=skipped)
        rows = (
            np.concatenate([p.features for p in parts])[order],
            np.concatenate([p.labels for p in parts])[order],
            np.concatenate([p.index for p in parts])[order],
            list(np.concatenate([p.ids for p in parts])[order]),
        )
        splits[name] = ([rows], split_attrs)
    attrs["num_skipped"] = sum(len(a["skipped"]) for _, a in splits.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_features(
        out, attrs=attrs, splits=splits, feature_dim=sets[0].attrs["feature_dim"],
        dtype=sets[0].splits[next(iter(sets[0].splits))].features.dtype,
    )
