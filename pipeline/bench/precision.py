"""`make bench-precision`: what PRECISION=bf16 costs the linear probe, on each dataset given.

bf16 features differ from f32 ones in the third significant digit (row cosines about
0.98), so their quality is judged where it matters, by the logistic probe's accuracy.
One held-out split is too coarse a judge: on 360 validation images one image is 0.28
points, and the C that the sweep picks can flip between precisions, so one split moves
by a point either way, more than the 0.5 points at stake. The probe is therefore scored
by repeated stratified k-fold over all rows, paired (both precisions on the same folds,
at the same fixed C): the gap is the mean of the per-fold differences, with its
standard error. The single split `make head` would report is kept beside it.

f32 comes from TensorFlow, the reference; bf16 from OpenVINO, the runtime that has it.
A dataset is an image folder, or `sklearn:digits`: scikit-learn's 1,797 8x8
handwritten digits, the one real image dataset shipped inside an installed package, so
a machine that cannot download still has a second dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: The precisions compared: (runtime, precision), the reference first.
PAIR = (("tensorflow", "f32"), ("openvino", "bf16"))


def write_digits(target: Path) -> Path:
    """scikit-learn's digits as PNG files, one folder per class (0-16 gray levels -> 0-255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = target / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return target


#: Datasets that need no download: name -> writer of an image folder.
BUNDLED = {"sklearn:digits": write_digits}


