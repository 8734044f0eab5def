"""The run directory contract (`pipeline.runs`): atomic write, is-current check, readers, the fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from pipeline import runs
from pipeline.cli import main
from pipeline.config import fingerprint
from pipeline.errors import CacheError


def write_run(run_dir: Path, *, config=None, metrics=None) -> Path:
    with runs.assembling(run_dir) as work:
        runs.write_records(
            work,
            class_names=["cat", "dog"],
            config=config or {"head": {"C": 1.0}},
            metrics=metrics or {"validation": {"accuracy": 0.5}},
        )
        runs.write_history(
            work,
            ["epoch", "phase", "loss", "seconds"],
            [
                {"epoch": 1, "phase": "head", "loss": 0.7, "seconds": 1.5},
                {"epoch": 2, "phase": "finetune", "seconds": 2.5},
            ],
        )
    return run_dir


def test_a_run_is_assembled_beside_its_place_and_renamed_over_the_previous_one(tmp_path):
    run_dir = write_run(tmp_path / "runs" / "a__dense", metrics={"n": 1})
    (run_dir / "stale.png").write_bytes(b"old figure")
    write_run(run_dir, metrics={"n": 2})
    assert runs.read_metrics(run_dir) == {"n": 2}
    assert not (run_dir / "stale.png").exists()  # replaced whole, not merged
    assert os.listdir(run_dir.parent) == ["a__dense"]  # no temporary folder left


def test_a_failed_run_leaves_the_previous_run_untouched_and_no_temporary_folder(tmp_path):
    run_dir = write_run(tmp_path / "a__dense", metrics={"n": 1})
    with pytest.raises(RuntimeError, match="training failed"):
        with runs.assembling(run_dir) as work:
            runs.write_records(work, class_names=["x"], config={}, metrics={"n": 2})
            raise RuntimeError("training failed")
    assert runs.read_metrics(run_dir) == {"n": 1} and runs.read_labels(run_dir) == ["cat", "dog"]
    assert os.listdir(tmp_path) == ["a__dense"]


def test_readers_give_back_what_the_writers_wrote(tmp_path):
    run_dir = write_run(tmp_path / "run", config={"features_key": {"backbone": "tiny"}, "head": {"C": 1.0}})
    assert runs.read_labels(run_dir) == ["cat", "dog"]
    assert runs.read_config(run_dir) == {"features_key": {"backbone": "tiny"}, "head": {"C": 1.0}}
    assert [row["phase"] for row in runs.read_history(run_dir)] == ["head", "finetune"]
    assert runs.history_column(run_dir, "seconds") == [1.5, 2.5]
    assert runs.history_column(run_dir, "loss") == [0.7]  # an epoch without the column is left out
    assert runs.read_history(tmp_path / "no-history") == []


def test_a_missing_or_corrupt_record_is_a_clear_error_for_readers_and_not_a_finished_run(tmp_path):
    run_dir = write_run(tmp_path / "run")
    (run_dir / runs.METRICS).write_text("{truncated")
    assert runs.read_run(run_dir) is None and runs.current(run_dir, {}) is None
    with pytest.raises(CacheError, match=r"Expected a run record at .*metrics.json"):
        runs.read_metrics(run_dir)
    with pytest.raises(CacheError, match=r"Expected a run record at .*config.json"):
        runs.read_config(tmp_path / "nothing")
    with pytest.raises(CacheError, match=r"Expected class names in .*labels.txt"):
        runs.read_labels(tmp_path / "nothing")


def test_a_run_is_current_when_its_config_holds_the_identity_asked_for(tmp_path):
    run_dir = write_run(
        tmp_path / "run",
        config={"features_key": {"size": 32}, "head": {"hidden": [8, 4]}, "features_path": "elsewhere.h5"},
    )
    found = runs.current(run_dir, {"features_key": {"size": 32}, "head": {"hidden": (8, 4)}})  # compared as JSON
    assert found is not None and found.metrics == {"validation": {"accuracy": 0.5}}
    assert runs.current(run_dir, {"features_key": {"size": 64}}) is None
    assert runs.current(run_dir, {"views": {"used": 0}}) is None  # a key the run lacks
    assert runs.current(tmp_path / "missing", {}) is None


def test_a_finetune_run_written_with_the_old_mtime_identity_stays_current(tmp_path):
    from pipeline.finetune.job import Job as _Job
    from pipeline.finetune.job import Origin as _Origin
    from pipeline.finetune.job import finished as _finished
    from pipeline.finetune.job import head_identity as _head_identity

    head_run = write_run(tmp_path / "f__dense", config={"head": {"head": "dense"}})
    origin = _Origin(
        "f__dense",
        run_dir=head_run,
        record={"head": {"head": "dense"}},
        trained=fingerprint(runs.read_metrics(head_run)),
        trained_mtime=(head_run / runs.METRICS).stat().st_mtime_ns,
    )
    identity = {"finetune": {"epochs": 2}, "head_run": _head_identity(origin)}
    job = _Job(None, None, origin, tmp_path / "f__dense__ft-all", identity, None, 0)
    old = {**identity, "head_run": {**identity["head_run"], "trained": origin.trained_mtime}}
    write_run(job.run_dir, config=old)
    assert _finished(job) is not None and _finished(job).up_to_date
    write_run(job.run_dir, config={**old, "head_run": {**old["head_run"], "trained": origin.trained_mtime - 1}})
    assert _finished(job) is None  # the stage-2 run was retrained since
    write_run(job.run_dir, config=identity)
    assert _finished(job) is not None


def test_the_fingerprint_is_the_canonical_json_digest_feature_file_names_always_used():
    key = {"backbone": "tiny", "image_size": 32, "splits": ("a", "b")}
    legacy = hashlib.sha256(
        json.dumps({"backbone": "tiny", "image_size": 32, "splits": ["a", "b"]}, sort_keys=True).encode()
    ).hexdigest()[:10]
    assert fingerprint(key) == legacy == fingerprint(dict(reversed(list(key.items()))))
    assert fingerprint({"path": Path("x/y")}) == fingerprint({"path": "x/y"})
    assert len(fingerprint(key, length=8)) == 8 and fingerprint(key) != fingerprint({**key, "image_size": 64})


def test_write_json_replaces_the_file_whole(tmp_path):
    path = runs.write_json(tmp_path / "out" / "result.json", {"path": Path("a.h5"), "n": 1})
    assert json.loads(path.read_text()) == {"path": "a.h5", "n": 1}
    assert os.listdir(path.parent) == ["result.json"]


def test_top_losses_grid_shows_what_it_can_read_and_never_fails_the_run(tmp_path, caplog):
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    labels, positions = np.array([0, 0, 1, 1]), np.array([10, 11, 12, 13])
    picture = np.zeros((8, 8, 3), np.uint8)

    def grid(read):
        return runs.top_losses_grid(
            proba,
            labels,
            positions,
            ["cat", "dog"],
            count=3,
            read=read,
            split="test",
            title="t",
            path=tmp_path / runs.TOP_LOSSES,
        )

    asked = []
    path = grid(lambda rows: asked.append(positions[rows].tolist()) or {11: picture, 12: picture})
    assert asked == [[11, 12, 13]] and path.exists()  # highest loss first; 13 unreadable, left out
    assert grid(lambda rows: {}) is None and "none of the test images" in caplog.text

    def broken(rows):
        raise OSError("moved")

    assert grid(broken) is None and "cannot read the test images back (moved)" in caplog.text


def test_stages_write_their_result_as_json_for_the_benchmark(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", 8)
    common = [
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--output-dir",
        str(tmp_path / "features"),
        "--no-progress",
    ]
    assert main(["features", *common, "--json", str(tmp_path / "features.json")]) == 0
    features = json.loads((tmp_path / "features.json").read_text())
    assert (features["images"], features["skipped"], features["up_to_date"]) == (16, 0, False)
    assert Path(features["path"]).exists() and features["images_per_second"] > 0
    head = ["head", *common, "--head", "logistic", "--runs-dir", str(tmp_path / "runs"), "--grid-images", "0"]
    assert main([*head, "--json", str(tmp_path / "head.json")]) == 0
    result = json.loads((tmp_path / "head.json").read_text())
    assert result["metrics"] == runs.read_metrics(Path(result["run_dir"])) and not result["up_to_date"]
    assert main([*head, "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["up_to_date"]


def test_class_names_the_plot_font_lacks_give_one_log_line_not_a_warning_per_character(tmp_path, caplog, recwarn):
    from pipeline import plots

    path = plots.confusion_matrix([[3, 1], [0, 4]], ["chat", "chien 🐶🐕"], tmp_path / "cm.png", title="t")
    assert path.exists() and path.stat().st_size > 0
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    (line,) = [r.getMessage() for r in caplog.records if "font has no" in r.getMessage()]
    assert line.startswith("cm.png:") and "🐕, 🐶" in line


def test_a_confusion_matrix_of_many_classes_shows_the_most_mistaken_ones(tmp_path):
    from pipeline import plots

    counts = np.diag(np.full(200, 20))
    counts[150, 7] = counts[3, 199] = counts[42, 42 + 1] = 5  # errors touch classes 3, 7, 42, 43, 150, 199
    shown = plots.most_mistaken(counts, plots.MATRIX_CLASSES)
    assert len(shown) == plots.MATRIX_CLASSES and {3, 7, 42, 43, 150, 199} <= set(shown.tolist())
    assert list(shown) == sorted(shown)
    path = plots.confusion_matrix(counts, [f"c{i}" for i in range(200)], tmp_path / "cm.png", title="t")
    from PIL import Image

    with Image.open(path) as image:  # drawn at the size of 30 classes, not 200
        assert max(image.size) <= 100 * (0.6 * plots.MATRIX_CLASSES + 2) + 1
