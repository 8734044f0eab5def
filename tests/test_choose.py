"""`make choose` on a tiny folder: the table, the plot, the recommendation and skipped backbones."""

from __future__ import annotations

import json

import pytest
from conftest import make_folder

from pipeline.choose import recommend
from pipeline.cli import main
from pipeline.config_tools import ChooseConfig
from pipeline.errors import ConfigError, WeightsUnavailableError


def row(name, accuracy, speed, dim=32):
    return {"backbone": name, "validation_accuracy": accuracy, "images_per_second": speed, "feature_dim": dim}


def test_the_fastest_within_the_tolerance_of_the_best_is_recommended():
    rows = [row("big", 0.990, 10), row("small", 0.986, 50), row("tiny", 0.95, 500)]
    assert recommend(rows, 0.5)["backbone"] == "small"
    assert "within 0.5 points of the best (big, 99.0%)" in recommend(rows, 0.5)["reason"]
    assert recommend(rows, 0.1)["backbone"] == "big"
    assert recommend(rows, 5)["backbone"] == "tiny"
    assert recommend([], 0.5) is None


def test_choose_weights_must_name_backbones_of_the_list():
    assert ChooseConfig(backbones="a,b", weights="b=/w.h5").weights_of() == {"b": "/w.h5"}
    with pytest.raises(ConfigError, match="CHOOSE_WEIGHTS must be NAME=PATH pairs"):
        ChooseConfig(backbones="a,b", weights="c=/w.h5")
    with pytest.raises(ConfigError, match="PER_CLASS=1"):
        ChooseConfig(per_class=1)


def test_make_choose_writes_table_plot_and_lists_the_absent_as_skipped(tmp_path, monkeypatch, capsys):
    import pipeline.features.hub as hub

    def offline(preset, file_name):
        raise WeightsUnavailableError(f"Cannot fetch keras-hub preset {preset!r} (offline).")

    monkeypatch.setattr(hub, "_download", offline)
    monkeypatch.setattr(hub, "_check_network", lambda preset: None)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "no-cache"))
    folder = make_folder(tmp_path / "pets", 8, layout="presplit")
    args = ["choose", "--data-dir", str(folder), "--weights", "none", "--image-size", "32", "--no-progress"]
    args += ["--backbones", "tiny,hub:dinov2_small", "--per-class", "4", "--choose-dir", str(tmp_path / "choose")]
    assert main([*args, "--features-dir", str(tmp_path / "features")]) == 0
    out = tmp_path / "choose" / "pets"
    result = json.loads((out / "choose.json").read_text())
    assert [r["backbone"] for r in result["rows"]] == ["tiny"]
    assert result["sample"] == {"train": 8, "validation": 8}  # validation has 4 per class
    tiny = result["rows"][0]
    assert tiny["feature_dim"] == 32 and tiny["feature_bytes_per_1k"] == 32 * 4 * 1000
    assert tiny["projected_features_seconds"] > 0 and tiny["runtime"] in ("openvino f32", "tensorflow f32")
    assert result["recommendation"]["backbone"] == "tiny"
    assert result["skipped"][0]["backbone"] == "hub:dinov2_small" and "offline" in result["skipped"][0]["reason"]
    assert (out / "choose.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| tiny | 32 | avg |" in printed and "skipped hub:dinov2_small" in printed


def test_choose_needs_an_image_folder(capsys):
    assert main(["choose", "--dataset", "cats_vs_dogs", "--weights", "none", "--backbones", "tiny"]) == 2
    assert "make choose samples an image folder; set DATA_DIR" in capsys.readouterr().err


def test_backbone_instead_of_backbones_is_an_error(tmp_path, capsys):
    assert main(["choose", "--data-dir", str(tmp_path), "--backbone", "tiny"]) == 2
    assert "use BACKBONES=tiny" in capsys.readouterr().err
