"""Stage 2 on more train rows than a memory budget: the dense head streams them from the file."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.synthetic import write_synthetic_features
from pipeline.config import HeadConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.store import load_views, open_rows, read_features
from pipeline.heads.dense import DenseHead
from pipeline.heads.train import train_head

SMALL_BUDGET = "200kB"  # the 3000 x 3 x 16 float32 train rows below take 576 kB


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """3000 train rows of 16 features, 3 classes, 2 augmented views; 500 validation and test rows."""
    path = tmp_path_factory.mktemp("streaming") / "synthetic.h5"
    return write_synthetic_features(path, rows=3000, dim=16, classes=3, views=2, val_rows=500)


def test_rows_left_in_the_file_read_back_as_the_loaded_ones(big_file):
    cached = read_features(big_file)
    train, views = cached.splits["train"], load_views(cached, 2)
    rows = open_rows(big_file, "train").with_views(2)
    assert (len(rows), rows.n_features, rows.num_views, rows.nbytes) == (3000, 16, 2, 3000 * 3 * 16 * 4)
    loaded, loaded_views = rows.load()
    np.testing.assert_array_equal(loaded.features, train.features)
    np.testing.assert_array_equal(loaded_views, views)
    np.testing.assert_array_equal(loaded.labels, train.labels)
    chosen = np.array([3, 4, 1500, 2999])
    subset = rows.select(chosen)
    table = subset.read(1, 4)  # versions x rows 1..3 of the subset
    np.testing.assert_array_equal(table[0], train.features[chosen[1:]])
    np.testing.assert_array_equal(table[1:], views[:, chosen[1:]])
    np.testing.assert_array_equal(subset.labels, train.labels[chosen])


def _epoch(dataset) -> tuple[list[int], np.ndarray, np.ndarray]:
    sizes, features, targets = [], [], []
    for batch in dataset:
        sizes.append(len(batch[0]))
        features.append(batch[0].numpy())
        targets.append(batch[1].numpy())
    return sizes, np.concatenate(features), np.concatenate(targets)


def test_a_streamed_epoch_is_every_row_once_in_one_of_its_versions(big_file):
    rows = open_rows(big_file, "train").with_views(2)
    table, _ = rows.load()
    versions = np.concatenate([table.features[None], load_views(read_features(big_file), 2)])  # (3, N, D)
    where = {versions[v, r].tobytes(): (r, v) for v in range(3) for r in range(len(rows))}
    head = DenseHead(batch_size=64, seed=3)
    head.n_classes_ = 3
    dataset = head._streamed_dataset(rows, rows.labels, None, window=1024, failures=[])
    assert int(dataset.cardinality()) == -(-3000 // 64)
    first = _epoch(dataset)
    sizes, features, targets = first
    assert sizes == [64] * (3000 // 64) + [3000 % 64]  # batches run across the 3 windows
    found = np.array([where[f.tobytes()] for f in features])
    assert sorted(found[:, 0]) == list(range(3000))  # every row once
    np.testing.assert_array_equal(targets, rows.labels[found[:, 0]])  # with its own label
    assert set(np.bincount(found[:, 1], minlength=3) > 800) == {True}  # versions drawn uniformly
    second = _epoch(dataset)
    assert not np.array_equal(second[1], features)  # a new order and new draws each epoch
    again = DenseHead(batch_size=64, seed=3)
    again.n_classes_ = 3
    np.testing.assert_array_equal(_epoch(again._streamed_dataset(rows, rows.labels, None, 1024, []))[1], features)


def _config(tmp_path, name, **kwargs) -> HeadConfig:
    return HeadConfig(
        head="dense",
        epochs=8,
        batch_size=64,
        learning_rate=0.01,
        grid_images=0,
        runs_dir=str(tmp_path / name),
        **kwargs,
    )


def test_the_streamed_dense_head_matches_the_in_memory_one(big_file, tmp_path):
    assert open_rows(big_file, "train").with_views(2).nbytes * DenseHead.memory_copies > 200_000
    memory = train_head(big_file, _config(tmp_path, "memory"))
    streamed = train_head(big_file, _config(tmp_path, "streamed", memory_budget=SMALL_BUDGET))
    assert memory.metrics["memory"]["streamed"] is False and streamed.metrics["memory"]["streamed"] is True
    assert streamed.head.params_["streamed"]["window_rows"] == 1024
    assert streamed.head.params_["n_views"] == memory.head.params_["n_views"] == 2
    # Same model, data and seed; only the order of the steps differs (see DenseHead.fit_streamed).
    for split in ("validation", "test"):
        a, b = memory.metrics[split]["accuracy"], streamed.metrics[split]["accuracy"]
        assert a > 0.8 and abs(a - b) <= 0.02, (split, a, b)
    test = read_features(big_file, splits=["test"]).splits["test"]
    agree = np.mean(memory.head.predict(test.features) == streamed.head.predict(test.features))
    assert agree >= 0.97, agree
    # Streaming is deterministic for a seed.
    again = train_head(big_file, _config(tmp_path, "again", memory_budget=SMALL_BUDGET))
    for got, want in zip(again.head.model_.get_weights(), streamed.head.model_.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_logistic_head_over_the_budget_names_the_dense_head(big_file, tmp_path):
    config = HeadConfig(head="logistic", views=2, grid_images=0, runs_dir=str(tmp_path), memory_budget=SMALL_BUDGET)
    with pytest.raises(ConfigError, match=r"The logistic head trains on rows in memory.*Use HEAD=dense") as caught:
        train_head(big_file, config)
    assert "\n" not in str(caught.value)
    from pipeline.locks import is_lock_file

    assert not [p for p in tmp_path.iterdir() if not is_lock_file(p)]  # nothing written but the run's lock


def test_non_finite_streamed_rows_are_an_error(tmp_path):
    import h5py

    path = write_synthetic_features(tmp_path / "nan.h5", rows=1500, dim=8, classes=2, val_rows=100)
    with h5py.File(path, "a") as f:
        f["train/features"][1200, 3] = np.nan
    with pytest.raises(DataError, match="X_train: features contain NaN/inf values .*the first train row 1200"):
        train_head(path, _config(tmp_path, "runs", memory_budget="10kB"))


@pytest.mark.parametrize("text", ["0", "lots", "2XB"])
def test_a_bad_memory_budget_is_a_config_error(text):
    with pytest.raises(ConfigError, match="MEMORY_BUDGET must be a positive size"):
        HeadConfig(memory_budget=text)
