"""LABELS=<csv>: Kaggle's train.csv and Roboflow's one-hot _classes.csv label a folder without class folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COLORS, write_image

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.sources import scan_folder


def kaggle(root, n=8):
    """Kaggle's layout: train/<id>.jpg and train.csv of id,label (ids without their extension)."""
    rows = ["id,label"]
    for i in range(n):
        label = "cat" if i % 2 else "dog"
        write_image(root / "train" / f"{i:03d}.jpg", COLORS[label], seed=i)
        rows.append(f"{i:03d},{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def listed(scan):
    return {path: scan.class_names[label] for files in scan.splits.values() for path, label in files}


def test_kaggle_ids_without_extension_find_their_images_and_the_splits_are_carved(tmp_path):
    root = kaggle(tmp_path / "comp", 20)
    write_image(root / "test" / "999.jpg", COLORS["cat"])  # Kaggle's unlabelled test images
    (root / "train.csv").write_text((root / "train.csv").read_text() + "404,cat\n")
    scan = scan_folder(DataConfig(data_dir=str(root), labels="train.csv", val_fraction=0.2, test_fraction=0.2), seed=0)
    assert scan.class_names == ("cat", "dog") and scan.layout == "labels from a CSV file, validation+test carved"
    assert listed(scan)["train/003.jpg"] == "cat" and listed(scan)["train/004.jpg"] == "dog"
    assert sorted(len(files) for files in scan.splits.values()) == [4, 4, 12]
    assert any("1 images that train.csv names are not in the folder" in w and "404" in w for w in scan.warnings)
    assert any("1 images of the folder are not in train.csv" in w for w in scan.warnings)


def test_roboflow_one_hot_columns_with_spaced_names_give_the_column_holding_one(tmp_path):
    root = tmp_path / "rf" / "train"
    rows = ["filename, cat, dog"]
    for i in range(6):
        write_image(root / f"img_{i}_jpg.rf.abc.jpg", COLORS["cat"], seed=i)
        rows.append(f"img_{i}_jpg.rf.abc.jpg,{i % 2},{1 - i % 2}")
    (root / "_classes.csv").write_text("\n".join(rows) + "\n")
    scan = scan_folder(
        DataConfig(data_dir=str(root), labels="_classes.csv", val_fraction=0.34, test_fraction=0.0), seed=0
    )
    assert listed(scan)["img_1_jpg.rf.abc.jpg"] == "cat" and listed(scan)["img_0_jpg.rf.abc.jpg"] == "dog"


def test_roboflow_export_with_a_table_in_each_split_folder_keeps_its_splits(tmp_path):
    root = tmp_path / "rf"
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        rows = ["filename, cat, dog"]
        for i in range(n):
            write_image(root / split / f"{split}_{i}.jpg", COLORS["cat"], seed=i)
            rows.append(f"{split}_{i}.jpg,{i % 2},{1 - i % 2}")
        (root / split / "_classes.csv").write_text("\n".join(rows) + "\n")
    (root / "README.roboflow.txt").write_text("exported")
    scan = scan_folder(DataConfig(data_dir=str(root), labels="_classes.csv"), seed=0)
    assert scan.layout == "presplit" and {k: len(v) for k, v in scan.splits.items()} == {
        "train": 6,
        "validation": 2,
        "test": 2,
    }
    assert listed(scan)["valid/valid_1.jpg"] == "cat" and listed(scan)["test/test_0.jpg"] == "dog"


@pytest.mark.parametrize(("separator", "encoding"), [(";", "utf-8"), ("\t", "utf-16"), (",", "utf-8-sig")])
def test_a_spreadsheet_saved_with_semicolons_or_tabs_or_as_unicode_text_is_read(tmp_path, separator, encoding):
    root = kaggle(tmp_path / "comp", 4)
    text = f"id{separator}label\r\n000{separator}chien\r\n001{separator}chat tigré\r\n"
    (root / "labels.csv").write_bytes(text.encode(encoding))
    scan = scan_folder(DataConfig(data_dir=str(root), labels="labels.csv", val_fraction=0, test_fraction=0), seed=0)
    assert listed(scan) == {"train/000.jpg": "chien", "train/001.jpg": "chat tigré"}


def test_a_labels_file_in_a_windows_code_page_is_a_one_line_error_with_the_fix(tmp_path):
    root = kaggle(tmp_path / "comp", 2)
    (root / "labels.csv").write_bytes("id,label\n000,chat tigré\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"labels.csv is not UTF-8 .*Save it as 'CSV UTF-8'.*iconv -f cp1252"):
        scan_folder(DataConfig(data_dir=str(root), labels="labels.csv"), seed=0)


def test_a_hugging_face_imagefolder_with_metadata_jsonl_in_each_split_keeps_its_splits(tmp_path):
    """train/metadata.jsonl names images relative to its own folder (here in a sub-folder)."""
    root = tmp_path / "hf"
    for split, n in (("train", 6), ("test", 2)):
        lines = []
        for i in range(n):
            label = ("cat", "dog")[i % 2]
            write_image(root / split / "images" / f"{i}.png", COLORS[label], seed=i)
            lines.append(json.dumps({"file_name": f"images/{i}.png", "label": label, "bbox": [0, 1]}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    scan = scan_folder(DataConfig(data_dir=str(root), labels="metadata.jsonl", val_fraction=0.34), seed=0)
    assert listed(scan)["test/images/1.png"] == "dog" and len(scan.splits["test"]) == 2
    (root / "train" / "metadata.jsonl").write_text('{"file_name": "images/0.png", "label": "cat"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"metadata.jsonl: line 2 is not a JSON object"):
        scan_folder(DataConfig(data_dir=str(root), labels="metadata.jsonl"), seed=0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("filename,cat,dog\n000.jpg,1,1\n", r"line 2 marks 2 classes \(cat, dog\); single-label"),
        ("id,width,height\n000,3,4\n", r"which column is the label\?"),
        ("id,label\n000,cat\n000,dog\n", r"train/000.jpg has two labels, 'cat' and 'dog' \(line 3\)"),
        ("id,label\n000,\n", r"line 2 has no label"),
        ("id,label\nnope,cat\n", r"None of the 1 images that labels.csv names is in the folder"),
        ("id,label\n000,cat\n", r"line 2 names '000', which matches 2 images \(copy/000.jpg, train/000.jpg\)"),
    ],
)
def test_labels_that_cannot_be_read_one_way_are_one_line_errors(tmp_path, table, message):
    root = kaggle(tmp_path / "comp", 2)
    if "matches" in message:
        write_image(root / "copy" / "000.jpg", COLORS["cat"])
    (root / "labels.csv").write_text(table)
    with pytest.raises(DataError, match=message):
        scan_folder(DataConfig(data_dir=str(root), labels=str(root / "labels.csv")), seed=0)


@pytest.mark.parametrize("labels", ["train_labels.csv", "name"])
def test_labels_that_name_only_tiff_images_say_so(tmp_path, labels):
    """Kaggle's histopathologic-cancer-detection: train/<id>.tif and train_labels.csv."""
    root = tmp_path / "histo"
    (root / "train").mkdir(parents=True)
    for i in range(2):
        (root / "train" / f"tissue_{i}.tif").write_bytes(b"II*\x00")
    (root / "train_labels.csv").write_text("id,label\ntissue_0,0\ntissue_1,1\n")
    with pytest.raises(
        DataError, match=r"(None of the 2 images|No image under).* left out: TensorFlow cannot decode TIF \(2\)"
    ):
        scan_folder(DataConfig(data_dir=str(root), labels=labels), seed=0)


def test_labels_need_an_image_folder_and_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match="set DATA_DIR too"):
        DataConfig(labels="train.csv")
    with pytest.raises(DataError, match=r"Labels file not found. Received: LABELS='missing.csv'"):
        scan_folder(DataConfig(data_dir=str(kaggle(tmp_path / "comp", 2)), labels="missing.csv"), seed=0)


def test_a_relabel_in_the_csv_reuses_every_feature_and_changes_the_label(tmp_path):
    from pipeline.cli import main
    from pipeline.features.store import read_features

    root = kaggle(tmp_path / "comp", 12)
    flags = ["--data-dir", str(root), "--labels", "train.csv", "--backbone", "tiny", "--weights", "none"]
    flags += ["--features-dir", str(tmp_path / "features"), "--no-progress", "--json", str(tmp_path / "run.json")]
    assert main(["features", *flags]) == 0
    table = root / "train.csv"
    table.write_text(table.read_text().replace("000,dog", "000,cat"))
    assert main(["features", *flags]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["extracted"] == 0 and run["reused"] == 12
    rows = read_features(Path(run["path"]))
    labels = {i: rows.attrs["class_names"][y] for s in rows.splits.values() for i, y in zip(s.ids, s.labels)}
    assert labels["train/000.jpg"] == "cat"
