"""Benchmarks: measured figures for speed and memory targets, never timed tests.

`bench_features` compares stage 1's throughput with the same backbone's bare forward
pass on in-memory tensors (the ceiling: decoding and storage should hide behind the
model), and records peak memory at two dataset sizes (it should stay flat). All
figures come from one run on one machine and are written as JSON and a table.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.data import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


def forward_throughput(forward, *, image_size: int, batch_size: int, seconds: float) -> float:
    """Images/s of a compiled forward pass alone, on a batch already in memory."""
    import tensorflow as tf

    images = tf.random.stateless_uniform((batch_size, image_size, image_size, 3), (0, 0), 0, 255)
    forward(images).numpy()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(images).numpy()
        count += batch_size
    return count / (time.perf_counter() - started)


def subset_folder(source: Path, target: Path, size: int) -> Path:
    """A class-per-folder tree of symlinks to the first `size` images of `source`,
    balanced across classes (the split sub-folders of `source` are pooled)."""
    by_class: dict[str, list[Path]] = {}
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            by_class.setdefault(path.parent.name, []).append(path)
    per_class = size // len(by_class)
    for name, paths in by_class.items():
        if len(paths) < per_class:
            raise ValueError(f"{source} has {len(paths)} images of class {name}; {per_class} needed for {size}.")
        (target / name).mkdir(parents=True, exist_ok=True)
        for path in paths[:per_class]:
            link = target / name / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return target


class PeakMemory:
    """Samples the resident memory of a process and its children until it ends."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak_bytes = pid, interval, 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            process = psutil.Process(self.pid)
            while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                family = [process, *process.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in family))
                time.sleep(self.interval)
        except psutil.Error:
            pass  # the process ended between two samples

    def wait(self) -> float:
        """Peak resident memory in MiB, once the process has ended."""
        self._thread.join()
        return round(self.peak_bytes / 2**20, 1)


_SUMMARY = re.compile(r"features: (\d+) images, (\d+) skipped, ([\d.]+) s, ([\d.]+) img/s")


def run_features_process(flags: Sequence[str]) -> dict[str, Any]:
    """Runs `python -m pipeline features` in a fresh process: wall time, img/s, peak RSS."""
    command = [sys.executable, "-m", "pipeline", "features", "--no-progress", *flags]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    peak_mib = memory.wait()
    wall = time.perf_counter() - started
    match = _SUMMARY.search(stdout)
    if process.returncode != 0 or not match:
        raise RuntimeError(f"features run failed ({process.returncode}): {stderr.strip().splitlines()[-1:]}")
    images, skipped, seconds, rate = match.groups()
    return {
        "images": int(images),
        "skipped": int(skipped),
        "extract_seconds": float(seconds),
        "img_per_s": float(rate),
        "wall_seconds": round(wall, 2),
        "peak_rss_mib": peak_mib,
    }


