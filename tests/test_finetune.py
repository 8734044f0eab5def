"""Stage 3 on the tiny backbone: what stays frozen, the warm start, resumption, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest
from conftest import make_folder
from test_extract import tiny_config

from pipeline.cli import main
from pipeline.config import AugmentConfig, FinetuneConfig, HeadConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.features.data import load_source
from pipeline.features.extract import extract_features
from pipeline.features.extractor import build_extractor
from pipeline.features.sources import stratified_rows
from pipeline.features.store import read_features
from pipeline.finetune.data import few_shot, image_dataset, predict
from pipeline.finetune.model import block_starts, build_model, resolve_fine_tune_at
from pipeline.finetune.train import finetune
from pipeline.heads.registry import load_head
from pipeline.heads.train import train_head
from pipeline.images import Resize

AT = "block2_conv"  # tiny: input, then conv/bn/relu for blocks 1-3; block 2 starts at layer 4


def save_tiny_weights(path):
    """A "pretrained" tiny backbone: its seeded weights, perturbed, saved to `path`."""
    backbone = build_extractor("tiny", image_size=32, weights=None).get_layer("backbone")
    rng = np.random.default_rng(0)
    backbone.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype) for w in backbone.get_weights()])
    backbone.save_weights(path)
    return path


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A "pretrained" tiny backbone, its features and a dense head."""
    root = tmp_path_factory.mktemp("stage3")
    weights = save_tiny_weights(root / "tiny.weights.h5")
    folder = make_folder(root / "images", 12, classes=("cat", "dog"))
    features = tiny_config(folder, root / "features", weights=str(weights))
    path = extract_features(features, progress=False).path
    head = HeadConfig(head="dense", epochs=5, runs_dir=str(root / "runs"), grid_images=2)
    run = train_head(path, head)
    return features, head, run, path


def tune(tmp_path, **kwargs) -> FinetuneConfig:
    defaults = dict(
        fine_tune_at=AT, epochs=2, patience=0, learning_rate=1e-2, runs_dir=str(tmp_path / "runs"), grid_images=2
    )
    return FinetuneConfig(**{**defaults, **kwargs})


class Snapshot(keras.callbacks.Callback):
    """The training model's weights by layer, at the end of training."""

    def on_train_end(self, logs=None):
        backbone = self.model.get_layer("tiny_extractor").get_layer("backbone")
        self.weights = [[np.array(w) for w in layer.get_weights()] for layer in backbone.layers]


def test_layers_below_fine_tune_at_and_every_batch_norm_stay_bit_identical(stage2, tmp_path):
    features, head, _, _ = stage2
    snapshot = Snapshot()
    run = finetune(features, head, tune(tmp_path), progress=False, callbacks=[snapshot])
    before = build_extractor("tiny", image_size=32, weights=features.weights).get_layer("backbone")
    assert run.metrics["fine_tune_at"]["index"] == 4
    changed = []
    for index, layer in enumerate(before.layers):
        for old, new in zip(layer.get_weights(), snapshot.weights[index]):
            if index < 4 or isinstance(layer, keras.layers.BatchNormalization):
                np.testing.assert_array_equal(old, new, err_msg=layer.name)  # never updated: bit-stable
            elif not np.array_equal(old, new):
                changed.append(layer.name)
    assert changed == ["block2_conv", "block3_conv"]


def test_trainable_counts_are_the_unfrozen_convolutions_and_the_head(stage2, tmp_path):
    features, head, _, _ = stage2
    run = finetune(features, head, tune(tmp_path, epochs=1), progress=False)
    counts = run.metrics["parameters"]
    head_params = 32 + 1  # Dense(1) on 32 features
    assert counts["frozen"]["trainable"] == head_params
    # block2_conv 3x3x16x32 and block3_conv 3x3x32x32, no biases; BN stays frozen.
    assert counts["finetune"]["trainable"] == 3 * 3 * 16 * 32 + 3 * 3 * 32 * 32 + head_params
    total = sum(counts["frozen"].values())
    assert sum(counts["finetune"].values()) == total


