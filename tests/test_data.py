"""Data sources: folder layouts and splits, bad folders, and the tfds path (mocked)."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from conftest import make_folder, write_image
from pipeline.config import DataConfig
from pipeline.data import folder_source, load_source, scan_folder, tfds_source
from pipeline.errors import ConfigError, DataError


def folder_config(path, **kwargs) -> DataConfig:
    return DataConfig(dataset=None, data_dir=str(path), **kwargs)


def test_presplit_folder_is_used_as_given(presplit_folder):
    scan = scan_folder(folder_config(presplit_folder), seed=0)
    assert scan.layout == "presplit"
    assert scan.class_names == ("cat", "dog")
    assert {s: len(v) for s, v in scan.splits.items()} == {"train": 16, "validation": 8, "test": 8}
    assert scan.splits["train"][0] == ("train/cat/cat.0.jpg", 0)
    assert all(path.startswith("validation/") for path, _ in scan.splits["validation"])


def test_flat_folder_is_split_stratified_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "flat", 20)
    config = folder_config(root, val_fraction=0.2, test_fraction=0.2)
    scan = scan_folder(config, seed=3)
    sizes = {s: len(v) for s, v in scan.splits.items()}
    assert sizes == {"train": 24, "validation": 8, "test": 8}
    for split in scan.splits.values():  # stratified: both classes equally represented
        labels = [label for _, label in split]
        assert labels.count(0) == labels.count(1)
    all_paths = [p for v in scan.splits.values() for p, _ in v]
    assert len(set(all_paths)) == 40
    assert scan_folder(config, seed=3).splits == scan.splits
    assert scan_folder(config, seed=4).splits != scan.splits


def test_test_split_carved_from_validation(presplit_folder, tmp_path):
    root = make_folder(tmp_path / "tv", 10, layout="presplit")
    for path in (root / "test").rglob("*.jpg"):
        path.unlink()
    for folder in sorted((root / "test").rglob("*"), reverse=True):
        folder.rmdir()
    (root / "test").rmdir()
    scan = scan_folder(folder_config(root, test_from_validation=0.2), seed=0)
    assert len(scan.splits["validation"]) == 8 and len(scan.splits["test"]) == 2
    with pytest.raises(ConfigError, match="already has a test split"):
        scan_folder(folder_config(presplit_folder, test_from_validation=0.2), seed=0)


def test_hidden_and_non_image_files_are_ignored_not_counted(image_folder):
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "README").write_text("top-level file")
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert sum(len(v) for v in scan.splits.values()) == 24
    assert set(scan.ignored) == {"README", "cat/.DS_Store", "cat/notes.txt"}


def test_nested_images_and_misnamed_extensions_are_found(image_folder):
    write_image(image_folder / "dog" / "sub" / "deep.PNG", (0, 0, 255), fmt="PNG")
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert "dog/sub/deep.PNG" in [p for v in scan.splits.values() for p, _ in v]


def test_empty_class_folder_is_an_error(image_folder):
    (image_folder / "bird").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*bird has no images"):
        scan_folder(folder_config(image_folder), seed=0)


def test_single_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "one", 5, classes=("cat",))
    with pytest.raises(DataError, match=r"at least 2 class sub-folders.*Received: 1 \(cat\)"):
        scan_folder(folder_config(root), seed=0)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="Image folder not found.*nowhere"):
        scan_folder(folder_config(tmp_path / "nowhere"), seed=0)


def test_validation_class_missing_from_train_is_an_error(presplit_folder):
    write_image(presplit_folder / "validation" / "fox" / "fox.0.jpg", (0, 255, 0))
    with pytest.raises(DataError, match="classes that train lacks: fox"):
        scan_folder(folder_config(presplit_folder), seed=0)


def test_too_few_images_to_stratify_names_the_counts(tmp_path):
    root = make_folder(tmp_path / "small", 1)
    with pytest.raises(DataError, match="Cannot carve a stratified"):
        scan_folder(folder_config(root, val_fraction=0.3, test_fraction=0.3), seed=0)


def test_fractions_are_validated():
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(dataset=None, data_dir="x", val_fraction=1.5)
    with pytest.raises(ConfigError, match="leave examples for training"):
        DataConfig(dataset=None, data_dir="x", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="exactly one data source"):
        DataConfig(dataset="cats_vs_dogs", data_dir="x")


def test_folder_records_carry_bytes_labels_ids_and_positions(presplit_folder):
    source = folder_source(scan_folder(folder_config(presplit_folder), seed=0), shard_index=1, num_shards=3)
    train = source.splits["train"]
    assert (train.size, train.total) == (5, 16)
    records = list(train.records(2).as_numpy_iterator())
    assert [r["index"] for r in records] == [7, 10, 13]
    assert records[0]["id"] == b"train/cat/cat.7.jpg"
    assert records[-1]["label"] == 1
    assert records[0]["image"][:2] == b"\xff\xd8"  # still encoded JPEG
    assert source.class_counts["train"] == {"cat": 8, "dog": 8}


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        source = tfds_source(DataConfig(), shard_index=0, num_shards=2)
        assert source.class_names == ("cat", "dog")
        train = source.splits["train"]
        assert (train.size, train.total) == (6, 12)
        records = list(train.records(1).as_numpy_iterator())
    assert [r["index"] for r in records] == [2, 4, 6, 8, 10]
    assert all(r["id"].startswith(b"cats_vs_dogs-") for r in records)
    assert set(r["label"] for r in records) <= {0, 1}


def test_tfds_slicing_on_a_prepared_dataset(dummy_tfds_dir):
    config = DataConfig(
        dataset="dummy_mnist", tfds_dir=str(dummy_tfds_dir),
        splits={"train": "train[:60%]", "validation": "train[60%:]", "test": "test"},
    )
    source = tfds_source(config)
    assert {name: s.size for name, s in source.splits.items()} == {"train": 12, "validation": 8, "test": 20}
    assert source.class_names[:3] == ("0", "1", "2")


def test_tfds_unknown_split_is_an_error(dummy_tfds_dir):
    config = DataConfig(dataset="dummy_mnist", tfds_dir=str(dummy_tfds_dir), splits={"train": "nope"})
    with pytest.raises(DataError, match="Split 'nope' does not exist in dummy_mnist.*Available splits: test, train"):
        tfds_source(config)


def test_tfds_unknown_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="Unknown tensorflow-datasets name.*no_such_dataset"):
        load_source(DataConfig(dataset="no_such_dataset", tfds_dir=str(tmp_path)), seed=0)


def test_tfds_not_prepared_without_download_names_the_fix(tmp_path):
    config = DataConfig(dataset="cats_vs_dogs", tfds_dir=str(tmp_path), download=False)
    with pytest.raises(DataError, match=r"not prepared in .*downloads are off.*TFDS_DIR=DIR"):
        load_source(config, seed=0)
