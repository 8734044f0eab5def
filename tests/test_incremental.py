"""A folder that changes costs only what changed: content-addressed rows, the stat cache, gc, export."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, make_folder, write_image
from test_extract import tiny_config

from pipeline.config import AugmentConfig, ViewsConfig
from pipeline.errors import CacheError
from pipeline.features import statcache
from pipeline.features.contentstore import PLAIN, open_store
from pipeline.features.extract import extract_features, resolve, store_path
from pipeline.features.gc import collect_garbage
from pipeline.features.store import load_views, read_content_ids, read_features


def _age(folder, seconds: float = 10.0) -> None:
    """Makes every file older than the stat cache's racy window, as files are between real runs."""
    past = time.time() - seconds
    for dirpath, _, names in os.walk(folder):
        for name in names:
            os.utime(os.path.join(dirpath, name), (past, past))


def _by_id(cached) -> dict[str, tuple[str, int, np.ndarray]]:
    """id -> (split, label, features) over every split of a feature file."""
    return {
        i: (name, int(l), f)
        for name, split in cached.splits.items()
        for i, l, f in zip(split.ids, split.labels, split.features)
    }


@pytest.fixture
def folder(tmp_path):
    root = make_folder(tmp_path / "images", 8, layout="presplit")
    _age(root)
    return root


def test_adding_images_extracts_exactly_those_and_keeps_every_other_row_bit_for_bit(folder, tmp_path):
    config = tiny_config(folder, tmp_path / "features")
    first = extract_features(config, progress=False)
    before = _by_id(read_features(first.path))
    for i in range(3):
        write_image(folder / "train" / "cat" / f"new.{i}.jpg", (200, 60, 60), seed=500 + i)
    second = extract_features(config, progress=False)
    assert (second.images, second.reused) == (3, len(before))
    assert second.path == first.path and [p.name for p in first.path.parent.glob("*.h5")] == [first.path.name]
    after = _by_id(read_features(second.path))
    assert len(after) == len(before) + 3
    for i, (split, label, features) in before.items():
        assert after[i][:2] == (split, label)
        np.testing.assert_array_equal(after[i][2], features)  # reused, not recomputed
    assert second.record()["extracted"] == 3 and "3 extracted" in second.summary()


def test_a_broken_link_is_left_out_with_a_warning_and_extracted_once_mended(folder, tmp_path, caplog):
    """A dataset assembled from links whose target moved: the run goes on without it."""
    config = tiny_config(folder, tmp_path / "features")
    link = folder / "train" / "cat" / "linked.jpg"
    link.symlink_to(tmp_path / "moved-away.jpg")
    with caplog.at_level("WARNING"):
        first = extract_features(config, progress=False)
    assert (
        "1 file of the listing cannot be read" in caplog.text and "moved-away.jpg, which does not exist" in caplog.text
    )
    assert "train/cat/linked.jpg" not in read_features(first.path).splits["train"].ids.tolist()
    write_image(tmp_path / "moved-away.jpg", (200, 60, 60), seed=77)
    second = extract_features(config, progress=False)
    assert second.images == 1 and "train/cat/linked.jpg" in read_features(second.path).splits["train"].ids.tolist()


def test_renames_moves_and_other_split_settings_extract_nothing_and_labels_follow(folder, tmp_path):
    config = tiny_config(folder, tmp_path / "features")
    before = _by_id(read_features(extract_features(config, progress=False).path))
    (folder / "train" / "cat" / "cat.0.jpg").rename(folder / "train" / "cat" / "renamed.jpg")
    (folder / "train" / "cat" / "cat.1.jpg").rename(folder / "train" / "dog" / "moved.jpg")
    (folder / "train" / "dog" / "dog.2.jpg").rename(folder / "validation" / "dog" / "to-validation.jpg")
    (folder / "test" / "cat" / "cat.0.jpg").unlink()
    result = extract_features(config, progress=False)
    assert result.images == 0 and result.reused == len(before) - 1
    after = _by_id(read_features(result.path))
    np.testing.assert_array_equal(after["train/cat/renamed.jpg"][2], before["train/cat/cat.0.jpg"][2])
    assert after["train/dog/moved.jpg"][:2] == ("train", 1)  # the new label
    np.testing.assert_array_equal(after["train/dog/moved.jpg"][2], before["train/cat/cat.1.jpg"][2])
    assert after["validation/dog/to-validation.jpg"][0] == "validation"
    assert "test/cat/cat.0.jpg" not in after
    flat = tiny_config(make_folder(tmp_path / "flat", 10), tmp_path / "features")
    base = extract_features(flat, progress=False)
    for other in ({"seed": 3}, {"data": dataclasses.replace(flat.data, val_fraction=0.4)}):
        changed = extract_features(dataclasses.replace(flat, **other), progress=False)
        assert changed.images == 0 and changed.path != base.path