def machine() -> dict[str, Any]:
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def bench_features(
    *,
    data_dir: Path,
    weights: str | None,
    work_dir: Path,
    backbone: str = "mobilenet_v2",
    image_size: int = 160,
    batch_size: int = 32,
    sizes: Sequence[int] = (1000, 3000),
    repeats: int = 3,
    forward_seconds: float = 10.0,
) -> dict[str, Any]:
    """Extraction vs bare forward pass (target ratio >= 0.95) and peak RSS per dataset size.

    Machine speed drifts from minute to minute on shared hosts, so forward-pass
    measurements are interleaved with the extraction runs: each extraction is
    compared with the mean of the forward measurements just before and after it, and
    the median of those ratios is reported, with every individual figure.
    """
    from pipeline.backbones import build_extractor
    from pipeline.extract import compiled_forward

    forward = compiled_forward(build_extractor(backbone, image_size=image_size, weights=weights), image_size)

    def measure_forward() -> float:
        return forward_throughput(forward, image_size=image_size, batch_size=batch_size, seconds=forward_seconds)

    def extract(size: int, attempt: int) -> dict[str, Any]:
        folder = subset_folder(Path(data_dir), work_dir / f"data-{size}", size)
        flags = [
            "--data-dir", str(folder), "--backbone", backbone, "--weights", weights or "none",
            "--image-size", str(image_size), "--batch-size", str(batch_size),
            "--output-dir", str(work_dir / f"features-{size}-{attempt}"),
        ]
        return run_features_process(flags)

    runs = []
    before = measure_forward()
    schedule = [(size, 0) for size in sizes[:-1]] + [(sizes[-1], i) for i in range(repeats)]
    for size, attempt in schedule:
        run = extract(size, attempt)
        after = measure_forward()
        run["forward_img_per_s"] = round((before + after) / 2, 1)
        run["ratio_to_forward"] = round(run["img_per_s"] / run["forward_img_per_s"], 3)
        runs.append(run)
        log.info("bench-features: %s", run)
        before = after
    ratios = sorted(r["ratio_to_forward"] for r in runs if r["images"] == runs[-1]["images"])
    return {
        "benchmark": "features",
        "machine": machine(),
        "settings": {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
                     "weights": str(weights), "data_dir": str(data_dir), "repeats": repeats},
        "runs": runs,
        "ratio_to_forward_median": ratios[len(ratios) // 2],
        "ratio_to_forward_all": ratios,
        "peak_rss_mib": {str(r["images"]): r["peak_rss_mib"] for r in runs},
        "target_ratio": 0.95,
    }


def features_table(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_features` result."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"Stage 1, {s['backbone']} at {s['image_size']} px, batch {s['batch_size']}, on {m['cpus']} CPUs "
        f"({m['processor']}, GPUs: {', '.join(m['gpus']) or 'none'}, TensorFlow {m['tensorflow']}). "
        f"Forward pass: the same compiled backbone on one in-memory batch, measured just before and after each run.",
        "",
        "| images | extraction img/s | forward-pass img/s | ratio | extraction s | wall s (incl. start-up) | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['images']} | {run['img_per_s']} | {run['forward_img_per_s']} | {run['ratio_to_forward']} "
            f"| {run['extract_seconds']} | {run['wall_seconds']} | {run['peak_rss_mib']} |"
        )
    lines += ["", f"Median ratio to the forward pass: **{result['ratio_to_forward_median']}** "
                  f"(target {result['target_ratio']})."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], table: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(table)
    return json_path, md_path


def bench_head(features_path: Path, *, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Seconds to train each head on cached features (median of `repeats`), with accuracy.

    This is the retrain cost the product promises: seconds, where the seed workflow
    pays a backbone pass over every image per epoch.
    """
    from pipeline.heads import create_head
    from pipeline.store import read_features

    cached = read_features(features_path)
    train, validation = cached.splits["train"], cached.splits["validation"]
    heads = {}
    for name in ("logistic", "dense"):
        times, accuracy = [], None
        for _ in range(repeats):
            head = create_head(name, seed=seed)
            started = time.perf_counter()
            head.fit(train.features, train.labels, validation.features, validation.labels,
                     n_classes=len(cached.class_names))
            times.append(time.perf_counter() - started)
            accuracy = float((head.predict(validation.features) == validation.labels).mean())
        heads[name] = {
            "seconds_median": round(sorted(times)[len(times) // 2], 3),
            "seconds_all": [round(t, 3) for t in times],
            "validation_accuracy": accuracy,
            "chosen": {k: v for k, v in head.params_.items() if k in ("C", "best_epoch", "epochs_run")},
        }
    return {
        "benchmark": "head",
        "machine": machine(),
        "features": str(features_path),
        "train_examples": len(train),
        "feature_dim": int(cached.attrs["feature_dim"]),
        "heads": heads,
        "targets_seconds": {"logistic": 1.0, "dense": 30.0},
    }


def head_table(result: dict[str, Any]) -> str:
    lines = [
        f"Head training on cached features ({result['train_examples']} x {result['feature_dim']}), "
        f"{result['machine']['cpus']} CPUs; median of repeated fits, logistic including its C sweep.",
        "",
        "| head | seconds (median) | all runs | target s | validation accuracy | chosen |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, h in result["heads"].items():
        lines.append(
            f"| {name} | {h['seconds_median']} | {', '.join(map(str, h['seconds_all']))} "
            f"| {result['targets_seconds'][name]} | {h['validation_accuracy']:.4f} | {json.dumps(h['chosen'])} |"
        )
    return "\n".join(lines) + "\n"
