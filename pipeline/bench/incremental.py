"""`make bench-incremental`: what `make features` costs when a large folder changes a little.

On a generated folder of small JPEGs (`--images`, default 100,000, tiny backbone),
each step a fresh `python -m pipeline features` process, timed from the outside:

1. the first run (every image extracted);
2. a no-op rerun (target: a few seconds, no TensorFlow import: only stats);
3. `--added` fraction more images (default 1%) copied in: the run extracts exactly those;
4. the same new images alone, in a folder and store of their own: a fresh extraction
   of them, so step 3 can be compared with "no-op + fresh extraction of the new images";
   steps 2-4 are repeated (`--repeats`, each round adding another 1%) and the median
   round is reported, since one process on a loaded machine is a noisy measurement;
5. store and feature-file bytes per row.

Results in bench/incremental.json and bench/incremental.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.measure import run_pipeline

log = logging.getLogger(__name__)

CLASSES = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")


def generate_folder(root: Path, count: int, *, start: int = 0, size: int = 24) -> Path:
    """`count` small JPEGs (numbered from `start`) in class folders; each image's pixels derive from its number."""
    from PIL import Image

    for n in range(start, start + count):
        label = CLASSES[n % len(CLASSES)]
        rng = np.random.default_rng(n)
        base = np.array([25 * (n % len(CLASSES)), 128, 255 - 25 * (n % len(CLASSES))], float)
        pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path = root / label / f"{n:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(path, quality=85)
    return root


def _features(folder: Path, out: Path, name: str, batch_size: int, *extra: str) -> dict[str, Any]:
    """One `make features` process on `folder` (more flags in `extra`): its wall seconds and its --json record."""
    flags = ["--data-dir", str(folder), "--backbone", "tiny", "--weights", "none", "--batch-size", str(batch_size)]
    stage, result = run_pipeline("features", [*flags, "--features-dir", str(out), *extra], {"PYTHONPATH": os.getcwd()})
    log.info("%s: %.2f s wall, %s", name, stage["wall_seconds"], stage["summary"])
    return {"wall_seconds": stage["wall_seconds"], **{k: result[k] for k in _KEPT if k in result}}


_KEPT = ("extracted", "reused", "hashed", "up_to_date", "seconds", "tensorflow_imported", "phases")


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def bench_incremental(work: Path, *, images: int, added: float, batch_size: int, repeats: int = 3) -> dict[str, Any]:
    """Runs the steps of the module docstring in `work`; returns the figures."""
    folder, out = work / "images", work / "features"
    started = time.perf_counter()
    generate_folder(folder, images)
    new = max(1, round(images * added))
    figures: dict[str, Any] = {"images": images, "added": new, "generate_seconds": round(time.perf_counter() - started)}
    figures["first"] = _features(folder, out, "first", batch_size)
    figures["noop"] = _features(folder, out, "noop", batch_size)
    # Too few images a class to carve splits from: all of them train (the extraction is what is compared).
    no_carving = ("--val-fraction", "0", "--test-fraction", "0")
    rounds = []
    for r in range(repeats):  # a loaded machine times one process differently from the next: the median of rounds
        first_new = images + r * new
        noop = _features(folder, out, f"noop_{r}", batch_size) if r else figures["noop"]
        generate_folder(folder, new, start=first_new)
        added = _features(folder, out, f"after_add_{r}", batch_size)
        generate_folder(work / f"new-alone-{r}", new, start=first_new)
        alone = _features(work / f"new-alone-{r}", work / f"features-alone-{r}", f"fresh_{r}", batch_size, *no_carving)
        ratio = added["wall_seconds"] / (noop["wall_seconds"] + alone["wall_seconds"])
        rounds.append({"noop": noop, "after_add": added, "fresh_new_alone": alone, "ratio": round(ratio, 3)})
    middle = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    figures.update(after_add=middle["after_add"], fresh_new_alone=middle["fresh_new_alone"])
    figures["ratio_to_noop_plus_fresh"] = middle["ratio"]
    figures["rounds"] = [{k: v["wall_seconds"] if isinstance(v, dict) else v for k, v in r.items()} for r in rounds]
    rows = images + repeats * new
    segments = list((out / "store").glob("*/segment-*.h5"))
    files = list(out.glob("*.h5"))
    figures["store_bytes_per_row"] = round(_bytes(segments) / rows, 1)
    figures["feature_file_bytes_per_row"] = round(_bytes(files) / rows, 1)
    figures["stat_cache_bytes_per_row"] = round(_bytes((out / "statcache").glob("*.json")) / rows, 1)
    figures["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    return figures


def incremental_table(figures: dict[str, Any]) -> str:
    """bench/incremental.md."""
    f = figures
    rows = [
        ("first run (all extracted)", f["first"]),
        ("no-op rerun", f["noop"]),
        (f"+{f['added']} images", f["after_add"]),
        (f"the {f['added']} new images alone, fresh", f["fresh_new_alone"]),
    ]
    lines = [
        "# make features on a changing folder",
        "",
        f"{f['images']} generated 24x24 JPEGs in 10 class folders (flat layout), tiny backbone, "
        f"{f['machine']['cpus']} CPUs; each step a fresh `python -m pipeline features` process "
        "(`make bench-incremental`).",
        "",
        "| step | wall s | extracted | reused | files hashed | TensorFlow imported |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['wall_seconds']:.2f} | {r.get('extracted', 0)} | {r.get('reused', 0)} | "
            f"{r.get('hashed', 0)} | {r.get('tensorflow_imported')} |"
        )
    lines += [
        "",
        f"+{f['added']} images against no-op + fresh extraction of them alone: "
        f"**{f['ratio_to_noop_plus_fresh']:.2f}x** (target <= 1.3x), the median of {len(f['rounds'])} rounds "
        "(each adds another 1%); rows above are that round's. All rounds (wall s):",
        "",
        "| round | no-op | +new | new alone, fresh | ratio |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {i} | {r['noop']:.2f} | {r['after_add']:.2f} | {r['fresh_new_alone']:.2f} | {r['ratio']:.2f} |"
            for i, r in enumerate(f["rounds"])
        ),
        "",
        f"Bytes per row: store {f['store_bytes_per_row']:.0f}, feature file {f['feature_file_bytes_per_row']:.0f}, "
        f"stat cache {f['stat_cache_bytes_per_row']:.0f}.",
    ]
    return "\n".join(lines) + "\n"


def add_command(commands) -> None:
    """The `bench-incremental` subcommand and its flags (`commands`: the CLI's subparsers)."""
    inc = commands.add_parser("bench-incremental", help="no-op and +1%% make features on generated images")
    inc.add_argument("--images", type=int, default=100_000, help="generated images")
    inc.add_argument("--added", type=float, default=0.01, help="fraction of images added")
    inc.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    inc.add_argument("--repeats", type=int, default=3, help="rounds of no-op, +new and new alone (median reported)")
    inc.add_argument("--out", default="bench", help="results folder")
    inc.add_argument("--work-dir", default=None, help="scratch folder (default: the system's temporary folder)")
    inc.set_defaults(run=run)


def run(args) -> int:
    """`python -m pipeline bench-incremental`: the figures as JSON and a table in OUT."""
    import tempfile

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