def test_the_same_bytes_at_two_paths_are_one_row_used_twice(folder, tmp_path):
    shutil.copy(folder / "train" / "cat" / "cat.0.jpg", folder / "train" / "cat" / "copy.jpg")
    shutil.copy(folder / "train" / "cat" / "cat.0.jpg", folder / "test" / "cat" / "copy.jpg")
    config = tiny_config(folder, tmp_path / "features")
    result = extract_features(config, progress=False)
    cached = read_features(result.path)
    rows = sum(len(s) for s in cached.splits.values())
    assert result.images == rows - 2
    by_id = _by_id(cached)
    np.testing.assert_array_equal(by_id["train/cat/copy.jpg"][2], by_id["train/cat/cat.0.jpg"][2])
    test_row = cached.splits["test"].ids.tolist().index("test/cat/copy.jpg")
    assert read_content_ids(result.path, "test")[test_row] == read_content_ids(result.path, "train")[0]


def test_the_stat_cache_reads_only_files_whose_stat_changed(folder, tmp_path, monkeypatch):
    config = tiny_config(folder, tmp_path / "features")
    extract_features(config, progress=False)
    calls = []
    original = statcache.hash_file
    monkeypatch.setattr(statcache, "hash_file", lambda path: calls.append(path) or original(path))
    assert extract_features(config, progress=False).up_to_date and calls == []
    touched = folder / "train" / "cat" / "cat.2.jpg"
    os.utime(touched, (time.time() - 5, time.time() - 5))  # same bytes, new mtime: hashed, not extracted
    result = extract_features(config, progress=False)
    assert calls == [str(touched)] and result.images == 0 and result.hashed == 1
    edited = folder / "train" / "dog" / "dog.3.jpg"
    write_image(edited, (10, 200, 10), seed=77)
    os.utime(edited, (time.time() - 5, time.time() - 5))
    calls.clear()
    result = extract_features(config, progress=False)
    assert calls == [str(edited)] and result.images == 1


def test_no_op_run_imports_no_tensorflow_nor_scikit_learn(tmp_path):
    """A flat folder's splits are carved on every run, by ranks of its paths (`pipeline.features.carving`)."""
    folder = make_folder(tmp_path / "flat", 10)
    _age(folder)
    out = tmp_path / "features"
    extract_features(tiny_config(folder, out), progress=False)
    code = (
        "import sys\n"
        "from pipeline.config import DataConfig, FeaturesConfig\n"
        "from pipeline.features.extract import extract_features\n"
        f"data = DataConfig(dataset=None, data_dir={str(folder)!r}, val_fraction=0.25, test_fraction=0.25)\n"
        f"config = FeaturesConfig(data=data, backbone='tiny', weights='none', batch_size=4, output_dir={str(out)!r})\n"
        "r = extract_features(config, progress=False)\n"
        "print(r.up_to_date, 'tensorflow' in sys.modules, 'keras' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["True", "False", "False", "False"], done.stderr[-2000:]


def test_added_train_images_extend_the_views_and_views_follow_the_content(folder, tmp_path):
    views = ViewsConfig(num_views=2, augment=AugmentConfig(flip="horizontal", rotation=0.1))
    config = tiny_config(folder, tmp_path / "features")
    first = read_features(extract_features(config, views=views, progress=False).path)
    old_views = load_views(first, 2)  # read now: the file is replaced in place below
    write_image(folder / "train" / "dog" / "new.jpg", (60, 60, 200), seed=901)
    (folder / "train" / "cat" / "cat.0.jpg").rename(folder / "train" / "cat" / "zz-renamed.jpg")
    result = extract_features(config, progress=False)  # no AUG_VIEWS: the file keeps (and extends) its views
    assert (result.images, result.view_images, result.num_views) == (1, 2, 2)
    after = read_features(result.path)
    new_views = load_views(after, 2)
    old_row = list(first.splits["train"].ids).index("train/cat/cat.0.jpg")
    new_row = list(after.splits["train"].ids).index("train/cat/zz-renamed.jpg")
    np.testing.assert_array_equal(new_views[:, new_row], old_views[:, old_row])


def test_a_corrupt_or_foreign_store_is_a_one_line_error(folder, tmp_path):
    config = tiny_config(folder, tmp_path / "features")
    extract_features(config, progress=False)
    resolved, key, path = resolve(config)
    segment = next(store_path(resolved, key).glob("segment-*.h5"))
    write_image(folder / "train" / "cat" / "new.jpg", (200, 60, 60), seed=5)
    with h5py.File(segment, "a") as f:
        f.attrs["identity"] = '{"backbone": "other"}'
    with pytest.raises(CacheError, match=r"is not a segment of this feature store .*Delete the folder"):
        extract_features(config, progress=False)
    segment.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match=r"Cannot read store segment .*Delete it"):
        extract_features(config, progress=False)


