"""Command line: `python -m pipeline <command>`, one sub-command per Make target.

The only module that reads argv or the environment. Flags become a validated config
object; user errors (`PipelineError`) print as one line and exit with status 2, and
Ctrl-C exits with 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.bench.commands import add_bench_commands
from pipeline.config import (
    SECTIONS,
    AuditConfig,
    EngineConfig,
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    ViewsConfig,
)
from pipeline.config_tools import ReviewConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.options import build_config, options

log = logging.getLogger("pipeline")


#: The option sections each command takes (`pipeline.config.SECTIONS`); flags are generated from them.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "features": ("data", "features", "augment", "views", "engine"),
    "head": ("data", "features", "head", "decisions"),
    "audit": ("data", "features", "head", "decisions", "audit"),
    "export": ("data", "features", "head", "decisions"),
    "predict": ("data", "features", "head", "decisions"),
    "finetune": ("data", "features", "head", "decisions", "augment", "finetune"),
    "compare": ("data", "features", "head", "decisions", "augment", "finetune"),
    "review": ("decisions", "review"),
    "choose": ("data", "features", "choose"),
    "export-features": ("data", "features"),
    "similar": ("data", "features", "decisions", "audit"),
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
    """The feature file the flags describe, and the key it must have.

    With --features the file is the one given, and only what the flags change from the
    defaults is checked against it: the defaults describe cats_vs_dogs, not that file.
    """
    from pipeline.features.extract import resolve

    _, key, path = resolve(config_of(FeaturesConfig, args))
    if not args.features:
        return path, key
    _, default_key, _ = resolve(build_config(FeaturesConfig, {}))
    return Path(args.features), {k: v for k, v in key.items() if k not in default_key or default_key[k] != v}


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
    from pipeline.export import check_top, expand_images, format_predictions, load_predictor, write_csv

    if not args.images:
        raise ConfigError("predict needs images: IMAGES=<file, folder or glob> (several allowed).")
    predictor = load_predictor(_run_dir(args))
    names = predictor.class_names
    top = check_top(args.top, names)
    results = predictor.predict(expand_images(args.images))
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


def _cmd_similar(args: argparse.Namespace) -> int:
    from pipeline.audit.similar import similar_images
    from pipeline.export import expand_images

    if not args.images:
        raise ConfigError("similar needs images: IMAGES=<file, folder or glob> (several allowed).")
    if args.top < 1:
        raise ConfigError(f"TOP must be >= 1 (matches shown per image). Received: TOP={args.top}.")
    config = config_of(AuditConfig, args)
    path, _ = _features_file(args)
    sheet = Path(config.audit_dir) / f"{path.stem}.similar.png"
    results, seconds, sheet = similar_images(
        path,
        expand_images(args.images),
        audit_dir=Path(config.audit_dir),
        top=args.top,
        threshold=config.duplicate_threshold,
        out=sheet,
    )
    for result in results:
        print(f"{result['image']}:")
        for m in result["matches"]:
            copy = "  COPY" if m["copy"] else ""
            print(f"  {m['cosine']:.4f}  {m['split']:10} {m['label']:16} {m['path'] or m['id']}{copy}")
    print(f"similar: backbone {seconds['backbone']:.2f} s, search {seconds['search']:.3f} s -> {sheet}")
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    """Serves the review page until Ctrl-C; its one line of output is the URL (no browser is opened)."""
    from pipeline.review.server import open_server, serve

    config = config_of(ReviewConfig, args)
    if config.decisions == "none":
        raise ConfigError("make review records decisions: DECISIONS must be a file or unset. Received: none.")
    server = open_server(config.audit_dir, port=config.port, decisions=config.decisions)
    print(f"review: {server.url}  (decisions -> {server.app.store.path}; Ctrl-C stops)", flush=True)
    serve(server)
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
    import importlib.util

    from pipeline.features.backbones import get_backbone, list_backbones
    from pipeline.features.hub import INSTALL_HINT

    print(f"{'name':24} {'family':22} {'size':>5} {'dim':>5}  {'preprocessing':13}  runtimes")
    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:24} {spec.family:22} {spec.default_size:5d} {spec.feature_dim:5d}  ", end="")
        print(f"{spec.preprocessing:13}  {spec.runtimes_text()}")
    print("\nkeras-hub presets, BACKBONE=hub:<preset> (any keras-hub image preset works; docs/backbones.md):")
    if importlib.util.find_spec("keras_hub") is None:
        print(f"  keras-hub is not installed: {INSTALL_HINT}")
    print(f"  {'preset':37} {'family':28} {'size':>4} {'dim':>5} {'pooling':>8} {'params':>7}  licence  values from")
    for row in _hub_rows():
        print(f"  {row}")
    return 0


def _hub_rows() -> list[str]:
    """The shortlist, with size and width read from the preset's config where a copy is cached here."""
    from pipeline.features.hub import cached_folder, preset_spec
    from pipeline.features.hub_presets import SHORTLIST

    rows = []
    for p in SHORTLIST:
        folder = cached_folder(p.preset)
        if folder is None:
            size, dim, pooling, source = (
                p.image_size,
                p.width * (2 if p.pooling == "cls_mean" else 1),
                p.pooling,
                "list",
            )
        else:
            spec = preset_spec(f"hub:{p.preset}", folder)
            size, dim, pooling, source = spec.default_size, spec.pooled_dim(None), spec.default_pooling, "cache"
        rows.append(
            f"{'hub:' + p.preset:37} {p.family:28} {size:4d} {dim:5d} {pooling:>8} "
            f"{p.params_millions:6.1f}M  {p.licence:8} {source}"
        )
    return rows


