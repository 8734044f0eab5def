"""Command line: `python -m pipeline <command>`, one sub-command per Make target.

The only module that reads argv or the environment. Flags become a validated config
object; user errors (`PipelineError`) print as one line and exit with status 2, and
Ctrl-C exits with 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import (
    DEFAULT_SHARD_SIZE,
    DEFAULT_TFDS_SPLITS,
    DTYPES,
    ENGINE_NAMES,
    FLIPS,
    HEAD_NAMES,
    OPTIMIZERS,
    POOLINGS,
    SPLIT_NAMES,
    AugmentConfig,
    DataConfig,
    EngineConfig,
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    ViewsConfig,
)
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")


def _parse_splits(text: str) -> dict[str, str]:
    """'train=train[:40%],validation=train[40%:50%]' -> {'train': 'train[:40%]', ...}."""
    splits = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, spec = part.partition("=")
        if not sep or not spec or name not in SPLIT_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected NAME=SPEC pairs separated by commas, NAME one of {', '.join(SPLIT_NAMES)}; "
                f"received {part!r}"
            )
        splits[name] = spec
    return splits


def _add_features_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (DATASET or DATA_DIR)")
    data.add_argument("--dataset", help="tensorflow-datasets name (default: cats_vs_dogs unless --data-dir is given)")
    data.add_argument("--data-dir", help="image folder with one sub-folder per class (or train/ validation/ [test/])")
    data.add_argument("--tfds-dir", help="tensorflow-datasets data_dir")
    data.add_argument("--no-download", action="store_true", help="never download tfds data")
    default_splits = ",".join(f"{k}={v}" for k, v in DEFAULT_TFDS_SPLITS.items())
    data.add_argument("--splits", type=_parse_splits, default=None, help=f"tfds split specs (default: {default_splits})".replace("%", "%%"))
    data.add_argument("--val-fraction", type=float, default=0.1, help="image folder without split sub-folders: validation fraction")
    data.add_argument("--test-fraction", type=float, default=0.1, help="image folder without split sub-folders: test fraction")
    data.add_argument("--test-from-validation", type=float, default=0.0, help="move this fraction of validation to test (tutorial: 0.2)")
    model = parser.add_argument_group("backbone")
    model.add_argument("--backbone", default="mobilenet_v2", help="registry name (`python -m pipeline backbones` lists them)")
    model.add_argument("--weights", default="imagenet", help="imagenet, none, or a path to an .h5 weights file")
    model.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: the backbone's native size)")
    model.add_argument("--pooling", choices=POOLINGS, default="avg")
    model.add_argument("--mixed-precision", action="store_true", help="run the backbone in float16 (GPUs)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of the features")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--shard", type=int, default=0, help="process shard I of --num-shards")
    run.add_argument("--num-shards", type=int, default=1)
    run.add_argument("--strict", action="store_true", help="fail on any unreadable image instead of skipping it")
    run.add_argument("--output-dir", default="features")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Where stage 1 runs; none of it changes the feature file."""
    engine = parser.add_argument_group("engine (where the backbone runs; never changes the file)")
    engine.add_argument("--engine", choices=ENGINE_NAMES, default="local",
                        help="local: this process; ray: the actors of a Ray cluster")
    engine.add_argument("--ray-address", default=None,
                        help="ray: address of an existing cluster (default: $RAY_ADDRESS, else start a local one)")
    engine.add_argument("--workers", type=int, default=None,
                        help="ray: worker actors (default: one per GPU of the cluster, else one)")
    engine.add_argument("--gpus-per-worker", type=float, default=None,
                        help="ray: GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    engine.add_argument("--ray-shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="ray: images per unit of work")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Flags (and $RAY_ADDRESS, read only for the ray engine) -> EngineConfig."""
    address = args.ray_address
    if args.engine == "ray" and address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    return EngineConfig(name=args.engine, address=address, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, shard_size=args.ray_shard_size)


def _add_augment_flags(parser: argparse.ArgumentParser) -> None:
    """The augmentation of fine-tuning and of cached views (one definition, `pipeline.augment`)."""
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--aug-flip", choices=FLIPS, default="horizontal")
    aug.add_argument("--aug-rotation", type=float, default=0.1, help="fraction of a full turn (0.1: +-36 degrees)")
    aug.add_argument("--aug-zoom", type=float, default=0.0, help="fraction of the image side")
    aug.add_argument("--aug-contrast", type=float, default=0.0, help="contrast factor")
    aug.add_argument("--aug-translation", type=float, default=0.0, help="fraction of the image side")


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    return AugmentConfig(flip=args.aug_flip, rotation=args.aug_rotation, zoom=args.aug_zoom,
                         contrast=args.aug_contrast, translation=args.aug_translation)


def _add_views_flags(parser: argparse.ArgumentParser) -> None:
    """Augmented views cached by `features` (with the --aug-* flags of `_add_augment_flags`)."""
    parser.add_argument("--aug-views", type=int, default=0,
                        help="also cache this many augmented views of every train image (seeded by --seed)")


def views_config(args: argparse.Namespace) -> ViewsConfig:
    return ViewsConfig(num_views=args.aug_views, augment=augment_config(args), seed=args.seed)


def features_config(args: argparse.Namespace) -> FeaturesConfig:
    """Flags -> FeaturesConfig; the one place where the two meet."""
    if args.dataset and args.data_dir:
        raise ConfigError(
            "Expected either a tfds name or an image folder, not both. Received: "
            f"--dataset={args.dataset!r} and --data-dir={args.data_dir!r}."
        )
    if args.data_dir:
        if args.splits:
            raise ConfigError("--splits slices tfds datasets; image folders use --val-fraction/--test-fraction.")
        source = {"dataset": None, "data_dir": args.data_dir}
    else:
        source = {"dataset": args.dataset or "cats_vs_dogs", "data_dir": None}
    data = DataConfig(
        **source,
        tfds_dir=args.tfds_dir,
        download=not args.no_download,
        splits=args.splits or DEFAULT_TFDS_SPLITS,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        test_from_validation=args.test_from_validation,
    )
    return FeaturesConfig(
        data=data,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        pooling=args.pooling,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        shard_index=args.shard,
        num_shards=args.num_shards,
        strict=args.strict,
        mixed_precision=args.mixed_precision,
        output_dir=args.output_dir,
    )


def _cmd_features(args: argparse.Namespace) -> int:
    from pipeline.extract import extract_features, get_engine, resolve

    config = features_config(args)
    if args.print_path:
        print(resolve(config)[2])
        return 0
    engine = get_engine(engine_config(args))
    result = extract_features(config, views=views_config(args), progress=not args.no_progress, engine=engine)
    if engine.describe():
        print(engine.describe())
    print(result.summary())
    return 0


def _add_head_flags(parser: argparse.ArgumentParser) -> None:
    head = parser.add_argument_group("head")
    head.add_argument("--features", help="feature file to use (default: the one the feature flags describe)")
    head.add_argument("--head", choices=HEAD_NAMES, default="logistic")
    head.add_argument("--C", type=float, default=None, help="logistic: inverse L2 strength (default: chosen on validation)")
    head.add_argument("--hidden", type=int, default=0, help="dense: units of an optional hidden layer")
    head.add_argument("--dropout", type=float, default=0.2)
    head.add_argument("--epochs", type=int, default=20)
    head.add_argument("--head-batch-size", type=int, default=32)
    head.add_argument("--learning-rate", type=float, default=1e-3)
    head.add_argument("--patience", type=int, default=5, help="dense: early-stopping patience on validation loss")
    head.add_argument("--class-weight", choices=["balanced"], default=None)
    head.add_argument("--runs-dir", default="runs")
    head.add_argument("--grid-images", type=int, default=16, help="images in the predictions grid (0: none)")
    head.add_argument("--views", type=int, default=None,
                      help="augmented train views to train on, the first V of the file "
                           "(default: dense all of them, logistic none; 0: none)")
    head.add_argument("--train-per-class", type=int, default=None,
                      help="train on a seeded, stratified subset of N train examples per class")
    head.add_argument("--memory-budget", default=None,
                      help="memory the train rows may take, e.g. 2GB (default: a quarter of RAM); past it the dense "
                           "head streams them from the file")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """A stage-2 run is found by --run, or by the feature and head flags that made it."""
    _add_features_flags(parser)
    _add_head_flags(parser)
    parser.add_argument("--run", dest="run_dir", help="run directory (default: the one the flags describe)")


def head_config(args: argparse.Namespace) -> HeadConfig:
    return HeadConfig(
        head=args.head, C=args.C, hidden=args.hidden, dropout=args.dropout, epochs=args.epochs,
        batch_size=args.head_batch_size, learning_rate=args.learning_rate, patience=args.patience,
        class_weight=args.class_weight, seed=args.seed, runs_dir=args.runs_dir, grid_images=args.grid_images,
        views=args.views, train_per_class=args.train_per_class, memory_budget=args.memory_budget,
    )


def _features_file(args: argparse.Namespace) -> tuple[Path, dict]:
    """The feature file the flags describe (or --features), and the key it must have."""
    from pipeline.extract import resolve

    _, key, path = resolve(features_config(args))
    return (Path(args.features) if args.features else path), key


def _cmd_head(args: argparse.Namespace) -> int:
    from pipeline.train import train_head

    config = head_config(args)
    path, key = _features_file(args)
    run = train_head(path, config, expect=key)
    print(run.summary())
    return 0


def _run_dir(args: argparse.Namespace) -> Path:
    """--run, or the run directory that the feature and head flags describe."""
    from pipeline.train import run_dir_for

    if args.run_dir:
        return Path(args.run_dir)
    path, _ = _features_file(args)
    return run_dir_for(path, head_config(args))


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


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument("--fine-tune-at", default="100",
                      help="first trainable backbone layer: an index, a layer name (prefix), blocks:N or all")
    tune.add_argument("--fine-tune-epochs", type=int, default=10)
    tune.add_argument("--head-epochs", type=int, default=0,
                      help="train a fresh head on images for N epochs first, instead of starting from `make head`")
    tune.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    tune.add_argument("--fine-tune-learning-rate", type=float, default=None,
                      help="default: 1e-5 for adam (Keras guide), else a tenth of --learning-rate (TF tutorial)")
    tune.add_argument("--fine-tune-batch-size", type=int, default=32)
    tune.add_argument("--fine-tune-patience", type=int, default=3,
                      help="stop after N epochs without a better validation loss (0: never)")
    tune.add_argument("--from-scratch", action="store_true",
                      help="train everything from random weights (needs --weights none); the control experiment")


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        fine_tune_at=args.fine_tune_at, epochs=args.fine_tune_epochs, head_epochs=args.head_epochs,
        optimizer=args.optimizer, learning_rate=args.fine_tune_learning_rate,
        head_learning_rate=args.learning_rate, batch_size=args.fine_tune_batch_size,
        patience=args.fine_tune_patience, dropout=args.dropout, augment=augment_config(args),
        from_scratch=args.from_scratch, mixed_precision=args.mixed_precision, seed=args.seed,
        runs_dir=args.runs_dir, grid_images=args.grid_images,
    )


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.finetune import finetune

    run = finetune(features_config(args), head_config(args), finetune_config(args),
                   head_run=Path(args.run_dir) if args.run_dir else None, progress=not args.no_progress)
    print(run.summary())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import compare
    from pipeline.extract import resolve

    features = features_config(args)
    if args.out:
        out = Path(args.out)
    else:
        resolved = resolve(features)[0]
        few = f"__{args.train_per_class}-per-class" if args.train_per_class else ""
        out = Path("compare") / f"{resolved.data.name}__{resolved.backbone}__{resolved.image_size}px{few}"
    result = compare(features, head_config(args), finetune_config(args), out_dir=out,
                     rows=[r for r in args.rows.split(",") if r], progress=not args.no_progress)
    print(result.table)
    print(f"compare: {', '.join(str(f) for f in result.files)}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.store import merge_shards

    out = merge_shards([Path(p) for p in args.shards], Path(args.output))
    print(f"merge: {len(args.shards)} shards -> {out}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from pipeline.backbones import get_backbone, list_backbones

    print(f"{'name':24} {'family':22} {'size':>5} {'dim':>5}  preprocessing")
    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:24} {spec.family:22} {spec.default_size:5d} {spec.feature_dim:5d}  {spec.preprocessing}")
    return 0


def _cmd_bench_features(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.bench import bench_features, features_table, write_results

    if not Path(args.data_dir).is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={args.data_dir!r} (BENCH_DATA).")
    weights = None if args.weights.lower() == "none" else args.weights
    with tempfile.TemporaryDirectory(prefix="bench-features-") as work:
        result = bench_features(
            data_dir=Path(args.data_dir), weights=weights, work_dir=Path(work), backbone=args.backbone,
            image_size=args.image_size, batch_size=args.batch_size, sizes=args.sizes,
            repeats=args.repeats, forward_seconds=args.forward_seconds,
        )
    table = features_table(result)
    paths = write_results(result, table, Path(args.out), "features")
    print(table)
    print(f"bench-features: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench_head(args: argparse.Namespace) -> int:
    from pipeline.bench import bench_head, head_table, write_results

    path, _ = _features_file(args)
    result = bench_head(path, repeats=args.repeats, seed=args.seed)
    table = head_table(result)
    paths = write_results(result, table, Path(args.out), "head")
    print(table)
    print(f"bench-head: results in {paths[0]} and {paths[1]}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline import bench

    settings = dict(bench.QUICK_SETTINGS if args.quick else bench.FULL_SETTINGS)
    given = {"backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
             "epochs": args.epochs, "extraction_sizes": args.extraction_sizes,
             "extraction_repeats": args.extraction_repeats, "forward_seconds": args.forward_seconds,
             "head_repeats": args.head_repeats}
    if args.quick and any(v is not None for v in (args.data_dir, args.weights, args.backbone, args.image_size)):
        raise ConfigError("Quick mode (BENCH_QUICK=1) generates its images and uses the tiny backbone: drop "
                          "--data-dir/--weights/--backbone/--image-size (BENCH_DATA/BENCH_WEIGHTS), or drop --quick.")
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
        print(f"bench: {'quick mode, ' if args.quick else ''}{settings['backbone']} at {settings['image_size']} px, "
              f"{settings['epochs']} seed epochs; expected duration about {max(minutes, 1):.0f} min on 2 CPUs "
              "(less with more cores or a GPU)", flush=True)
        result = bench.bench_pipeline(data_dir=data_dir, weights=str(weights), work_dir=Path(work),
                                      quick=args.quick, **settings)
    table = bench.pipeline_table(result)
    paths = bench.write_results(result, table, out, "results")
    print(table)
    print(f"bench: results in {paths[0]} and {paths[1]}")
    return 0


SCALE_PARTS = ("engines", "driver", "extraction", "heads")


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.scale import bench_scale

    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(SCALE_PARTS))
    if unknown:
        raise ConfigError(f"Unknown bench-scale parts: {', '.join(unknown)}. Expected some of: {', '.join(SCALE_PARTS)}.")
    if "engines" in parts and not Path(args.data_dir or "").is_dir():
        raise ConfigError(f"Benchmark data not found. Received: --data-dir={args.data_dir!r} (BENCH_DATA).")
    settings = {
        "engines": {"data_dir": Path(args.data_dir or "."), "weights": args.weights, "backbone": args.backbone,
                    "image_size": args.image_size, "batch_size": args.batch_size, "workers": tuple(args.workers),
                    "repeats": args.repeats},
        "driver": {"rows": args.driver_rows, "dim": args.driver_dim, "batch_size": args.batch_size,
                   "workers": tuple(args.workers), "shard_size": args.ray_shard_size},
        "extraction": {"sizes": tuple(args.extraction_sizes), "backbone": args.extraction_backbone,
                       "image_size": args.extraction_image_size, "batch_size": args.batch_size},
        "heads": {"rows": tuple(args.head_rows), "dim": args.head_dim, "epochs": args.head_epochs,
                  "in_memory_max": args.in_memory_max, "stream_budget": args.stream_budget,
                  "logistic_rows": tuple(args.logistic_rows)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work_dir) as work:
        bench_scale(parts=parts, work_dir=Path(work), out_dir=Path(args.out), settings=settings)
    print((Path(args.out) / "scale.md").read_text())
    print(f"bench-scale: results in {Path(args.out) / 'scale.json'} and {Path(args.out) / 'scale.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    features = commands.add_parser("features", help="stage 1: cache backbone features to HDF5")
    _add_features_flags(features)
    features.add_argument("--print-path", action="store_true", help="print the feature file path and exit")
    _add_augment_flags(features)
    _add_views_flags(features)
    _add_engine_flags(features)
    features.set_defaults(run=_cmd_features)

    head = commands.add_parser("head", help="stage 2: train a head on cached features, evaluate, plot")
    _add_features_flags(head)
    _add_head_flags(head)
    head.set_defaults(run=_cmd_head)

    export = commands.add_parser("export", help="one Keras model: raw images in, class probabilities out")
    _add_run_flags(export)
    export.add_argument("--tflite", action="store_true", help="also write model.tflite")
    export.add_argument("--no-saved-model", action="store_true", help="only write model.keras")
    export.set_defaults(run=_cmd_export)

    tune = commands.add_parser("finetune", help="stage 3: augmented end-to-end fine-tuning from the stage-2 head")
    _add_run_flags(tune)
    _add_augment_flags(tune)
    _add_finetune_flags(tune)
    tune.set_defaults(run=_cmd_finetune)

    predict = commands.add_parser("predict", help="top classes per image with the exported model")
    _add_run_flags(predict)
    predict.add_argument("images", nargs="*", help="image files, folders or globs")
    predict.add_argument("--top", type=int, default=3)
    predict.add_argument("--csv", help="also write all probabilities to this CSV file")
    predict.set_defaults(run=_cmd_predict)

    comparison = commands.add_parser("compare", help="cached heads vs fine-tuning vs from scratch: table and plots")
    _add_features_flags(comparison)
    _add_head_flags(comparison)
    _add_augment_flags(comparison)
    _add_finetune_flags(comparison)
    comparison.add_argument("--rows", default="logistic,dense,finetune-top,finetune-all,scratch",
                            help="comma-separated rows: logistic, dense, finetune-top, finetune-all, scratch, "
                                 "seed, dense-views-K, logistic-views-K")
    comparison.add_argument("--out", help="output folder (default: compare/<data>__<backbone>__<size>px"
                                          "[__<N>-per-class])")
    comparison.set_defaults(run=_cmd_compare)

    merge = commands.add_parser("merge", help="join the shard files of one features run")
    merge.add_argument("shards", nargs="+", help="shard files (.h5)")
    merge.add_argument("-o", "--output", required=True, help="merged file")
    merge.set_defaults(run=_cmd_merge)

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

    bench_heads = commands.add_parser("bench-head", help="benchmark stage 2: head training seconds on cached features")
    _add_features_flags(bench_heads)
    bench_heads.add_argument("--features", help="feature file (default: the one the feature flags describe)")
    bench_heads.add_argument("--repeats", type=int, default=3)
    bench_heads.add_argument("--out", default="bench", help="folder for head.json and head.md")
    bench_heads.set_defaults(run=_cmd_bench_head)

    full = commands.add_parser("bench", help="benchmark the pipeline against the seed workflow (make bench)")
    full.add_argument("--quick", action="store_true",
                      help="tiny backbone on generated images, 2 epochs: checks the benchmark code in about a minute")
    full.add_argument("--data-dir", help="image folder with train/ and validation/ (Make: BENCH_DATA)")
    full.add_argument("--weights", help="imagenet or a path to an .h5 weights file (Make: BENCH_WEIGHTS)")
    full.add_argument("--backbone", help="registry name (default: mobilenet_v2)")
    full.add_argument("--image-size", type=int, help="pixels (default: 160, the TF tutorial's)")
    full.add_argument("--batch-size", type=int, help="extraction batch size (default: 32)")
    full.add_argument("--epochs", type=int, help="seed workflow epochs (default: 10, quick 2)")
    full.add_argument("--extraction-sizes", type=int, nargs="+",
                      help="dataset sizes of the extraction vs forward-pass runs (default: 1000 3000)")
    full.add_argument("--extraction-repeats", type=int, help="extraction runs of the largest size (default: 1)")
    full.add_argument("--forward-seconds", type=float, help="seconds per forward-pass measurement (default: 5)")
    full.add_argument("--head-repeats", type=int, help="head fits timed on cached features (default: 3, quick 1)")
    full.add_argument("--out", help="folder for results.json and results.md (default: bench, quick: bench/quick)")
    full.set_defaults(run=_cmd_bench)

    scale = commands.add_parser("bench-scale", help="benchmark scale: ENGINE=ray vs local, the driver's ceiling, "
                                                    "extraction and stage 2 against size -> bench/scale.{json,md}")
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
    scale.add_argument("--extraction-sizes", type=int, nargs="+", default=[1000, 10_000, 100_000],
                       help="extraction: generated dataset sizes")
    scale.add_argument("--extraction-backbone", default="tiny", help="extraction: backbone (random weights)")
    scale.add_argument("--extraction-image-size", type=int, default=32, help="extraction: pixels")
    scale.add_argument("--head-rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                       help="heads: generated train rows for the dense head")
    scale.add_argument("--head-dim", type=int, default=1280, help="heads: feature width")
    scale.add_argument("--head-epochs", type=int, default=1, help="heads: dense head epochs")
    scale.add_argument("--in-memory-max", type=int, default=100_000,
                       help="heads: largest row count also trained in memory")
    scale.add_argument("--stream-budget", default="64MB", help="heads: MEMORY_BUDGET of the streamed runs")
    scale.add_argument("--logistic-rows", type=int, nargs="*", default=[10_000, 30_000, 100_000],
                       help="heads: generated train rows for the logistic head")
    scale.add_argument("--work-dir", default=None, help="folder for generated data (default: the system's temp)")
    scale.add_argument("--out", default="bench", help="folder for scale.json and scale.md")
    scale.set_defaults(run=_cmd_bench_scale)

    listing = commands.add_parser("backbones", help="list the registered backbones")
    listing.set_defaults(run=_cmd_backbones)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # TensorFlow's C++ start-up chatter hides the messages that matter.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
