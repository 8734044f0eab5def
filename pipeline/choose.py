"""`make choose`: which backbone for this data, at what cost.

On a seeded, stratified sample of an image folder (`stratified_rows` over the folder
scan) every candidate backbone extracts features and the logistic probe is fitted on
them, as `make head` would on the full data. Per backbone the table has validation
accuracy, images per second on this machine (decode, resize and forward pass, as
stage 1 runs them, after the model's warm-up), feature width, feature bytes per 1,000
images, and the time a full `make features` would take at that rate. The
recommendation is the fastest backbone within CHOOSE_TOLERANCE accuracy points of
the best: a linear probe's accuracy on a sample is noisy, its cost is not.

A backbone whose weights are absent (offline, no cached or local preset) is listed
as skipped with the reason; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.config_tools import ChooseConfig
from pipeline.errors import ConfigError, WeightsUnavailableError
from pipeline.features.backbones import get_backbone
from pipeline.features.sources import FolderScan, folder_source, scan_folder, stratified_rows

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class Sample:
    """The sampled positions of the train and validation splits of a folder, with their labels."""

    scan: FolderScan
    positions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    total_images: int


def draw_sample(config: FeaturesConfig, per_class: int) -> Sample:
    """`per_class` train and at most `per_class` validation images of every class, seeded."""
    if config.data.data_dir is None:
        raise ConfigError(
            f"make choose samples an image folder; set DATA_DIR. Received: DATASET={config.data.dataset!r}."
        )
    scan = scan_folder(config.data, seed=config.seed)
    names = list(scan.class_names)
    positions, labels = {}, {}
    for split in ("train", "validation"):
        split_labels = np.array([label for _, label in scan.splits.get(split, [])], np.int64)
        if not len(split_labels):
            raise ConfigError(f"make choose needs a {split} split; the folder {scan.root} has none.")
        smallest = int(np.bincount(split_labels, minlength=len(names)).min())
        n = per_class if split == "train" else max(1, min(per_class, smallest))
        rows = stratified_rows(split_labels, np.arange(len(split_labels)), n, names, seed=config.seed)
        positions[split], labels[split] = rows, split_labels[rows]
    total = sum(len(entries) for entries in scan.splits.values())
    return Sample(scan=scan, positions=positions, labels=labels, total_images=total)


def choose(features: FeaturesConfig, config: ChooseConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs every candidate on the sample; writes choose.{json,md,png} to CHOOSE_DIR/<data>/."""
    sample = draw_sample(features, config.per_class)
    weights = config.weights_of()
    rows, skipped = [], []
    for name in config.names:
        candidate = dataclasses.replace(features, backbone=name, weights=weights.get(name, features.weights))
        try:
            spec = get_backbone(name, candidate.weights_arg)
        except WeightsUnavailableError as err:
            skipped.append({"backbone": name, "reason": str(err)})
            log.warning("choose: skipping %s: %s", name, err)
            continue
        try:
            rows.append(
                _measure(candidate.resolved(spec.default_size, spec.check_pooling(features.pooling)), spec, sample)
            )
        except WeightsUnavailableError as err:
            skipped.append({"backbone": name, "reason": str(err)})
            log.warning("choose: skipping %s: %s", name, err)
    result = {
        "data": str(sample.scan.root),
        "sample": {split: int(len(p)) for split, p in sample.positions.items()},
        "total_images": sample.total_images,
        "per_class": config.per_class,
        "tolerance_points": config.tolerance,
        "rows": rows,
        "skipped": skipped,
        "recommendation": recommend(rows, config.tolerance),
    }
    return write_results(result, Path(config.out_dir) / features.data.name)


def _measure(config: FeaturesConfig, spec, sample: Sample) -> dict[str, Any]:
    """Extracts the sample with one backbone and fits the logistic probe on it."""
    from pipeline.features.extractor import build_extractor
    from pipeline.features.runtimes import forward_for
    from pipeline.heads.registry import create_head
    from pipeline.phases import Phases

    model = build_extractor(spec, image_size=config.image_size, weights=config.weights_arg, pooling=config.pooling)
    forward = forward_for(model, config, spec, Phases())
    source = folder_source(sample.scan)
    features, rates = {}, []
    for split, positions in sample.positions.items():
        features[split], seconds, images = _extract(forward, source.splits[split].at(positions), config)
        rates.append((seconds, images))
    head = create_head("logistic", seed=config.seed).fit(
        features["train"], sample.labels["train"], features["validation"], sample.labels["validation"]
    )
    predicted = head.predict_proba(features["validation"]).argmax(axis=1)
    seconds, images = (sum(values) for values in zip(*rates))
    per_second = images / seconds if seconds else float("nan")
    dim = spec.pooled_dim(config.pooling)
    return {
        "backbone": config.backbone,
        "weights": config.weights,
        "image_size": config.image_size,
        "pooling": config.pooling,
        "validation_accuracy": float(np.mean(predicted == sample.labels["validation"])),
        "images_per_second": round(per_second, 1),
        "runtime": forward.describe(),
        "feature_dim": dim,
        "feature_bytes_per_1k": dim * _DTYPE_BYTES[config.dtype] * 1000,
        "projected_features_seconds": round(sample.total_images / per_second, 1),
    }


