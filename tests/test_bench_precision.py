"""`bench-precision`: bf16 against f32 by the logistic probe, paired k-fold, on folders and bundled data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_folder

from pipeline.bench import precision
from pipeline.errors import ConfigError

pytest.importorskip("openvino")


def test_the_bundled_digits_become_an_image_folder_with_ten_classes(tmp_path):
    from PIL import Image

    folder = precision.dataset_folder("sklearn:digits", tmp_path / "digits")
    counts = {p.name: len(list(p.glob("*.png"))) for p in folder.iterdir()}
    assert sorted(counts) == [str(d) for d in range(10)] and sum(counts.values()) == 1797
    with Image.open(next((folder / "7").glob("*.png"))) as image:
        assert image.size == (8, 8) and image.mode == "L" and np.asarray(image).max() > 200


def test_unknown_data_names_the_folder_and_the_bundled_datasets(tmp_path):
    with pytest.raises(ConfigError, match="Benchmark data not found: 'nowhere'.*sklearn:digits"):
        precision.dataset_folder("nowhere", tmp_path)


def test_the_paired_gap_is_zero_for_the_same_features_and_negative_for_noisier_ones():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    X = rng.normal(size=(120, 8)) + 1.5 * np.eye(3, 8)[y]
    args = type("Args", (), {"folds": 4, "repeats": 2, "seed": 0})()
    same = precision.paired_kfold(X, X.copy(), y, C=1.0, args=args)
    assert same["gap_points_mean"] == 0 and same["gap_points_range"] == [0, 0] and same["folds"] == 8
    noisy = precision.paired_kfold(X, X + rng.normal(scale=3.0, size=X.shape), y, C=1.0, args=args)
    assert noisy["gap_points_mean"] < -5 and noisy["f32_accuracy"] > 0.8


def test_the_command_compares_both_precisions_on_every_dataset(tmp_path, monkeypatch):
    from pipeline.cli import main
    from pipeline.features import runtimes

    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    folder = make_folder(tmp_path / "images", 10)
    argv = ["bench-precision", "--data", str(folder), "--backbone", "tiny", "--image-sizes", "32"]
    assert main([*argv, "--folds", "2", "--repeats", "1", "--cs", "1.0", "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    cell = result["datasets"][str(folder)]["32"]
    assert cell["images"] == 20 and cell["classes"] == 2 and cell["kfold"]["1.0"]["folds"] == 2
    assert set(cell["holdout"]) == {"f32", "bf16"} and "validation_accuracy" in cell["holdout"]["bf16"]
    assert "| images | 20 | 32 | 1.0 |" in (tmp_path / "precision.md").read_text()


def test_the_command_stops_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    from pipeline.cli import main
    from pipeline.features import runtimes

    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: False)
    assert main(["bench-precision", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
