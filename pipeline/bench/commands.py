"""The benchmark sub-commands of `python -m pipeline`: flags generated from `pipeline.bench.settings`.

`pipeline.cli` calls `add_bench_commands`, passing its own `stage` factory for the two
commands that also take the data and features options (bench-head, bench-audit).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.bench import settings as bench_settings
from pipeline.bench.settings import (
    SCALE_PARTS,
    Assets,
    AuditBench,
    FeaturesBench,
    HeadBench,
    PipelineBench,
    ScaleBench,
    add_setting_flags,
    settings_of,
)
from pipeline.config import FeaturesConfig
from pipeline.errors import ConfigError
from pipeline.options import build_config

#: What to do when the benchmark's assets are missing.
_HINT = "Run the quick benchmark with BENCH_QUICK=1, or set SHARED=... or BENCH_DATA/BENCH_WEIGHTS."


def _features_file(args: argparse.Namespace) -> Path:
    """--features, or the feature file the data and features flags describe, extracted first when it is not there."""
    from pipeline.features.extract import extract_features

    if args.features:
        return Path(args.features)
    return Path(extract_features(build_config(FeaturesConfig, vars(args)), progress=not args.no_progress).path)


def _asset_defaults() -> dict[str, object]:
    """bench-head's and bench-audit's features, by default those of `Assets` (the other benchmarks')."""
    assets = Assets()
    return {"backbone": assets.backbone, "image_size": assets.image_size, "batch_size": assets.batch_size}


def _finish(command: str, result: dict, table: str, out: str, name: str) -> int:
    from pipeline.bench.measure import write_results

    paths = write_results(result, table, Path(out), name)
    print(table)
    print(f"{command}: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench_features(args: argparse.Namespace) -> int:
    from pipeline.bench.features import bench_features, features_table

    settings = settings_of(FeaturesBench, args)
    if not settings.data_dir or not Path(settings.data_dir).is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={settings.data_dir!r} (BENCH_DATA).")
    with tempfile.TemporaryDirectory(prefix="bench-features-") as work:
        result = bench_features(settings, work_dir=Path(work))
    return _finish("bench-features", result, features_table(result), settings.out, "features")


def _cmd_bench_head(args: argparse.Namespace) -> int:
    from pipeline.bench.heads import bench_head, head_table

    settings = settings_of(HeadBench, args)
    seed = build_config(FeaturesConfig, vars(args)).seed
    result = bench_head(_features_file(args), repeats=settings.repeats, seed=seed)
    return _finish("bench-head", result, head_table(result), settings.out, "head")


def _cmd_bench_audit(args: argparse.Namespace) -> int:
    from pipeline.bench.audit import audit_table, bench_audit, calibrate_duplicates
    from pipeline.bench.flips import flip_benchmark

    settings = settings_of(AuditBench, args)
    path = None if settings.no_calibration else _features_file(args)
    if path is not None and not path.is_file():
        raise ConfigError(
            f"The calibration needs the features of a real image folder. Received: {path} (missing). "
            "Run `make features` with the same variables, or pass --no-calibration."
        )
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as work:
        result = bench_audit(work_dir=Path(work), sizes=settings.sizes)
        if path is not None:
            seed = build_config(FeaturesConfig, vars(args)).seed
            planted = Path(work) / "planted"
            result["calibration"] = calibrate_duplicates(path, work_dir=planted, count=settings.planted, seed=seed)
            result["flips"] = flip_benchmark(path)
    return _finish("bench-audit", result, audit_table(result), settings.out, "audit")


def _pipeline_settings(args: argparse.Namespace) -> PipelineBench:
    """The full or quick settings with the flags given; checks the assets they need."""
    if args.quick:
        if any(getattr(args, name) is not None for name in ("data_dir", "weights", "backbone", "image_size")):
            raise ConfigError(
                "Quick mode (BENCH_QUICK=1) generates its images and uses the tiny backbone: drop "
                "--data-dir/--weights/--backbone/--image-size (BENCH_DATA/BENCH_WEIGHTS), or drop --quick."
            )
        return settings_of(PipelineBench, args, bench_settings.QUICK_SETTINGS)
    settings = settings_of(PipelineBench, args, bench_settings.FULL_SETTINGS)
    if not settings.data_dir or not Path(settings.data_dir).is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={settings.data_dir!r} (BENCH_DATA). {_HINT}")
    weights = settings.weights
    if weights.lower() not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(f"Benchmark weights not found. Received: --weights={weights!r} (BENCH_WEIGHTS). {_HINT}")
    return settings


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import endtoend
    from pipeline.bench.measure import count_images, write_results
    from pipeline.bench.report import pipeline_table, profile_table

    settings = _pipeline_settings(args)
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        if args.quick:
            data_dir, weights = endtoend.write_quick_assets(Path(work))
        else:
            data_dir, weights = Path(settings.data_dir), settings.weights
        minutes = endtoend.expected_seconds(count_images(data_dir), settings) / 60
        print(
            f"bench: {'quick mode, ' if args.quick else ''}{settings.backbone} at {settings.image_size} px, "
            f"{settings.epochs} seed epochs; expected duration about {max(minutes, 1):.0f} min on 2 CPUs "
            "(less with more cores or a GPU)",
            flush=True,
        )
        result = endtoend.bench_pipeline(
            settings, data_dir=data_dir, weights=str(weights), work_dir=Path(work), quick=args.quick
        )
    table = pipeline_table(result)
    out = Path(settings.out)
    paths = write_results(result, table, out, "results")
    profile = out / "profile.md"
    profile.write_text(profile_table(result))
    print(table)
    print(f"bench: results in {paths[0]} and {paths[1]}; phases of each process in {profile}")
    return 0


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from pipeline.bench.scale import bench_scale

    settings = settings_of(ScaleBench, args)
    parts = tuple(p for p in settings.parts.split(",") if p)
    unknown = sorted(set(parts) - set(SCALE_PARTS))
    if unknown:
        raise ConfigError(
            f"Unknown bench-scale parts: {', '.join(unknown)}. Expected some of: {', '.join(SCALE_PARTS)}."
        )
    if "engines" in parts and not Path(settings.data_dir or "").is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={settings.data_dir!r} (BENCH_DATA).")
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=settings.work_dir) as work:
        bench_scale(settings, parts=parts, work_dir=Path(work))
    out = Path(settings.out)
    print((out / "scale.md").read_text())
    print(f"bench-scale: results in {out / 'scale.json'} and {out / 'scale.md'}")
    return 0


def _cmd_bench_options(args: argparse.Namespace) -> int:
    bench_settings.print_settings()
    return 0


def add_bench_commands(commands, stage: Callable[..., argparse.ArgumentParser]) -> None:
    """bench, bench-features, bench-head, bench-audit, bench-scale, bench-runtimes, bench-precision and bench-options.

    `commands` is the CLI's sub-parsers; `stage(name, help, run, features_file=True)` makes a
    sub-command that takes the option sections `pipeline.cli.COMMAND_SECTIONS` gives it.
    """
    from pipeline.bench import incremental, precision, runtimes

    runtimes.add_command(commands)
    precision.add_command(commands)
    incremental.add_command(commands)
    full = commands.add_parser("bench", help="benchmark the pipeline against the seed workflow (make bench)")
    full.add_argument(
        "--quick",
        action="store_true",
        help="tiny backbone on generated images: checks the benchmark code in about a minute (BENCH_QUICK=1; "
        "defaults: " + ", ".join(f"{k}={v}" for k, v in _quick_overrides().items()) + ")",
    )
    add_setting_flags(full, PipelineBench)
    full.set_defaults(run=_cmd_bench)

    features = commands.add_parser("bench-features", help="benchmark stage 1: throughput vs forward pass, peak memory")
    add_setting_flags(features, FeaturesBench)
    features.set_defaults(run=_cmd_bench_features)

    heads = stage(
        "bench-head", "benchmark stage 2: head training seconds on cached features", _cmd_bench_head, features_file=True
    )
    add_setting_flags(heads, HeadBench)
    heads.set_defaults(**_asset_defaults())

    audit = stage(
        "bench-audit",
        "benchmark the audit at 10k/100k generated rows; calibrate the duplicate threshold on real features",
        _cmd_bench_audit,
        features_file=True,
    )
    add_setting_flags(audit, AuditBench)
    audit.set_defaults(**_asset_defaults())

    scale = commands.add_parser(
        "bench-scale",
        help="benchmark scale: ENGINE=ray vs local, the driver's ceiling, "
        "extraction and stage 2 against size -> bench/scale.{json,md}",
    )
    add_setting_flags(scale, ScaleBench)
    scale.set_defaults(run=_cmd_bench_scale)

    listing = commands.add_parser("bench-options", help="every benchmark setting with its default (make help)")
    listing.set_defaults(run=_cmd_bench_options)


def _quick_overrides() -> dict[str, object]:
    """Quick mode's settings that differ from the full run's."""
    import dataclasses

    full, quick = bench_settings.FULL_SETTINGS, bench_settings.QUICK_SETTINGS
    return {
        f.name: getattr(quick, f.name)
        for f in dataclasses.fields(quick)
        if getattr(quick, f.name) != getattr(full, f.name)
    }