def _cmd_choose(args: argparse.Namespace) -> int:
    from pipeline.choose import choose
    from pipeline.config_tools import ChooseConfig

    if args.backbone is not None:
        raise ConfigError(
            f"make choose compares the backbones of BACKBONES (comma-separated); BACKBONE is for the stages. "
            f"Received: BACKBONE={args.backbone!r}; use BACKBONES={args.backbone}."
        )
    result = choose(config_of(FeaturesConfig, args), config_of(ChooseConfig, args), progress=not args.no_progress)
    print((Path(result["out"]) / "choose.md").read_text(), end="")
    print(f"choose -> {result['out']}")
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
    stage = functools.partial(_stage, commands)
    _add_stage_commands(stage)
    _add_data_commands(stage)
    _add_tool_commands(commands)
    add_bench_commands(commands, stage)
    return parser


def _stage(
    commands,
    name: str,
    help: str,
    run,
    *,
    run_dir: bool = False,
    features_file: bool = False,
    json_result: bool = False,
) -> argparse.ArgumentParser:
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


def _add_stage_commands(stage) -> None:
    """The commands of the Make targets that run a stage, each with the flags of its option sections."""
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


def _add_data_commands(stage) -> None:
    """The commands that look at the data through its features: audit, similar, review, compare, choose, export."""
    stage(
        "audit",
        "find duplicates, label errors, outliers and class overlap in the features",
        _cmd_audit,
        features_file=True,
    )
    similar = stage(
        "similar",
        "nearest dataset images of the given images (every copy of a bad image), from the audit's graph",
        _cmd_similar,
        features_file=True,
    )
    similar.add_argument("images", nargs="*", help="image files, folders or globs (Make: IMAGES)")
    similar.add_argument("--top", type=int, default=10, help="matches shown per image (Make: TOP; default: 10)")
    stage("review", "a local page to review the latest audit and record decisions", _cmd_review)
    stage("choose", "which backbone for this data: accuracy, speed, size on a sample", _cmd_choose)
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


def _add_tool_commands(commands) -> None:
    """The commands that list or clean things: gc, options, backbones."""
    collect = commands.add_parser("gc", help="drop store rows no feature file uses, and format-1 feature files")
    collect.add_argument("--features-dir", default="features", help="features folder (Make: FEATURES_DIR)")
    collect.set_defaults(run=_cmd_gc)

    listing = commands.add_parser("options", help="every option with its Make variable and default (make help)")
    listing.set_defaults(run=_cmd_options)
    listing = commands.add_parser("backbones", help="list the registered backbones")
    listing.set_defaults(run=_cmd_backbones)


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
    does nothing for a finished command (every file is closed and renamed, every worker
    stopped by now); with TensorFlow loaded it costs about a second."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.imports import KerasWithoutOptionalImports

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
        # faiss logs each CPU build it tries and fails to load (three tracebacks per audit).
        logging.getLogger("faiss").setLevel(logging.WARNING)
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
