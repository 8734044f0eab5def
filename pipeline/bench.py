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


def forward_throughput(*, backbone: str, image_size: int, weights: str | None, batch_size: int, seconds: float) -> float:
    """Images/s of the compiled forward pass alone, on a batch already in memory."""
    import tensorflow as tf

    from pipeline.backbones import build_extractor

    model = build_extractor(backbone, image_size=image_size, weights=weights)
    forward = tf.function(lambda x: model(x, training=False))
    images = tf.random.stateless_uniform((batch_size, image_size, image_size, 3), (0, 0), 0, 255)
    forward(images).numpy()  # trace and warm up
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
    forward_seconds: float = 20.0,
) -> dict[str, Any]:
    """Extraction vs bare forward pass (target ratio >= 0.95) and peak RSS per dataset size."""
    forward = forward_throughput(
        backbone=backbone, image_size=image_size, weights=weights, batch_size=batch_size, seconds=forward_seconds
    )
    runs = []
    for size in sizes:
        folder = subset_folder(Path(data_dir), work_dir / f"data-{size}", size)
        flags = [
            "--data-dir", str(folder), "--backbone", backbone, "--weights", weights or "none",
            "--image-size", str(image_size), "--batch-size", str(batch_size),
            "--output-dir", str(work_dir / f"features-{size}"),
        ]
        run = run_features_process(flags)
        run["ratio_to_forward"] = round(run["img_per_s"] / forward, 3)
        runs.append(run)
        log.info("bench-features: %d images: %s", size, run)
    return {
        "benchmark": "features",
        "machine": machine(),
        "settings": {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
                     "weights": str(weights), "data_dir": str(data_dir)},
        "forward_img_per_s": round(forward, 1),
        "runs": runs,
        "ratio_to_forward": runs[-1]["ratio_to_forward"],
        "target_ratio": 0.95,
    }


def features_table(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_features` result."""
    s = result["settings"]
    lines = [
        f"Stage 1 on {result['machine']['cpus']} CPUs ({result['machine']['processor']}, "
        f"GPUs: {', '.join(result['machine']['gpus']) or 'none'}), {s['backbone']} at {s['image_size']} px, "
        f"batch {s['batch_size']}. Bare forward pass on in-memory tensors: **{result['forward_img_per_s']} img/s**.",
        "",
        "| images | extraction img/s | ratio to forward pass | extraction s | wall s (incl. start-up) | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['images']} | {run['img_per_s']} | {run['ratio_to_forward']} | {run['extract_seconds']} "
            f"| {run['wall_seconds']} | {run['peak_rss_mib']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], table: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(table)
    return json_path, md_path
