"""Stage 2: train a light head on cached features, evaluate it, write a run directory.

The backbone never runs here, which is why a retrain takes seconds. Hyper-parameters
are chosen on the validation split only; the test split is scored once, at the end.

A run directory (`runs/<feature file>__<head>/`) holds::

    head.joblib | head.keras, head.json    the fitted head
    labels.txt                             class names in output order
    config.json                            features config + key, head config
    metrics.json                           validation and test metrics, chosen hyper-parameters
    history.csv, tensorboard/              dense head only
    learning_curves.png                    dense head only
    confusion_matrix.png, predictions.png  on test (validation if there is no test split)
    report.md                              the table and the plots

It is assembled in a temporary directory and moved into place at the end, so a
failed run never leaves a half-written directory or clobbers the previous one.

Augmented views of the train split (stage 1 with AUG_VIEWS) are used as
`HeadConfig.views` says: by default all of them for the dense head, none for the
logistic one. `HeadConfig.train_per_class` trains on a seeded, stratified subset
of the train split (few-shot); the views of the chosen examples come with them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline import plots
from pipeline.config import FeaturesConfig, HeadConfig, parse_size
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.heads import Head, create_head, load_head
from pipeline.metrics import classification_metrics
from pipeline.store import VIEWS_SPLIT, FeatureRows, FeatureSet, open_rows, read_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRun:
    """A finished stage-2 run; `up_to_date` means it was found finished, not retrained."""

    run_dir: Path
    head: Head
    metrics: dict[str, Any]
    up_to_date: bool = False

    def summary(self) -> str:
        parts = [f"head: {self.head.name}" + (" (up to date, not retrained)" if self.up_to_date else "")]
        used = self.metrics.get("views") or {}
        if used.get("train_per_class"):
            parts.append(f"{used['train_per_class']} train examples per class")
        if used.get("used"):
            parts.append(f"{used['used']} augmented views ({used['how']})")
        for split in ("validation", "test"):
            if self.metrics.get(split):
                parts.append(f"{split} accuracy {self.metrics[split]['accuracy']:.4f}")
        parts.append(f"trained in {self.metrics['training_seconds']:.2f} s -> {self.run_dir}")
        return ", ".join(parts)


def run_dir_for(features_path: Path, config: HeadConfig) -> Path:
    """`runs/<feature file>__<head>[__views-V][__N-per-class]`.

    Explicit VIEWS and TRAIN_PER_CLASS name their own runs, so runs of one file with
    0, 2 or 5 views, or few-shot subsets, sit side by side; the default (VIEWS unset)
    keeps the plain name.
    """
    name = f"{Path(features_path).stem}__{config.head}"
    if config.views is not None:
        name += f"__views-{config.views}"
    if config.train_per_class is not None:
        name += f"__{config.train_per_class}-per-class"
    return Path(config.runs_dir) / name


def memory_budget(config: HeadConfig) -> int:
    """MEMORY_BUDGET in bytes; by default a quarter of this machine's RAM."""
    if config.memory_budget is not None:
        return parse_size(config.memory_budget, "MEMORY_BUDGET")
    import psutil

    return psutil.virtual_memory().total // 4


