"""`make bench-scale`: what stage 1 and stage 2 cost as they grow; results in bench/scale.{json,md}.

Each part runs in fresh processes unless said otherwise: the engines (ENGINE=ray against
the local engine on one image folder), the Ray driver's ceiling (`pipeline.bench.driver`),
extraction against dataset size (local engine, generated images), and the heads against
feature rows (the dense head streamed and in memory, the logistic head in memory).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.driver import bench_driver
from pipeline.bench.measure import features_figures, machine, run_python, run_stage, subset_folder, write_results
from pipeline.bench.settings import ScaleBench
from pipeline.bench.synthetic import write_images, write_synthetic_features

log = logging.getLogger(__name__)


def _features_flags(data_dir: Path, weights: str, backbone: str, image_size: int, batch_size: int, out: Path) -> list:
    flags = {
        "--data-dir": str(data_dir),
        "--weights": weights,
        "--backbone": backbone,
        "--image-size": str(image_size),
        "--batch-size": str(batch_size),
        "--output-dir": str(out),
    }
    return [item for pair in flags.items() for item in pair]


def bench_engines(settings: ScaleBench, *, work_dir: Path) -> list[dict[str, Any]]:
    """`make features` with the local engine and with ENGINE=ray at each number of `workers`.

    Each run starts in a fresh process with a fresh output folder; Ray runs start their
    own local cluster (RAY_ADDRESS is cleared), so start-up is Ray's full cost. The
    engines take turns, `repeats` rounds, so a machine whose speed drifts affects all
    of them alike; each row records the load average before it ran.
    """
    assets = (Path(settings.data_dir), settings.weights, settings.backbone, settings.image_size, settings.batch_size)
    engines = [("local", [])] + [
        (f"ray, {w} worker{'s' if w > 1 else ''}", ["--engine", "ray", "--workers", str(w)]) for w in settings.workers
    ]
    results = []
    for repeat in range(settings.repeats):
        for number, (name, extra) in enumerate(engines):
            load = os.getloadavg()[0]
            flags = _features_flags(*assets, work_dir / f"engines-{repeat}-{number}")
            stage = run_stage("features", [*flags, *extra], env={"RAY_ADDRESS": ""})
            engine_line = next((line for line in stage["lines"] if line.startswith("engine: ray")), "")
            startup = re.search(r"start-up ([\d.]+) s", engine_line)
            row = {
                "engine": name,
                "repeat": repeat,
                **features_figures(stage["result"]),
                "wall_seconds": stage["wall_seconds"],
                "peak_rss_mib": stage["peak_rss_mib"],
                "startup_seconds": float(startup.group(1)) if startup else None,
                "load_before": round(load, 2),
            }
            log.info("bench-scale engines: %s", row)
            results.append(row)
    return results


def bench_extraction_sizes(settings: ScaleBench, *, work_dir: Path) -> list[dict[str, Any]]:
    """The local engine on generated folders of each size: seconds per image, peak memory."""
    backbone, image_size = settings.extraction_backbone, settings.extraction_image_size
    images = write_images(work_dir / "images", max(settings.extraction_sizes))
    results = []
    for n in settings.extraction_sizes:
        folder = subset_folder(images, work_dir / f"images-{n}", n)
        flags = _features_flags(folder, "none", backbone, image_size, settings.batch_size, work_dir / f"features-{n}")
        stage = run_stage("features", flags)
        figures = features_figures(stage["result"])
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


def _head_runs(settings: ScaleBench, n: int) -> list[tuple[str, str, str]]:
    """(head, how, memory budget) of each fit at `n` rows."""
    runs = []
    if n in settings.head_rows:
        runs += [("dense", "in memory", "1TB")] if n <= settings.in_memory_max else []
        runs += [("dense", "streamed", settings.stream_budget)]
    if n in settings.logistic_rows:
        runs += [("logistic", "in memory", "1TB")]
    return runs


def bench_heads(settings: ScaleBench, *, work_dir: Path) -> list[dict[str, Any]]:
    """Peak memory and seconds of `make head` on generated feature files of each size.

    Dense: in memory (budget 1 TB, only up to `in_memory_max` rows) and streamed
    (`stream_budget`); logistic (its C sweep, in memory) at `logistic_rows`. Validation
    and test hold 10,000 rows each at every size, so the train rows make the
    difference. Each fit runs in a fresh process; the figures include its Python and
    TensorFlow.
    """
    dim, results = settings.head_dim, []
    for n in sorted(set(settings.head_rows) | set(settings.logistic_rows)):
        path = work_dir / f"synthetic-{n}.h5"
        if not path.exists():
            write_synthetic_features(path, rows=n, dim=dim, classes=2, val_rows=min(n, 10_000))
        for head, how, budget in _head_runs(settings, n):
            code = _FIT_CHILD.format(path=str(path), head=head, epochs=settings.head_epochs, budget=budget)
            child = run_python(code, what=f"a {head} head on {n} rows")
            if how == "streamed" and not child["streamed"]:
                raise ValueError(f"{n} rows fit the streaming budget {budget}; lower --stream-budget.")
            file_mib = round(path.stat().st_size / 2**20, 1)
            train_mib = round(n * dim * 4 / 2**20, 1)
            row = {"head": head, "rows": n, "dim": dim, "how": how, "budget": budget, "file_mib": file_mib}
            results.append({**row, "train_float32_mib": train_mib, **child})
            log.info("bench-scale heads: %s", results[-1])
    return results


# --- the report ----------------------------------------------------------------------------


def _engines_table(result: dict[str, Any]) -> list[str]:
    s = result["engines_settings"]
    lines = [
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
    return lines


def _driver_table(result: dict[str, Any]) -> list[str]:
    s = result["driver_settings"]
    lines = [
        f"## The driver's ceiling: stand-in workers, {s['rows']} rows of {s['dim']} float32 features, "
        f"batches of {s['batch_size']}, shards of {s['shard_size']}",
        "",
        "| what | rows/s | MB/s | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in result["driver"]:
        mbs = r["rows_per_s"] * s["dim"] * 4 / 1e6
        lines.append(f"| {r['what']} | {r['rows_per_s']:,} | {mbs:.0f} | {r['seconds']:.2f} |")
    return lines


def _extraction_table(result: dict[str, Any]) -> list[str]:
    lines = [
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
    return lines


def _heads_table(result: dict[str, Any]) -> list[str]:
    s = result["heads_settings"]
    lines = [
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
    return lines


def scale_table(result: dict[str, Any]) -> str:
    """bench/scale.md: one table per part that ran."""
    host = result["machine"]
    lines = [
        f"# make bench-scale, {result['date']}",
        "",
        f"Machine: {host['cpus']} CPUs, {host['memory_gib']} GiB, GPUs: {', '.join(host['gpus']) or 'none'}, "
        f"TensorFlow {host['tensorflow']}, Ray {result.get('ray_version')}.",
        "",
    ]
    tables = {
        "engines": _engines_table,
        "driver": _driver_table,
        "extraction": _extraction_table,
        "heads": _heads_table,
    }
    for part, table in tables.items():
        if result.get(part):
            lines += [*table(result), ""]
    return "\n".join(lines)


# --- running the parts -----------------------------------------------------------------------


def _part_settings(settings: ScaleBench) -> dict[str, dict[str, Any]]:
    """What each part's results record of the settings it ran with."""
    return {
        "engines": {
            "data_dir": str(settings.data_dir),
            "weights": settings.weights,
            "backbone": settings.backbone,
            "image_size": settings.image_size,
            "batch_size": settings.batch_size,
            "workers": settings.workers,
            "repeats": settings.repeats,
        },
        "driver": {
            "rows": settings.driver_rows,
            "dim": settings.driver_dim,
            "batch_size": settings.batch_size,
            "workers": settings.workers,
            "shard_size": settings.ray_shard_size,
        },
        "heads": {
            "rows": settings.head_rows,
            "dim": settings.head_dim,
            "epochs": settings.head_epochs,
            "in_memory_max": settings.in_memory_max,
            "stream_budget": settings.stream_budget,
            "logistic_rows": settings.logistic_rows,
        },
    }


