"""`make compare` on the tiny backbone: every row, the outputs, reuse of finished rows."""

from __future__ import annotations

import json

import pytest

from conftest import make_folder
from pipeline.compare import ROWS, compare
from pipeline.config import FinetuneConfig, HeadConfig
from pipeline.errors import ConfigError
from test_extract import tiny_config
from test_finetune import save_tiny_weights


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
    assert {p.name for p in out.iterdir()} >= {"comparison.md", "comparison.json", "comparison.png",
                                               "learning_curves.png", "rows.json", "features", "runs"}
    assert result.table.count("\n| ") == len(ROWS) + 1  # header + one line per row
    caplog.set_level("INFO", logger="pipeline.compare")
    again = compare(features, head, tune, out_dir=out, rows=["logistic", "scratch"], progress=False)
    assert [r["own_seconds"] for r in again.rows] == [by_row["logistic"]["own_seconds"], by_row["scratch"]["own_seconds"]]
    assert caplog.text.count("is up to date") == 2
    assert set(json.loads((out / "rows.json").read_text())) >= set(ROWS)


def test_unknown_rows_are_an_error(tmp_path):
    features, head, tune = settings(tmp_path)
    with pytest.raises(ConfigError, match="Unknown comparison rows \\['best'\\]"):
        compare(features, head, tune, out_dir=tmp_path / "c", rows=["logistic", "best"])