def test_at_step_zero_the_model_predicts_what_the_stage2_head_predicts(stage2, tmp_path):
    features, _, run, path = stage2
    config = tune(tmp_path, augment=AugmentConfig(flip="horizontal_and_vertical", rotation=0.3, zoom=0.2))
    head = load_head(run.run_dir)
    parts = build_model(features.resolved(32), config, head, n_classes=2)
    split = load_source(features.data, seed=features.seed).splits["validation"]
    proba, labels = predict(parts.model, image_dataset(split, Resize(32), 8, binary=True))
    cached = read_features(path).splits["validation"]
    np.testing.assert_array_equal(labels, cached.labels)
    np.testing.assert_allclose(proba, head.predict_proba(cached.features), atol=1e-5)


def test_run_directory_before_and_after_metrics_and_exported_model(stage2, tmp_path):
    features, head, stage2_run, _ = stage2
    run = finetune(features, head, tune(tmp_path), progress=False)
    files = {p.name for p in run.run_dir.iterdir()}
    assert {
        "model.keras",
        "labels.txt",
        "config.json",
        "metrics.json",
        "history.csv",
        "learning_curves.png",
        "confusion_matrix.png",
        "top_losses.png",
        "report.md",
        "tensorboard",
    } <= files
    assert not list(run.run_dir.parent.glob("*.partial-*"))
    metrics = run.metrics
    assert metrics["before"]["validation"]["loss"] == pytest.approx(stage2_run.metrics["validation"]["loss"], abs=1e-5)
    assert metrics["after"]["validation"]["loss"] <= metrics["before"]["validation"]["loss"]  # best epoch kept
    rows = (run.run_dir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,phase,loss") and len(rows) == 3
    model = keras.saving.load_model(run.run_dir / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (3, 50, 41, 3), dtype=np.uint8)
    proba = np.asarray(model(images))
    assert proba.shape == (3, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    again = finetune(features, head, tune(tmp_path), progress=False)
    assert again.up_to_date and again.metrics == json.loads((run.run_dir / "metrics.json").read_text())


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch: int):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


class Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.started = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started.append(epoch)


def test_an_interrupted_run_resumes_from_the_next_epoch(stage2, tmp_path):
    features, head, _, _ = stage2
    config = tune(tmp_path, epochs=4)
    with pytest.raises(KeyboardInterrupt):
        finetune(features, head, config, progress=False, callbacks=[Interrupt(2)])
    partial = list((tmp_path / "runs").glob("*.partial-*"))
    assert len(partial) == 1 and json.loads((partial[0] / "state.json").read_text())["history"][-1]["epoch"] == 2
    epochs = Epochs()
    run = finetune(features, head, config, progress=False, callbacks=[epochs])
    assert epochs.started == [2, 3]
    history = (run.run_dir / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == [1, 2, 3, 4]


class Steps(keras.callbacks.Callback):
    """The optimizer's step count when training starts and after every epoch."""

    def __init__(self):
        super().__init__()
        self.at_start, self.after_epoch = None, []

    def on_train_begin(self, logs=None):
        self.at_start = int(self.model.optimizer.iterations)

    def on_epoch_end(self, epoch, logs=None):
        self.after_epoch.append(int(self.model.optimizer.iterations))


def test_a_resumed_run_continues_the_optimizer_keeps_the_best_epoch_and_leaves_nothing_behind(stage2, tmp_path):
    features, head, _, _ = stage2
    config = tune(tmp_path, epochs=3, learning_rate=3e-2)
    first = Steps()
    with pytest.raises(KeyboardInterrupt):
        finetune(features, head, config, progress=False, callbacks=[first, Interrupt(2)])
    work = next((tmp_path / "runs").glob("*.partial-*"))
    state = json.loads((work / "state.json").read_text())
    assert {p.name for p in work.glob("*.npz")} == {state["last"], state["best"]} and state["last"] == "epoch-002.npz"
    resumed = Steps()
    run = finetune(features, head, config, progress=False, callbacks=[resumed])
    assert resumed.at_start == first.after_epoch[-1] > 0  # Adam's state came back with the weights
    history = csv.DictReader((run.run_dir / "history.csv").read_text().splitlines())
    losses = {0: run.metrics["before"]["validation"]["loss"]} | {int(r["epoch"]): float(r["val_loss"]) for r in history}
    assert run.metrics["best_epoch"] == min(losses, key=losses.get)  # over the epochs of both runs
    assert run.metrics["after"]["validation"]["loss"] == pytest.approx(min(losses.values()), rel=1e-4, abs=1e-6)
    assert not list(run.run_dir.glob("*.npz")) and not list(run.run_dir.glob(".tmp-*"))
    assert not (run.run_dir / "state.json").exists() and not list(run.run_dir.parent.glob("*.partial-*"))


def test_an_interrupted_warm_up_resumes_in_phase_1_then_fine_tunes_the_epochs_asked(stage2, tmp_path):
    features, head, _, _ = stage2
    config = tune(tmp_path, head_epochs=2, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(features, head, config, progress=False, callbacks=[Interrupt(1)])
    epochs = Epochs()
    run = finetune(features, head, config, progress=False, callbacks=[epochs])
    assert epochs.started == [1, 2, 3]  # phase 1 from its second epoch, then both fine-tuning epochs
    rows = [row.split(",")[:2] for row in (run.run_dir / "history.csv").read_text().splitlines()[1:]]
    assert rows == [["1", "head"], ["2", "head"], ["3", "finetune"], ["4", "finetune"]]


def test_state_left_by_the_earlier_format_starts_afresh_with_a_warning(stage2, tmp_path, caplog):
    features, head, _, _ = stage2
    config = tune(tmp_path, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(features, head, config, progress=False, callbacks=[Interrupt(1)])
    work = next((tmp_path / "runs").glob("*.partial-*"))
    for leftover in work.glob("*.npz"):
        leftover.unlink()
    (work / "epoch-001.weights.h5").write_bytes(b"old")
    (work / "state.json").write_text(
        json.dumps(
            {
                "history": [{"epoch": 1, "phase": "finetune", "seconds": 1.0}],
                "last_weights": "epoch-001.weights.h5",
                "best_epoch": 0,
                "best_loss": 0.5,
                "before": None,
                "stopped": False,
            }
        )
    )
    epochs = Epochs()
    run = finetune(features, head, config, progress=False, callbacks=[epochs])
    assert epochs.started == [0, 1] and "cannot be resumed: starting afresh" in caplog.text
    assert not list(run.run_dir.glob("*.weights.h5"))


def test_the_data_source_is_loaded_once_per_run(stage2, tmp_path, monkeypatch):
    import pipeline.features.data
    import pipeline.finetune.data

    features, head, _, _ = stage2
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return load_source(*args, **kwargs)

    monkeypatch.setattr(pipeline.finetune.data, "load_source", counted)
    monkeypatch.setattr(pipeline.features.data, "load_source", counted)
    run = finetune(features, head, tune(tmp_path, epochs=1, grid_images=3), progress=False)
    assert len(list(run.run_dir.glob("*.png"))) == 3  # learning curves, confusion matrix, the image grid
    assert len(calls) == 1


def test_head_epochs_train_a_fresh_head_on_images_first(stage2, tmp_path):
    features, head, _, _ = stage2
    run = finetune(features, head, tune(tmp_path, head_epochs=2, epochs=1), progress=False)
    assert run.run_dir.name.endswith("__images2__ft-block2_conv")
    phases = [row.split(",")[1] for row in (run.run_dir / "history.csv").read_text().splitlines()[1:]]
    assert phases == ["head", "head", "finetune"]


def test_a_few_shot_head_is_fine_tuned_on_its_own_few_shots(stage2, tmp_path):
    features, head, _, path = stage2
    few = dataclasses.replace(head, train_per_class=3, runs_dir=str(tmp_path / "runs"))
    stage2_run = train_head(path, few)
    cached = read_features(path).splits["train"]
    chosen = stratified_rows(cached.labels, cached.index, 3, ["cat", "dog"], seed=few.seed)
    source = load_source(features.data, seed=features.seed)
    subset = few_shot(source.splits["train"], 3, ["cat", "dog"], seed=few.seed)
    ids = sorted(r["id"].decode() for r in subset.records(0).as_numpy_iterator())
    assert subset.size == 6 and ids == sorted(i.decode() if isinstance(i, bytes) else i for i in cached.ids[chosen])

    run = finetune(features, few, tune(tmp_path, epochs=1), progress=False)
    assert run.run_dir.name == f"{stage2_run.run_dir.name}__ft-block2_conv"
    assert run.metrics["train_examples"] == 6 and run.metrics["train_per_class"] == 3
    # Without a stage-2 head (the seed workflow), the head's settings pick the same shots.
    seed_run = finetune(features, few, tune(tmp_path, head_epochs=1, epochs=0), progress=False)
    assert seed_run.run_dir.name.endswith("__images1__3-per-class__ft-frozen")
    assert seed_run.metrics["train_examples"] == 6


def test_blocks_and_names_resolve_on_mobilenet_v2():
    backbone = build_extractor("mobilenet_v2", image_size=32, weights=None).get_layer("backbone")
    assert len(backbone.layers) == 154
    assert len(block_starts(backbone)) == 16  # block_1 ... block_16; the stem and Conv_1 join their neighbours
    assert backbone.layers[resolve_fine_tune_at(backbone, "blocks:1")].name == "block_16_expand"
    assert resolve_fine_tune_at(backbone, "100") == 100
    assert resolve_fine_tune_at(backbone, "all") == 0
    assert backbone.layers[resolve_fine_tune_at(backbone, "block_16")].name == "block_16_expand"
    assert resolve_fine_tune_at(backbone, "Conv_1") == [la.name for la in backbone.layers].index("Conv_1")


@pytest.mark.parametrize(
    "at, message",
    [
        ("999", r"FINE_TUNE_AT=999 is out of range: backbone has 10 layers \(0-9\)"),
        ("-1", "out of range"),
        ("blocks:7", r"expected blocks:N with 1 <= N <= 3"),
        ("block9", "neither a layer index"),
        ("blok2_conv", "Did you mean block2_conv"),
    ],
)
def test_an_invalid_fine_tune_at_is_a_clear_error(stage2, tmp_path, at, message):
    features, head, _, _ = stage2
    with pytest.raises(ConfigError, match=message):
        finetune(features, head, tune(tmp_path, fine_tune_at=at), progress=False)


def test_a_missing_head_a_random_backbone_or_another_image_size_are_errors(stage2, tmp_path):
    features, head, run, _ = stage2
    with pytest.raises(CacheError, match=r"No stage-2 head .* `make head HEAD=dense` .* HEAD_EPOCHS=N"):
        finetune(features, dataclasses.replace(head, head="logistic"), tune(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="needs a pretrained backbone, but WEIGHTS=none"):
        finetune(dataclasses.replace(features, weights="none"), head, tune(tmp_path), progress=False)
    with pytest.raises(CacheError, match="image_size: head 32, asked 48"):
        finetune(
            dataclasses.replace(features, image_size=48), head, tune(tmp_path), head_run=run.run_dir, progress=False
        )
    with pytest.raises(ConfigError, match="FROM_SCRATCH=1 trains from random weights: set WEIGHTS=none"):
        finetune(features, head, tune(tmp_path, from_scratch=True), progress=False)


def test_make_style_cli_runs_stage3(stage2, tmp_path, capsys):
    features, _, run, _ = stage2
    args = [
        "finetune",
        "--data-dir",
        features.data.data_dir,
        "--backbone",
        "tiny",
        "--weights",
        features.weights,
        "--image-size",
        "32",
        "--output-dir",
        features.output_dir,
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--run",
        str(run.run_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--fine-tune-epochs",
        "1",
        "--no-progress",
        "--grid-images",
        "0",
    ]
    assert main([*args, "--fine-tune-at", "blocks:1"]) == 0
    assert "finetune, validation accuracy" in capsys.readouterr().out
    assert main([*args, "--fine-tune-at", "nope"]) == 2
    assert "FINE_TUNE_AT='nope'" in capsys.readouterr().err


def test_make_head_runs_stages_1_and_2_first_only_when_warm_starting(stage2, tmp_path, capsys):
    """`make finetune` passes --make-head; the command, not Make, decides whether a head is needed."""
    features, _, _, _ = stage2
    args = [
        "finetune",
        "--data-dir",
        features.data.data_dir,
        "--backbone",
        "tiny",
        "--weights",
        features.weights,
        "--image-size",
        "32",
        "--features-dir",
        str(tmp_path / "features"),
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--head",
        "dense",
        "--epochs",
        "2",
        "--fine-tune-epochs",
        "1",
        "--fine-tune-at",
        "blocks:1",
        "--no-progress",
        "--grid-images",
        "0",
    ]
    assert main(args) == 2  # without it: the one-line error naming both ways out
    assert "No stage-2 head to warm-start from" in capsys.readouterr().err
    assert main([*args, "--make-head"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0].endswith("__dense") and runs[1] == f"{runs[0]}__ft-blocks1"
    assert len(list((tmp_path / "features").glob("*.h5"))) == 1
    # A warm-up on images needs no stage-2 head: nothing is extracted for it.
    assert main([*args, "--make-head", "--head-epochs", "1", "--features-dir", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()


def test_review_decisions_reach_the_images_and_the_report(stage2, tmp_path):
    import dataclasses
    import hashlib
    from pathlib import Path

    from pipeline.decisions import DecisionStore

    features, head, _, path = stage2
    splits = read_features(path).splits
    root = Path(features.data.data_dir)
    chosen = [
        (str(splits["train"].ids[0]), "exclude", ""),
        (str(splits["validation"].ids[0]), "relabel", "dog" if splits["validation"].labels[0] == 0 else "cat"),
        (str(splits["test"].ids[0]), "exclude", ""),
    ]
    decisions = tmp_path / "data.decisions.csv"
    with DecisionStore(decisions, ["cat", "dog"]) as store:
        for rel, decision, label in chosen:
            store.record(hashlib.sha256((root / rel).read_bytes()).hexdigest(), rel, decision, label)
    decided = dataclasses.replace(head, decisions=str(decisions), decisions_test=True)
    stage2_run = train_head(path, decided)
    assert "__dec-" in stage2_run.run_dir.name
    run = finetune(features, decided, tune(tmp_path, epochs=1), progress=False)
    assert run.run_dir.name.startswith(stage2_run.run_dir.name + "__ft-")
    applied = run.metrics["decisions"]["applied"]
    assert applied == {
        "train": {"exclude": 1, "relabel": 0},
        "validation": {"exclude": 0, "relabel": 1},
        "test": {"exclude": 1, "relabel": 0},
    }
    assert run.metrics["train_examples"] == len(splits["train"]) - 1
    after = run.metrics["after"]
    assert after["test"]["n"] == len(splits["test"]) - 1 and after["test_without_decisions"]["n"] == len(splits["test"])
    assert "Test accuracy with the decisions" in (run.run_dir / "report.md").read_text()
