"""`make bench`'s report: results.md (targets first, then each result) and profile.md (where the time goes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.bench.features import features_table
from pipeline.bench.measure import median


def _range(values: Sequence[float]) -> str:
    """'median (min-max)' of measurements."""
    return f"{median(values)} ({min(values)}-{max(values)})"


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def _yes(met: bool) -> str:
    return "**yes**" if met else "no"


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f}"


def _header(result: dict[str, Any]) -> list[str]:
    """What was measured, on what, and what the seed workflow and the two kinds of seconds are."""
    settings, host = result["settings"], result["machine"]
    mode = (
        "**Quick mode**: the tiny backbone on generated images; it checks the benchmark code, "
        "its figures say nothing about the product.\n\n"
        if result["quick"]
        else ""
    )
    return [
        "# `make bench`: cached features against the seed workflow",
        "",
        f"{mode}Machine: {host['cpus']} CPUs ({host['processor']}, {host['platform']}), "
        f"{host.get('memory_gib', '?')} GiB, GPUs: {', '.join(host['gpus']) or 'none'}; Python {host['python']}, "
        f"TensorFlow {host['tensorflow']}. Data: {Path(settings['data_dir']).name} ({settings['train_examples']} "
        f"train, {settings['validation_examples']} validation images); {settings['backbone']} at "
        f"{settings['image_size']} px, weights {Path(settings['weights']).name}, batch {settings['batch_size']}. "
        "Everything below was measured in one run on this machine; figures given as "
        "'median (min-max)' are repeated measurements.",
        "",
        "Seed workflow: the TensorFlow tutorial's model (RandomFlip horizontal + RandomRotation 0.2, the "
        "backbone's preprocessing, the frozen backbone called with `training=False`, Dropout 0.2, Dense) trained "
        f"with `fit` for {_epochs(settings['epochs'])}, RMSprop at 1e-4, the backbone in the loop: `python -m "
        f"pipeline finetune --head-epochs {settings['epochs']} --fine-tune-epochs 0 --optimizer rmsprop ...`.",
        "",
        f"Wall seconds: {result['wall_time_includes']}. Compute seconds: {result['compute_time_includes']}.",
    ]


def _fast_loop_rows(fast: dict[str, Any], targets: dict[str, float]) -> list[str]:
    met = fast["targets_met"]
    return [
        f"| 1 | `head` logistic, whole process, wall s ({len(fast['head_logistic_seconds_all'])} runs) "
        f"| {_range(fast['head_logistic_seconds_all'])} | | | <= {targets['head_logistic_seconds']:g} s "
        f"| {_yes(met['head_logistic_seconds'])} |",
        f"| 1 | `head` dense, whole process minus its fit, s | {fast['head_dense_fixed_seconds']} "
        f"| {fast['head_dense_seconds']} wall, {fast['head_dense_fit_seconds']} fit | | "
        f"<= {targets['head_dense_fixed_seconds']:g} s | {_yes(met['head_dense_fixed_seconds'])} |",
        f"| 2 | no-op `features` (file up to date), wall s ({len(fast['noop_features_seconds_all'])} runs) "
        f"| {_range(fast['noop_features_seconds_all'])} | | | <= {targets['noop_features_seconds']:g} s "
        f"| {_yes(met['noop_features_seconds'])} |",
    ]


def _targets(result: dict[str, Any]) -> list[str]:
    """One row per target: the measure, the pipeline's figure, its reference, whether it is met."""
    targets, seed = result["targets"], result["end_to_end"]["seed_workflow"]
    lines = [
        "## Targets",
        "",
        "| # | measure | pipeline | reference | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    lines += _fast_loop_rows(result["fast_loop"], targets)
    for name in ("logistic", "dense"):
        run = result["end_to_end"][f"pipeline_{name}"]
        lines.append(
            f"| 3 | end to end, features + {name} head: wall s (validation accuracy) | {run['wall_seconds']} "
            f"({run['validation_accuracy']:.4f}) | {seed['wall_seconds']} ({seed['validation_accuracy']:.4f}) "
            f"| {run['speedup']}x faster | >= {targets['speedup']:g}x faster, accuracy >= seed "
            f"| {_yes(run['target_met'])} |"
        )
    for size, extraction in result["extraction"].items():
        ratios, runs = extraction["ratio_to_forward_all"], extraction["runs"]
        ratio = extraction["ratio_to_forward_median"]
        lines.append(
            f"| 4 | extraction img/s vs the bare forward pass ({runs[0].get('forward_runtime', 'tensorflow f32')}) "
            f"at {size} px ({len(ratios)} runs) "
            f"| {median([r['img_per_s'] for r in runs])} | {median([r['forward_img_per_s'] for r in runs])} "
            f"| {ratio} ({ratios[0]}-{ratios[-1]}) | >= {targets['extraction_ratio']} "
            f"| {_yes(ratio >= targets['extraction_ratio'])} |"
        )
    retrain, storage = result["retrain"], result["storage"]
    return lines + [
        f"| - | logistic retrain on cached features vs one seed epoch, s | {retrain['logistic_seconds']} "
        f"| {retrain['seed_epoch_seconds']} | {retrain['logistic_ratio_to_seed_epoch']}x faster "
        f"| < {targets['logistic_retrain_seconds']:g} s | {_yes(retrain['target_met'])} |",
        f"| - | feature file MiB, float16 vs float32 | {_mib(storage['float16_bytes'])} "
        f"| {_mib(storage['float32_bytes'])} | {storage['size_ratio']} | accuracy change reported "
        f"| {storage['accuracy_difference']:+.4f} |",
        "",
        "Where each process's time goes: `profile.md`, written by the same run.",
    ]


def _end_to_end(result: dict[str, Any]) -> list[str]:
    e2e, fast, stages = result["end_to_end"], result["fast_loop"], result["stages"]
    seed = e2e["seed_workflow"]
    lines = [
        "## End to end",
        "",
        "| workflow | wall s | compute s | validation accuracy | speed-up, wall | speed-up, compute "
        "| accuracy - seed |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| seed workflow, {_epochs(result['settings']['epochs'])} | {seed['wall_seconds']} "
        f"| {seed['compute_seconds']} | {seed['validation_accuracy']:.4f} | 1 | 1 | 0 |",
    ]
    for name in ("logistic", "dense"):
        run = e2e[f"pipeline_{name}"]
        lines.append(
            f"| `features` + `head` {name} | {run['wall_seconds']} | {run['compute_seconds']} "
            f"| {run['validation_accuracy']:.4f} | {run['speedup']}x | {run['compute_speedup']}x "
            f"| {run['accuracy_difference']:+.4f} |"
        )
    features = stages["features"]
    return lines + [
        "",
        f"Pipeline wall = `features` ({features['wall_seconds']} s, of which extraction "
        f"{features['extract_seconds']} s) + `head` ({fast['head_logistic_seconds']} s logistic, the "
        f"median of {len(fast['head_logistic_seconds_all'])} processes; {stages['head dense']['wall_seconds']} s "
        "dense).",
    ]


def _retrain(result: dict[str, Any]) -> list[str]:
    retrain = result["retrain"]
    lines = [
        "## Head retrain on cached features",
        "",
        f"Median of {result['settings']['head_repeats']} in-process fits (logistic including its sweep over C) "
        "against the median seed epoch after the first, which also traces the model (all epochs: "
        f"{', '.join(map(str, retrain['seed_epoch_seconds_all']))} s).",
        "",
        "| head | seconds | one seed epoch s | ratio | validation accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("logistic", "dense"):
        head = retrain["heads"][name]
        lines.append(
            f"| {name} | {head['seconds_median']} | {retrain['seed_epoch_seconds']} "
            f"| {retrain[f'{name}_ratio_to_seed_epoch']}x faster | {head['validation_accuracy']:.4f} |"
        )
    return lines


def _storage(result: dict[str, Any]) -> list[str]:
    storage, stages = result["storage"], result["stages"]
    return [
        "## Storage",
        "",
        "| dtype | feature file MiB | bytes | logistic validation accuracy | `features` wall s |",
        "|---|---:|---:|---:|---:|",
        f"| float32 | {_mib(storage['float32_bytes'])} | {storage['float32_bytes']} "
        f"| {storage['float32_validation_accuracy']:.4f} | {stages['features']['wall_seconds']} |",
        f"| float16 | {_mib(storage['float16_bytes'])} | {storage['float16_bytes']} "
        f"| {storage['float16_validation_accuracy']:.4f} | {stages['features float16']['wall_seconds']} |",
        "",
        f"float16 / float32 size: {storage['size_ratio']}; validation accuracy difference (float16 - float32): "
        f"{storage['accuracy_difference']:+.4f}.",
    ]


def _peak_memory(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Peak memory",
        "",
        "Resident memory of each stage's process and its children, sampled every 50 ms.",
        "",
        "| stage | peak RSS MiB | wall s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {s['peak_rss_mib']} | {s['wall_seconds']} |" for name, s in result["stages"].items()]
    for size, extraction in result["extraction"].items():
        for run in extraction["runs"]:
            name = f"bench-features {size} px, {run['images']} images"
            lines.append(f"| {name} | {run['peak_rss_mib']} | {run['wall_seconds']} |")
    return lines


def _extraction(result: dict[str, Any]) -> list[str]:
    lines = ["## Extraction against the forward pass", ""]
    for extraction in result["extraction"].values():
        lines += [features_table({**extraction, "machine": result["machine"]}), ""]
    return lines


def pipeline_table(result: dict[str, Any]) -> str:
    """The markdown report of a `bench_pipeline` result: targets first, then each result."""
    sections = (_header, _targets, _end_to_end, _retrain, _storage, _peak_memory, _extraction)
    lines: list[str] = []
    for section in sections:
        lines += [*section(result), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


#: What each phase of a stage's `phases` covers, for the profile's readers.
PHASE_NOTES = {
    "start-up and imports": "interpreter start-up and the CLI's imports (no TensorFlow)",
    "resolve key": "the data's fingerprint and the file's cache key",
    "import TensorFlow and Keras": "",
    "build model": "the Keras backbone and its weights",
    "trace forward pass": "tf.function trace and the first call",
    "list data": "the split's files and labels, as a tf.data source",
    "decode": "waiting for each batch: reading, decoding and resizing (in bursts on a CPU)",
    "forward": "the backbone on each batch",
    "write": "appending each batch to the HDF5 file, flushed",
    "build input pipeline": "tf.data pipelines, one per split (the first one also starts tf.data)",
    "finish file": "the finished, compressed copy of the partial file, and the rename",
    "stage imports": "pipeline.heads.train and what it imports: numpy, h5py",
    "resolve feature file": "the feature file's path and key, as `features` computes them",
    "lock": "waiting for the run directory's lock",
    "read features": "validation and test rows, then the train rows",
    "up-to-date check": "is a finished run of this head on these features there already?",
    "import libraries": "what the head's fit needs: scikit-learn (logistic), TensorFlow and Keras (dense)",
    "fit": "training, with the logistic head's sweep over C",
    "evaluate": "validation and test metrics",
    "save head": "the fitted head",
    "import matplotlib": "",
    "plot confusion matrix": "",
    "plot top losses": "reading the 16 thumbnails (PIL) and drawing the grid",
    "plot learning curves": "",
    "report": "report.md",
    "finish": "the run directory moved into place",
}


def profile_table(result: dict[str, Any]) -> str:
    """`bench/profile.md`: where the wall time of one `features` run and one logistic `head` run goes.

    Phases come from the stages' own timers (`pipeline.phases`); what is left of the
    process's wall time (process creation, exit, anything untimed) is its own row.
    """
    host, settings = result["machine"], result["settings"]
    lines = [
        "# Where the time goes: one `features` run and one logistic `head` run",
        "",
        f"Measured by `make bench` in the same run as `results.md`: {host['cpus']} CPUs ({host['processor']}), "
        f"GPUs: {', '.join(host['gpus']) or 'none'}; {Path(settings['data_dir']).name}, {settings['backbone']} at "
        f"{settings['image_size']} px, batch {settings['batch_size']}. Each phase is timed by the stage itself "
        "(`pipeline/phases.py`); the last row is the rest of the process's wall time, measured from outside.",
        "",
    ]
    stages, fast = result["stages"], result["fast_loop"]
    noop = {"wall_seconds": fast["noop_features_seconds"], "phases": fast["noop_features_phases"]}
    for title, stage in (
        (f"`features`, {stages['features']['images']} images extracted", stages["features"]),
        ("`head`, logistic", stages["head logistic"]),
        ("`features`, file up to date", noop),
    ):
        phases, wall = stage["phases"], stage["wall_seconds"]
        lines += [f"## {title}: {wall} s wall", "", "| phase | seconds | share | what |", "|---|---:|---:|---|"]
        for name, seconds in phases.items():
            lines.append(f"| {name} | {seconds:.3f} | {seconds / wall:.1%} | {PHASE_NOTES.get(name, '')} |")
        rest = wall - sum(phases.values())
        lines += [
            f"| rest of the process | {rest:.3f} | {rest / wall:.1%} | process creation and exit, untimed steps |",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"
