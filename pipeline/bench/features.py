"""`make bench-features`: stage 1's throughput against the same backbone's bare forward pass.

The forward pass on in-memory tensors, on the runtime stage 1 picks, is the ceiling:
decoding and storage should hide behind the model (on a CPU they share its cores, so
the faster the runtime, the larger their share). Peak memory is recorded at each dataset
size, where it should stay flat.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.bench.measure import machine, run_features_process, subset_folder
from pipeline.bench.settings import TARGETS, FeaturesBench

log = logging.getLogger(__name__)


def forward_throughput(forward, *, image_size: int, batch_size: int, seconds: float) -> float:
    """Images/s of a compiled forward pass alone, on a batch already in memory."""
    import numpy as np
    import tensorflow as tf

    images = tf.random.stateless_uniform((batch_size, image_size, image_size, 3), (0, 0), 0, 255)
    np.asarray(forward(images))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        np.asarray(forward(images))
        count += batch_size
    return count / (time.perf_counter() - started)


def _extract(settings: FeaturesBench, weights: str | None, work_dir: Path, size: int, attempt: int) -> dict[str, Any]:
    """One `features` process on the first `size` images."""
    folder = subset_folder(Path(settings.data_dir), work_dir / f"data-{size}", size)
    flags = {
        "--data-dir": str(folder),
        "--backbone": settings.backbone,
        "--weights": weights or "none",
        "--image-size": str(settings.image_size),
        "--batch-size": str(settings.batch_size),
        "--output-dir": str(work_dir / f"features-{size}-{attempt}"),
    }
    return run_features_process([item for pair in flags.items() for item in pair])


def bench_features(settings: FeaturesBench, *, work_dir: Path) -> dict[str, Any]:
    """Extraction vs bare forward pass (`TARGETS["extraction_ratio"]`) and peak RSS per dataset size.

    Machine speed drifts from minute to minute on shared hosts, so forward-pass
    measurements are interleaved with the extraction runs: each extraction is
    compared with the mean of the forward measurements just before and after it, and
    the median of those ratios is reported, with every individual figure.
    """
    weights = None if str(settings.weights).lower() == "none" else settings.weights
    size, batch = settings.image_size, settings.batch_size
    forward = _bare_forward(settings, weights, work_dir)

    def measure_forward() -> float:
        return forward_throughput(forward, image_size=size, batch_size=batch, seconds=settings.forward_seconds)

    runs = []
    before = measure_forward()
    sizes = settings.sizes
    schedule = [(n, 0) for n in sizes[:-1]] + [(sizes[-1], i) for i in range(settings.repeats)]
    for images, attempt in schedule:
        run = _extract(settings, weights, work_dir, images, attempt)
        after = measure_forward()
        run["forward_img_per_s"] = round((before + after) / 2, 1)
        run["forward_runtime"] = forward.describe()
        run["ratio_to_forward"] = round(run["img_per_s"] / run["forward_img_per_s"], 3)
        runs.append(run)
        log.info("bench-features: %s", run)
        before = after
    return _result(settings, runs)


def _bare_forward(settings: FeaturesBench, weights: str | None, work_dir: Path):
    """The backbone on the runtime `make features` picks (RUNTIME=auto), so the ratio compares like with like."""
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features.backbones import get_backbone
    from pipeline.features.extractor import build_extractor
    from pipeline.features.runtimes import forward_for
    from pipeline.phases import Phases

    spec = get_backbone(settings.backbone, weights)
    config = FeaturesConfig(
        data=DataConfig(dataset=None, data_dir=str(settings.data_dir)),
        backbone=settings.backbone,
        weights=str(weights or "none"),
        image_size=settings.image_size,
        batch_size=settings.batch_size,
        output_dir=str(work_dir / "bare-forward"),
    ).resolved(settings.image_size, spec.default_pooling)
    model = build_extractor(spec, image_size=config.image_size, weights=weights, pooling=config.pooling)
    return forward_for(model, config, spec, Phases())


def _result(settings: FeaturesBench, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = sorted(r["ratio_to_forward"] for r in runs if r["images"] == runs[-1]["images"])
    return {
        "benchmark": "features",
        "machine": machine(),
        "settings": {
            "backbone": settings.backbone,
            "image_size": settings.image_size,
            "batch_size": settings.batch_size,
            "weights": str(settings.weights),
            "data_dir": str(settings.data_dir),
            "repeats": settings.repeats,
        },
        "runs": runs,
        "ratio_to_forward_median": ratios[len(ratios) // 2],
        "ratio_to_forward_all": ratios,
        "peak_rss_mib": {str(r["images"]): r["peak_rss_mib"] for r in runs},
        "target_ratio": TARGETS["extraction_ratio"],
    }


def features_table(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_features` result."""
    settings, host = result["settings"], result["machine"]
    lines = [
        f"Stage 1, {settings['backbone']} at {settings['image_size']} px, batch {settings['batch_size']}, "
        f"on {host['cpus']} CPUs ({host['processor']}, GPUs: {', '.join(host['gpus']) or 'none'}, "
        f"TensorFlow {host['tensorflow']}). Forward pass: the same compiled backbone on one in-memory batch, "
        "measured just before and after each run.",
        "",
        "| images | extraction img/s | forward-pass img/s | ratio | extraction s | wall s (incl. start-up) "
        "| peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['images']} | {run['img_per_s']} | {run['forward_img_per_s']} | {run['ratio_to_forward']} "
            f"| {run['extract_seconds']} | {run['wall_seconds']} | {run['peak_rss_mib']} |"
        )
    ratios = result["ratio_to_forward_all"]
    lines += [
        "",
        f"Median ratio to the forward pass: **{result['ratio_to_forward_median']}** (range "
        f"{ratios[0]}-{ratios[-1]}, {len(ratios)} runs of {result['runs'][-1]['images']} images; "
        f"target {result['target_ratio']}).",
    ]
    return "\n".join(lines) + "\n"
