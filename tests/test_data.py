"""Data sources: folder layouts and splits, bad folders, and the tfds path (mocked)."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from conftest import COLORS, make_folder, write_image

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.data import load_source
from pipeline.features.listing import image_files
from pipeline.features.sources import folder_source, scan_folder
from pipeline.features.tfds_data import tfds_source


def folder_config(path, **kwargs) -> DataConfig:
    return DataConfig(dataset=None, data_dir=str(path), **kwargs)


def make_splits(root, per_class: dict, classes=("cat", "dog")):
    """Split folders named as given, e.g. {"Training": 10, "Testing": 4}: images per class."""
    for split, n in per_class.items():
        for name in classes:
            for i in range(n):
                write_image(
                    root / split / name / f"{name}.{i}.jpg",
                    COLORS[name],
                    seed=zlib.crc32(f"{split}/{name}/{i}".encode()),
                )
    return root


def sizes(scan) -> dict:
    return {split: len(entries) for split, entries in scan.splits.items()}


def per_class(entries) -> dict:
    labels = [label for _, label in entries]
    return {label: labels.count(label) for label in sorted(set(labels))}


def test_presplit_folder_is_used_as_given(presplit_folder):
    (presplit_folder / "LICENSE.txt").write_text("top-level file")
    scan = scan_folder(folder_config(presplit_folder), seed=0)
    assert scan.layout == "presplit"
    assert scan.class_names == ("cat", "dog")
    assert {s: len(v) for s, v in scan.splits.items()} == {"train": 16, "validation": 8, "test": 8}
    assert scan.splits["train"][0] == ("train/cat/cat.0.jpg", 0)
    assert all(path.startswith("validation/") for path, _ in scan.splits["validation"])
    assert scan.ignored == ("LICENSE.txt",) and scan.warnings == ()


@pytest.mark.parametrize("names", [("Train", "Validation", "Test"), ("training", "VALID", "testing")])
def test_split_folder_names_are_recognised_in_any_case(tmp_path, names):
    root = make_splits(tmp_path / "data", dict(zip(names, (6, 3, 2))))
    scan = scan_folder(folder_config(root), seed=0)
    assert (scan.layout, scan.class_names) == ("presplit", ("cat", "dog"))
    assert sizes(scan) == {"train": 12, "validation": 6, "test": 4}
    assert scan.splits["test"][0] == (f"{names[2]}/cat/cat.0.jpg", 0)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    root = make_splits(tmp_path / "data", {"train": 6, "val": 3})
    scan = scan_folder(folder_config(root), seed=0)
    assert (scan.layout, scan.class_names) == ("presplit", ("cat", "dog"))
    assert sizes(scan) == {"train": 12, "validation": 6}
    assert all(path.startswith("val/") for path, _ in scan.splits["validation"])


def test_roboflow_train_valid_test_with_readme_files(tmp_path):
    root = make_splits(tmp_path / "roboflow", {"train": 6, "valid": 3, "test": 2})
    (root / "README.roboflow.txt").write_text("exported with roboflow")
    (root / "README.dataset.txt").write_text("dataset card")
    scan = scan_folder(folder_config(root), seed=0)
    assert (scan.layout, scan.class_names) == ("presplit", ("cat", "dog"))
    assert sizes(scan) == {"train": 12, "validation": 6, "test": 4}
    assert set(scan.ignored) == {"README.roboflow.txt", "README.dataset.txt"}
    specs = {name: s.spec for name, s in folder_source(scan).splits.items()}
    assert specs == {
        "train": "folder:presplit:train",
        "validation": "folder:presplit:validation",
        "test": "folder:presplit:test",
    }


def test_train_and_test_folders_carve_validation_from_train(tmp_path):
    root = make_splits(tmp_path / "kaggle", {"train": 10, "test": 3})
    config = folder_config(root, val_fraction=0.2)
    scan = scan_folder(config, seed=0)
    assert scan.layout == "train+test, validation carved"
    assert sizes(scan) == {"train": 16, "validation": 4, "test": 6}
    assert per_class(scan.splits["validation"]) == {0: 2, 1: 2}  # stratified
    assert all(path.startswith("train/") for path, _ in scan.splits["validation"])
    assert {p for p, _ in scan.splits["test"]} == {f"test/{c}/{c}.{i}.jpg" for c in ("cat", "dog") for i in range(3)}
    assert not {p for p, _ in scan.splits["train"]} & {p for p, _ in scan.splits["validation"]}
    again, other_seed = scan_folder(config, seed=0), scan_folder(config, seed=1)
    assert again.splits == scan.splits and again.fingerprint == scan.fingerprint
    assert other_seed.splits["validation"] != scan.splits["validation"]
    assert other_seed.fingerprint != scan.fingerprint  # another assignment, another cache key
    specs = {name: s.spec for name, s in folder_source(scan).splits.items()}
    assert specs["validation"] == "folder:train+test, validation carved:validation"


def test_kaggle_training_testing_folders(tmp_path):
    root = make_splits(tmp_path / "brain-mri", {"Training": 10, "Testing": 2}, classes=("cat", "dog", "fox"))
    scan = scan_folder(folder_config(root, val_fraction=0.2), seed=0)
    assert (scan.layout, scan.class_names) == ("train+test, validation carved", ("cat", "dog", "fox"))
    assert sizes(scan) == {"train": 24, "validation": 6, "test": 6}
    assert per_class(scan.splits["validation"]) == {0: 2, 1: 2, 2: 2}


def test_kaggle_split_folders_named_with_more_words_and_doubled_by_the_zip_are_splits(tmp_path):
    """Kaggle's cat-and-dog: training_set/training_set/<class>/ and test_set/test_set/<class>/;
    as class folders they would make a silent train-against-test classifier."""
    root = make_splits(tmp_path / "cat-and-dog" / "training_set", {"training_set": 10})
    make_splits(tmp_path / "cat-and-dog" / "test_set", {"test_set": 2})
    scan = scan_folder(folder_config(root.parent, val_fraction=0.2), seed=0)
    assert (scan.layout, scan.class_names) == ("train+test, validation carved", ("cat", "dog"))
    assert sizes(scan) == {"train": 16, "validation": 4, "test": 4}
    assert "test_set/test_set/dog/dog.1.jpg" in [path for path, _ in scan.splits["test"]]


def test_coco_and_intel_split_names_and_an_unlabelled_folder_beside_them(tmp_path):
    root = make_splits(tmp_path / "coco", {"train2017": 4, "val2017": 2})
    assert sizes(scan_folder(folder_config(root), seed=0)) == {"train": 8, "validation": 4}
    intel = make_splits(tmp_path / "intel", {"seg_train": 4, "seg_test": 2})
    write_image(intel / "seg_pred" / "seg_pred" / "1.jpg", (9, 9, 9))
    with pytest.raises(DataError, match=r"mixes split folders \(seg_test, seg_train\) with other folders \(seg_pred\)"):
        scan_folder(folder_config(intel), seed=0)


def test_an_unlabelled_folder_named_like_a_split_beside_splits_is_left_out(tmp_path, caplog):
    """Kaggle's MNIST as JPEGs: trainingSet/trainingSet/<digit>/ and testSet/testSet/<images>."""
    root = make_splits(tmp_path / "mnist" / "trainingSet", {"trainingSet": 10}).parent
    write_image(root / "testSet" / "testSet" / "img_1.jpg", (9, 9, 9))
    scan = scan_folder(folder_config(root, val_fraction=0.2, test_fraction=0.2), seed=0)
    assert scan.layout == "train only, validation+test carved" and sizes(scan)["train"] == 12
    with caplog.at_level(logging.WARNING, logger="pipeline.features.sources"):
        folder_source(scan)
    assert "testSet has 1 images but no class sub-folders" in caplog.text


