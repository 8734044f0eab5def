"""Command line: `python -m pipeline <command>`, one sub-command per Make target.

The only module that reads argv or the environment. Flags become a validated config
object; user errors (`PipelineError`) print as one line and exit with status 2, and
Ctrl-C exits with 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.config import (
    SECTIONS,
    AuditConfig,
    EngineConfig,
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    ViewsConfig,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.options import build_config, options

log = logging.getLogger("pipeline")


#: The option sections each command takes (`pipeline.config.SECTIONS`); flags are generated from them.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "features": ("data", "features", "augment", "views", "engine"),
    "head": ("data", "features", "head"),
    "audit": ("data", "features", "head", "audit"),
    "export": ("data", "features", "head"),
    "predict": ("data", "features", "head"),
    "finetune": ("data", "features", "head", "augment", "finetune"),
    "compare": ("data", "features", "head", "augment", "finetune"),
    "export-features": ("data", "features"),
    "bench-head": ("data", "features"),
    "bench-audit": ("data", "features"),
}
#: Earlier spellings of flags, still accepted.
_ALIASES = {"features_dir": ("--output-dir",), "C": ("--C",)}


def _parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off; received {text!r}")


def _parser_of(kind: Any, opt) -> Any:
    """The text -> value function of a field: the option's own, else its type (`int | None` -> int)."""
    if opt.parse is not None:

        def parse(text: str) -> Any:
            try:
                return opt.parse(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None

        return parse
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    return args[0]


def _add_options(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """One flag per option of each section, generated from its declaration in pipeline.config.

    Defaults are left to the configs (argparse's default is None: not given); `--help`
    shows them, and the configs validate choices, so each is written once.
    """
    for section in sections:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        group = parser.add_argument_group(f"{section} options")
        for name, opt in options(cls).items():
            f = defaults[name]
            shown = _shown_default(f, bool_field=hints[name] is bool, invert=opt.invert)
            extra = f"; one of {', '.join(str(c) for c in opt.choices if c is not None)}" if opt.choices else ""
            help_text = f"{opt.help} ({opt.make_variable}; default: {shown}{extra})".replace("%", "%%")
            flags = [opt.flag, *_ALIASES.get(opt.name, ())]
            if hints[name] is bool:
                group.add_argument(
                    *flags, dest=opt.name, nargs="?", const=True, type=_parse_bool, default=None, help=help_text
                )
            else:
                group.add_argument(
                    *flags,
                    dest=opt.name,
                    type=_parser_of(hints[name], opt),
                    default=None,
                    metavar=opt.make_variable,
                    help=help_text,
                )


def _shown_default(f: dataclasses.Field, *, bool_field: bool, invert: bool) -> str:
    """A field's default as its option is written (`make help`, `--help`)."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if bool_field:
        return "1" if value != invert else "unset"  # the flag's own value: `download` is NO_DOWNLOAD
    if value is None:
        return "unset"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _cmd_options(args: argparse.Namespace) -> int:
    """`make help`'s variables: every option of every section with its default, from the configs."""
    for section, cls in SECTIONS.items():
        print(f"  {section} options:")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, opt in options(cls).items():
            shown = _shown_default(fields[name], bool_field=hints[name] is bool, invert=opt.invert)
            choices = f" (one of {', '.join(str(c) for c in opt.choices if c is not None)})" if opt.choices else ""
            print(f"    {opt.make_variable + '=' + shown:34} {opt.help}{choices}")
    return 0


def config_of(cls: type, args: argparse.Namespace):
    """The config of `cls` from the parsed flags: the one place where the two meet."""
    return build_config(cls, vars(args))


def _cmd_features(args: argparse.Namespace) -> int:
    from pipeline.features.engines import get_engine
    from pipeline.features.extract import extract_features, resolve

    config = config_of(FeaturesConfig, args)
    if args.print_path:
        print(resolve(config)[2])
        return 0
    engine = get_engine(config_of(EngineConfig, args))
    result = extract_features(config, views=config_of(ViewsConfig, args), progress=not args.no_progress, engine=engine)
    if engine.describe():
        print(engine.describe())
    return _report(args, result)


def _report(args: argparse.Namespace, result) -> int:
    """Prints a stage's summary line; with --json, also writes its result as JSON (what `make bench` reads)."""
    print(result.summary())
    if args.json:
        from pipeline.runs import write_json

        record = result.record()
        record["phases"] = {"start-up and imports": round(args.startup_seconds, 4), **record.get("phases", {})}
        write_json(Path(args.json), record)
    return 0


def _features_file(args: argparse.Namespace) -> tuple[Path, dict]:
    """The feature file the flags describe (or --features), and the key it must have."""
    from pipeline.features.extract import resolve

    _, key, path = resolve(config_of(FeaturesConfig, args))
    return (Path(args.features) if args.features else path), key


def _cmd_head(args: argparse.Namespace) -> int:
    from pipeline.phases import Phases

    phases = Phases()  # the stage's own phases follow these two
    with phases("stage imports"):
        from pipeline.heads.train import train_head
    config = config_of(HeadConfig, args)
    with phases("resolve feature file"):
        path, key = _features_file(args)
    run = train_head(path, config, expect=key, phases=phases)
    return _report(args, run)


def _run_dir(args: argparse.Namespace) -> Path:
    """--run, or the run directory that the feature and head flags describe."""
    from pipeline.runs import run_dir_for

    if args.run_dir:
        return Path(args.run_dir)
    path, _ = _features_file(args)
    return run_dir_for(path, config_of(HeadConfig, args))


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_run

    exported = export_run(_run_dir(args), saved_model=not args.no_saved_model, tflite=args.tflite)
    print(f"export: {', '.join(str(f) for f in exported.files)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.export import (
        check_top,
        expand_images,
        format_predictions,
        load_classifier,
        predict_images,
        write_csv,
    )

    if not args.images:
        raise ConfigError("predict needs images: IMAGES=<file, folder or glob> (several allowed).")
    model, names = load_classifier(_run_dir(args))
    top = check_top(args.top, names)
    results = predict_images(model, names, expand_images(args.images))
    print("\n".join(format_predictions(results, names, top)))
    if args.csv:
        print(f"predict: {len(results)} rows -> {write_csv(results, names, Path(args.csv))}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.finetune.train import finetune

    run = finetune(
        config_of(FeaturesConfig, args),
        config_of(HeadConfig, args),
        config_of(FinetuneConfig, args),
        head_run=Path(args.run_dir) if args.run_dir else None,
        progress=not args.no_progress,
        make_head=args.make_head,
    )
    return _report(args, run)


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import ROWS, compare
    from pipeline.features.extract import resolve

    features = config_of(FeaturesConfig, args)
    if args.out:
        out = Path(args.out)
    else:
        resolved = resolve(features)[0]
        few = f"__{args.train_per_class}-per-class" if args.train_per_class else ""
        out = Path("compare") / f"{resolved.data.name}__{resolved.backbone}__{resolved.image_size}px{few}"
    result = compare(
        features,
        config_of(HeadConfig, args),
        config_of(FinetuneConfig, args),
        out_dir=out,
        rows=[r for r in args.rows.split(",") if r] if args.rows else ROWS,
        progress=not args.no_progress,
    )
    print(result.table)
    print(f"compare: {', '.join(str(f) for f in result.files)}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from pipeline.audit.findings import audit_features

    config = config_of(AuditConfig, args)
    path, key = _features_file(args)
    result = audit_features(path, config, expect=key)
    print(result.summary())
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.features.gc import collect_garbage

    report = collect_garbage(Path(args.features_dir))
    print(
        f"gc: {report['stores']} stores, {report['rows_kept']} rows kept, {report['rows_dropped']} dropped; "
        f"{report['views_stores_deleted']} unused views stores and {report['old_files_deleted']} format-1 "
        f"feature files deleted in {args.features_dir}"
    )
    return 0


def _cmd_export_features(args: argparse.Namespace) -> int:
    from pipeline.features.tabular import export_features

    path, _ = _features_file(args)
    files = export_features(path, Path(args.out) if args.out else None, fmt=args.format)
    print(f"export-features: {', '.join(str(f) for f in files)}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from pipeline.features.backbones import get_backbone, list_backbones

    print(f"{'name':24} {'family':22} {'size':>5} {'dim':>5}  preprocessing")
    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:24} {spec.family:22} {spec.default_size:5d} {spec.feature_dim:5d}  {spec.preprocessing}")
    return 0


def _cmd_bench_features(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench.endtoend import bench_features, features_table, write_results

    if not Path(args.data_dir).is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={args.data_dir!r} (BENCH_DATA).")
    weights = None if args.weights.lower() == "none" else args.weights
    with tempfile.TemporaryDirectory(prefix="bench-features-") as work:
        result = bench_features(
            data_dir=Path(args.data_dir),
            weights=weights,
            work_dir=Path(work),
            backbone=args.backbone,
            image_size=args.image_size,
            batch_size=args.batch_size,
            sizes=args.sizes,
            repeats=args.repeats,
            forward_seconds=args.forward_seconds,
        )
    table = features_table(result)
    paths = write_results(result, table, Path(args.out), "features")
    print(table)
    print(f"bench-features: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench_head(args: argparse.Namespace) -> int:
    from pipeline.bench.endtoend import bench_head, head_table, write_results

    path, _ = _features_file(args)
    result = bench_head(path, repeats=args.repeats, seed=config_of(FeaturesConfig, args).seed)
    table = head_table(result)
    paths = write_results(result, table, Path(args.out), "head")
    print(table)
    print(f"bench-head: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench_audit(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench.endtoend import audit_table, bench_audit, calibrate_duplicates, write_results

    path = None if args.no_calibration else _features_file(args)[0]
    if path is not None and not path.is_file():
        raise ConfigError(
            f"The calibration needs the features of a real image folder. Received: {path} (missing). "
            "Run `make features` with the same variables, or pass --no-calibration."
        )
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as work:
        result = bench_audit(work_dir=Path(work), sizes=args.sizes)
        if path is not None:
            result["calibration"] = calibrate_duplicates(
                path, work_dir=Path(work) / "planted", count=args.planted, seed=config_of(FeaturesConfig, args).seed
            )
    table = audit_table(result)
    paths = write_results(result, table, Path(args.out), "audit")
    print(table)
    print(f"bench-audit: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench import endtoend as bench

    settings = dict(bench.QUICK_SETTINGS if args.quick else bench.FULL_SETTINGS)
    given = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "extraction_image_sizes": args.extraction_image_sizes,
        "extraction_sizes": args.extraction_sizes,
        "extraction_repeats": args.extraction_repeats,
        "forward_seconds": args.forward_seconds,
        "head_repeats": args.head_repeats,
        "stage_repeats": args.stage_repeats,
    }
    if args.quick and any(v is not None for v in (args.data_dir, args.weights, args.backbone, args.image_size)):
        raise ConfigError(
            "Quick mode (BENCH_QUICK=1) generates its images and uses the tiny backbone: drop "
            "--data-dir/--weights/--backbone/--image-size (BENCH_DATA/BENCH_WEIGHTS), or drop --quick."
        )
    settings.update({k: v for k, v in given.items() if v is not None})
    out = Path(args.out or ("bench/quick" if args.quick else "bench"))
    if not args.quick:
        hint = "Run the quick benchmark with BENCH_QUICK=1, or set SHARED=... or BENCH_DATA/BENCH_WEIGHTS."
        if not args.data_dir or not Path(args.data_dir).is_dir():
            raise ConfigError(f"Benchmark data not found. Received: --data-dir={args.data_dir!r} (BENCH_DATA). {hint}")
        weights = args.weights or "imagenet"
        if weights.lower() not in ("imagenet", "none") and not Path(weights).is_file():
            raise ConfigError(f"Benchmark weights not found. Received: --weights={weights!r} (BENCH_WEIGHTS). {hint}")
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        if args.quick:
            data_dir, weights = bench.write_quick_assets(Path(work))
        else:
            data_dir = Path(args.data_dir)
        minutes = bench.expected_seconds(bench.count_images(data_dir), settings) / 60
        print(
            f"bench: {'quick mode, ' if args.quick else ''}{settings['backbone']} at {settings['image_size']} px, "
            f"{settings['epochs']} seed epochs; expected duration about {max(minutes, 1):.0f} min on 2 CPUs "
            "(less with more cores or a GPU)",
            flush=True,
        )
        result = bench.bench_pipeline(
            data_dir=data_dir, weights=str(weights), work_dir=Path(work), quick=args.quick, **settings
        )
    table = bench.pipeline_table(result)
    paths = bench.write_results(result, table, out, "results")
    profile = out / "profile.md"
    profile.write_text(bench.profile_table(result))
    print(table)
    print(f"bench: results in {paths[0]} and {paths[1]}; phases of each process in {profile}")
    return 0


SCALE_PARTS = ("engines", "driver", "extraction", "heads")


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench.scale import bench_scale

    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(SCALE_PARTS))
    if unknown:
        raise ConfigError(
            f"Unknown bench-scale parts: {', '.join(unknown)}. Expected some of: {', '.join(SCALE_PARTS)}."
        )
    if "engines" in parts and not Path(args.data_dir or "").is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={args.data_dir!r} (BENCH_DATA).")
    settings = {
        "engines": {
            "data_dir": Path(args.data_dir or "."),
            "weights": args.weights,
            "backbone": args.backbone,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": tuple(args.workers),
            "repeats": args.repeats,
        },
        "driver": {
            "rows": args.driver_rows,
            "dim": args.driver_dim,
            "batch_size": args.batch_size,
            "workers": tuple(args.workers),
            "shard_size": args.ray_shard_size,
        },
        "extraction": {
            "sizes": tuple(args.extraction_sizes),
            "backbone": args.extraction_backbone,
            "image_size": args.extraction_image_size,
            "batch_size": args.batch_size,
        },
        "heads": {
            "rows": tuple(args.head_rows),
            "dim": args.head_dim,
            "epochs": args.head_epochs,
            "in_memory_max": args.in_memory_max,
            "stream_budget": args.stream_budget,
            "logistic_rows": tuple(args.logistic_rows),
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work_dir) as work:
        bench_scale(parts=parts, work_dir=Path(work), out_dir=Path(args.out), settings=settings)
    print((Path(args.out) / "scale.md").read_text())
    print(f"bench-scale: results in {Path(args.out) / 'scale.json'} and {Path(args.out) / 'scale.md'}")
    return 0


def _cmd_bench_incremental(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench.incremental import bench_incremental, incremental_table
    from pipeline.runs import write_json

    with tempfile.TemporaryDirectory(prefix="bench-incremental-", dir=args.work_dir) as work:
        figures = bench_incremental(
            Path(work), images=args.images, added=args.added, batch_size=args.batch_size, repeats=args.repeats
        )
    out = Path(args.out)
    write_json(out / "incremental.json", figures)
    (out / "incremental.md").write_text(incremental_table(figures))
    print((out / "incremental.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging and TensorFlow's own INFO/WARNING logs (Make: VERBOSE=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def stage(
        name: str, help: str, run, *, run_dir: bool = False, features_file: bool = False, json_result: bool = False
    ):
        """A sub-command taking its option sections' flags (COMMAND_SECTIONS)."""
        sub = commands.add_parser(name, help=help)
        _add_options(sub, COMMAND_SECTIONS[name])
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        if json_result:
            sub.add_argument(
                "--json", metavar="PATH", help="also write the result (paths, figures, metrics) as JSON to PATH"
            )
        if features_file:
            sub.add_argument(
                "--features", help="feature file to use (default: the one the options describe; Make: FEATURES)"
            )
        if run_dir:
            sub.add_argument(
                "--run", dest="run_dir", help="run directory (default: the one the options describe; Make: RUN)"
            )
        sub.set_defaults(run=run)
        return sub

    features = stage("features", "stage 1: cache backbone features to HDF5", _cmd_features, json_result=True)
    features.add_argument("--print-path", action="store_true", help="print the feature file path and exit")
    stage(
        "head",
        "stage 2: train a head on cached features, evaluate, plot",
        _cmd_head,
        features_file=True,
        json_result=True,
    )
    export = stage(
        "export",
        "one Keras model: raw images in, class probabilities out",
        _cmd_export,
        run_dir=True,
        features_file=True,
    )
    export.add_argument("--tflite", action="store_true", help="also write model.tflite (Make: TFLITE=1)")
    export.add_argument("--no-saved-model", action="store_true", help="only write model.keras")
    tune = stage(
        "finetune",
        "stage 3: augmented end-to-end fine-tuning from the stage-2 head",
        _cmd_finetune,
        run_dir=True,
        features_file=True,
        json_result=True,
    )
    tune.add_argument(
        "--make-head",
        action="store_true",
        help="when warm-starting, first run stages 1 and 2 as `make head` would (make finetune does)",
    )
    predict = stage(
        "predict", "top classes per image with the exported model", _cmd_predict, run_dir=True, features_file=True
    )
    predict.add_argument("images", nargs="*", help="image files, folders or globs (Make: IMAGES)")
    predict.add_argument("--top", type=int, default=3, help="classes shown per image (Make: TOP; default: 3)")
    predict.add_argument("--csv", help="also write all probabilities to this CSV file (Make: CSV)")
    stage(
        "audit",
        "find duplicates, label errors, outliers and class overlap in the features",
        _cmd_audit,
        features_file=True,
    )
    comparison = stage(
        "compare", "cached heads vs fine-tuning vs from scratch: table and plots", _cmd_compare, features_file=True
    )
    comparison.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows (Make: COMPARE_ROWS; default: the five of "
        "pipeline.compare.ROWS); also seed, dense-views-K, logistic-views-K",
    )
    comparison.add_argument(
        "--out",
        help="output folder (Make: COMPARE_DIR; default: compare/<data>__<backbone>__<size>px[__<N>-per-class])",
    )

    tabular = stage(
        "export-features",
        "the current feature file as Parquet, or .npy + Parquet",
        _cmd_export_features,
        features_file=True,
    )
    tabular.add_argument("--format", default="parquet", choices=("parquet", "npy"), help="Make: FORMAT")
    tabular.add_argument("--out", help="output file (Make: EXPORT_OUT; default: FEATURES_DIR/export/<file>.<format>)")
    collect = commands.add_parser("gc", help="drop store rows no feature file uses, and format-1 feature files")
    collect.add_argument("--features-dir", default="features", help="features folder (Make: FEATURES_DIR)")
    collect.set_defaults(run=_cmd_gc)

    bench = commands.add_parser("bench-features", help="benchmark stage 1: throughput vs forward pass, peak memory")
    bench.add_argument("--data-dir", required=True, help="image folder (default in Make: cats_and_dogs_filtered)")
    bench.add_argument("--weights", default="none", help="imagenet, none, or a path to an .h5 file")
    bench.add_argument("--backbone", default="mobilenet_v2")
    bench.add_argument("--image-size", type=int, default=160)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000], help="dataset sizes to run")
    bench.add_argument("--repeats", type=int, default=3, help="extraction runs of the largest size")
    bench.add_argument("--forward-seconds", type=float, default=10.0, help="duration of each forward-pass measurement")
    bench.add_argument("--out", default="bench", help="folder for features.json and features.md")
    bench.set_defaults(run=_cmd_bench_features)

    bench_heads = stage(
        "bench-head", "benchmark stage 2: head training seconds on cached features", _cmd_bench_head, features_file=True
    )
    bench_heads.add_argument("--repeats", type=int, default=3)
    bench_heads.add_argument("--out", default="bench", help="folder for head.json and head.md")

    bench_audit = stage(
        "bench-audit",
        "benchmark the audit at 10k/100k generated rows; calibrate the duplicate threshold on real features",
        _cmd_bench_audit,
        features_file=True,
    )
    bench_audit.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="generated rows")
    bench_audit.add_argument("--planted", type=int, default=300, help="photos altered for the calibration")
    bench_audit.add_argument("--no-calibration", action="store_true", help="only the generated-rows benchmark")
    bench_audit.add_argument("--out", default="bench", help="folder for audit.json and audit.md")

    full = commands.add_parser("bench", help="benchmark the pipeline against the seed workflow (make bench)")
    full.add_argument(
        "--quick",
        action="store_true",
        help="tiny backbone on generated images, 2 epochs: checks the benchmark code in about a minute",
    )
    full.add_argument("--data-dir", help="image folder with train/ and validation/ (Make: BENCH_DATA)")
    full.add_argument("--weights", help="imagenet or a path to an .h5 weights file (Make: BENCH_WEIGHTS)")
    full.add_argument("--backbone", help="registry name (default: mobilenet_v2)")
    full.add_argument("--image-size", type=int, help="pixels (default: 160, the TF tutorial's)")
    full.add_argument("--batch-size", type=int, help="extraction batch size (default: 32)")
    full.add_argument("--epochs", type=int, help="seed workflow epochs (default: 10, quick 2)")
    full.add_argument(
        "--extraction-image-sizes",
        type=int,
        nargs="+",
        help="image sizes of the extraction vs forward-pass runs (default: 160 224)",
    )
    full.add_argument(
        "--extraction-sizes",
        type=int,
        nargs="+",
        help="dataset sizes of the extraction vs forward-pass runs (default: 3000)",
    )
    full.add_argument("--extraction-repeats", type=int, help="extraction runs of the largest size (default: 5)")
    full.add_argument("--forward-seconds", type=float, help="seconds per forward-pass measurement (default: 5)")
    full.add_argument("--head-repeats", type=int, help="head fits timed on cached features (default: 3, quick 1)")
    full.add_argument(
        "--stage-repeats", type=int, help="logistic `head` and no-op `features` processes timed (default: 3, quick 2)"
    )
    full.add_argument("--out", help="folder for results.json and results.md (default: bench, quick: bench/quick)")
    full.set_defaults(run=_cmd_bench)

    inc = commands.add_parser("bench-incremental", help="no-op and +1%% make features on generated images")
    inc.add_argument("--images", type=int, default=100_000, help="generated images")
    inc.add_argument("--added", type=float, default=0.01, help="fraction of images added")
    inc.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    inc.add_argument("--repeats", type=int, default=3, help="rounds of no-op, +new and new alone (median reported)")
    inc.add_argument("--out", default="bench", help="results folder")
    inc.add_argument("--work-dir", default=None, help="scratch folder (default: the system's temporary folder)")
    inc.set_defaults(run=_cmd_bench_incremental)
    scale = commands.add_parser(
        "bench-scale",
        help="benchmark scale: ENGINE=ray vs local, the driver's ceiling, "
        "extraction and stage 2 against size -> bench/scale.{json,md}",
    )
    scale.add_argument("--parts", default=",".join(SCALE_PARTS), help=f"comma-separated: {', '.join(SCALE_PARTS)}")
    scale.add_argument("--data-dir", help="engines: image folder (Make: BENCH_DATA)")
    scale.add_argument("--weights", default="none", help="engines: imagenet, none or an .h5 file (Make: BENCH_WEIGHTS)")
    scale.add_argument("--backbone", default="mobilenet_v2", help="engines: backbone")
    scale.add_argument("--image-size", type=int, default=160, help="engines: pixels")
    scale.add_argument("--batch-size", type=int, default=32, help="engines, driver and extraction: batch size")
    scale.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="engines and driver: Ray worker counts")
    scale.add_argument("--repeats", type=int, default=3, help="engines: rounds of every engine, taking turns")
    scale.add_argument("--driver-rows", type=int, default=200_000, help="driver: rows the stand-in workers return")
    scale.add_argument("--driver-dim", type=int, default=1280, help="driver: feature width")
    scale.add_argument("--ray-shard-size", type=int, default=1000, help="driver: images per shard")
    scale.add_argument(
        "--extraction-sizes",
        type=int,
        nargs="+",
        default=[1000, 10_000, 100_000],
        help="extraction: generated dataset sizes",
    )
    scale.add_argument("--extraction-backbone", default="tiny", help="extraction: backbone (random weights)")
    scale.add_argument("--extraction-image-size", type=int, default=32, help="extraction: pixels")
    scale.add_argument(
        "--head-rows",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="heads: generated train rows for the dense head",
    )
    scale.add_argument("--head-dim", type=int, default=1280, help="heads: feature width")
    scale.add_argument("--head-epochs", type=int, default=1, help="heads: dense head epochs")
    scale.add_argument(
        "--in-memory-max", type=int, default=100_000, help="heads: largest row count also trained in memory"
    )
    scale.add_argument("--stream-budget", default="64MB", help="heads: MEMORY_BUDGET of the streamed runs")
    scale.add_argument(
        "--logistic-rows",
        type=int,
        nargs="*",
        default=[10_000, 30_000, 100_000],
        help="heads: generated train rows for the logistic head",
    )
    scale.add_argument("--work-dir", default=None, help="folder for generated data (default: the system's temp)")
    scale.add_argument("--out", default="bench", help="folder for scale.json and scale.md")
    scale.set_defaults(run=_cmd_bench_scale)

    listing = commands.add_parser("options", help="every option with its Make variable and default (make help)")
    listing.set_defaults(run=_cmd_options)

    listing = commands.add_parser("backbones", help="list the registered backbones")
    listing.set_defaults(run=_cmd_backbones)
    return parser


def run() -> int:
    """The console entry point (`python -m pipeline`, `pipeline`): `main` with TensorFlow's native logs filtered.

    Tests call `main` directly, so the file-descriptor plumbing of `pipeline.quiet` stays
    out of their captured output.
    """
    if "-v" in sys.argv[1:2] or "--verbose" in sys.argv[1:2]:
        return _exit(main())
    from pipeline.quiet import NativeLogFilter

    native = NativeLogFilter()
    try:
        code = main()
    finally:
        native.close()
    return _exit(code)


def _exit(code: int) -> int:
    """Ends the command without Python's teardown, which unloads every module and object and
    does nothing for a finished command: by now every file is closed and renamed, and every
    worker stopped. With TensorFlow loaded it took about 1 s (`import tensorflow` then exit:
    4.4-4.6 s against 3.4-3.6 s with `os._exit`); after a logistic `make head` (scikit-learn,
    matplotlib) about 0.3 s."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class KerasWithoutOptionalImports:
    """An import finder that keeps Keras from importing the optional libraries it never needs here.

    `import tensorflow` imports Keras, and with it two modules this tool never uses that
    import a library whenever it is installed, as both are here: the scikit-learn wrappers
    (`keras.wrappers`; scikit-learn is the logistic head's) and the plotting helpers
    (`keras.visualization`, which imports `matplotlib.pyplot`; matplotlib draws the runs'
    figures). For those importers only, the library reads as absent, which both handle as
    Keras intends (`try: import ... except ImportError`); every other importer gets it as
    usual. Measured by `import tensorflow`: scikit-learn 0.8 s (3.4 s against 2.6 s), then
    matplotlib 0.4 s (2.6-2.8 s against 2.2-2.3 s, 4 runs each).
    """

    #: importing module (prefix) -> the top-level packages it is refused.
    refused: Mapping[str, tuple[str, ...]] = MappingProxyType(
        {
            "keras.src.wrappers": ("sklearn",),
            "keras.src.visualization": ("matplotlib",),
        }
    )

    def find_spec(self, name, path=None, target=None):
        package = name.partition(".")[0]
        for prefix, packages in self.refused.items():
            if package in packages and self._importer().startswith(prefix):
                raise ModuleNotFoundError(
                    f"No module named {name!r} for {prefix} (pipeline.cli.KerasWithoutOptionalImports)"
                )
        return None

    @staticmethod
    def _importer() -> str:
        """The module whose code runs the import, past importlib's own frames."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
            frame = frame.f_back
        return frame.f_globals.get("__name__", "") if frame is not None else ""


def main(argv: Sequence[str] | None = None) -> int:
    if not any(isinstance(finder, KerasWithoutOptionalImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, KerasWithoutOptionalImports())
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # TensorFlow's own INFO and WARNING logs hide the messages that matter; --verbose shows them
    # (set before TensorFlow is imported, which only the commands do).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.verbose else "2")
    if not args.verbose:
        for name in ("tensorflow", "absl"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if getattr(args, "json", None):
        from pipeline.phases import since_process_start

        args.startup_seconds = since_process_start()  # the first phase of the result's `phases`
    try:
        return args.run(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished batches are saved; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