def train_head(features_path: Path, config: HeadConfig, *, expect: Mapping[str, Any] | None = None) -> HeadRun:
    """Fits `config.head` on the train split of `features_path` and writes its run directory.

    The train rows are read into memory when the head's `memory_copies` of them (as
    float32) fit `memory_budget(config)`; else the head trains on them streamed from
    the file (`Head.fit_streamed`: the dense head streams, the logistic head refuses).
    `metrics.json` says which (`memory`).
    """
    cached = read_features(features_path, expect=expect, exclude=[VIEWS_SPLIT])  # train: block by block
    run_dir = run_dir_for(features_path, config)
    used = _views_record(cached, config)
    finished = _finished_run(run_dir, cached, config, used)
    if finished:
        return finished
    rows = _check_splits(cached)
    class_names = list(cached.class_names)
    validation = cached.splits["validation"]
    test = cached.splits.get("test")
    if test is None:
        log.warning("%s has no test split: reporting validation metrics only.", features_path)
    if config.train_per_class is not None:
        rows = rows.select(stratified_rows(rows.labels, rows.index, config.train_per_class, class_names,
                                           seed=config.seed))
    rows = rows.with_views(used["used"])
    head = create_head(config.head, **config.head_params())
    budget = memory_budget(config)
    streamed = rows.nbytes * head.memory_copies > budget
    memory = {"budget_bytes": budget, "train_bytes": rows.nbytes, "streamed": streamed}

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    try:
        if streamed:
            log.info("%d train rows x %d versions take %.2f GB as float32, %d times that over MEMORY_BUDGET "
                     "(%.2f GB): streaming them from %s", len(rows), rows.num_views + 1, rows.nbytes / 1e9,
                     head.memory_copies, budget / 1e9, features_path)
            head.fit_streamed(rows, validation.features, validation.labels, n_classes=len(class_names),
                              callbacks=_callbacks(head, work), memory_budget=budget)
        else:
            train, views = rows.load()
            head.fit(
                train.features, train.labels, validation.features, validation.labels,
                n_classes=len(class_names), callbacks=_callbacks(head, work), views=views,
            )
        metrics = {
            "head": config.head,
            "features": str(features_path),
            "train_examples": len(rows),
            "views": used,
            "memory": memory,
            "hyperparameters": head.params_,
            "training_seconds": head.params_["fit_seconds"],
            "validation": classification_metrics(head.predict_proba(validation.features), validation.labels, class_names),
            "test": classification_metrics(head.predict_proba(test.features), test.labels, class_names) if test else None,
        }
        if test is None:
            metrics["note"] = "no test split: validation metrics only"
        _write_run(work, head, cached, config, metrics)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(work, run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return HeadRun(run_dir=run_dir, head=head, metrics=metrics)


def _finished_run(run_dir: Path, cached: FeatureSet, config: HeadConfig, used: dict[str, Any]) -> HeadRun | None:
    """The run in `run_dir` if it was trained on these features with this config.

    Training is deterministic for a seed, so such a run is what a retrain would give.
    Views are not in the features' key, so the views used are compared too: a file
    that gained views since makes the default dense run stale (a run on its first V
    views stays valid, since views never change once written).
    """
    try:
        record = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        record.get("features_key") != cached.key or record.get("head") != config.to_dict()
        or _without_available(record.get("views", _NO_VIEWS)) != _without_available(used)
    ):
        return None
    return HeadRun(run_dir=run_dir, head=load_head(run_dir), metrics=metrics, up_to_date=True)


_NO_VIEWS = {"used": 0}


def _without_available(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "available"}


def _views_record(cached: FeatureSet, config: HeadConfig) -> dict[str, Any]:
    """Which views a run uses and what they are (their augmentation and seed), as stored in config.json."""
    used = config.views_used(cached.num_views)
    record: dict[str, Any] = dict(_NO_VIEWS)
    if used:
        a = cached.view_attrs
        record = {
            "used": used, "available": cached.num_views, "augment": a["augment"], "seed": a["seed"],
            "how": "sampled per example per epoch" if config.head == "dense" else "stacked as rows",
        }
    if config.train_per_class is not None:
        record["train_per_class"] = config.train_per_class
    return record


