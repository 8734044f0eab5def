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
from pipeline.errors import CacheError
from pipeline.extract import extract_features, resolve
from pipeline.store import FeatureWriter, _append, partial_path, read_features
from test_extract import tiny_config

KEY = {"backbone": "tiny", "image_size": 32}


def writer(path, key=KEY) -> FeatureWriter:
    return FeatureWriter(
        path,
        attrs={"format_version": 1, "key": key, "class_names": ["a", "b"], "feature_dim": 4},
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
        _append(w._file["train"], *batch(3, 3))  # a batch written but never committed
    with writer(path) as w:
        assert w.committed("train") == (3, 2)
        w.append("train", *batch(3, 3))
    w.finish({})
    assert read_features(path).splits["train"].index.tolist() == [0, 1, 2, 3, 4, 5]


def test_a_partial_file_from_other_settings_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    with writer(path) as w:
        w.append("train", *batch(0, 2))
    with pytest.raises(CacheError, match=r"started with other settings \(backbone: file has 'tiny', asked 'xception'\)"):
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


def _partial_rows(path) -> int:
    """Committed train rows of a partial file being written by another process."""
    try:
        with h5py.File(path, "r", swmr=True, libver="latest") as f:
            return int(f["train/committed"][0])
    except (OSError, KeyError):
        return 0


def _run_until(tmp_path, folder, out, rows, sig):
    """Starts `python -m pipeline features` and sends `sig` once `rows` train rows are safe."""
    command = [sys.executable, "-m", "pipeline", "features", "--data-dir", str(folder), "--backbone", "tiny",
               "--weights", "none", "--batch-size", "2", "--val-fraction", "0.25", "--test-fraction", "0.25",
               "--output-dir", str(out), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = partial_path(resolve(tiny_config(folder, out, batch_size=2))[2])
    deadline = time.monotonic() + 120
    while _partial_rows(partial) < rows:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "extraction did not start"
        time.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, partial


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_an_interrupted_run_resumes_after_its_last_batch(tmp_path, sig):
    folder = make_folder(tmp_path / "images", 100)  # 200 images, 100 for train
    reference = read_features(extract_features(tiny_config(folder, tmp_path / "ref", batch_size=2), progress=False).path)
    out = tmp_path / "features"
    returncode, stderr, partial = _run_until(tmp_path, folder, out, rows=20, sig=sig)
    if sig == signal.SIGINT:
        assert returncode == 130 and "rerun the same command to resume" in stderr
        assert "Traceback" not in stderr
    else:
        assert returncode == -signal.SIGKILL
    assert partial.exists() and not resolve(tiny_config(folder, out, batch_size=2))[2].exists()
    saved = _partial_rows(partial)
    assert 20 <= saved < 100
    result = extract_features(tiny_config(folder, out, batch_size=2), progress=False)
    assert result.images == 200 - saved  # no finished batch was computed twice
    resumed = read_features(result.path)
    for name, split in reference.splits.items():
        np.testing.assert_array_equal(resumed.splits[name].features, split.features)
        np.testing.assert_array_equal(resumed.splits[name].ids, split.ids)
    assert not partial.exists()


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "pipeline", "features", "--data-dir", str(tmp_path / "missing"), "--backbone", "tiny",
         "--weights", "none"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("error: Image folder not found")