def test_a_class_named_with_a_split_word_stays_a_class_and_a_doubled_root_is_looked_through(tmp_path):
    root = make_folder(tmp_path / "places" / "places", 6, classes=("cat", "dog"))
    (root / "dog").rename(root / "train_station")
    scan = scan_folder(folder_config(root.parent, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert (scan.layout, scan.class_names) == ("flat, validation+test carved", ("cat", "train_station"))
    assert scan.root == root.parent and all((root.parent / p).is_file() for f in scan.splits.values() for p, _ in f)


def test_train_folder_alone_carves_validation_and_test(tmp_path):
    root = make_splits(tmp_path / "data", {"train": 10})
    scan = scan_folder(folder_config(root, val_fraction=0.2, test_fraction=0.2), seed=0)
    assert scan.layout == "train only, validation+test carved"
    assert sizes(scan) == {"train": 12, "validation": 4, "test": 4}
    assert all(path.startswith("train/") for v in scan.splits.values() for path, _ in v)


def test_split_and_class_folders_mixed_is_an_error_naming_both(tmp_path):
    root = make_splits(tmp_path / "mixed", {"train": 2, "test": 2})
    write_image(root / "bird" / "bird.0.jpg", (0, 255, 0))
    with pytest.raises(DataError, match=r"mixes split folders \(test, train\) with other folders \(bird\)"):
        scan_folder(folder_config(root), seed=0)


def test_two_folders_for_one_split_is_an_error(tmp_path):
    root = make_splits(tmp_path / "twice", {"train": 2, "val": 2, "validation": 2})
    with pytest.raises(DataError, match=r"2 folders for the validation split: val, validation"):
        scan_folder(folder_config(root), seed=0)


def test_split_folders_without_train_is_an_error(tmp_path):
    root = make_splits(tmp_path / "notrain", {"validation": 2, "test": 2})
    with pytest.raises(DataError, match=r"split folders \(test, validation\) but no train folder"):
        scan_folder(folder_config(root), seed=0)


def test_unlabelled_test_folder_is_not_used_with_a_warning(tmp_path, caplog):
    root = make_splits(tmp_path / "dogs-vs-cats", {"train": 10, "validation": 4})
    for i in range(3):
        write_image(root / "test" / f"{i}.jpg", (128, 128, 128), seed=i)
    scan = scan_folder(folder_config(root), seed=0)
    assert scan.layout == "presplit"
    assert sizes(scan) == {"train": 20, "validation": 8}
    assert not any(path.startswith("test/") for v in scan.splits.values() for path, _ in v)
    with caplog.at_level(logging.WARNING, logger="pipeline.features.sources"):
        source = folder_source(scan)
    assert set(source.splits) == {"train", "validation"}
    assert "test folder" in caplog.text and "3 images but no class sub-folders" in caplog.text
    assert "make predict IMAGES=" in caplog.text


def test_unlabelled_train_folder_is_an_error(tmp_path):
    root = make_splits(tmp_path / "data", {"test": 2})
    for i in range(3):
        write_image(root / "train" / f"cat.{i}.jpg", (128, 128, 128), seed=i)
    with pytest.raises(DataError, match=r"one sub-folder per class in the train folder .*3 images and no sub-folders"):
        scan_folder(folder_config(root), seed=0)


def test_class_named_like_a_split_is_a_warning(tmp_path, caplog):
    root = make_splits(tmp_path / "data", {"train": 4, "validation": 2}, classes=("cat", "dog"))
    for i in range(4):
        write_image(root / "train" / "test" / f"x.{i}.jpg", (0, 255, 0), seed=i)
    scan = scan_folder(folder_config(root), seed=0)
    assert scan.class_names == ("cat", "dog", "test")
    with caplog.at_level(logging.WARNING, logger="pipeline.features.sources"):
        folder_source(scan)
    assert "named like a split folder" in caplog.text and "class 'test'" in caplog.text


def test_flat_folder_is_split_stratified_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "flat", 20)
    config = folder_config(root, val_fraction=0.2, test_fraction=0.2)
    scan = scan_folder(config, seed=3)
    assert scan.layout == "flat, validation+test carved"
    assert sizes(scan) == {"train": 24, "validation": 8, "test": 8}
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
    assert scan.layout == "presplit, test carved from validation"
    with pytest.raises(ConfigError, match="already has a test split"):
        scan_folder(folder_config(presplit_folder, test_from_validation=0.2), seed=0)


def test_hidden_and_non_image_files_are_ignored_not_counted(image_folder):
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "README").write_text("top-level file")
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert sum(len(v) for v in scan.splits.values()) == 24
    assert set(scan.ignored) == {"README", "cat/.DS_Store", "cat/notes.txt"}