def test_a_format_1_file_is_refused_in_one_line_and_gc_deletes_it(folder, tmp_path):
    out = tmp_path / "features"
    old = out / "images__tiny__none__32px__avg__0123456789.h5"
    out.mkdir()
    with h5py.File(old, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["complete"] = True
    with pytest.raises(CacheError, match=r"format 1 .*Rerun `make features`"):
        read_features(old)
    extract_features(tiny_config(folder, out), progress=False)
    assert collect_garbage(out)["old_files_deleted"] == 1 and not old.exists()


def test_gc_drops_rows_no_file_uses_and_keeps_the_rest(folder, tmp_path):
    out = tmp_path / "features"
    config = tiny_config(folder, out)
    before = _by_id(read_features(extract_features(config, progress=False).path))
    shutil.rmtree(folder / "test")
    result = extract_features(config, progress=False)
    report = collect_garbage(out)
    assert report["rows_dropped"] == 8 and report["rows_kept"] == len(before) - 8
    assert extract_features(config, progress=False).up_to_date
    after = _by_id(read_features(result.path))
    for i, (_, _, features) in after.items():
        np.testing.assert_array_equal(features, before[i][2])
    shutil.rmtree(folder / "validation")  # more than half the rows dead: compacted by the run itself
    (folder / "train" / "dog").rename(folder / "train" / "dogs")
    extract_features(config, progress=False)
    resolved, key, _ = resolve(config)
    assert len(list(store_path(resolved, key).glob("segment-*.h5"))) == 1


def test_export_features_to_parquet_and_npy_reads_back_with_duckdb_and_pyarrow(folder, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.features.tabular import export_features

    path = extract_features(tiny_config(folder, tmp_path / "features"), progress=False).path
    cached = read_features(path)
    (parquet,) = export_features(path, tmp_path / "out.parquet", fmt="parquet")
    counts = dict(duckdb.sql(f"SELECT split, count(*) FROM '{parquet}' GROUP BY split").fetchall())
    assert counts == {name: len(split) for name, split in cached.splits.items()}
    table = pq.read_table(parquet)
    assert str(table.schema.field("features").type) == "fixed_size_list<element: float>[32]"
    train = table.filter(pc.equal(table["split"], "train"))
    np.testing.assert_array_equal(
        np.stack(train["features"].to_numpy(zero_copy_only=False)), cached.splits["train"].features
    )
    assert train["path"].to_pylist() == cached.splits["train"].ids.tolist()
    assert train["label_name"].to_pylist() == [cached.class_names[l] for l in cached.splits["train"].labels]
    assert all(len(h) == 64 for h in train["sha256"].to_pylist())
    npy, meta = export_features(path, tmp_path / "emb.npy", fmt="npy")
    embeddings, rows = np.load(npy), pq.read_table(meta)
    assert embeddings.shape == (rows.num_rows, 32) and embeddings.dtype == np.float32
    first = rows.filter(pc.equal(rows["split"], "validation"))["row"].to_pylist()
    np.testing.assert_array_equal(embeddings[first], cached.splits["validation"].features)


def test_the_content_store_finds_rows_by_content_the_first_copy_winning_and_reads_them_bit_for_bit(tmp_path):
    identity = {"backbone": "tiny"}
    store = open_store(tmp_path / "store", identity, feature_dim=3, dtype="float32")
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    with store.writer() as segment:
        segment.append(["a", "b", "c"], [PLAIN] * 3, first)
    with store.writer() as segment:
        segment.append(["b", "d"], [PLAIN] * 2, second)  # "b" again: the copy indexed first is kept
        segment.append(["a"], [0], second[:1])  # a view of "a"
    unborn = tmp_path / "store" / "segment-0-1-0.h5.partial.new"  # a run killed before its first batch
    unborn.write_bytes(b"half an HDF5 header")
    store = open_store(tmp_path / "store", identity, feature_dim=3, dtype="float32")
    assert not unborn.exists()
    locations = store.locate(["d", "x", "b", "a"])
    assert locations[1] == -1 and len(store) == 5 and ("a", 0) in store and ("d", 0) not in store
    expected = np.stack([second[1], first[1], first[0]])
    for reading in (contextlib.nullcontext(), store.reading()):
        with reading:
            (rows,) = store.read(locations[[0, 2, 3]])
        np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(next(store.read(store.locate(["a"], 0))), second[:1])
    with pytest.raises(CacheError, match=r"lacks 1 of the rows asked for.*Rerun `make features`"):
        next(store.read(locations))
