"""The HDF5 store: durable appends, crash recovery, refusals, and resumption of a killed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, make_folder
from test_extract import tiny_config

from pipeline.errors import CacheError
from pipeline.features.contentstore import PLAIN, open_store
from pipeline.features.extract import extract_features, resolve
from pipeline.features.store import FORMAT_VERSION, FeatureWriter, load_views, partial_path, read_features
from pipeline.features.tables import append_rows

KEY = {"backbone": "tiny", "image_size": 32}


def writer(path, key=KEY) -> FeatureWriter:
    return FeatureWriter(
        path,
        attrs={"format_version": FORMAT_VERSION, "key": key, "class_names": ["a", "b"], "feature_dim": 4},
        splits={"train": {"spec": "t", "num_inputs": 9}, "validation": {"spec": "v", "num_inputs": 2}},
        feature_dim=4,
        dtype="float32",
    )


def batch(start, n):
    index = np.arange(start, start + n)
    return np.tile(index[:, None], (1, 4)).astype(np.float32), index % 2, index, [f"id{i}".encode() for i in index]


def test_round_trip_and_attributes(tmp_path):
    path = tmp_path / "f.h5"
    with writer(path) as w:
        w.append("train", *batch(0, 3))
        w.append("train", *batch(4, 2))  # position 3 was skipped
        w.append("validation", *batch(0, 2))
    w.finish({"train": [{"index": 3, "id": "id3", "reason": "broken"}]})
    assert not partial_path(path).exists()
    cached = read_features(path)
    train = cached.splits["train"]
    assert train.features[:, 0].tolist() == [0, 1, 2, 4, 5]
    assert train.ids.tolist() == ["id0", "id1", "id2", "id4", "id5"]
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 1, 0, 0, 1]
    assert cached.class_names == ("a", "b") and cached.key == KEY
    assert cached.split_attrs["train"]["skipped"] == [{"index": 3, "id": "id3", "reason": "broken"}]
    assert cached.attrs["num_skipped"] == 1
    with h5py.File(path) as f:  # plain h5py users see compressed, chunked data and a true flag
        assert f["train/features"].compression == "gzip" and f.attrs["complete"]


def test_uncommitted_rows_of_a_crash_are_dropped_on_resume(tmp_path):
    path = tmp_path / "f.h5"
    with writer(path) as w:
        w.append("train", *batch(0, 3))
        append_rows(w._file["train"], *batch(3, 3))  # a batch written but never committed
    with writer(path) as w:
        assert w.committed("train") == (3, 2)
        w.append("train", *batch(3, 3))
    w.finish({})
    assert read_features(path).splits["train"].index.tolist() == [0, 1, 2, 3, 4, 5]


def test_a_partial_file_from_other_settings_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    with writer(path) as w:
        w.append("train", *batch(0, 2))
    with pytest.raises(
        CacheError, match=r"started with other settings \(backbone: file has 'tiny', asked 'xception'\)"
    ):
        with writer(path, key={**KEY, "backbone": "xception"}):
            pass


def test_reader_refuses_missing_incomplete_and_mismatched_files(tmp_path):
    path = tmp_path / "f.h5"
    with pytest.raises(CacheError, match="not found.*Run `make features`"):
        read_features(path)
    with writer(path) as w:
        w.append("train", *batch(0, 2))
    with pytest.raises(CacheError, match="unfinished file is beside it.*resume"):
        read_features(path)
    w.finish({})
    with pytest.raises(CacheError, match="other settings than asked: image_size: file has 32, asked 224"):
        read_features(path, expect={"image_size": 224})
    with pytest.raises(CacheError, match="has no split test"):
        read_features(path, splits=["train", "test"])
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="not a complete feature file"):
        read_features(path)


_READER = """
import sys, h5py, pathlib
folder, pattern, stop, opened = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), 0
while not stop.exists():
    for path in folder.glob(pattern):
        try:
            with h5py.File(path, "r", swmr=True, libver="latest") as f:
                opened += 1
        except OSError:
            pass
print(opened)
"""


def _feature_file_runs(folder):
    for start in range(0, 300, 2):
        with writer(folder / "f.h5") as w:
            w.append("train", *batch(start, 2))
    with writer(folder / "f.h5") as w:
        assert w.committed("train") == (300, 299)


def _store_segment_runs(folder):
    store = open_store(folder / "store", {"backbone": "tiny"}, feature_dim=4, dtype="float32")
    for start in range(0, 300, 2):
        with store.writer() as segment:
            segment.append([f"sha256:{start}", f"sha256:{start + 1}"], [PLAIN, PLAIN], batch(start, 2)[0])
    assert len(open_store(folder / "store", {"backbone": "tiny"}, feature_dim=4, dtype="float32")) == 300


@pytest.mark.parametrize(
    "runs, pattern", [(_feature_file_runs, "f.h5.partial"), (_store_segment_runs, "store/segment-*.h5.partial")]
)
def test_a_reader_of_an_unfinished_file_never_blocks_its_writer(tmp_path, runs, pattern):
    """Another process polling the partial files (a progress probe, `make audit`) while 150 runs
    in a row create or reopen them: no writer meets that reader's file lock."""
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(tmp_path), pattern, str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        runs(tmp_path)
    finally:
        stop.touch()
        opened = int(reader.communicate(timeout=60)[0])
    assert opened > 0


