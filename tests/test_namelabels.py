"""LABELS=name: Kaggle's Dogs vs. Cats and the Oxford-IIIT Pets name each photo's class in its file name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COLORS, write_image
from test_csvlabels import listed

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.sources import scan_folder


def dogs_vs_cats(root, n=10):
    """Kaggle's layout: train/cat.0.jpg ... train/dog.<n>.jpg, and test1/<n>.jpg without labels."""
    for i in range(n):
        for label in ("cat", "dog"):
            write_image(root / "train" / f"{label}.{i}.jpg", COLORS[label], seed=i)
    for i, number in enumerate((1, 10, 123)):  # a bare number is no label, not "1" and "12" with a number
        write_image(root / "test1" / f"{number}.jpg", COLORS["cat"], seed=i)
    return root


def test_kaggle_dogs_vs_cats_is_labelled_by_name_and_its_unlabelled_test_folder_left_out(tmp_path):
    root = dogs_vs_cats(tmp_path / "dogs-vs-cats")
    scan = scan_folder(DataConfig(data_dir=str(root), labels="name", val_fraction=0.2, test_fraction=0.2), seed=0)
    assert scan.class_names == ("cat", "dog") and scan.layout == "labels from file names, validation+test carved"
    assert listed(scan)["train/cat.3.jpg"] == "cat" and listed(scan)["train/dog.0.jpg"] == "dog"
    assert sorted(len(files) for files in scan.splits.values()) == [4, 4, 12]
    assert any("3 images have no label in the file name" in w and "test1/10.jpg" in w for w in scan.warnings)


def test_oxford_pets_names_give_multi_word_breeds_and_copies_keep_their_label(tmp_path):
    root = tmp_path / "images"
    names = ["Abyssinian_1.jpg", "Abyssinian_100.jpg", "american_bulldog_10.jpg", "american_bulldog_2.jpg"]
    names += ["american_bulldog_2 (1).jpg", "Abyssinian-7.png", "Abyssinian (3).jpg", "notes.jpg", "2024_01.jpg"]
    for i, name in enumerate(names):
        write_image(root / name, COLORS["cat"], seed=i)
    scan = scan_folder(DataConfig(data_dir=str(root), labels="name", val_fraction=0.0, test_fraction=0.0), seed=0)
    assert listed(scan) == {
        **{name: "Abyssinian" for name in names if name.startswith("Aby")},
        **{name: "american_bulldog" for name in names if name.startswith("ame")},
    }
    assert any("2 images have no label in the file name" in w and "notes.jpg" in w for w in scan.warnings)


def test_split_folders_of_named_images_keep_their_splits(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 4), ("valid", 2)):
        for i in range(n):
            for label in ("cat", "dog"):
                write_image(root / split / f"{label}_{i}.jpg", COLORS[label], seed=i)
    scan = scan_folder(DataConfig(data_dir=str(root), labels="name"), seed=0)
    assert scan.layout == "presplit" and {k: len(v) for k, v in scan.splits.items()} == {"train": 8, "validation": 4}
    assert listed(scan)["valid/dog_1.jpg"] == "dog"


def test_a_regular_expression_takes_its_first_group(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(["2024-cat-beach.jpg", "2023-dog-park.jpg", "2024-dog-home.jpg", "2022-cat-sofa.jpg"]):
        write_image(root / name, COLORS["cat"], seed=i)
    config = DataConfig(data_dir=str(root), labels=r"name:^\d+-([a-z]+)-", val_fraction=0.0, test_fraction=0.0)
    assert listed(scan_folder(config, seed=0))["2023-dog-park.jpg"] == "dog"


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("name:([a-z]+", r"LABELS='name:\(\[a-z\]\+' holds no valid regular expression: missing \)"),
        ("name:[a-z]+", r"needs a group around the label in the file name, such as LABELS='name:"),
    ],
)
def test_a_pattern_that_cannot_label_is_a_one_line_error(tmp_path, labels, message):
    with pytest.raises(ConfigError, match=message):
        scan_folder(DataConfig(data_dir=str(dogs_vs_cats(tmp_path / "d", 2)), labels=labels), seed=0)


def test_no_labelled_name_in_train_is_an_error(tmp_path):
    root = tmp_path / "numbers"
    for i in range(4):
        write_image(root / "train" / f"{i}.jpg", COLORS["cat"], seed=i)
    with pytest.raises(DataError, match=r"No image under .* has a label from LABELS='name'"):
        scan_folder(DataConfig(data_dir=str(root), labels="name"), seed=0)


@pytest.mark.parametrize("where", ["train folder", "flat folder"])
def test_without_labels_the_error_suggests_labels_name_for_named_files(tmp_path, where):
    root = dogs_vs_cats(tmp_path / "d", 3)
    if where == "flat folder":
        root = root / "train"
    else:
        (root / "test1").rename(root / "test")
    with pytest.raises(DataError, match=r"The file names hold the labels \(cat.0.jpg: cat\)\? Pass LABELS=name"):
        scan_folder(DataConfig(data_dir=str(root)), seed=0)


def test_a_relabel_by_renaming_a_file_reuses_every_feature(tmp_path):
    from pipeline.cli import main
    from pipeline.features.store import read_features

    root = dogs_vs_cats(tmp_path / "d", 6)
    flags = ["--data-dir", str(root), "--labels", "name", "--backbone", "tiny", "--weights", "none"]
    flags += ["--features-dir", str(tmp_path / "features"), "--no-progress", "--json", str(tmp_path / "run.json")]
    assert main(["features", *flags]) == 0
    (root / "train" / "dog.5.jpg").rename(root / "train" / "cat.55.jpg")
    assert main(["features", *flags]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["extracted"] == 0 and run["reused"] == 12
    rows = read_features(Path(run["path"]))
    labels = {i: rows.attrs["class_names"][y] for s in rows.splits.values() for i, y in zip(s.ids, s.labels)}
    assert labels["train/cat.55.jpg"] == "cat" and "train/dog.5.jpg" not in labels
