"""`make bench-scale`: what stage 1 and stage 2 cost as they grow; never timed tests.

Measured here (each in a fresh process unless said otherwise, results in
bench/scale.json and bench/scale.md):

1. ENGINE=ray with 1 and 2 workers against the local engine on one image folder:
   images per second and Ray's start-up seconds.
2. The driver's ceiling: stand-in workers that return random features at full speed
   (`StandInWorker`), so the rows per second the driver can receive and write are
   all that is measured; divided by one GPU worker's images per second, it says how
   many GPU workers one driver can feed.
3. Extraction seconds per image and peak memory at growing generated datasets
   (local engine).
4. The dense head's peak memory and seconds at growing generated feature files,
   streamed from the file and in memory; the logistic head's seconds and memory at
   growing rows (where it stops being practical).

`write_synthetic_features` makes the generated feature files; the tests use it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features.store import FORMAT_VERSION, write_features
from pipeline.phases import Phases

log = logging.getLogger(__name__)


#: Rows generated at once: the unit of the generator's seeds, so files do not depend on memory.
_CHUNK = 16384


def synthetic_rows(
    rows: int, *, dim: int, classes: int, seed: int, noise_seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (features float32 (n, dim), labels int64 (n,)) of a generated split of `rows` rows.

    Class c's features are its mean plus unit Gaussian noise; the means sit about 3
    noise units apart, so heads reach high but not perfect accuracy (~93% for two
    classes), as on real features. The rows depend only on (seed, noise_seed, rows).
    """
    means = np.random.default_rng([seed, 0]).normal(0, 3 / np.sqrt(2 * dim), (classes, dim)).astype(np.float32)
    for a in range(0, rows, _CHUNK):
        n = min(rows, a + _CHUNK) - a
        rng = np.random.default_rng([seed, noise_seed + 1, a])
        labels = rng.integers(classes, size=n)
        yield means[labels] + rng.standard_normal((n, dim), dtype=np.float32), labels.astype(np.int64)