def _partial_rows(out) -> int:
    """Committed rows of the store segment being written by another process under `out`."""
    for partial in sorted(out.glob("store/*/segment-*.h5.partial")):
        try:
            with h5py.File(partial, "r", swmr=True, libver="latest") as f:
                return int(f["rows/committed"][0])
        except (OSError, KeyError):
            return 0
    return 0


def _run_until(tmp_path, folder, out, rows, sig):
    """Starts `python -m pipeline features` and sends `sig` once `rows` rows are safe in the store."""
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--batch-size",
        "2",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _partial_rows(out) < rows:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "extraction did not start"
        time.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_an_interrupted_run_resumes_after_its_last_batch(tmp_path, sig):
    """Rows committed to the store before the kill are reused, bit for bit; none is computed twice."""
    folder = make_folder(tmp_path / "images", 100)  # 200 images, 100 for train
    reference = read_features(
        extract_features(tiny_config(folder, tmp_path / "ref", batch_size=2), progress=False).path
    )
    out = tmp_path / "features"
    returncode, stderr = _run_until(tmp_path, folder, out, rows=20, sig=sig)
    if sig == signal.SIGINT:
        assert returncode == 130 and "rerun the same command to resume" in stderr
        assert "Traceback" not in stderr
    else:
        assert returncode == -signal.SIGKILL
    assert not resolve(tiny_config(folder, out, batch_size=2))[2].exists()
    saved = _partial_rows(out)
    assert 20 <= saved < 200
    result = extract_features(tiny_config(folder, out, batch_size=2), progress=False)
    assert (result.images, result.reused) == (200 - saved, saved)  # no committed batch was computed twice
    resumed = read_features(result.path)
    for name, split in reference.splits.items():
        np.testing.assert_array_equal(resumed.splits[name].features, split.features)
        np.testing.assert_array_equal(resumed.splits[name].ids, split.ids)
    assert not list(out.glob("store/*/*.partial"))


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--data-dir",
            str(tmp_path / "missing"),
            "--backbone",
            "tiny",
            "--weights",
            "none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("error: Image folder not found")


# The on-disk layout both tables share: pinned, since files written before must stay readable and resumable.
# dataset: (dtype, chunks, compression); features at D=700 float16: 1 MiB is 748 rows, capped at 256
_PARTIAL_LAYOUT = {
    "train/features": ("float16", (256, 700), None),
    "train/labels": ("int64", (4096,), None),
    "train/index": ("int64", (4096,), None),
    "train/id_ends": ("int64", (4096,), None),
    "train/id_bytes": ("uint8", (4096,), None),
    "train/committed": ("int64", None, None),
    "train/views/features": ("float16", (256, 700), None),
    "train/views/labels": ("int64", (4096,), None),
    "train/views/index": ("int64", (4096,), None),
    "train/views/view": ("int64", (4096,), None),
    "train/views/committed": ("int64", None, None),
    "train/views/seconds": ("float64", None, None),
}
_FINISHED_LAYOUT = {  # capped at 1024 rows, so 748
    "train/features": ("float16", (748, 700), "gzip"),
    "train/labels": ("int64", (16384,), "gzip"),
    "train/index": ("int64", (16384,), "gzip"),
    "train/ids": ("object", (16384,), "gzip"),
    "train/views/features": ("float16", (748, 700), "gzip"),
    "train/views/labels": ("int64", (16384,), "gzip"),
    "train/views/index": ("int64", (16384,), "gzip"),
    "train/views/view": ("int64", (16384,), "gzip"),
}


def _layout(path, swmr=False) -> dict:
    found = {}
    with h5py.File(path, "r", swmr=swmr, libver="latest") as f:
        f.visititems(
            lambda name, obj: (
                found.update({name: (str(obj.dtype), obj.chunks, obj.compression)})
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return found


def test_both_tables_keep_their_on_disk_layout_and_ids_survive_a_resume_across_copy_chunks(tmp_path):
    path = tmp_path / "f.h5"
    ids = [f"dir/é{i}.jpg".encode() for i in range(5000)]  # non-ASCII, and more rows than one copy chunk (4096)

    def open_writer():
        return FeatureWriter(
            path,
            attrs={"format_version": FORMAT_VERSION, "key": KEY, "class_names": ["a", "b"]},
            splits={"train": {"spec": "t"}},
            feature_dim=700,
            dtype="float16",
            views={"num_views": 1, "seed": 0, "augment": {}},
        )

    features = np.random.default_rng(0).normal(size=(5000, 700)).astype(np.float32)
    labels, index = np.arange(5000) % 2, np.arange(5000)
    with open_writer() as w:
        w.append("train", features, labels, index, ids)
        w.append_views(features + 1, labels, index, np.zeros(5000, np.int64), 0.25)
    assert _layout(partial_path(path), swmr=True) == _PARTIAL_LAYOUT
    with open_writer() as w:  # the resume copies every row through the chunk reader, ids as bytes
        assert w.committed("train") == (5000, 4999) and w.views_committed() == 5000
    w.finish({})
    assert _layout(path) == _FINISHED_LAYOUT
    cached = read_features(path)
    assert cached.splits["train"].ids.tolist() == [i.decode() for i in ids]
    np.testing.assert_array_equal(cached.splits["train"].features, features.astype(np.float16))  # a cast, no arithmetic
    np.testing.assert_array_equal(load_views(cached, 1)[0], (features + 1).astype(np.float16))
    assert cached.view_attrs["seconds"] == 0.25 and cached.view_attrs["bytes"] > 0
