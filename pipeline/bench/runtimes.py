"""`make bench-runtimes`: stage 1 on every runtime x precision x image size, in one interleaved run.

Each cell runs `python -m pipeline features` as its own process (so its peak RSS is its
own) on the same subset of the benchmark's images, round after round with the order of
the cells reversed every other round, because a shared machine drifts from minute to
minute: ratios are taken within a round, then the median and range over rounds. The
converted model is cached once per size before the rounds (conversion is a one-off
cost, reported apart). Beside each extraction: the bare forward pass of each runtime on
an in-memory batch and decoding alone, the two bounds extraction can reach, and the
smallest row cosine of each runtime's features to TensorFlow's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench.measure import measured_process

#: (runtime, precision) cells; TensorFlow f32 is the reference of every ratio.
VARIANTS = (("tensorflow", "f32"), ("openvino", "f32"), ("openvino", "bf16"))


def add_command(commands) -> None:
    """The `bench-runtimes` subcommand and its flags (`commands`: the CLI's subparsers)."""
    parser = commands.add_parser("bench-runtimes", help="stage 1 by runtime x precision x image size")
    parser.set_defaults(run=run)
    parser.add_argument("--data-dir", required=True, help="image folder (Make: BENCH_DATA)")
    parser.add_argument("--weights", default="none", help="imagenet, none, or a path to an .h5 file")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--images", type=int, default=600, help="images per extraction (a balanced subset)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-seconds", type=float, default=5.0)
    parser.add_argument("--out", default="bench", help="folder for runtimes.json and runtimes.md")


def run(args) -> int:
    import tempfile

    from pipeline.bench.measure import subset_folder, write_results

    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as work:
        work = Path(work)
        folder = subset_folder(Path(args.data_dir), work / "data", args.images)
        result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "run"}, "sizes": {}}
        for size in args.image_sizes:
            result["sizes"][str(size)] = bench_size(folder, work / f"{size}px", size, args)
    table = runtimes_table(result)
    paths = write_results(result, table, Path(args.out), "runtimes")
    print(table)
    print(f"bench-runtimes: results in {paths[0]} and {paths[1]}")
    return 0


def machine() -> dict[str, Any]:
    import platform

    from pipeline.features.runtimes import cpu_flags

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "cpu_flags": cpu_flags()}