def _extract(forward, split, config: FeaturesConfig) -> tuple[np.ndarray, float, int]:
    """Features of a split's records, and the seconds and images that the rate counts.

    The batches are stage 1's (`image_batches`, on the runtime's input schedule). The
    rate leaves out the first batch, which pays for the runtime's verification against
    TensorFlow once per run, not per image.
    """
    from pipeline.features.backbones import input_resize
    from pipeline.features.batches import image_batches

    batches = image_batches(
        split, start=0, resize=input_resize(config), batch_size=config.batch_size, schedule=forward.schedule
    )
    out, clock = [], [time.perf_counter()]
    for images, *_ in batches:
        out.append(np.asarray(forward(images)))
        clock.append(time.perf_counter())
    if sum(len(b) for b in out) != split.size:
        raise ConfigError(f"make choose read {sum(len(b) for b in out)} of {split.size} sampled images.")
    first = 1 if len(out) > 1 else 0  # a split of one batch is timed with its verification
    return np.concatenate(out), clock[-1] - clock[first], sum(len(b) for b in out[first:])


def recommend(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any] | None:
    """The fastest backbone within `tolerance` accuracy points of the best, and why."""
    if not rows:
        return None
    best = max(rows, key=lambda r: r["validation_accuracy"])
    close = [r for r in rows if 100 * (best["validation_accuracy"] - r["validation_accuracy"]) <= tolerance]
    pick = max(close, key=lambda r: r["images_per_second"])
    if pick is best:
        accuracy = 100 * best["validation_accuracy"]
        reason = f"the most accurate ({accuracy:.1f}%), and none within {tolerance} points is faster"
    else:
        reason = (
            f"{100 * pick['validation_accuracy']:.1f}% validation accuracy, within {tolerance} points of the best "
            f"({best['backbone']}, {100 * best['validation_accuracy']:.1f}%), at "
            f"{pick['images_per_second'] / best['images_per_second']:.1f}x its images per second"
        )
    return {"backbone": pick["backbone"], "reason": reason}


def write_results(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """choose.json, choose.md (the table) and choose.png (accuracy against images per second)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "choose.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "choose.md").write_text(table(result))
    if result["rows"]:
        plot(result["rows"], out / "choose.png")
    return {**result, "out": str(out)}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of `make choose`, its recommendation and the skipped backbones."""
    lines = [
        f"# Which backbone for {result['data']}",
        "",
        f"Sample: {result['sample']['train']} train, {result['sample']['validation']} validation images "
        f"(PER_CLASS={result['per_class']}); full data: {result['total_images']} images.",
        "",
        "| backbone | size | pooling | val. acc. | img/s | runtime | dim | MB / 1k images | full `make features` |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backbone']} | {r['image_size']} | {r['pooling']} | {100 * r['validation_accuracy']:.1f}% "
            f"| {r['images_per_second']:.1f} | {r['runtime']} | {r['feature_dim']} "
            f"| {r['feature_bytes_per_1k'] / 1e6:.2f} | {_duration(r['projected_features_seconds'])} |"
        )
    pick = result["recommendation"]
    lines += ["", f"Recommended: **{pick['backbone']}**, {pick['reason']}." if pick else "No backbone ran."]
    lines += [f"- skipped {s['backbone']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Validation accuracy against images per second (log scale), one labelled point per backbone."""
    from matplotlib.figure import Figure

    from pipeline.plots import save

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for r in rows:
        axes.scatter(r["images_per_second"], 100 * r["validation_accuracy"], s=20 + r["feature_dim"] / 20)
        axes.annotate(r["backbone"], (r["images_per_second"], 100 * r["validation_accuracy"]), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel(f"images per second ({rows[0]['runtime']}, this machine)")
    axes.set_ylabel("validation accuracy (%), logistic probe")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return save(figure, path, dpi=100)
