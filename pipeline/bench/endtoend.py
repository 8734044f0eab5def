"""`make bench`: cached features plus a head against the seed workflow, in one run on one machine.

The seed workflow is the TensorFlow tutorial's model trained with the backbone in the
loop every epoch. Every stage runs as `python -m pipeline <command>` in a fresh process
(`pipeline.bench.measure`) with its outputs in a fresh work folder, so nothing is found
up to date instead of measured. The report is `pipeline.bench.report`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import runs
from pipeline.bench.features import bench_features
from pipeline.bench.heads import bench_head
from pipeline.bench.measure import features_figures, machine, median, run_stage, run_up_to_date
from pipeline.bench.settings import FULL_SETTINGS, QUICK_SETTINGS, TARGETS, FeaturesBench, PipelineBench
from pipeline.errors import ConfigError

__all__ = ["FULL_SETTINGS", "QUICK_SETTINGS", "bench_pipeline", "expected_seconds", "seed_workflow_flags"]

log = logging.getLogger(__name__)

#: Generated images per class and split in quick mode (300 in all).
QUICK_IMAGES = {"train": 100, "validation": 50}

#: What `expected_seconds` scales from (MobileNetV2 at 160 px, 2 CPUs): seconds per image
#: of extraction and of one seed epoch, per process of fixed costs, and the seed
#: workflow's own fixed cost (its evaluations and saving the model).
_RATES = {
    "extract": 1 / 180,
    "seed_epoch": 22.0 / 3000,
    "process": 6.0,
    "light_process": 2.5,
    "head_fits": 3.0,
    "seed_fixed": 40.0,
}


def seed_workflow_flags(epochs: int) -> list[str]:
    """The TensorFlow tutorial's training, as flags of `python -m pipeline finetune`.

    Stage 3 with a fresh head trained on images and no fine-tuning phase *is* the
    tutorial's model, so the benchmark does not reimplement it: RandomFlip
    ("horizontal") and RandomRotation(0.2) -> the backbone's preprocessing -> the
    frozen backbone called with `training=False` -> average pooling -> Dropout(0.2) ->
    Dense, trained with `fit` for `epochs` epochs, RMSprop at 1e-4, batch 32. The
    rotation is the tutorial's 0.2, not AUG_ROTATION's default of 0.1.
    `--fine-tune-at all` only names the empty fine-tuning phase (every backbone has a
    layer 0, the default 100 does not exist in the tiny one).
    """
    flags = {
        "--head-epochs": str(epochs),
        "--fine-tune-epochs": "0",
        "--fine-tune-at": "all",
        "--optimizer": "rmsprop",
        "--learning-rate": "1e-4",
        "--dropout": "0.2",
        "--fine-tune-batch-size": "32",
        "--aug-flip": "horizontal",
        "--aug-rotation": "0.2",
        "--aug-zoom": "0",
        "--aug-contrast": "0",
        "--aug-translation": "0",
    }
    return [item for pair in flags.items() for item in pair]


def expected_seconds(n_images: int, settings: PipelineBench) -> float:
    """A rough duration of `bench_pipeline` on a 2-CPU machine, scaled from MobileNetV2 at 160 px by pixel count.

    Other backbones differ, and more cores or a GPU make it shorter.
    """
    sizes, image_sizes = settings.extraction_sizes, settings.extraction_image_sizes
    runs_per_image_size = len(sizes) - 1 + settings.extraction_repeats
    extracted_per_image_size = sum(sizes[:-1]) + sizes[-1] * settings.extraction_repeats
    heavy = len(image_sizes) * runs_per_image_size + 4  # + both feature files, the dense head, the seed workflow
    light = 2 * settings.stage_repeats + 1  # logistic heads, no-op features, the float16 logistic head

    def scale(size: int) -> float:
        return (size / 160) ** 2

    seed = _RATES["seed_fixed"] + (2 * _RATES["extract"] + settings.epochs * _RATES["seed_epoch"]) * n_images
    return (
        heavy * _RATES["process"]
        + light * _RATES["light_process"]
        + settings.forward_seconds * len(image_sizes) * (runs_per_image_size + 1)
        + settings.head_repeats * _RATES["head_fits"]
        + scale(settings.image_size) * seed
        + sum(scale(size) for size in image_sizes) * extracted_per_image_size * _RATES["extract"]
    )


def write_quick_assets(root: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """(image folder, weights file) for quick mode, so CI needs no shared assets.

    The folder has train/ and validation/ with two classes of noisy 40x40 JPEGs,
    reddish `cats` and bluish `dogs` (separable even through a random backbone),
    `QUICK_IMAGES` per class and split. The weights are the tiny backbone's seeded
    initial weights saved to a `.weights.h5` file: the seed workflow, like stage 3,
    refuses `WEIGHTS=none` outside a from-scratch run.
    """
    import numpy as np
    from PIL import Image

    from pipeline.features.extractor import build_extractor

    rng = np.random.default_rng(seed)
    colors = {"cats": (200, 70, 60), "dogs": (60, 80, 200)}
    data = Path(root) / "generated"
    for split, per_class in QUICK_IMAGES.items():
        for name, color in colors.items():
            folder = data / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(np.asarray(color, float) + rng.normal(0, 40, (40, 40, 3)), 0, 255)
                # Names unique across splits, as in cats_and_dogs_filtered: `subset_folder` pools them.
                image = Image.fromarray(pixels.astype(np.uint8), "RGB")
                image.save(folder / f"{name}.{split}.{i}.jpg", quality=90)
    weights = Path(root) / "tiny.weights.h5"
    extractor = build_extractor("tiny", image_size=QUICK_SETTINGS.image_size, weights=None)
    extractor.get_layer("backbone").save_weights(weights)
    return data, weights


class Stages:
    """The benchmark's `python -m pipeline` processes, each run once and recorded by name, in order."""

    def __init__(self, settings: PipelineBench, *, data_dir: Path, weights: str, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.records: dict[str, dict[str, Any]] = {}
        flags = {
            "--data-dir": str(data_dir),
            "--backbone": settings.backbone,
            "--weights": str(weights),
            "--image-size": str(settings.image_size),
            "--batch-size": str(settings.batch_size),
            "--seed": "0",
            "--output-dir": str(work_dir / "features"),
        }
        self.features_flags = [item for pair in flags.items() for item in pair]

    def run(self, name: str, command: str, flags: list[str]) -> dict[str, Any]:
        """Runs one stage; its record holds its figures, phases and result metrics."""
        log.info("bench: %s ...", name)
        record = run_stage(command, flags)
        result = record.pop("result")
        del record["lines"]
        record["phases"] = result.get("phases", {})
        if command == "features":
            record.update(features_figures(result), file_bytes=os.path.getsize(record["output"]))
        else:
            metrics = result["metrics"]
            validation = metrics["after"]["validation"] if command == "finetune" else metrics["validation"]
            record.update(
                validation_accuracy=validation["accuracy"],
                validation_examples=validation["n"],
                training_seconds=metrics["training_seconds"],
            )
            if command == "finetune":
                record["epoch_seconds"] = runs.history_column(Path(record["output"]), "seconds")
        log.info("bench: %s: %.1f s wall, peak %.0f MiB", name, record["wall_seconds"], record["peak_rss_mib"])
        self.records[name] = record
        return record

    def features(self, name: str, *extra: str) -> dict[str, Any]:
        return self.run(name, "features", [*self.features_flags, *extra])

    def head(self, name: str, kind: str, *extra: str) -> dict[str, Any]:
        """A head trained in a fresh runs folder of its own, so it is trained and not found."""
        runs_dir = self.work_dir / "runs" / name.replace(" ", "-")
        return self.run(name, "head", [*self.features_flags, *extra, "--runs-dir", str(runs_dir), "--head", kind])

    def seed_workflow(self, epochs: int) -> dict[str, Any]:
        runs_dir = str(self.work_dir / "seed-runs")
        return self.run(
            "seed workflow", "finetune", [*self.features_flags, *seed_workflow_flags(epochs), "--runs-dir", runs_dir]
        )


@dataclass(frozen=True)
class Figures:
    """Everything `bench_pipeline` measured, before it is summed up into results."""

    settings: PipelineBench
    extraction: dict[str, dict[str, Any]]
    stages: dict[str, dict[str, Any]]
    float32: dict[str, Any]
    logistic_runs: list[dict[str, Any]]
    dense: dict[str, Any]
    float16: dict[str, Any]
    logistic16: dict[str, Any]
    noop: list[dict[str, Any]]
    retrain: dict[str, Any]
    seed: dict[str, Any]

    @property
    def logistic(self) -> dict[str, Any]:
        """The first logistic head, with the median wall seconds of all of them."""
        return {**self.logistic_runs[0], "wall_seconds": median([r["wall_seconds"] for r in self.logistic_runs])}


FLOAT16 = ("--dtype", "float16")


def measure_extraction(settings: PipelineBench, *, data_dir: Path, weights: str, work_dir: Path) -> dict[str, Any]:
    """`bench_features` at every extraction image size."""
    return {
        str(size): bench_features(
            FeaturesBench(
                data_dir=str(data_dir),
                weights=str(weights),
                backbone=settings.backbone,
                image_size=size,
                batch_size=settings.batch_size,
                sizes=settings.extraction_sizes,
                repeats=settings.extraction_repeats,
                forward_seconds=settings.forward_seconds,
            ),
            work_dir=work_dir / f"bench-features-{size}",
        )
        for size in settings.extraction_image_sizes
    }


def measure(settings: PipelineBench, *, data_dir: Path, weights: str, work_dir: Path) -> Figures:
    """Runs every measurement of `make bench`, in order."""
    sizes = ", ".join(map(str, settings.extraction_image_sizes))
    log.info("bench: 1/5 extraction against the forward pass at %s px", sizes)
    extraction = measure_extraction(settings, data_dir=data_dir, weights=weights, work_dir=work_dir)
    log.info("bench: 2/5 the pipeline end to end, float32 and float16 features")
    stages = Stages(settings, data_dir=data_dir, weights=weights, work_dir=work_dir)
    float32 = stages.features("features")
    names = ["head logistic" + (f" {i + 1}" if i else "") for i in range(settings.stage_repeats)]
    logistic_runs = [stages.head(name, "logistic") for name in names]
    dense = stages.head("head dense", "dense")
    float16 = stages.features("features float16", *FLOAT16)
    logistic16 = stages.head("head logistic float16", "logistic", *FLOAT16)
    log.info("bench: 3/5 no-op `features` runs")
    noop = [run_up_to_date("features", stages.features_flags) for _ in range(settings.stage_repeats)]
    log.info("bench: 4/5 head retrains on the cached features")
    retrain = bench_head(Path(float32["output"]), repeats=settings.head_repeats)
    log.info("bench: 5/5 the seed workflow, %d epochs with the backbone in the loop", settings.epochs)
    seed = stages.seed_workflow(settings.epochs)
    return Figures(
        settings, extraction, stages.records, float32, logistic_runs, dense, float16, logistic16, noop, retrain, seed
    )


def end_to_end(figures: Figures) -> dict[str, Any]:
    """`features` + each head against the seed workflow: wall and compute seconds, accuracy, speed-up."""
    seed, float32 = figures.seed, figures.float32
    result = {
        "seed_workflow": {
            "stages": ["finetune"],
            "wall_seconds": seed["wall_seconds"],
            "compute_seconds": seed["training_seconds"],
            "validation_accuracy": seed["validation_accuracy"],
            "epochs": figures.settings.epochs,
        }
    }
    for name, head in (("logistic", figures.logistic), ("dense", figures.dense)):
        wall = float32["wall_seconds"] + head["wall_seconds"]
        compute = float32["extract_seconds"] + head["training_seconds"]
        difference = head["validation_accuracy"] - seed["validation_accuracy"]
        speedup = seed["wall_seconds"] / wall
        result[f"pipeline_{name}"] = {
            "stages": ["features", f"head {name}"],
            "wall_seconds": round(wall, 2),
            "compute_seconds": round(compute, 2),
            "validation_accuracy": head["validation_accuracy"],
            "speedup": round(speedup, 2),
            "compute_speedup": round(seed["training_seconds"] / compute, 2),
            "accuracy_difference": round(difference, 4),
            "target_met": bool(speedup >= TARGETS["speedup"] and difference >= 0),
        }
    return result


def fast_loop(figures: Figures) -> dict[str, Any]:
    """The fast loop: logistic `head` processes, no-op `features` processes, the dense head's fixed cost."""
    logistic_walls = [r["wall_seconds"] for r in figures.logistic_runs]
    noop_walls = [r["wall_seconds"] for r in figures.noop]
    dense = figures.dense
    dense_fixed = round(dense["wall_seconds"] - dense["training_seconds"], 2)
    return {
        "head_logistic_seconds": median(logistic_walls),
        "head_logistic_seconds_all": logistic_walls,
        "head_dense_seconds": dense["wall_seconds"],
        "head_dense_fit_seconds": dense["training_seconds"],
        "head_dense_fixed_seconds": dense_fixed,
        "noop_features_seconds": median(noop_walls),
        "noop_features_seconds_all": noop_walls,
        "noop_features_phases": figures.noop[len(figures.noop) // 2]["phases"],
        "targets_met": {
            "head_logistic_seconds": median(logistic_walls) <= TARGETS["head_logistic_seconds"],
            "head_dense_fixed_seconds": dense_fixed <= TARGETS["head_dense_fixed_seconds"],
            "noop_features_seconds": median(noop_walls) <= TARGETS["noop_features_seconds"],
        },
    }


def retrain(figures: Figures) -> dict[str, Any]:
    """Head retrains on cached features against one seed epoch (the first also traces the model, so it is left out)."""
    epochs = figures.seed["epoch_seconds"]
    seed_epoch = round(median(epochs[1:] or epochs), 3)
    heads = figures.retrain["heads"]
    logistic, dense = heads["logistic"]["seconds_median"], heads["dense"]["seconds_median"]
    return {
        "logistic_seconds": logistic,
        "dense_seconds": dense,
        "seed_epoch_seconds": seed_epoch,
        "seed_epoch_seconds_all": epochs,
        "logistic_ratio_to_seed_epoch": round(seed_epoch / logistic, 2),
        "dense_ratio_to_seed_epoch": round(seed_epoch / dense, 2),
        "target_met": bool(logistic < TARGETS["logistic_retrain_seconds"]),
        "heads": heads,
    }


def storage(figures: Figures) -> dict[str, Any]:
    """The feature file in float32 and float16, and the logistic head's validation accuracy on each."""
    float32, float16 = figures.float32["file_bytes"], figures.float16["file_bytes"]
    accuracy32, accuracy16 = figures.logistic["validation_accuracy"], figures.logistic16["validation_accuracy"]
    return {
        "float32_bytes": float32,
        "float16_bytes": float16,
        "size_ratio": round(float16 / float32, 3),
        "float32_validation_accuracy": accuracy32,
        "float16_validation_accuracy": accuracy16,
        "accuracy_difference": round(accuracy16 - accuracy32, 4),
    }


def peak_memory(figures: Figures) -> dict[str, float]:
    """Peak resident memory of every stage process and every extraction run."""
    return {
        **{name: stage["peak_rss_mib"] for name, stage in figures.stages.items()},
        **{
            f"bench-features {size} px, {run['images']} images": run["peak_rss_mib"]
            for size, extraction in figures.extraction.items()
            for run in extraction["runs"]
        },
    }


def settings_record(figures: Figures, *, data_dir: Path, weights: str) -> dict[str, Any]:
    """The settings as run, with the examples each split had."""
    settings = {k: v for k, v in dataclasses.asdict(figures.settings).items() if k != "out"}
    return {
        **settings,
        "data_dir": str(data_dir),
        "weights": str(weights),
        "extraction_image_sizes": list(figures.settings.extraction_image_sizes),
        "extraction_sizes": list(figures.settings.extraction_sizes),
        "train_examples": figures.retrain["train_examples"],
        "validation_examples": figures.seed["validation_examples"],
        "seed_workflow_flags": seed_workflow_flags(figures.settings.epochs),
    }


def bench_pipeline(
    settings: PipelineBench, *, data_dir: Path, weights: str, work_dir: Path, quick: bool = False
) -> dict[str, Any]:
    """`make bench`: the pipeline against the seed workflow, one run, one machine, as one JSON-ready dict.

    Every stage runs in its own process (`run_stage`) with outputs in `work_dir`,
    which should be fresh.
    """
    if str(weights).lower() == "none":
        raise ConfigError(
            "The seed workflow trains on a pretrained backbone. Received: weights='none'. "
            "Set BENCH_WEIGHTS to a weights file or imagenet."
        )
    figures = measure(settings, data_dir=data_dir, weights=weights, work_dir=Path(work_dir))
    return {
        "benchmark": "pipeline",
        "quick": quick,
        "machine": machine(),
        "settings": settings_record(figures, data_dir=data_dir, weights=weights),
        "wall_time_includes": "each stage's `python -m pipeline` process: interpreter start-up, imports, data "
        "listing, model build, the work itself, evaluation and writing its outputs "
        "(files, plots, report)",
        "compute_time_includes": "the stage's own timer: the extraction loop; the head's fit; the seed "
        "workflow's training epochs (each with its validation pass)",
        "targets": TARGETS,
        "extraction": {size: {k: v for k, v in e.items() if k != "machine"} for size, e in figures.extraction.items()},
        "end_to_end": end_to_end(figures),
        "fast_loop": fast_loop(figures),
        "retrain": retrain(figures),
        "storage": storage(figures),
        "peak_rss_mib": peak_memory(figures),
        # the work folder is temporary: only the outputs' names are kept
        "stages": {name: {**s, "output": Path(s["output"]).name} for name, s in figures.stages.items()},
    }
