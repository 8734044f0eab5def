"""`make bench`: the quick mode runs end to end and its figures are consistent.

The quick benchmark (tiny backbone, generated images, 2 epochs) is what keeps the
benchmark code from rotting; its timings mean nothing, so the assertions are about
structure and arithmetic, not speed. It starts eight `python -m pipeline`
processes, which makes `test_quick_benchmark_writes_consistent_results` the slow
one here: about 50 s on a quiet 2-CPU machine, 80 s under load.
"""

from __future__ import annotations

import json
import math

import pytest

from pipeline.bench import endtoend as bench
from pipeline.cli import build_parser, config_of, main
from pipeline.config import FinetuneConfig


def test_seed_workflow_flags_are_the_tutorials_recipe():
    """The seed workflow is stage 3 with the tutorial's settings, nothing reimplemented."""
    args = build_parser().parse_args(["finetune", "--data-dir", "x", *bench.seed_workflow_flags(10)])
    config = config_of(FinetuneConfig, args)
    assert (config.head_epochs, config.epochs) == (10, 0)
    assert (config.optimizer, config.head_learning_rate) == ("rmsprop", 1e-4)
    assert (config.dropout, config.batch_size) == (0.2, 32)
    assert config.augment.to_dict() == {
        "flip": "horizontal",
        "rotation": 0.2,
        "zoom": 0.0,
        "contrast": 0.0,
        "translation": 0.0,
    }


def test_full_run_is_expected_to_fit_in_fifteen_minutes():
    minutes = bench.expected_seconds(3000, bench.FULL_SETTINGS) / 60
    assert 6 < minutes < 15


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--data-dir", "/no/such/folder"], "Benchmark data not found"),
        (["bench", "--data-dir", ".", "--weights", "/no/such/weights.h5"], "Benchmark weights not found"),
        (["bench", "--quick", "--data-dir", "."], "Quick mode (BENCH_QUICK=1) generates its images"),
    ],
)
def test_bench_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    if "not found" in message:
        assert "BENCH_QUICK=1" in err


@pytest.mark.slow  # seven `python -m pipeline` processes: about 40 s on 2 CPUs
def test_quick_benchmark_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected duration about" in printed and "## Targets" in printed

    result = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert result["benchmark"] == "pipeline" and result["quick"] is True
    machine = result["machine"]
    assert machine["cpus"] >= 1 and isinstance(machine["gpus"], list) and machine["tensorflow"]
    assert result["settings"]["backbone"] == "tiny" and result["settings"]["epochs"] == 2
    assert result["settings"]["train_examples"] == 200 and result["settings"]["validation_examples"] == 100

    # 1. extraction against the forward pass at each image size, on all 300 images (names unique across splits)
    extraction = result["extraction"]
    assert set(extraction) == {"32", "40"}
    for size, figures in extraction.items():
        assert figures["settings"]["image_size"] == int(size)
        assert [r["images"] for r in figures["runs"]] == [300]
        run = figures["runs"][0]
        assert run["ratio_to_forward"] == pytest.approx(run["img_per_s"] / run["forward_img_per_s"], abs=2e-3)

    # 2. end to end: ratios are computed from the stages' own figures
    stages, e2e, fast = result["stages"], result["end_to_end"], result["fast_loop"]
    seed = e2e["seed_workflow"]
    assert seed["wall_seconds"] == stages["seed workflow"]["wall_seconds"] > 0
    assert len(stages["seed workflow"]["epoch_seconds"]) == 2
    logistic_walls = [stages[name]["wall_seconds"] for name in ("head logistic", "head logistic 2")]
    assert fast["head_logistic_seconds_all"] == logistic_walls
    head_walls = {"logistic": sorted(logistic_walls)[1], "dense": stages["head dense"]["wall_seconds"]}
    for name in ("logistic", "dense"):
        p = e2e[f"pipeline_{name}"]
        wall = stages["features"]["wall_seconds"] + head_walls[name]
        assert p["wall_seconds"] == pytest.approx(wall, abs=0.01)
        assert p["speedup"] == pytest.approx(seed["wall_seconds"] / wall, abs=0.01)
        assert p["accuracy_difference"] == pytest.approx(
            p["validation_accuracy"] - seed["validation_accuracy"], abs=1e-4
        )
        assert p["target_met"] == (p["speedup"] >= 12 and p["accuracy_difference"] >= 0)
        assert p["validation_accuracy"] >= 0.9  # the generated classes are separable
    for workflow in e2e.values():
        assert 0.0 <= workflow["validation_accuracy"] <= 1.0
        assert workflow["wall_seconds"] > 0 and workflow["compute_seconds"] > 0

    # 3. the fast loop: no-op features, the dense head's fixed cost, the stages' phases
    assert len(fast["noop_features_seconds_all"]) == 2 and fast["noop_features_seconds"] > 0
    assert fast["head_dense_fixed_seconds"] == pytest.approx(
        stages["head dense"]["wall_seconds"] - stages["head dense"]["training_seconds"], abs=0.01
    )
    assert {"start-up and imports", "resolve key"} <= set(fast["noop_features_phases"])
    assert "forward" not in fast["noop_features_phases"]  # it found its file: no backbone ran
    phases = stages["features"]["phases"]
    assert {"import TensorFlow and Keras", "build model", "decode", "forward", "write", "finish file"} <= set(phases)
    assert sum(phases.values()) <= stages["features"]["wall_seconds"]
    assert "start-up and imports" in stages["head logistic"]["phases"]

    # 4. head retrain against one seed epoch
    retrain = result["retrain"]
    assert retrain["logistic_seconds"] > 0 and retrain["seed_epoch_seconds"] > 0
    assert retrain["logistic_ratio_to_seed_epoch"] == pytest.approx(
        retrain["seed_epoch_seconds"] / retrain["logistic_seconds"], abs=0.01
    )
    assert retrain["target_met"] == (retrain["logistic_seconds"] < 1.0)

    # 5. storage: float16 files are smaller, and the accuracy difference is reported
    storage = result["storage"]
    assert 0 < storage["float16_bytes"] < storage["float32_bytes"]
    assert storage["size_ratio"] == pytest.approx(storage["float16_bytes"] / storage["float32_bytes"], abs=1e-3)
    for key in ("float32_validation_accuracy", "float16_validation_accuracy"):
        assert 0.0 <= storage[key] <= 1.0
    assert math.isfinite(storage["accuracy_difference"])

    # 6. peak memory of every stage
    expected = {
        "features",
        "head logistic",
        "head logistic 2",
        "head dense",
        "features float16",
        "head logistic float16",
        "seed workflow",
        "bench-features 32 px, 300 images",
        "bench-features 40 px, 300 images",
    }
    assert set(result["peak_rss_mib"]) == expected
    assert all(mib > 50 for mib in result["peak_rss_mib"].values())

    for heading in (
        "## Targets",
        "## End to end",
        "## Head retrain",
        "## Storage",
        "## Peak memory",
        "## Extraction against the forward pass",
        "Quick mode",
    ):
        assert heading in table
    assert f"| {stages['seed workflow']['wall_seconds']} |" in table
    profile = (out / "profile.md").read_text()
    assert f"## `features`, {stages['features']['images']} images extracted" in profile
    for heading in ("`features`, ", "`head`, logistic", "file up to date", "| forward |", "rest of the process"):
        assert heading in profile
