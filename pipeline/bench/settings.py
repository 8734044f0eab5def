"""The benchmarks' settings, each declared once: the CLI's flags, their defaults and `make help` come from here.

A field's flag is `--<name>` (`_` -> `-`); `make` names the Make variable that passes it
on, when one does. The Makefile passes a flag only when its variable is set, so these
defaults hold unless a variable says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

#: The parts of `make bench-scale`, in the order they run.
SCALE_PARTS = ("engines", "driver", "extraction", "heads")


def setting(default: Any, help: str, *, make: str = "", nargs: str = "+") -> Any:
    """A dataclass field that is a benchmark setting, with its flag's help and Make variable (`nargs`: tuples')."""
    return field(default=default, metadata={"help": help, "make": make, "nargs": nargs})


@dataclass(frozen=True)
class Output:
    out: str = setting("bench", "folder for the results (.json and .md)", make="BENCH_OUT")


@dataclass(frozen=True)
class Assets(Output):
    """The image folder and backbone of the benchmarks that extract features."""

    data_dir: str | None = setting(None, "image folder, one sub-folder per class", make="BENCH_DATA")
    weights: str = setting("none", "imagenet, none or a weights file", make="BENCH_WEIGHTS")
    backbone: str = setting("mobilenet_v2", "registry name", make="BENCH_BACKBONE")
    image_size: int = setting(160, "pixels (the TensorFlow tutorial's)", make="BENCH_IMAGE_SIZE")
    batch_size: int = setting(32, "extraction batch size", make="BATCH_SIZE")


@dataclass(frozen=True)
class FeaturesBench(Assets):
    """`make bench-features`: stage 1 against the bare forward pass, peak memory per dataset size."""

    sizes: tuple[int, ...] = setting((1000, 3000), "dataset sizes to run")
    repeats: int = setting(3, "extraction runs of the largest size")
    forward_seconds: float = setting(10.0, "duration of each forward-pass measurement")


@dataclass(frozen=True)
class HeadBench(Output):
    """`make bench-head`: head fits on the cached features the data and features options describe."""

    repeats: int = setting(3, "fits timed per head")


@dataclass(frozen=True)
class AuditBench(Output):
    """`make bench-audit`: the audit on generated rows; the duplicate threshold calibrated on real features."""

    sizes: tuple[int, ...] = setting((10_000, 100_000, 1_000_000), "generated rows (1M: about 20 min, 7 GiB)")
    planted: int = setting(300, "photos altered for the calibration")
    no_calibration: bool = setting(False, "only the generated-rows benchmark")


@dataclass(frozen=True)
class PipelineBench(Assets):
    """`make bench`: the TensorFlow tutorial's setting, with extraction also at the product's default size.

    Extraction runs `extraction_repeats` times per image size on `extraction_sizes`
    images, each between two forward-pass measurements; `stage_repeats` is the number of
    logistic `head` processes and no-op `features` processes timed.
    """

    weights: str = setting("imagenet", "imagenet or a weights file (the seed workflow needs one)", make="BENCH_WEIGHTS")
    epochs: int = setting(10, "seed workflow epochs (the TF tutorial's)", make="BENCH_EPOCHS")
    extraction_image_sizes: tuple[int, ...] = setting((160, 224), "image sizes of the extraction vs forward-pass runs")
    extraction_sizes: tuple[int, ...] = setting((3000,), "dataset sizes of the extraction vs forward-pass runs")
    extraction_repeats: int = setting(5, "extraction runs of the largest size")
    forward_seconds: float = setting(5.0, "seconds per forward-pass measurement")
    head_repeats: int = setting(3, "head fits timed on cached features")
    stage_repeats: int = setting(3, "logistic `head` and no-op `features` processes timed")


#: `make bench`'s full run.
FULL_SETTINGS = PipelineBench()
#: Quick mode (BENCH_QUICK=1): the tiny backbone on generated images checks the benchmark code, not the product.
QUICK_SETTINGS = dataclasses.replace(
    FULL_SETTINGS,
    out="bench/quick",
    backbone="tiny",
    image_size=32,
    epochs=2,
    extraction_image_sizes=(32, 40),
    extraction_sizes=(300,),
    extraction_repeats=1,
    forward_seconds=1.0,
    head_repeats=1,
    stage_repeats=2,
)


@dataclass(frozen=True)
class ScaleBench(Assets):
    """`make bench-scale`: the engines, the Ray driver's ceiling, extraction and heads against size."""

    parts: str = setting(",".join(SCALE_PARTS), f"comma-separated: {', '.join(SCALE_PARTS)}", make="BENCH_SCALE_PARTS")
    workers: tuple[int, ...] = setting((1, 2), "engines and driver: Ray worker counts")
    repeats: int = setting(3, "engines: rounds of every engine, taking turns")
    driver_rows: int = setting(200_000, "driver: rows the stand-in workers return")
    driver_dim: int = setting(1280, "driver: feature width")
    ray_shard_size: int = setting(1000, "driver: images per shard")
    extraction_sizes: tuple[int, ...] = setting((1000, 10_000, 100_000), "extraction: generated dataset sizes")
    extraction_backbone: str = setting("tiny", "extraction: backbone (random weights)")
    extraction_image_size: int = setting(32, "extraction: pixels")
    head_rows: tuple[int, ...] = setting((10_000, 100_000, 1_000_000), "heads: generated train rows, dense head")
    head_dim: int = setting(1280, "heads: feature width")
    head_epochs: int = setting(1, "heads: dense head epochs")
    in_memory_max: int = setting(100_000, "heads: largest row count also trained in memory")
    stream_budget: str = setting("64MB", "heads: MEMORY_BUDGET of the streamed runs")
    logistic_rows: tuple[int, ...] = setting(
        (10_000, 30_000, 100_000), "heads: generated train rows, logistic head", nargs="*"
    )
    work_dir: str | None = setting(None, "folder for generated data (default: the system's temp)")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting of `cls`; argparse's default is None (not given), `--help` shows the declared one."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        variable = f"{f.metadata['make']}; " if f.metadata["make"] else ""
        help_text = f"{f.metadata['help']} ({variable}default: {_shown(f.default)})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=int, nargs=f.metadata["nargs"], default=None, help=help_text)
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            parser.add_argument(flag, type=args[0], default=None, metavar=f.name.upper(), help=help_text)


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings of `cls` set by flags (lists as tuples)."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def settings_of(cls: type, args: argparse.Namespace, base: Any = None):
    """`base` (default: `cls()`, the declared defaults) with the settings the flags set."""
    return dataclasses.replace(cls() if base is None else base, **given(cls, args))


def print_settings() -> None:
    """`make help`'s benchmark variables and every setting's default, from the declarations above."""
    for command, cls in (
        ("bench", PipelineBench),
        ("bench-features", FeaturesBench),
        ("bench-head", HeadBench),
        ("bench-audit", AuditBench),
        ("bench-scale", ScaleBench),
    ):
        print(f"  {command} settings (flag: default; Make variable):")
        for f in dataclasses.fields(cls):
            variable = f"  {f.metadata['make']}" if f.metadata["make"] else ""
            print(f"    --{f.name.replace('_', '-') + ' ' + _shown(f.default):40}{variable}")


#: The fast loop's targets: whole processes, as a user runs them.
TARGETS = {
    "extraction_ratio": 0.90,  # extraction img/s over the bare forward pass's, at every extraction image size
    "speedup": 12.0,  # seed workflow wall s over `features` + `head` wall s, at equal or better accuracy
    "head_logistic_seconds": 2.0,  # a logistic `head` process, median
    "head_dense_fixed_seconds": 4.0,  # a dense `head` process minus its fit
    "noop_features_seconds": 1.0,  # a `features` process that finds its file up to date, median
    "logistic_retrain_seconds": 1.0,  # the logistic fit alone, in process
}