def _non_utf8(folder, name: bytes):
    """A path named with bytes that are not UTF-8 (cp1252 from a zip made on Windows), or a skip
    where the filesystem refuses such names (macOS)."""
    path = os.fsdecode(os.path.join(os.fsencode(folder), name))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")


def test_images_named_in_another_encoding_are_left_out_with_a_warning_and_a_class_is_an_error(tmp_path, caplog):
    root = make_folder(tmp_path / "data", 6)
    write_image(Path(_non_utf8(root, b"cat/caf\xe9 au lait.jpg")), COLORS["cat"])
    scan = scan_folder(folder_config(root, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert sum(len(v) for v in scan.splits.values()) == 12
    (warning,) = [w for w in scan.warnings if "not UTF-8" in w]
    assert "1 image is left out" in warning and "b'cat/caf\\xe9 au lait.jpg'" in warning and "convmv" in warning
    with caplog.at_level(logging.WARNING):  # `make predict` lists folders the same way
        assert len(image_files(root / "cat")) == 6 and "not UTF-8" in caplog.text
    write_image(Path(_non_utf8(root, b"m\xfcll/1.jpg")), COLORS["dog"])
    write_image(Path(_non_utf8(root, b"m\xfcll/2.jpg")), COLORS["dog"])
    with pytest.raises(DataError, match=r"Class name b'm\\xfcll' in .* is not UTF-8.*convmv"):
        scan_folder(folder_config(root, val_fraction=0.25, test_fraction=0.25), seed=0)


@pytest.mark.parametrize("layout", ["flat", "presplit"])
def test_archive_and_nas_folders_are_neither_classes_splits_nor_images(tmp_path, layout):
    """A folder unzipped on a Mac has __MACOSX beside the data, AppleDouble `._*` files
    included; a Synology share has @eaDir thumbnails (real JPEGs) inside every folder."""
    root = make_folder(tmp_path / "data", 6, layout=layout)
    cats = root / "cat" if layout == "flat" else root / "train" / "cat"
    write_image(root / "__MACOSX" / cats.relative_to(root) / "._cat.0.jpg", (9, 9, 9))
    (cats / "._cat.0.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    write_image(cats / "@eaDir" / "cat.0.jpg" / "SYNOPHOTO_THUMB_S.jpg", (9, 9, 9))
    scan = scan_folder(folder_config(root, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert scan.class_names == ("cat", "dog")
    paths = [p for files in scan.splits.values() for p, _ in files]
    assert len(paths) == (12 if layout == "flat" else 24) and not any("@eaDir" in p or "/._" in p for p in paths)
    prefix = "" if layout == "flat" else "train/"
    assert {"__MACOSX", f"{prefix}cat/._cat.0.jpg", f"{prefix}cat/@eaDir"} <= set(scan.ignored)


def test_linked_folders_are_followed_and_a_link_loop_is_listed_once(image_folder, tmp_path):
    """A dataset assembled from links (a class folder holding a link to another disk) loses no image."""
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "extra.jpg", COLORS["cat"])
    (image_folder / "cat" / "batch2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(image_folder / "cat", target_is_directory=True)  # a loop
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    paths = [p for files in scan.splits.values() for p, _ in files]
    assert "cat/batch2/extra.jpg" in paths and len(paths) == 25 and len(set(paths)) == 25
    assert "cat/batch2/back (a link to a folder listed already)" in scan.ignored
    from pipeline.export import expand_images

    assert image_folder / "cat" / "batch2" / "extra.jpg" in expand_images([str(image_folder / "cat")])


def test_iphone_heic_photos_left_out_get_a_warning_that_counts_them_and_jfif_is_read(image_folder):
    for i in range(3):
        (image_folder / "cat" / f"IMG_{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (image_folder / "dog" / "scan.tiff").write_bytes(b"II*\0")
    write_image(image_folder / "dog" / "saved from the web.jfif", COLORS["dog"], fmt="JPEG")
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    (warning,) = [w for w in scan.warnings if "left out" in w]
    assert warning.startswith("4 photos are left out: TensorFlow cannot decode HEIC (3), TIFF (1).")
    assert "dog/saved from the web.jfif" in [p for files in scan.splits.values() for p, _ in files]
    (image_folder / "s1").mkdir()
    for i in range(2):  # the ORL faces: s1/1.pgm, ...
        (image_folder / "s1" / f"{i + 1}.pgm").write_bytes(b"P5 92 112 255\n")
    with pytest.raises(DataError, match=r"Class folder .*s1 has no images .* 2 photos are left out: .* PGM \(2\)"):
        scan_folder(folder_config(image_folder), seed=0)


def test_images_beside_a_csv_without_labels_get_an_error_that_names_the_labels_option(tmp_path):
    root = tmp_path / "kaggle"
    for i in range(4):
        write_image(root / "train" / "train" / f"{i}.jpg", COLORS["cat"])  # Kaggle doubles the level at times
    (root / "train.csv").write_text("id,label\n0,cat\n1,dog\n2,cat\n3,dog\n")
    (root / "sample_submission.csv").write_text("id,label\n")
    match = r"no labels.*in train.csv, sample_submission.csv\? Pass LABELS=train.csv .*Labels in a CSV"
    with pytest.raises(DataError, match=match):
        scan_folder(folder_config(root), seed=0)
    flat = tmp_path / "flat"
    write_image(flat / "0.jpg", COLORS["cat"])
    (flat / "_classes.csv").write_text("filename,cat,dog\n0.jpg,1,0\n")
    with pytest.raises(DataError, match=r"at least 2 class sub-folders.*labels are in _classes.csv\?"):
        scan_folder(folder_config(flat), seed=0)


def test_nested_images_and_misnamed_extensions_are_found(image_folder):
    write_image(image_folder / "dog" / "sub" / "deep.PNG", (0, 0, 255), fmt="PNG")
    scan = scan_folder(folder_config(image_folder, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert "dog/sub/deep.PNG" in [p for v in scan.splits.values() for p, _ in v]


def test_empty_class_folder_is_an_error(image_folder):
    (image_folder / "bird").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*bird has no images"):
        scan_folder(folder_config(image_folder), seed=0)


def test_a_doubled_level_with_a_file_list_beside_it_is_looked_through_and_one_level_too_high_is_named(tmp_path):
    """Kaggle's garbage classification: a doubled folder with file lists beside it; and a
    dataset folder whose images/ holds the classes."""
    root = make_folder(tmp_path / "Garbage classification" / "Garbage classification", 4).parent
    (root / "one-indexed-files.txt").write_text("cat.0.jpg 1\n")
    scan = scan_folder(folder_config(root, val_fraction=0.25, test_fraction=0.25), seed=0)
    assert scan.class_names == ("cat", "dog") and scan.root == root  # ids stay relative to DATA_DIR
    assert all(path.startswith("Garbage classification/") for files in scan.splits.values() for path, _ in files)
    dataset = make_folder(tmp_path / "dataset" / "images", 4).parent
    (dataset / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"images/ holds folders \(cat, dog\): if they are the classes, pass DATA_DIR="):
        scan_folder(folder_config(dataset), seed=0)


def test_classes_that_differ_only_in_case_or_separators_get_a_warning(tmp_path):
    root = make_folder(tmp_path / "merged", 4, classes=("cat", "dog", "fox"))
    (root / "dog").rename(root / "Cat")
    (root / "fox").rename(root / "golden_retriever")
    write_image(root / "Golden Retriever" / "g.jpg", COLORS["fox"])
    scan = scan_folder(folder_config(root, val_fraction=0.0, test_fraction=0.0), seed=0)
    assert len(scan.class_names) == 4
    (warning,) = [w for w in scan.warnings if "differ only" in w]
    assert "'Cat' and 'cat'; 'Golden Retriever' and 'golden_retriever'" in warning


def test_single_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "one", 5, classes=("cat",))
    with pytest.raises(DataError, match=r"at least 2 class sub-folders.*Received: 1 \(cat\)"):
        scan_folder(folder_config(root), seed=0)


def test_missing_directory_is_an_error_and_an_archive_is_named_as_one(tmp_path):
    with pytest.raises(DataError, match="Image folder not found.*nowhere'[.]$"):
        scan_folder(folder_config(tmp_path / "nowhere"), seed=0)
    (tmp_path / "cats-and-dogs.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"cats-and-dogs.zip', an archive: extract it \(`unzip`, `tar -xf`\)"):
        scan_folder(folder_config(tmp_path / "cats-and-dogs.zip"), seed=0)


def test_validation_class_missing_from_train_is_an_error(presplit_folder):
    write_image(presplit_folder / "validation" / "fox" / "fox.0.jpg", (0, 255, 0))
    with pytest.raises(DataError, match="classes that train lacks: fox"):
        scan_folder(folder_config(presplit_folder), seed=0)


def test_too_few_images_to_carve_names_the_class_and_its_count(tmp_path):
    root = make_folder(tmp_path / "small", 1)
    with pytest.raises(
        DataError, match=r"Cannot carve 30% test \+ 30% validation from class 'cat' \(1 image\): .*train"
    ):
        scan_folder(folder_config(root, val_fraction=0.3, test_fraction=0.3), seed=0)
    with pytest.raises(DataError, match=r"Cannot carve a 10% validation split from classes of 1-1 images"):
        scan_folder(folder_config(root, val_fraction=0.1, test_fraction=0.0), seed=0)


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


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds's mock data in place of a download (which the offline check would refuse here)."""
    from pipeline.features import tfds_data

    monkeypatch.setattr(tfds_data, "unreachable", lambda host: "")
    with tfds.testing.mock_data(num_examples=12):
        yield


def test_tfds_source_with_mock_data(mock_tfds):
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
        dataset="dummy_mnist",
        tfds_dir=str(dummy_tfds_dir),
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


def test_tfds_without_a_network_fails_at_once_not_after_minutes_of_retries(tmp_path, monkeypatch):
    import socket

    from pipeline import network
    from pipeline.features import tfds_data

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for name in network.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", unresolvable)
    config = DataConfig(dataset="cats_vs_dogs", tfds_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"cannot download it \(storage.googleapis.com unreachable.*TFDS_DIR=DIR"):
        load_source(config, seed=0)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert network.unreachable(tfds_data.NETWORK_PROBE_HOST) == ""  # behind a proxy, the download decides


def test_a_split_restricted_to_positions_reads_only_those_records(presplit_folder):
    source = folder_source(scan_folder(folder_config(presplit_folder), seed=0), shard_index=1, num_shards=3)
    train = source.splits["train"]  # positions 1, 4, 7, 10, 13 of 16
    chosen = train.at([13, 4, 10, 4])
    assert (chosen.size, chosen.total, chosen.name) == (3, 16, "train")
    assert [r["index"] for r in chosen.records(0).as_numpy_iterator()] == [4, 10, 13]
    assert [r["index"] for r in chosen.records(1).as_numpy_iterator()] == [10, 13]
    assert list(chosen.records(3).as_numpy_iterator()) == []
    with pytest.raises(DataError, match="Positions of split 'train' must lie in 0-15. Received: 4-16"):
        train.at([4, 16])


def test_tfds_split_restricted_to_positions_of_its_shard(mock_tfds):
    train = tfds_source(DataConfig(), shard_index=0, num_shards=2).splits["train"]
    records = list(train.at([6, 2, 10]).records(1).as_numpy_iterator())
    assert [r["index"] for r in records] == [6, 10]