def bench_size(folder: Path, work: Path, size: int, args) -> dict[str, Any]:
    """Every variant at `size` px: extraction rounds, bare forward passes, decoding, cosines."""
    import numpy as np

    cache = work / "runtimes"
    conversion = _extract(folder, work / "convert", size, "openvino", "f32", args, cache)
    runs: dict[str, list[dict[str, Any]]] = {f"{r} {p}": [] for r, p in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for runtime, precision in order:
            out = work / f"{runtime}-{precision}-{round_}"
            runs[f"{runtime} {precision}"].append(_extract(folder, out, size, runtime, precision, args, cache))
    bounds = bare_bounds(folder, size, args)
    reference = runs["tensorflow f32"]
    cells = {}
    for name, results in runs.items():
        ratios = [r["img_per_s"] / t["img_per_s"] for r, t in zip(results, reference)]
        rates = [r["img_per_s"] for r in results]
        bound = min(bounds["forward"][name], bounds["decode"])
        cells[name] = {
            "runs": results,
            "img_per_s_median": round(float(np.median(rates)), 1),
            "img_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
            "ratio_to_tf_median": round(float(np.median(ratios)), 2),
            "ratio_to_tf_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "bare_forward_img_per_s": bounds["forward"][name],
            "ratio_to_bound_median": round(float(np.median(rates)) / bound, 2),
            "peak_rss_mib_median": round(float(np.median([r["peak_rss_mib"] for r in results])), 1),
            "min_cosine_to_tf": min_cosine(results[0]["path"], reference[0]["path"]),
        }
    return {"conversion": conversion["phases"], "decode_img_per_s": bounds["decode"], "cells": cells}


def _extract(folder: Path, out: Path, size: int, runtime: str, precision: str, args, cache: Path) -> dict[str, Any]:
    """One `features` run in its own process; the converted models' cache is shared through a link."""
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if not (out / "runtimes").exists():
        (out / "runtimes").symlink_to(cache.resolve())
    record = out / "result.json"
    command = [
        sys.executable, "-m", "pipeline", "features", "--no-progress", "--json", str(record),
        "--data-dir", str(folder), "--backbone", args.backbone, "--weights", args.weights,
        "--image-size", str(size), "--batch-size", str(args.batch_size), "--features-dir", str(out),
        "--runtime", runtime, "--precision", precision,
    ]  # fmt: skip
    done = measured_process(command)  # sampled: a child's ru_maxrss starts from its parent's RSS at the fork
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    result = json.loads(record.read_text())
    return {
        "path": result["path"],
        "img_per_s": result["images_per_second"],
        "seconds": result["seconds"],
        "wall_seconds": round(done.wall_seconds, 2),
        "peak_rss_mib": round(done.peak_rss_mib, 1),
        "phases": result["phases"],
    }


def bare_bounds(folder: Path, size: int, args) -> dict[str, Any]:
    """Images/s of each runtime's forward pass on an in-memory batch, and of decoding alone."""
    import dataclasses

    from pipeline.bench.features import forward_throughput
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features import backbones, runtimes
    from pipeline.features.extractor import build_extractor
    from pipeline.phases import Phases

    spec = backbones.get_backbone(args.backbone)
    weights = None if args.weights == "none" else args.weights
    model = build_extractor(spec, image_size=size, weights=weights)
    base = FeaturesConfig(
        data=DataConfig(dataset=None, data_dir=str(folder)), backbone=args.backbone, weights=args.weights,
        image_size=size, batch_size=args.batch_size, output_dir=str(folder.parent / f"bare-{size}"),
    ).resolved(size, spec.default_pooling)  # fmt: skip
    forward = {}
    for runtime, precision in VARIANTS:
        config = dataclasses.replace(base, precision=precision)
        fn = runtimes.get_runtime(runtime).forward(model, config, spec, Phases())
        rate = forward_throughput(fn, image_size=size, batch_size=args.batch_size, seconds=args.forward_seconds)
        forward[f"{runtime} {precision}"] = round(rate, 1)
    return {"forward": forward, "decode": decode_rate(folder, size, args.batch_size)}


def decode_rate(folder: Path, size: int, batch_size: int) -> float:
    """Images/s of decoding and resizing alone, on the schedule stage 1 uses on this machine."""
    from pipeline.config import DataConfig
    from pipeline.features.batches import image_batches
    from pipeline.features.data import load_source
    from pipeline.features.forward import input_schedule
    from pipeline.images import Resize

    source = load_source(DataConfig(dataset=None, data_dir=str(folder)), seed=0, shard_index=0, num_shards=1)
    count, started = 0, time.perf_counter()
    for split in source.splits.values():
        batches = image_batches(split, start=0, resize=Resize(size), batch_size=batch_size, schedule=input_schedule())
        for images, *_ in batches:
            count += len(images)
    return round(count / (time.perf_counter() - started), 1)


def min_cosine(path: str, reference: str) -> float:
    """The smallest row cosine between two feature files of the same rows."""
    from pipeline.features.runtimes import row_cosines
    from pipeline.features.store import read_features

    got, want = read_features(Path(path)), read_features(Path(reference))
    return round(float(min(row_cosines(got.splits[n].features, s.features).min() for n, s in want.splits.items())), 8)


def runtimes_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# Stage 1 by runtime: {s['backbone']}, {s['images']} images, batch {s['batch_size']}, {s['rounds']} rounds",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; OpenVINO CPU flags: {', '.join(m['cpu_flags'])}.",
        "Medians over rounds [min-max]; ratios to TensorFlow f32 taken within each round.",
        "",
        "| size | runtime | precision | extraction img/s | ratio to TF | bare forward img/s | decode img/s "
        "| extraction / min(forward, decode) | cosine to TF | peak RSS MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, entry in result["sizes"].items():
        for name, c in entry["cells"].items():
            runtime, precision = name.split()
            lo, hi = c["img_per_s_range"]
            rlo, rhi = c["ratio_to_tf_range"]
            lines.append(
                f"| {size} | {runtime} | {precision} | {c['img_per_s_median']} [{lo}-{hi}] "
                f"| {c['ratio_to_tf_median']} [{rlo}-{rhi}] | {c['bare_forward_img_per_s']} "
                f"| {entry['decode_img_per_s']} | {c['ratio_to_bound_median']} | {c['min_cosine_to_tf']:.8f} "
                f"| {c['peak_rss_mib_median']} |"
            )
    conversions = ", ".join(
        f"{size} px: {e['conversion'].get('convert model', 0):.1f} s" for size, e in result["sizes"].items()
    )
    return "\n".join([*lines, "", f"One-off conversion to OpenVINO: {conversions}.", ""])