def stratified_rows(labels: np.ndarray, index: np.ndarray, per_class: int, class_names: list[str], *,
                    seed: int) -> np.ndarray:
    """Sorted rows of a seeded subset with `per_class` examples of every class.

    Each class keeps the examples whose split `index` ranks first under a seeded hash,
    so the choice depends on the examples, not on their rows: the head on cached
    features and stage 3 on images (which may hold images the cache skipped) pick
    the same ones. A class with fewer than `per_class` examples is an error, not a
    smaller class.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    short = [f"{class_names[c]}: {int(n)}" for c, n in enumerate(counts) if n < per_class]
    if short:
        raise ConfigError(
            f"TRAIN_PER_CLASS={per_class} needs that many train examples in every class. Received: "
            f"{', '.join(short)}. Lower TRAIN_PER_CLASS."
        )
    ranks = np.array([_rank(seed, int(i)) for i in index], dtype=np.uint64)
    rows = []
    for c in range(len(class_names)):
        members = np.flatnonzero(labels == c)
        rows.append(members[np.argsort(ranks[members], kind="stable")[:per_class]])
    return np.sort(np.concatenate(rows))


def _rank(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big")


def _check_splits(cached: FeatureSet) -> FeatureRows:
    """The train rows (left in the file), once train and validation are known to exist with sane labels."""
    k = len(cached.class_names)
    try:
        rows = open_rows(cached.path, VIEWS_SPLIT)
    except CacheError:
        rows = None
    available = [*([VIEWS_SPLIT] if rows is not None else []), *cached.splits]
    missing = [s for s in ("train", "validation") if s not in available]
    if missing:
        raise DataError(
            f"{cached.path} has no {' or '.join(missing)} split; a head needs train and validation "
            f"(available: {', '.join(available)}). Rebuild the features with both splits."
        )
    for name, labels in [(VIEWS_SPLIT, rows.labels), *((n, s.labels) for n, s in cached.splits.items())]:
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise DataError(
                f"{cached.path}: split '{name}' has {int(bad.sum())} labels outside the {k} classes "
                f"{cached.class_names} (first: {int(labels[bad][0])}). The file is inconsistent; rebuild it."
            )
    return rows


def _callbacks(head: Head, work: Path) -> list[Any] | None:
    if head.name != "dense":
        return None
    import keras

    return [keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"))]


def _write_run(work: Path, head: Head, cached: FeatureSet, config: HeadConfig, metrics: dict[str, Any]) -> None:
    class_names = list(cached.class_names)
    head.save(work)
    (work / "labels.txt").write_text("\n".join(class_names) + "\n")
    (work / "config.json").write_text(json.dumps(
        {"features": cached.config, "features_key": cached.key, "features_path": str(cached.path),
         "head": config.to_dict(), "views": metrics["views"]}, indent=2, sort_keys=True) + "\n")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figures = []
    history = getattr(head, "history_", None)
    if history:
        with open(work / "history.csv", "w", newline="") as f:
            writer = csv.writer(f)
            names = list(history)
            writer.writerow(["epoch", *names])
            for epoch, row in enumerate(zip(*(history[n] for n in names)), start=1):
                writer.writerow([epoch, *row])
        figures.append(plots.learning_curves(history, work / "learning_curves.png"))
    scored = "test" if metrics["test"] else "validation"
    figures.append(plots.confusion_matrix(
        metrics[scored]["confusion_matrix"], class_names, work / "confusion_matrix.png",
        title=f"{config.head} head, {scored} split",
    ))
    grid = _predictions_grid(head, cached, scored, config, work / "predictions.png")
    if grid:
        figures.append(grid)
    (work / "report.md").write_text(report(metrics, class_names, [f.name for f in figures]))


def _predictions_grid(head: Head, cached: FeatureSet, split: str, config: HeadConfig, path: Path) -> Path | None:
    """A grid of images with predicted vs true labels, read back from the data source."""
    if config.grid_images == 0:
        return None
    rows = cached.splits[split]
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(len(rows), size=min(config.grid_images, len(rows)), replace=False))
    try:
        images = load_images(FeaturesConfig.from_dict(cached.config), split, rows.index[chosen])
    except Exception as err:  # the images may have moved since extraction; the plot is optional
        log.warning("No predictions grid: cannot read the %s images back (%s).", split, err)
        return None
    proba = head.predict_proba(rows.features[chosen])
    names = cached.class_names
    return plots.predictions_grid(
        [images[int(i)] for i in rows.index[chosen]],
        [names[label] for label in rows.labels[chosen]],
        [names[p] for p in proba.argmax(axis=1)],
        proba.max(axis=1).tolist(),
        path,
        title=f"{head.name} head on {split} images",
    )


def load_images(config: FeaturesConfig, split: str, positions: np.ndarray) -> dict[int, np.ndarray]:
    """The images at `positions` of a split, decoded and resized as the backbone saw them."""
    import tensorflow as tf

    from pipeline.data import load_source
    from pipeline.extract import decode_and_resize

    source = load_source(config.data, seed=config.seed)
    wanted = tf.constant(np.asarray(positions, np.int64))
    records = source.splits[split].records(0).filter(lambda r: tf.reduce_any(tf.equal(r["index"], wanted)))
    return {
        int(r["index"]): decode_and_resize(r["image"], config.image_size).numpy()
        for r in records
    }


def report(metrics: Mapping[str, Any], class_names: list[str], figures: list[str]) -> str:
    """A short markdown report: headline numbers, per-class table, the figures."""
    splits = [s for s in ("validation", "test") if metrics.get(s)]
    lines = [f"# {metrics['head']} head", "", f"Features: `{metrics['features']}`", ""]
    lines += ["| split | n | accuracy | mean per-class accuracy | loss |", "|---|---:|---:|---:|---:|"]
    for s in splits:
        m = metrics[s]
        lines.append(f"| {s} | {m['n']} | {m['accuracy']:.4f} | {m['mean_per_class_accuracy']:.4f} | {m['loss']:.4f} |")
    if metrics.get("note"):
        lines += ["", f"Note: {metrics['note']}."]
    chosen = {k: v for k, v in metrics["hyperparameters"].items() if k in ("C", "best_epoch", "epochs_run", "converged")}
    lines += ["", f"Training: {metrics['training_seconds']:.2f} s; {json.dumps(chosen)}", ""]
    views = metrics.get("views") or {}
    if views.get("used") or views.get("train_per_class"):
        lines[-1:] = [f"Train split: {metrics.get('train_examples')} examples"
                      + (f" ({views['train_per_class']} per class)" if views.get("train_per_class") else "")
                      + (f", {views['used']} augmented views each, {views['how']} (augmentation "
                         f"{json.dumps(views['augment'])}, seed {views['seed']})" if views.get("used") else ""),
                      ""]
    last = splits[-1]
    lines += [f"Per class ({last}):", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in class_names:
        c = metrics[last]["per_class"][name]
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines.append("")
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