def _ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def bench_scale(settings: ScaleBench, *, parts: tuple[str, ...], work_dir: Path) -> dict[str, Any]:
    """Runs the asked `parts` (engines, driver, extraction, heads) and writes bench/scale.{json,md}.

    Results of parts not run are kept from the previous bench/scale.json, so the
    parts can be run (and rerun) separately.
    """
    import datetime as dt

    out_dir = Path(settings.out)
    previous = out_dir / "scale.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    result.update(ray_version=_ray_version(), machine=machine(), date=dt.date.today().isoformat())
    recorded = _part_settings(settings)
    if "engines" in parts:
        result["engines_settings"] = recorded["engines"]
        result["engines"] = bench_engines(settings, work_dir=work_dir)
    if "driver" in parts:
        result["driver_settings"] = recorded["driver"]
        result["driver"] = bench_driver(**recorded["driver"], work_dir=work_dir)
    if "extraction" in parts:  # kept per backbone and size, so sweeps of several backbones sit together
        this = (settings.extraction_backbone, settings.extraction_image_size)
        kept = [r for r in result.get("extraction", []) if (r.get("backbone"), r.get("image_size")) != this]
        result["extraction"] = kept + bench_extraction_sizes(settings, work_dir=work_dir)
    if "heads" in parts:  # kept per (head, rows, how), so sizes can be measured in separate runs
        result["heads_settings"] = recorded["heads"]
        new = bench_heads(settings, work_dir=work_dir)
        done = {(r["head"], r["rows"], r["how"]) for r in new}
        result["heads"] = [r for r in result.get("heads", []) if (r["head"], r["rows"], r["how"]) not in done] + new
    write_results(result, scale_table(result), out_dir, "scale")
    return result