def add_command(commands) -> None:
    """The `bench-precision` subcommand and its flags (`commands`: the CLI's subparsers)."""
    parser = commands.add_parser("bench-precision", help="logistic-probe accuracy of PRECISION=bf16 against f32")
    parser.set_defaults(run=run)
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=f"image folders or bundled datasets ({', '.join(BUNDLED)}) (Make: BENCH_DATA, BENCH_SECOND_DATA)",
    )
    parser.add_argument("--weights", default="none", help="imagenet, none, or a path to an .h5 file")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="k-fold repeats, each with other folds")
    parser.add_argument("--cs", type=float, nargs="+", default=[0.1, 1.0], help="the fixed C values scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="bench", help="folder for precision.json and precision.md")


def run(args) -> int:
    import tempfile

    from pipeline.bench.measure import write_results
    from pipeline.bench.runtimes import machine
    from pipeline.features.runtimes import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        raise ConfigError("bench-precision needs a CPU with native bf16 (AMX or AVX512_BF16); this one has none.")
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "datasets": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as work:
        for i, data in enumerate(args.data):
            folder = dataset_folder(data, Path(work) / f"data-{i}")
            sizes = {str(s): bench_dataset(folder, Path(work) / f"{i}-{s}px", s, args) for s in args.image_sizes}
            result["datasets"][data] = sizes
    table = precision_table(result)
    paths = write_results(result, table, Path(args.out), "precision")
    print(table)
    print(f"bench-precision: results in {paths[0]} and {paths[1]}")
    return 0


def dataset_folder(data: str, target: Path) -> Path:
    """An image folder for `data`: the folder itself, or a bundled dataset written to `target`."""
    if data in BUNDLED:
        return BUNDLED[data](target)
    if not Path(data).is_dir():
        raise ConfigError(f"Benchmark data not found: {data!r}. Give an image folder or one of: {', '.join(BUNDLED)}.")
    return Path(data)


def bench_dataset(folder: Path, work: Path, size: int, args) -> dict[str, Any]:
    """Both precisions' features of `folder` at `size` px, then the paired k-fold probe and the holdout."""
    from pipeline.features.store import read_features

    paths = {precision: extract(folder, work, size, runtime, precision, args) for runtime, precision in PAIR}
    f32, bf16 = (read_features(paths[p]) for _, p in PAIR)
    (X32, y, ids), (X16, y16, ids16) = pooled(f32), pooled(bf16)
    if ids != ids16 or not np.array_equal(y, y16):
        raise AssertionError("the two feature files hold other images")  # one folder, one scan: never
    return {
        "images": len(y),
        "classes": len(f32.attrs["class_names"]),
        "kfold": {str(c): paired_kfold(X32, X16, y, C=c, args=args) for c in args.cs},
        "holdout": {p: holdout(fs, args.seed) for p, fs in (("f32", f32), ("bf16", bf16))},
    }


def extract(folder: Path, work: Path, size: int, runtime: str, precision: str, args) -> Path:
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features.extract import extract_features

    config = FeaturesConfig(
        data=DataConfig(dataset=None, data_dir=str(folder)),
        backbone=args.backbone,
        weights=args.weights,
        image_size=size,
        seed=args.seed,
        runtime=runtime,
        precision=precision,
        output_dir=str(work / f"{runtime}-{precision}"),
    )
    return Path(extract_features(config, progress=not args.no_progress).path)


def pooled(features) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Every split's rows of a feature file, in id order: (float64 features, labels, ids)."""
    rows = [(split.features, split.labels, list(split.ids)) for split in features.splits.values()]
    ids = [i for _, _, split_ids in rows for i in split_ids]
    order = np.argsort(np.asarray(ids, dtype=object))
    X = np.concatenate([r[0] for r in rows]).astype(np.float64)[order]
    y = np.concatenate([r[1] for r in rows])[order]
    return X, y, [ids[i] for i in order]


def paired_kfold(X32: np.ndarray, X16: np.ndarray, y: np.ndarray, *, C: float, args) -> dict[str, Any]:
    """Accuracy of the logistic head at `C` on both precisions, fold by fold, and their gap in points."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    from pipeline.heads.logistic import LogisticHead

    def accuracy(X, train, test) -> float:
        head = LogisticHead(C=C, seed=args.seed).fit(X[train], y[train])
        return float((head.predict(X[test]) == y[test]).mean())

    folds = RepeatedStratifiedKFold(n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed)
    scores = np.asarray([[accuracy(X, train, test) for X in (X32, X16)] for train, test in folds.split(X32, y)])
    gaps = 100 * (scores[:, 1] - scores[:, 0])
    return {
        "f32_accuracy": round(float(scores[:, 0].mean()), 4),
        "bf16_accuracy": round(float(scores[:, 1].mean()), 4),
        "gap_points_mean": round(float(gaps.mean()), 2),
        "gap_points_se": round(float(gaps.std(ddof=1) / np.sqrt(len(gaps))), 2) if len(gaps) > 1 else None,
        "gap_points_range": [round(float(gaps.min()), 2), round(float(gaps.max()), 2)],
        "folds": len(gaps),
    }


def holdout(features, seed: int) -> dict[str, Any]:
    """What `make head` reports: C swept on validation, then validation (and test) accuracy."""
    from pipeline.heads.logistic import LogisticHead

    train, val = features.splits["train"], features.splits["validation"]
    head = LogisticHead(seed=seed).fit(train.features, train.labels, val.features, val.labels)
    scores = {"C": head.params_["C"]}
    for name in ("validation", "test"):
        if name in features.splits:
            split = features.splits[name]
            scores[f"{name}_accuracy"] = round(float((head.predict(split.features) == split.labels).mean()), 4)
    return scores


def precision_table(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# PRECISION=bf16 against f32: the logistic probe, {s['backbone']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; OpenVINO CPU flags: {', '.join(m['cpu_flags'])}. "
        f"f32 from TensorFlow, bf16 from OpenVINO. Paired {s['folds']}-fold cross-validation over all images, "
        f"repeated {s['repeats']} times, at fixed C; the gap is bf16 - f32 in accuracy points, mean "
        "± standard error [range over folds]. Holdout: the C sweep on validation and the accuracies "
        "`make head` reports.",
        "",
        "| data | images | size | C | f32 accuracy | bf16 accuracy | gap, points |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    holdouts = []
    for data, sizes in result["datasets"].items():
        for size, cell in sizes.items():
            for c, k in cell["kfold"].items():
                gap = f"{k['gap_points_mean']:+.2f} ± {k['gap_points_se']} [{k['gap_points_range'][0]:+.2f}, "
                gap += f"{k['gap_points_range'][1]:+.2f}]"
                lines.append(
                    f"| {Path(data).name or data} | {cell['images']} | {size} | {c} | {k['f32_accuracy']:.4f} "
                    f"| {k['bf16_accuracy']:.4f} | {gap} |"
                )
            h = cell["holdout"]
            holdouts.append(
                f"| {Path(data).name or data} | {size} | {h['f32']['C']:g} / {h['bf16']['C']:g} "
                f"| {h['f32'].get('validation_accuracy')} / {h['bf16'].get('validation_accuracy')} "
                f"| {h['f32'].get('test_accuracy', '-')} / {h['bf16'].get('test_accuracy', '-')} |"
            )
    lines += ["", "| data | size | C chosen, f32 / bf16 | validation, f32 / bf16 | test, f32 / bf16 |"]
    lines += ["|---|---:|---|---|---|", *holdouts, ""]
    return "\n".join(lines)
