"""`make bench-head`: seconds to retrain each head on cached features, the fast loop's promise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.bench.measure import machine, median


def _time_fits(name: str, cached, *, repeats: int, seed: int) -> dict[str, Any]:
    """`repeats` fits of a fresh head `name`: seconds of each, the last one's accuracy and chosen settings."""
    from pipeline.heads.registry import create_head

    train, validation = cached.splits["train"], cached.splits["validation"]
    times, accuracy, head = [], None, None
    for _ in range(repeats):
        head = create_head(name, seed=seed)
        started = time.perf_counter()
        head.fit(
            train.features, train.labels, validation.features, validation.labels, n_classes=len(cached.class_names)
        )
        times.append(time.perf_counter() - started)
        accuracy = float((head.predict(validation.features) == validation.labels).mean())
    return {
        "seconds_median": round(median(times), 3),
        "seconds_all": [round(t, 3) for t in times],
        "validation_accuracy": accuracy,
        "chosen": {k: v for k, v in head.params_.items() if k in ("C", "best_epoch", "epochs_run")},
    }


def bench_head(features_path: Path, *, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Seconds to train each head on cached features (median of `repeats`), with accuracy.

    This is the retrain cost the product promises: seconds, where the seed workflow
    pays a backbone pass over every image per epoch.
    """
    from pipeline.features.store import read_features

    cached = read_features(features_path)
    return {
        "benchmark": "head",
        "machine": machine(),
        "features": str(features_path),
        "train_examples": len(cached.splits["train"]),
        "feature_dim": int(cached.attrs["feature_dim"]),
        "heads": {name: _time_fits(name, cached, repeats=repeats, seed=seed) for name in ("logistic", "dense")},
        "targets_seconds": {"logistic": 1.0, "dense": 30.0},
    }


def head_table(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_head` result."""
    lines = [
        f"Head training on cached features ({result['train_examples']} x {result['feature_dim']}), "
        f"{result['machine']['cpus']} CPUs; median of repeated fits, logistic including its C sweep.",
        "",
        "| head | seconds (median) | all runs | target s | validation accuracy | chosen |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, head in result["heads"].items():
        lines.append(
            f"| {name} | {head['seconds_median']} | {', '.join(map(str, head['seconds_all']))} "
            f"| {result['targets_seconds'][name]} | {head['validation_accuracy']:.4f} | {json.dumps(head['chosen'])} |"
        )
    return "\n".join(lines) + "\n"
