"""`make compare` on the tiny backbone: every row, the outputs, reuse of finished rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_folder
from test_extract import tiny_config
from test_finetune import save_tiny_weights

from pipeline.cli import main
from pipeline.compare import ROWS, compare
from pipeline.config import FinetuneConfig, HeadConfig
from pipeline.errors import ConfigError


def settings(tmp_path):
    folder = make_folder(tmp_path / "images", 10, classes=("cat", "dog"))
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    features = tiny_config(folder, tmp_path / "unused", weights=str(weights))
    head = HeadConfig(epochs=3, grid_images=0)
    tune = FinetuneConfig(epochs=1, learning_rate=1e-3, grid_images=0)
    return features, head, tune


def test_every_row_runs_once_and_a_rerun_reuses_them(tmp_path, caplog):
    features, head, tune = settings(tmp_path)
    out = tmp_path / "compare"
    result = compare(features, head, tune, out_dir=out, progress=False)
    assert [r["row"] for r in result.rows] == list(ROWS)
    for row in result.rows:
        assert 0.0 <= row["validation"] <= 1.0 and 0.0 <= row["test"] <= 1.0
        assert row["total_seconds"] >= row["own_seconds"] > 0
    by_row = {r["row"]: r for r in result.rows}
    assert by_row["logistic"]["trainable_parameters"] == 32 + 1
    assert by_row["finetune-all"]["trainable_parameters"] > by_row["finetune-top"]["trainable_parameters"]
    assert by_row["finetune-top"]["total_seconds"] > by_row["dense"]["total_seconds"]
    assert "random weights" in by_row["scratch"]["kind"]
    assert {p.name for p in out.iterdir()} >= {
        "comparison.md",
        "comparison.json",
        "comparison.png",
        "learning_curves.png",
        "rows.json",
        "features",
        "runs",
    }
    assert result.table.count("\n| ") == len(ROWS) + 1  # header + one line per row
    caplog.set_level("INFO", logger="pipeline.compare")
    again = compare(features, head, tune, out_dir=out, rows=["logistic", "scratch"], progress=False)
    assert [r["own_seconds"] for r in again.rows] == [
        by_row["logistic"]["own_seconds"],
        by_row["scratch"]["own_seconds"],
    ]
    assert caplog.text.count("is up to date") == 2
    assert set(json.loads((out / "rows.json").read_text())) >= set(ROWS)


def test_unknown_rows_are_an_error(tmp_path):
    features, head, tune = settings(tmp_path)
    with pytest.raises(ConfigError, match="Unknown comparison rows \\['best'\\]"):
        compare(features, head, tune, out_dir=tmp_path / "c", rows=["logistic", "best"])


def test_views_rows_and_the_seed_workflow_share_the_augmentation_and_the_few_shots(tmp_path):
    features, head, tune = settings(tmp_path)
    few = HeadConfig(epochs=2, grid_images=0, train_per_class=4)
    out = tmp_path / "compare"
    result = compare(
        features, few, tune, out_dir=out, rows=["dense", "dense-views-2", "logistic-views-1", "seed"], progress=False
    )
    by_row = {r["row"]: r for r in result.rows}
    recorded = json.loads((out / "rows.json").read_text())["_features"]
    assert recorded["views"] == 2 and recorded["seconds_per_view"] > 0
    used = {
        name: json.loads((Path(by_row[name]["run_dir"]) / "metrics.json").read_text())
        for name in by_row
        if name != "seed"
    }
    assert used["dense"]["views"]["used"] == 0  # the plain row ignores the views another row cached
    assert used["dense-views-2"]["views"]["used"] == 2 and used["logistic-views-1"]["views"]["used"] == 1
    assert all(m["train_examples"] == 8 for m in used.values())
    assert by_row["dense-views-2"]["total_seconds"] >= (
        by_row["dense-views-2"]["own_seconds"] + 2 * recorded["seconds_per_view"]
    )
    seed = json.loads((Path(by_row["seed"]["run_dir"]) / "metrics.json").read_text())
    assert seed["train_examples"] == 8 and seed["epochs_run"] == 2
    assert "seed workflow" in by_row["seed"]["kind"] and len(by_row["seed"]["val_accuracy_curve"]) == 2
    assert "4 train images per class" in result.table


def test_a_views_row_needs_a_positive_count(tmp_path):
    features, head, tune = settings(tmp_path)
    with pytest.raises(ConfigError, match="dense-views-K"):
        compare(features, head, tune, out_dir=tmp_path / "c", rows=["dense-views-0"])


def test_make_style_cli_writes_a_few_shot_comparison_beside_the_others(tmp_path, monkeypatch, capsys):
    features, _, _ = settings(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [
        "compare",
        "--data-dir",
        features.data.data_dir,
        "--backbone",
        "tiny",
        "--weights",
        features.weights,
        "--image-size",
        "32",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--epochs",
        "2",
        "--train-per-class",
        "3",
        "--grid-images",
        "0",
        "--no-progress",
    ]
    assert main([*args, "--rows", "logistic,dense-views-1"]) == 0
    out = capsys.readouterr().out
    assert "3 train images per class" in out and "| dense-views-1 |" in out
    assert (tmp_path / "compare" / "images__tiny__32px__3-per-class" / "comparison.md").exists()
    assert main([*args, "--rows", "logistic,dense-views-x"]) == 2
    assert "Unknown comparison rows ['dense-views-x']" in capsys.readouterr().err
