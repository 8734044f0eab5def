"""Stage 3's outputs: metrics.json, the saved model, learning curves, confusion matrix, top losses, report.md."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import plots, runs
from pipeline.config import FeaturesConfig, FinetuneConfig
from pipeline.decisions import report_lines
from pipeline.features.backbones import input_resize
from pipeline.features.pictures import load_images
from pipeline.features.sources import DataSource
from pipeline.finetune.checkpoints import Resumable
from pipeline.finetune.data import FinetuneData, predict, split_predictions
from pipeline.finetune.job import FinetuneRun, Job, Origin
from pipeline.finetune.model import FinetuneModel, backbone_layers
from pipeline.metrics import classification_metrics

log = logging.getLogger(__name__)


MODEL_FILE = "model.keras"


def evaluate_run(
    job: Job, parts: FinetuneModel, data: FinetuneData, training: Resumable, counts: Mapping[str, dict[str, int]]
) -> dict[str, Any]:
    """metrics.json: the fine-tuned model evaluated, beside the starting point and the training record."""
    config, at, backbone = job.config, parts.fine_tune_at, parts.backbone
    finetune_epochs = [h for h in training.history if h["phase"] == "finetune"]
    return {
        "stage": "finetune",
        "backbone": job.features.backbone,
        "fine_tune_at": None
        if at is None
        else {
            "requested": config.fine_tune_at,
            "index": at,
            "layer": backbone_layers(backbone)[at].name,
            "layers": len(backbone_layers(backbone)),
        },
        "learning_rate": config.resolved_learning_rate,
        "optimizer": config.optimizer,
        "head_run": str(job.origin.run_dir) if job.origin.run_dir else job.origin.name,
        "train_examples": data.train_split.size,
        "train_per_class": job.per_class,
        "best_epoch": training.best_epoch,
        "epochs_run": training.epochs_done,
        "stopped_early": training.stopped,
        "parameters": dict(counts),
        "seconds_per_epoch": _mean([h["seconds"] for h in finetune_epochs or training.history]),
        "training_seconds": round(sum(h["seconds"] for h in training.history), 2),
        "before": training.before,
        "after": evaluate(parts.model, data),
        "decisions": data.decisions,
    }


def evaluate(model, data: FinetuneData) -> dict[str, Any]:
    results = {}
    for name, dataset in (
        ("validation", data.validation),
        ("test", data.test),
        ("test_without_decisions", data.test_as_given),
    ):
        if dataset is None:
            if name != "test_without_decisions":
                results[name] = None
            continue
        proba, labels = predict(model, dataset)
        results[name] = classification_metrics(proba, labels, data.class_names)
    return results


def _mean(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 3) if values else 0.0


def write_run(
    job: Job, parts: FinetuneModel, data: FinetuneData, training: Resumable, metrics: dict[str, Any]
) -> FinetuneRun:
    """The model, records and figures, written into the `.partial` folder, which is then renamed."""
    work, features, config, class_names = job.work, job.features, job.config, data.class_names
    training.clear()
    parts.classifier(input_resize(features)).save(work / MODEL_FILE)
    runs.write_records(work, class_names=class_names, config=job.identity, metrics=metrics)
    runs.write_history(
        work, ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"], training.history
    )
    figures = [_learning_curves(job.origin, training, work / runs.LEARNING_CURVES, config)]
    scored = "test" if metrics["after"]["test"] else "validation"
    figures.append(
        plots.confusion_matrix(
            metrics["after"][scored]["confusion_matrix"],
            class_names,
            work / runs.CONFUSION_MATRIX,
            title=f"fine-tuned, {scored} split",
        )
    )
    grid = _predictions_grid(parts, features, data.source, scored, class_names, config, work / runs.TOP_LOSSES)
    if grid:
        figures.append(grid)
    runs.write_report(work, report(metrics, [f.name for f in figures]))
    runs.publish(work, job.run_dir)
    return FinetuneRun(run_dir=job.run_dir, metrics=metrics)


def _learning_curves(origin: Origin, training: Resumable, path: Path, config: FinetuneConfig) -> Path:
    """The stage-2 curves (dense head) or the warm-up epochs, then fine-tuning, with a marker."""
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    earlier = dict(getattr(origin.head, "history_", None) or {})
    history = {n: list(earlier.get(n, [])) for n in names}
    marker = len(history["loss"]) + config.head_epochs
    for h in training.history:
        for n in names:
            history[n].append(h.get(n, float("nan")))
    return plots.learning_curves(history, path, marker=marker if config.epochs else None)


def _predictions_grid(
    parts: FinetuneModel,
    features: FeaturesConfig,
    source: DataSource,
    split: str,
    class_names: list[str],
    config: FinetuneConfig,
    path: Path,
) -> Path | None:
    """The `grid_images` images of `split` the fine-tuned model gets most wrong or is
    least sure of (highest -log p(true), fastai's top losses), one more pass over it."""
    if config.grid_images == 0:
        return None
    try:
        proba, labels, positions = split_predictions(parts.model, features, source.splits[split], config.batch_size)
    except Exception as err:  # the plot is optional; the metrics are not
        log.warning("No top-losses grid: cannot read the %s images back (%s).", split, err)
        return None
    return runs.top_losses_grid(
        proba,
        labels,
        positions,
        class_names,
        count=config.grid_images,
        split=split,
        path=path,
        read=lambda chosen: load_images(features, split, positions[chosen], source=source),
        title=f"fine-tuned model: top losses on {split} images",
    )


def report(metrics: Mapping[str, Any], figures: list[str]) -> str:
    """Before/after accuracy, parameter counts and time per epoch, then the figures."""
    at = metrics["fine_tune_at"]
    unfrozen = (
        f"Unfrozen from layer {at['index']} ({at['layer']}) of {at['layers']}"
        if at
        else "No fine-tuning phase: the backbone stayed frozen"
    )
    lines = [
        f"# Fine-tuned {metrics['backbone']}",
        "",
        f"Warm start: {metrics['head_run']}. {unfrozen}; {metrics['optimizer']} at {metrics['learning_rate']:g}.",
        "",
        "| split | n | accuracy before | accuracy after | loss before | loss after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split in ("validation", "test"):
        before, after = metrics["before"].get(split), metrics["after"].get(split)
        if after:
            lines.append(
                f"| {split} | {after['n']} | {before['accuracy']:.4f} | {after['accuracy']:.4f} | "
                f"{before['loss']:.4f} | {after['loss']:.4f} |"
            )
    p = metrics["parameters"]
    lines += [
        "",
        "| parameters | trainable | non-trainable |",
        "|---|---:|---:|",
        f"| frozen backbone | {p['frozen']['trainable']:,} | {p['frozen']['non_trainable']:,} |",
        f"| fine-tuning | {p['finetune']['trainable']:,} | {p['finetune']['non_trainable']:,} |",
        "",
        f"Epochs run: {metrics['epochs_run']} (best: {metrics['best_epoch']}), "
        f"{metrics['seconds_per_epoch']:.1f} s per fine-tuning epoch, {metrics['training_seconds']:.0f} s in all.",
        "",
    ]
    after = metrics["after"]
    lines += report_lines(metrics.get("decisions"), after.get("test"), after.get("test_without_decisions"))
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
