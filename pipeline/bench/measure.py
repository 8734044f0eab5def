"""Measured processes: every benchmarked step runs in a fresh process, so its time and memory are its own.

A stage's wall time is what a user pays (start-up, imports, model build, writing outputs),
and its peak memory covers the process and its children.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.features.listing import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


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


class StageFailed(PipelineError):
    """A benchmarked process exited with an error (its stderr is logged)."""


@dataclass(frozen=True)
class Measured:
    """A finished process: its exit status, output, wall seconds and peak RSS (with its children)."""

    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_rss_mib: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]

    def last_error_line(self) -> str:
        return (self.stderr.strip().splitlines() or ["no output"])[-1]


def measured_process(argv: Sequence[str], *, env: dict[str, str] | None = None) -> Measured:
    """Runs `argv` to its end, sampling its memory; `env` is added to this process's environment."""
    log.debug("bench: %s", " ".join(argv))
    started = time.perf_counter()
    process = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    peak_mib = memory.wait()
    return Measured(process.returncode, stdout, stderr, time.perf_counter() - started, peak_mib)


def run_pipeline(command: str, flags: Sequence[str], env: dict[str, str] | None) -> tuple[dict[str, Any], dict]:
    """`python -m pipeline COMMAND --no-progress FLAGS --json ...`: its figures and its --json result."""
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        result_path = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "pipeline", command, "--no-progress", *flags, "--json", str(result_path)]
        done = measured_process(argv, env=env)
        if done.returncode != 0 or not done.lines:
            log.error(
                "bench: `%s` failed; its stderr ends with:\n%s",
                " ".join(argv[2:]),
                "\n".join(done.stderr.strip().splitlines()[-30:]),
            )
            raise StageFailed(
                f"`python -m pipeline {command}` failed with status {done.returncode}: {done.last_error_line()}"
            )
        result = json.loads(result_path.read_text())
    stage = {
        "command": command,
        "wall_seconds": round(done.wall_seconds, 2),
        "peak_rss_mib": done.peak_rss_mib,
        "summary": done.lines[-1],
        "lines": done.lines,
    }
    return stage, result


def run_stage(command: str, flags: Sequence[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `python -m pipeline COMMAND --no-progress --json RESULT FLAGS` in a fresh process.

    Returns `command`, `wall_seconds` (everything a user waits for: interpreter
    start-up, imports, model build, the work and writing the outputs), `peak_rss_mib`
    (the process and its children, sampled every 50 ms), `summary` (the last line of
    stdout; `lines`: all of it), `result` (the stage's result, read from its --json
    file) and `output` (the feature file or run directory it wrote). A stage that finds its output up
    to date is an error: a benchmark must measure, not find.
    """
    stage, result = run_pipeline(command, flags, env)
    if result["up_to_date"]:
        raise StageFailed(
            f"`python -m pipeline {command}` found its output up to date instead of measuring it "
            f"({stage['summary']}); the benchmark needs a fresh work folder."
        )
    return {**stage, "result": result, "output": result.get("path") or result["run_dir"]}


def run_up_to_date(command: str, flags: Sequence[str]) -> dict[str, Any]:
    """Runs a stage whose output is up to date: its wall seconds and phases (it must find, not measure)."""
    stage, result = run_pipeline(command, flags, None)
    stage.pop("lines")
    if not result["up_to_date"]:
        raise StageFailed(
            f"`python -m pipeline {command}` did work ({stage['summary']}) where its output should "
            "have been up to date."
        )
    return {**stage, "phases": result.get("phases", {})}


def run_python(code: str, *args: str, what: str) -> dict[str, Any]:
    """Runs `python -c CODE ARGS` in a fresh process; its last stdout line is JSON. Adds wall seconds and peak RSS."""
    done = measured_process([sys.executable, "-c", code, *args])
    if done.returncode != 0 or not done.lines:
        log.error("bench: %s failed:\n%s", what, "\n".join(done.stderr.strip().splitlines()[-30:]))
        raise StageFailed(f"{what} failed with status {done.returncode}: {done.last_error_line()}")
    return {
        **json.loads(done.lines[-1]),
        "wall_seconds": round(done.wall_seconds, 2),
        "peak_rss_mib": done.peak_rss_mib,
    }


def features_figures(result: dict[str, Any]) -> dict[str, Any]:
    """Images, skipped, extraction seconds and img/s from a `features` result (its --json file)."""
    return {
        "images": result["images"],
        "skipped": result["skipped"],
        "extract_seconds": result["seconds"],
        "img_per_s": result["images_per_second"],
    }


def run_features_process(flags: Sequence[str]) -> dict[str, Any]:
    """Runs `python -m pipeline features` in a fresh process: wall time, img/s, peak RSS."""
    stage = run_stage("features", flags)
    return {
        **features_figures(stage["result"]),
        "wall_seconds": stage["wall_seconds"],
        "peak_rss_mib": stage["peak_rss_mib"],
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    import keras
    import psutil
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


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


def count_images(data_dir: Path) -> int:
    return sum(1 for p in Path(data_dir).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def median(values: Sequence[float]) -> float:
    """The middle value (the upper one of an even count), as the tables report it."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def write_results(result: dict[str, Any], table: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """`out_dir/name.json` and `out_dir/name.md`: the figures and their table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(table)
    return json_path, md_path
