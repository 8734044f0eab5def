"""`make export-features`: the current feature file as Parquet (or NumPy plus Parquet metadata).

For tools that do not read HDF5 (DuckDB, pandas, Spark, a vector database). One row per
image, splits in the file's order (train, validation, test), rows in split order:

    path        string   the id in the feature file: path under the image folder, or tfds_id
    sha256      string   hex digest of the file's bytes (null for tfds rows)
    content_id  string   the row's address in the content store
    split       string
    label       int64    index into the class names
    label_name  string
    features    fixed_size_list<float32>[D]     (parquet only)

`npy` writes the features as one `(N, D)` float32 array (`<out>.npy`, rows in the order
above) and the same metadata with a `row` column in `<out>.parquet` beside it. pyarrow
writes the Parquet; files are written under a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.features.statcache import CONTENT_PREFIX
from pipeline.features.store import open_rows, read_content_ids, read_features

log = logging.getLogger(__name__)

FORMATS = ("parquet", "npy")
_ROWS = 4096


def default_output(path: Path, fmt: str) -> Path:
    """`<features dir>/export/<feature file stem>.parquet` (or `.npy`)."""
    return Path(path).parent / "export" / f"{Path(path).stem}.{fmt}"


def _blocks(path: Path) -> Iterator[tuple[str, dict, np.ndarray]]:
    """(split, metadata columns, float32 features) per block of rows, in file order."""
    cached = read_features(path, splits=[])
    names = cached.class_names
    import h5py

    with h5py.File(path, "r") as f:
        splits = [s for s in ("train", "validation", "test") if s in f] + [
            s for s in f if s not in ("train", "validation", "test")
        ]
    for split in splits:
        rows = open_rows(path, split)
        content = read_content_ids(path, split)
        for start in range(0, len(rows), _ROWS):
            stop = min(start + _ROWS, len(rows))
            ids = content[start:stop].tolist()
            labels = rows.labels[start:stop]
            meta = {
                "path": [str(i) for i in rows.ids[start:stop]],
                "sha256": [c[len(CONTENT_PREFIX) :] if c.startswith(CONTENT_PREFIX) else None for c in ids],
                "content_id": ids,
                "split": [split] * (stop - start),
                "label": labels.astype(np.int64),
                "label_name": [names[int(l)] for l in labels],
            }
            yield split, meta, rows.read(start, stop)[0]


def export_features(path: Path, out: Path | None = None, *, fmt: str = "parquet") -> list[Path]:
    """Writes the feature file at `path` as `fmt`; returns the files written."""
    if fmt not in FORMATS:
        raise ConfigError(f"Export format must be one of {', '.join(FORMATS)}. Received: FORMAT={fmt!r}.")
    out = Path(out) if out is not None else default_output(path, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        return [_write_parquet(path, out, with_features=True)]
    npy = out.with_suffix(".npy")
    meta = _write_parquet(path, out.with_suffix(".parquet"), with_features=False)
    total = sum(len(open_rows(path, s)) for s in _split_names(path))
    dim = int(read_features(path, splits=[]).attrs["feature_dim"])
    tmp = npy.with_name(npy.name + ".tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
    row = 0
    for _, _, features in _blocks(path):
        array[row : row + len(features)] = features
        row += len(features)
    array.flush()
    del array
    os.replace(tmp, npy)
    return [npy, meta]


def _split_names(path: Path) -> list[str]:
    import h5py

    with h5py.File(path, "r") as f:
        return list(f)


def _write_parquet(path: Path, out: Path, *, with_features: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(read_features(path, splits=[]).attrs["feature_dim"])
    fields = [
        pa.field("path", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("content_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("label_name", pa.string()),
    ]
    if with_features:
        fields.append(pa.field("features", pa.list_(pa.float32(), dim)))
    else:
        fields.append(pa.field("row", pa.int64()))
    schema = pa.schema(fields)
    tmp = out.with_name(out.name + ".tmp")
    row = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for _, meta, features in _blocks(path):
            columns = dict(meta)
            if with_features:
                flat = pa.array(np.ascontiguousarray(features, np.float32).reshape(-1), pa.float32())
                columns["features"] = pa.FixedSizeListArray.from_arrays(flat, dim)
            else:
                columns["row"] = np.arange(row, row + len(features), dtype=np.int64)
            row += len(features)
            writer.write_table(pa.table(columns, schema=schema))
    os.replace(tmp, out)
    log.info("export: %d rows -> %s", row, out)
    return out