def write_synthetic_features(
    path: Path,
    *,
    rows: int,
    dim: int = 1280,
    classes: int = 2,
    views: int = 0,
    val_rows: int | None = None,
    seed: int = 0,
) -> Path:
    """A finished feature file of generated rows (train `rows`, validation and test `val_rows` each).

    Augmented view v of a train row is the row plus N(0, 0.3) noise. Rows are
    written chunk by chunk, so memory stays flat however many rows are asked.
    """
    val_rows = max(100, rows // 10) if val_rows is None else val_rows
    names = [f"class_{c}" for c in range(classes)]
    key = {"dataset": "synthetic", "rows": rows, "dim": dim, "classes": classes, "seed": seed}

    def chunks(n: int, noise_seed: int, prefix: str):
        done = 0
        for features, labels in synthetic_rows(n, dim=dim, classes=classes, seed=seed, noise_seed=noise_seed):
            index = np.arange(done, done + len(labels), dtype=np.int64)
            yield features, labels, index, [f"{prefix}-{i}" for i in index]
            done += len(labels)

    def view_chunks():
        for v in range(views):
            done = 0
            for features, labels in synthetic_rows(rows, dim=dim, classes=classes, seed=seed, noise_seed=0):
                noise = np.random.default_rng([seed, 100 + v, done]).normal(0, 0.3, features.shape)
                index = np.arange(done, done + len(labels), dtype=np.int64)
                yield (features + noise.astype(np.float32), labels, index, np.full(len(labels), v, np.int64))
                done += len(labels)

    splits = {
        name: (
            chunks(n, noise_seed, name),
            {"spec": f"synthetic:{name}", "num_inputs": n, "num_skipped": 0, "skipped": []},
        )
        for name, n, noise_seed in (("train", rows, 0), ("validation", val_rows, 1), ("test", val_rows, 2))
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "config": {"synthetic": key},
        "class_names": names,
        "feature_dim": dim,
        "dtype": "float32",
        "dataset": "synthetic",
        "num_skipped": 0,
    }
    view_attrs = None
    if views:
        view_attrs = (
            view_chunks(),
            {
                "num_views": views,
                "seed": seed,
                "augment": {"noise": 0.3},
                "config": {"synthetic": True},
                "seconds": 0.0,
                "seconds_per_view": 0.0,
            },
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_features(Path(path), attrs=attrs, splits=splits, feature_dim=dim, dtype=np.float32, views=view_attrs)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- running pipeline commands --------------------------------------------------------


def run_pipeline(argv: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `python -m pipeline ARGV` in a fresh process: stdout lines, wall seconds, peak RSS (with children)."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.bench.endtoend import PeakMemory, StageFailed

    command = [sys.executable, "-m", "pipeline", *argv]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    peak = memory.wait()
    if process.returncode != 0:
        log.error("bench-scale: `%s` failed:\n%s", " ".join(argv), "\n".join(stderr.strip().splitlines()[-30:]))
        raise StageFailed(
            f"`python -m pipeline {argv[0]}` failed with status {process.returncode}: "
            f"{(stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    return {
        "lines": [line for line in stdout.splitlines() if line.strip()],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": peak,
    }


def run_python(code: str) -> dict[str, Any]:
    """Runs `python -c CODE` in a fresh process; its last stdout line is JSON. Adds wall seconds and peak RSS."""
    import json
    import subprocess
    import sys
    import time

    from pipeline.bench.endtoend import PeakMemory, StageFailed

    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    peak = memory.wait()
    if process.returncode != 0:
        log.error("bench-scale: child failed:\n%s", "\n".join(stderr.strip().splitlines()[-30:]))
        raise StageFailed(f"a bench-scale child process failed with status {process.returncode}")
    return {
        **json.loads(stdout.strip().splitlines()[-1]),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": peak,
    }


# --- 1. engines ------------------------------------------------------------------------


def bench_engines(
    *,
    data_dir: Path,
    weights: str,
    backbone: str,
    image_size: int,
    batch_size: int,
    work_dir: Path,
    workers: tuple[int, ...] = (1, 2),
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """`make features` with the local engine and with ENGINE=ray at each number of `workers`.

    Each run starts in a fresh process with a fresh output folder; Ray runs start their
    own local cluster (RAY_ADDRESS is cleared), so start-up is Ray's full cost. The
    engines take turns, `repeats` rounds, so a machine whose speed drifts affects all
    of them alike; each row records the load average before it ran.
    """
    import os
    import re

    from pipeline.bench.endtoend import features_figures

    results = []
    runs = [("local", [])] + [
        (f"ray, {w} worker{'s' if w > 1 else ''}", ["--engine", "ray", "--workers", str(w)]) for w in workers
    ]
    for repeat in range(repeats):
        for number, (name, extra) in enumerate(runs):
            out = work_dir / f"engines-{repeat}-{number}"
            load = os.getloadavg()[0]
            stage = run_pipeline(
                [
                    "features",
                    "--data-dir",
                    str(data_dir),
                    "--weights",
                    weights,
                    "--backbone",
                    backbone,
                    "--image-size",
                    str(image_size),
                    "--batch-size",
                    str(batch_size),
                    "--output-dir",
                    str(out),
                    "--no-progress",
                    *extra,
                ],
                env={"RAY_ADDRESS": ""},
            )
            row = {
                "engine": name,
                "repeat": repeat,
                **features_figures(stage["lines"][-1]),
                "wall_seconds": stage["wall_seconds"],
                "peak_rss_mib": stage["peak_rss_mib"],
                "startup_seconds": None,
                "load_before": round(load, 2),
            }
            engine_line = next((line for line in stage["lines"] if line.startswith("engine: ray")), "")
            match = re.search(r"start-up ([\d.]+) s", engine_line)
            if match:
                row["startup_seconds"] = float(match.group(1))
            log.info("bench-scale engines: %s", row)
            results.append(row)
    return results


# --- 2. the driver's ceiling -------------------------------------------------------------


class StandInWorker:
    """A Ray worker that returns random features at full speed: all that is left to measure is the driver.

    Same methods as `pipeline.features.ray_engine.ExtractionWorker`; plain features only.
    """

    def __init__(self, config, *, dim: int, chunk_bytes: int | None = None) -> None:
        from pipeline.features.ray_engine import CHUNK_BYTES

        self.batch_size = config.batch_size
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.features = np.random.default_rng(0).standard_normal((self.batch_size, dim), dtype=np.float32)

    def ready(self) -> dict[str, Any]:
        import os
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": []}

    def extract(self, task) -> Iterator[tuple]:
        from pipeline.features.ray_engine import coalesce

        yield from coalesce(self._batches(task), self.chunk_bytes)

    def _batches(self, task) -> Iterator[tuple]:
        for a in range(task.start, task.stop, self.batch_size):
            index = np.arange(a, min(task.stop, a + self.batch_size), dtype=np.int64)
            yield self.features[: len(index)], index % 2, index, [b"stand-in-%d" % i for i in index]


class _NullWriter:
    """Takes rows and drops them: the driver's receiving alone."""

    attrs = {"dataset_version": "stand-in"}

    def committed(self, split: str) -> tuple[int, int]:
        return 0, -1

    def append(self, *args) -> None:
        pass


def bench_driver(
    *, rows: int, dim: int, batch_size: int, work_dir: Path, workers: tuple[int, ...] = (1, 2), shard_size: int = 1000
) -> list[dict[str, Any]]:
    """Rows per second one driver receives from stand-in workers and writes, and writes alone.

    Measured in this process (the driver): for each number of workers, receiving
    only (rows dropped), and receiving and writing the feature file; and the writer
    alone, appending batches of `batch_size` rows with no Ray at all.
    """
    import time

    from pipeline.config import DataConfig, EngineConfig, FeaturesConfig
    from pipeline.features.ray_engine import WRITE_BYTES, RayEngine
    from pipeline.features.sources import SplitSource
    from pipeline.features.store import FeatureWriter

    def unused(start: int):
        raise AssertionError("stand-in workers read no records")

    split = SplitSource(name="train", spec="stand-in", size=rows, total=rows, records=unused)
    config = FeaturesConfig(
        data=DataConfig(dataset="stand-in"), backbone="tiny", weights="none", batch_size=batch_size, image_size=32
    )
    attrs = {"key": {"stand-in": rows}, "dataset_version": "stand-in"}
    results = []

    def writer(name: str) -> FeatureWriter:
        return FeatureWriter(
            work_dir / f"{name}.h5",
            attrs=attrs,
            splits={"train": {"spec": "stand-in"}},
            feature_dim=dim,
            dtype="float32",
        )

    # The writer alone, appending a batch at a time (the local engine) and ~4 MB at a time (the Ray driver).
    for size, what in ((batch_size, f"{batch_size} rows"), (max(1, WRITE_BYTES // (4 * dim)), "4 MB")):
        batch = np.random.default_rng(0).standard_normal((size, dim), dtype=np.float32)
        with writer(f"write-only-{size}") as w:
            started = time.perf_counter()
            for a in range(0, rows, size):
                index = np.arange(a, min(rows, a + size))
                w.append("train", batch[: len(index)], index % 2, index, [b"x"] * len(index))
            seconds = time.perf_counter() - started
        results.append(
            {
                "what": f"write only, appends of {what} (no Ray)",
                "workers": 0,
                "rows": rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(rows / seconds),
            }
        )
    warm_up = SplitSource(name="train", spec="stand-in", size=shard_size * max(workers), total=rows, records=unused)
    for count in workers:
        engine = RayEngine(
            EngineConfig(name="ray", workers=count, shard_size=shard_size),
            worker=StandInWorker,
            worker_kwargs={"dim": dim},
        )
        with engine.start(config, None, Phases()) as runner:
            runner.extract_split(warm_up, _NullWriter(), progress=False)  # the workers' first task imports more
            for what, target in (("receive only", _NullWriter()), ("receive and write", None)):
                with contextlib.nullcontext(target) if target is not None else writer(f"ray-{count}") as w:
                    started = time.perf_counter()
                    got = runner.extract_split(split, w, progress=False)
                    seconds = time.perf_counter() - started
                results.append(
                    {
                        "what": f"{what} ({count} stand-in worker{'s' if count > 1 else ''})",
                        "workers": count,
                        "rows": got,
                        "seconds": round(seconds, 3),
                        "rows_per_s": round(got / seconds),
                    }
                )
                log.info("bench-scale driver: %s", results[-1])
                if target is None:  # the finished file: a gzip copy of the partial one, after the last shard
                    started = time.perf_counter()
                    w.finish({})
                    seconds = time.perf_counter() - started
                    results.append(
                        {
                            "what": "finish the file (gzip copy, once per run)",
                            "workers": count,
                            "rows": got,
                            "seconds": round(seconds, 3),
                            "rows_per_s": round(got / seconds),
                        }
                    )
    return results


# --- 3. extraction against dataset size ---------------------------------------------------


def write_images(root: Path, count: int, *, size: int = 48, seed: int = 0) -> Path:
    """`count` small JPEGs in two class folders (a flat layout): noise around a class colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"cat": (200, 60, 60), "dog": (60, 60, 200)}
    for i in range(count):
        name = ("cat", "dog")[i % 2]
        path = root / name / f"{name}.{i // 2}.jpg"
        if path.exists():
            continue
        pixels = np.clip(np.asarray(colours[name]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def bench_extraction_sizes(
    *, sizes: tuple[int, ...], backbone: str, image_size: int, batch_size: int, work_dir: Path
) -> list[dict[str, Any]]:
    """The local engine on generated folders of each size: seconds per image, peak memory."""
    from pipeline.bench.endtoend import features_figures, subset_folder

    images = write_images(work_dir / "images", max(sizes))
    results = []
    for n in sizes:
        folder = subset_folder(images, work_dir / f"images-{n}", n)
        stage = run_pipeline(
            [
                "features",
                "--data-dir",
                str(folder),
                "--weights",
                "none",
                "--backbone",
                backbone,
                "--image-size",
                str(image_size),
                "--batch-size",
                str(batch_size),
                "--output-dir",
                str(work_dir / f"features-{n}"),
                "--no-progress",
            ]
        )
        figures = features_figures(stage["lines"][-1])
        results.append(
            {
                "backbone": backbone,
                "image_size": image_size,
                "images": n,
                **figures,
                "ms_per_image": round(1000 * figures["extract_seconds"] / n, 3),
                "wall_seconds": stage["wall_seconds"],
                "peak_rss_mib": stage["peak_rss_mib"],
            }
        )
        log.info("bench-scale extraction: %s", results[-1])
    return results


# --- 4. stage 2 against feature rows ----------------------------------------------------------


_FIT_CHILD = """
import json, sys, tempfile
from pipeline.config import HeadConfig
from pipeline.heads.train import train_head
with tempfile.TemporaryDirectory() as runs:
    run = train_head({path!r}, HeadConfig(head={head!r}, epochs={epochs}, memory_budget={budget!r}, grid_images=0,
                     patience=100, runs_dir=runs))
    print(json.dumps({{"fit_seconds": run.metrics["training_seconds"], "streamed": run.metrics["memory"]["streamed"],
                      "validation_accuracy": run.metrics["validation"]["accuracy"]}}))
"""


def bench_heads(
    *,
    rows: tuple[int, ...],
    dim: int,
    epochs: int,
    in_memory_max: int,
    stream_budget: str,
    logistic_rows: tuple[int, ...],
    work_dir: Path,
) -> list[dict[str, Any]]:
    """Peak memory and seconds of `make head` on generated feature files of each size.

    Dense: in memory (budget 1 TB, only up to `in_memory_max` rows) and streamed
    (`stream_budget`); logistic (its C sweep, in memory) at `logistic_rows`. Validation
    and test hold 10,000 rows each at every size, so the train rows make the
    difference. Each fit runs in a fresh process; the figures include its Python and
    TensorFlow.
    """
    results = []
    for n in sorted(set(rows) | set(logistic_rows)):
        path = work_dir / f"synthetic-{n}.h5"
        if not path.exists():
            write_synthetic_features(path, rows=n, dim=dim, classes=2, val_rows=min(n, 10_000))
        runs = []
        if n in rows:
            runs += [("dense", "in memory", "1TB")] if n <= in_memory_max else []
            runs += [("dense", "streamed", stream_budget)]
        if n in logistic_rows:
            runs += [("logistic", "in memory", "1TB")]
        for head, how, budget in runs:
            child = run_python(_FIT_CHILD.format(path=str(path), head=head, epochs=epochs, budget=budget))
            if how == "streamed" and not child["streamed"]:
                raise ValueError(f"{n} rows fit the streaming budget {budget}; lower --stream-budget.")
            results.append(
                {
                    "head": head,
                    "rows": n,
                    "dim": dim,
                    "how": how,
                    "budget": budget,
                    "file_mib": round(path.stat().st_size / 2**20, 1),
                    "train_float32_mib": round(n * dim * 4 / 2**20, 1),
                    **child,
                }
            )
            log.info("bench-scale heads: %s", results[-1])
    return results


# --- the report ----------------------------------------------------------------------------


def scale_table(result: dict[str, Any]) -> str:
    """bench/scale.md: one table per part that ran."""
    m = result["machine"]
    lines = [
        f"# make bench-scale, {result['date']}",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, GPUs: {', '.join(m['gpus']) or 'none'}, "
        f"TensorFlow {m['tensorflow']}, Ray {result.get('ray_version')}.",
        "",
    ]
    if result.get("engines"):
        s = result["engines_settings"]
        lines += [
            f"## Engines: {s['data_dir']}, {s['backbone']} at {s['image_size']} px, batch {s['batch_size']}, "
            "engines taking turns",
            "",
            "| engine | round | images | extraction img/s | extraction s | Ray start-up s | wall s | "
            "peak RSS MiB | load before |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["engines"]:
            startup = "" if r["startup_seconds"] is None else f"{r['startup_seconds']:.1f}"
            lines.append(
                f"| {r['engine']} | {r.get('repeat', 0) + 1} | {r['images']} | {r['img_per_s']:.1f} | "
                f"{r['extract_seconds']:.1f} | {startup} | {r['wall_seconds']:.1f} | "
                f"{r['peak_rss_mib']:.0f} | {r.get('load_before', '')} |"
            )
        lines += ["", "| engine | median img/s | median Ray start-up s | median wall s |", "|---|---:|---:|---:|"]
        for name in dict.fromkeys(r["engine"] for r in result["engines"]):
            rows = [r for r in result["engines"] if r["engine"] == name]
            startups = [r["startup_seconds"] for r in rows if r["startup_seconds"] is not None]
            lines.append(
                f"| {name} | {np.median([r['img_per_s'] for r in rows]):.1f} | "
                f"{f'{np.median(startups):.1f}' if startups else ''} | "
                f"{np.median([r['wall_seconds'] for r in rows]):.1f} |"
            )
        lines.append("")
    if result.get("driver"):
        s = result["driver_settings"]
        lines += [
            f"## The driver's ceiling: stand-in workers, {s['rows']} rows of {s['dim']} float32 features, "
            f"batches of {s['batch_size']}, shards of {s['shard_size']}",
            "",
            "| what | rows/s | MB/s | seconds |",
            "|---|---:|---:|---:|",
        ]
        for r in result["driver"]:
            mbs = r["rows_per_s"] * s["dim"] * 4 / 1e6
            lines.append(f"| {r['what']} | {r['rows_per_s']:,} | {mbs:.0f} | {r['seconds']:.2f} |")
        lines.append("")
    if result.get("extraction"):
        lines += [
            "## Extraction against dataset size: local engine, random weights, generated 48 px JPEGs",
            "",
            "| backbone | images | extraction s | ms per image | img/s | wall s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["extraction"]:
            lines.append(
                f"| {r['backbone']} at {r['image_size']} px | {r['images']:,} | {r['extract_seconds']:.1f} | "
                f"{r['ms_per_image']:.3f} | {r['img_per_s']:.0f} | {r['wall_seconds']:.1f} | "
                f"{r['peak_rss_mib']:.0f} |"
            )
        lines.append("")
    if result.get("heads"):
        s = result["heads_settings"]
        lines += [
            f"## Stage 2 against feature rows: generated {s['dim']}-d features, 2 classes, {s['epochs']} "
            "epoch(s) for the dense head",
            "",
            "| head | train rows | how | train rows as float32 MiB | file MiB | fit s | wall s | peak RSS MiB "
            "| validation accuracy |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(result["heads"], key=lambda r: (r["head"], r["rows"], r["how"])):
            how = r["how"] + (f" (budget {r['budget']})" if r["how"] == "streamed" else "")
            lines.append(
                f"| {r['head']} | {r['rows']:,} | {how} | {r['train_float32_mib']:,.0f} | "
                f"{r['file_mib']:,.0f} | {r['fit_seconds']:.1f} | {r['wall_seconds']:.1f} | "
                f"{r['peak_rss_mib']:,.0f} | {r['validation_accuracy']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def bench_scale(
    *, parts: tuple[str, ...], work_dir: Path, out_dir: Path, settings: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Runs the asked `parts` (engines, driver, extraction, heads) and writes bench/scale.{json,md}.

    Results of parts not run are kept from the previous bench/scale.json, so the
    parts can be run (and rerun) separately.
    """
    import datetime as dt

    from pipeline.bench.endtoend import machine, write_results

    previous = out_dir / "scale.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    try:
        import ray

        result["ray_version"] = ray.__version__
    except ImportError:
        result["ray_version"] = None
    result.update(machine=machine(), date=dt.date.today().isoformat())
    if "engines" in parts:
        s = settings["engines"]
        result["engines_settings"] = {**s, "data_dir": str(s["data_dir"])}
        result["engines"] = bench_engines(**s, work_dir=work_dir)
    if "driver" in parts:
        result["driver_settings"] = settings["driver"]
        result["driver"] = bench_driver(**settings["driver"], work_dir=work_dir)
    if "extraction" in parts:  # kept per backbone and size, so sweeps of several backbones sit together
        s = settings["extraction"]
        kept = [
            r
            for r in result.get("extraction", [])
            if (r.get("backbone"), r.get("image_size")) != (s["backbone"], s["image_size"])
        ]
        result["extraction"] = kept + bench_extraction_sizes(**s, work_dir=work_dir)
    if "heads" in parts:  # kept per (head, rows, how), so sizes can be measured in separate runs
        result["heads_settings"] = settings["heads"]
        new = bench_heads(**settings["heads"], work_dir=work_dir)
        done = {(r["head"], r["rows"], r["how"]) for r in new}
        result["heads"] = [r for r in result.get("heads", []) if (r["head"], r["rows"], r["how"]) not in done] + new
    write_results(result, scale_table(result), out_dir, "scale")
    return result
