"""Stage 3: augmented end-to-end fine-tuning, warm-started from the stage-2 head.

The model is the one the Keras guide and the TensorFlow tutorial teach::

    images (S, S, 3) 0-255 -> augmentation -> the backbone's preprocessing
        -> backbone(training=False) -> pooling -> head (Dropout + Dense) -> logits

The backbone is called with `training=False`, so BatchNormalization normalizes with
its ImageNet statistics and never updates them; its layers also stay frozen
(`trainable=False`) everywhere. Layers from `fine_tune_at` up are unfrozen, and the
model is recompiled after every change of `trainable`, as Keras requires.

The head starts from the stage-2 run (a dense head is copied with its Dropout; a
logistic head becomes Dropout + a Dense layer carrying its coefficients), so at step
0 the model predicts what the stage-2 head predicts, and a low learning rate only
refines a converged head. `head_epochs > 0` instead trains a fresh head on images
with the backbone frozen first, the tutorials' first phase. A few-shot head
(`TRAIN_PER_CLASS=N`) is fine-tuned on the same N images per class it was trained on.

Run directory `runs/<stage-2 run>__ft-<fine_tune_at>/`::

    model.keras, labels.txt        raw uint8 images of any size in, probabilities out
    config.json                    features config + key, the stage-2 run, finetune config
    metrics.json                   validation/test before and after, parameter counts, s/epoch
    history.csv, tensorboard/      one row per epoch (warm-up and fine-tuning)
    learning_curves.png            the stage-2 curves continued, a "start fine-tuning" marker
    confusion_matrix.png, top_losses.png, report.md

`finetune` is a recipe of named steps: resolve (`_resolve_job`), build (`_load_data`,
which loads the data source once, and `build_model`), phase 1 (`_phase_head`), phase 2
(`_phase_finetune`), evaluate (`_evaluate_run`) and write (`_write_run`).

While training, state lives in `<run dir>.partial-<digest>/` (`Resumable`): a snapshot
of the weights and optimizer state of the last finished epoch and of the best one
(`epoch-NNN.npz`), and `state.json`, written last and by rename, which names them. A
rerun with the same settings resumes after the last finished epoch and keeps the best
model so far; the run directory appears only at the end, when the best weights are
restored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import plots, runs
from pipeline.augment import augmentation_layers
from pipeline.config import (
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    fingerprint,
    slugify,
)
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.export import image_classifier
from pipeline.features.backbones import get_backbone
from pipeline.features.extract import resolve
from pipeline.features.extractor import build_extractor
from pipeline.features.sources import DataSource, SplitSource, load_source, stratified_rows
from pipeline.heads.base import Head
from pipeline.heads.dense import logits_loss_and_accuracy
from pipeline.heads.registry import load_head
from pipeline.images import decode_and_resize, load_images
from pipeline.locks import exclusive
from pipeline.metrics import classification_metrics, probabilities
from pipeline.runs import run_dir_for

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
STATE_FORMAT = 2  # 1 (unmarked): Keras .weights.h5 per epoch beside best.weights.npz
_BLOCK = re.compile(r"^(.*?block_?\d+[a-z]?)(?:_|$)")


# ------------------------------------------------------------------ unfreezing
def block_starts(backbone) -> list[int]:
    """Indices of the layers where each block of `backbone` begins, in order.

    keras.applications name block layers `block_16_expand` (MobileNetV2), `block14_...`
    (Xception), `block7a_...` (EfficientNet) or `conv5_block3_...` (ResNet); a block is
    the run of layers sharing that prefix. Layers after the last block (the final
    1x1 convolution of MobileNetV2 or EfficientNet) belong to it.
    """
    starts, current = [], None
    for index, layer in enumerate(backbone.layers):
        match = _BLOCK.match(layer.name)
        if match and match.group(1) != current:
            current = match.group(1)
            starts.append(index)
    return starts


def resolve_fine_tune_at(backbone, fine_tune_at: str) -> int:
    """`fine_tune_at` -> the index of the first trainable layer of `backbone`.

    Accepts a layer index, `all` (0), `blocks:N` (the top N blocks) or a layer name
    (exact, else the first layer whose name starts with it).
    """
    layers = backbone.layers
    text = str(fine_tune_at).strip()
    where = f"{backbone.name} has {len(layers)} layers (0-{len(layers) - 1})"
    if text == "all":
        return 0
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < len(layers):
            raise ConfigError(f"FINE_TUNE_AT={text} is out of range: {where}.")
        return index
    if text.startswith("blocks:"):
        count = text.partition(":")[2]
        starts = block_starts(backbone)
        if not count.isdigit() or not 1 <= int(count) <= len(starts):
            raise ConfigError(
                f"FINE_TUNE_AT={text}: expected blocks:N with 1 <= N <= {len(starts)}, the number of "
                f"blocks of {backbone.name}."
            )
        return starts[-int(count)]
    names = [layer.name for layer in layers]
    if text in names:
        return names.index(text)
    prefixed = [i for i, name in enumerate(names) if name.startswith(text)]
    if prefixed:
        return prefixed[0]
    close = difflib.get_close_matches(text, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Its layers run from {names[0]!r} to {names[-1]!r}."
    raise ConfigError(
        f"FINE_TUNE_AT={text!r} is neither a layer index, `all`, `blocks:N` nor a layer name of {backbone.name}.{hint}"
    )


def unfreeze(backbone, at: int, *, batch_norm: bool = False) -> None:
    """Makes layers `at`.. of `backbone` trainable and the ones below frozen.

    BatchNormalization layers stay frozen unless `batch_norm` (training from scratch):
    the guide's rule, which keeps their scale and offset matched to the statistics
    that `training=False` freezes.
    """
    import keras

    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= at
        if isinstance(layer, keras.layers.BatchNormalization) and not batch_norm:
            layer.trainable = False


def parameter_counts(model) -> dict[str, int]:
    """Trainable and non-trainable parameters, the figures of `model.summary()`."""

    def count(variables) -> int:
        return int(sum(math.prod(v.shape) for v in variables))

    return {"trainable": count(model.trainable_weights), "non_trainable": count(model.non_trainable_weights)}


# ------------------------------------------------------------------- the model
@dataclass
class FinetuneModel:
    """The training model (images -> logits) and its parts, shared by reference."""

    model: Any
    extractor: Any
    head: Any
    fine_tune_at: int | None  # None: no fine-tuning phase (the seed workflow), nothing to unfreeze

    @property
    def backbone(self):
        return self.extractor.get_layer("backbone")

    def freeze_backbone(self) -> None:
        self.backbone.trainable = False

    def unfreeze(self, *, batch_norm: bool = False) -> None:
        unfreeze(self.backbone, self.fine_tune_at, batch_norm=batch_norm)

    def classifier(self, image_size: int):
        """Raw uint8 images of any size -> probabilities, sharing the trained layers."""
        return image_classifier(
            self.extractor,
            self.head,
            image_size=image_size,
            name=f"{self.extractor.name.removesuffix('_extractor')}_finetuned",
        )


def build_model(features: FeaturesConfig, config: FinetuneConfig, head: Head | None, n_classes: int) -> FinetuneModel:
    """The fine-tuning model, its head copied from `head` (a fresh one when None)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    spec = get_backbone(features.backbone)
    extractor = build_extractor(
        spec,
        image_size=features.image_size,
        weights=features.weights_arg,
        pooling=features.pooling,
        mixed_precision=config.mixed_precision,
    )
    # Without a fine-tuning phase FINE_TUNE_AT is unused, so it is not held against small backbones.
    at = resolve_fine_tune_at(extractor.get_layer("backbone"), config.fine_tune_at) if config.epochs else None
    units = 1 if n_classes == 2 else n_classes
    if head is None:
        head_model = _fresh_head(spec.feature_dim, units, config)
    else:
        head_model = head.finetune_model(dropout=config.dropout, seed=config.seed)
    images = keras.Input((features.image_size, features.image_size, 3), name="images")
    x = augmentation_layers(config.augment, seed=config.seed)(images)
    logits = head_model(extractor(x))
    model = keras.Model(images, logits, name=f"{spec.name}_finetune")
    return FinetuneModel(model=model, extractor=extractor, head=head_model, fine_tune_at=at)


def _fresh_head(n_features: int, units: int, config: FinetuneConfig):
    import keras

    inputs = keras.Input((n_features,), name="features")
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(inputs)
    outputs = keras.layers.Dense(
        units, kernel_initializer=keras.initializers.GlorotUniform(seed=config.seed), name="logits"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def _compile(model, config: FinetuneConfig, learning_rate: float, binary: bool) -> None:
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop, "sgd": keras.optimizers.SGD}
    optimizer = optimizers[config.optimizer](learning_rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    loss, accuracy = logits_loss_and_accuracy(binary)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])


# -------------------------------------------------------------------- the data
def image_dataset(
    split: SplitSource, image_size: int, batch_size: int, *, binary: bool, shuffle_seed: int | None = None
):
    """Batches of (images (N, S, S, 3) float 0-255, labels) decoded as stage 1 decodes.

    Binary labels are float (N, 1), the shape of the single logit. Unreadable images
    are dropped, as stage 1 drops them; `_check_counts` says so.
    """
    import tensorflow as tf

    ds = split.records(0)
    if shuffle_seed is not None:
        # Shuffle the encoded bytes (small), not the decoded images.
        ds = ds.shuffle(split.size, seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(record):
        label = record["label"]
        label = tf.cast(label, tf.float32)[tf.newaxis] if binary else label
        return decode_and_resize(record["image"], image_size), label

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,)) of `model` (logits out) in inference mode.

    `predict_on_batch` reuses the model's one compiled predict function, so every
    evaluation shares a single trace.
    """
    logits, labels = [], []
    for images, y in dataset:
        logits.append(np.asarray(model.predict_on_batch(images), np.float64))
        labels.append(np.asarray(y).reshape(-1))
    return probabilities(np.concatenate(logits)), np.concatenate(labels).astype(np.int64)


# ------------------------------------------------------------- resumable training
@dataclass
class Resumable:
    """Training that survives an interruption: epoch snapshots and one state file in `work`.

    After every epoch the model's weights and its optimizer's variables go to
    `epoch-NNN.npz`, written under a temporary name and renamed; then `state.json`,
    also by rename, names the last snapshot and the best one, with the history, the
    best validation loss and whether early stopping ended training, and the snapshots
    it no longer names are deleted. Whatever stops the process, the state names
    complete files of finished epochs, so a rerun continues after the last one. The
    best snapshot is restored without its optimizer state, so it loads after any
    recompile.

    Not `keras.callbacks.BackupAndRestore` (tried, Keras 3.15): it keeps the last epoch
    only, so the best epoch, the history and early stopping's count would need this
    state file anyway, written at another moment than its files (a kill in between
    leaves the two disagreeing); it deletes its backup when a `fit` ends and sets
    `model._initial_epoch`, which every later `fit` prefers to its own `initial_epoch`
    (resumed in phase 1, phase 2 started at the phase-1 epoch and ran 4 epochs
    instead of 2; resumed in phase 2, phase 1 ran again); and it writes in place, so
    a kill during a save left files that fail every rerun (a truncated weights file
    raises OSError unless `double_checkpoint`; a truncated `training_metadata.json`
    raises JSONDecodeError even then).
    """

    work: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    last: str | None = None  # snapshot of the last finished epoch: weights and optimizer
    best: str | None = None  # snapshot of the best model so far
    best_epoch: int | None = None
    best_loss: float = math.inf
    before: dict[str, Any] | None = None  # metrics of the starting point of fine-tuning
    stopped: bool = False

    @classmethod
    def open(cls, work: Path) -> Resumable:
        """The state in `work` (created if missing); empty when there is none."""
        path = work / STATE_FILE
        if path.exists():
            raw = json.loads(path.read_text())
            if raw.pop("format", None) == STATE_FORMAT:
                raw["best_loss"] = math.inf if raw["best_loss"] is None else raw["best_loss"]
                return cls(work, **raw)
            log.warning("%s was left by an earlier version of stage 3 and cannot be resumed: starting afresh.", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return cls(work)

    @property
    def epochs_done(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    def restore_last(self, model) -> None:
        """The weights and optimizer state of the last finished epoch, to continue training."""
        if self.last:
            self._load(model, self.last, optimizer=True)

    def restore_best(self, model) -> None:
        """The weights of the best model so far; the optimizer is left alone, so they load after any compile."""
        self._load(model, self.best, optimizer=False)

    def start_finetuning(self, model, before: dict[str, Any], epoch: int) -> None:
        """Makes `model` (metrics `before`) the first best model: fine-tuning that never beats it leaves it."""
        self.before, self.best_loss, self.best_epoch = before, before["validation"]["loss"], epoch
        self.best = self.last or self._snapshot(model, epoch)  # the last snapshot is `model` after phase 1
        self._commit()

    def callback(self, *, phase: str, patience: int | None):
        """A Keras callback that records every epoch (`end_epoch`) and stops when it says so."""
        import keras

        training = self

        class Snapshots(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - self.started
                if training.end_epoch(self.model, epoch + 1, phase, seconds, logs or {}, patience=patience):
                    self.model.stop_training = True

        return Snapshots()

    def end_epoch(
        self, model, number: int, phase: str, seconds: float, logs: Mapping[str, Any], *, patience: int | None
    ) -> bool:
        """Snapshots epoch `number` and commits; True when early stopping ends training.

        The best model is tracked by validation loss in the fine-tuning phase;
        `patience` (None: never) stops training that many epochs after it.
        """
        entry = {
            "epoch": number,
            "phase": phase,
            "seconds": round(seconds, 3),
            **{k: float(v) for k, v in logs.items()},
        }
        self.history = [h for h in self.history if h["epoch"] < number] + [entry]
        self.last = self._snapshot(model, number)
        if phase == "finetune" and entry.get("val_loss", math.inf) < self.best_loss:
            self.best, self.best_loss, self.best_epoch = self.last, entry["val_loss"], number
        stop = patience is not None and self.best_epoch is not None and number - self.best_epoch >= patience
        if stop:
            self.stopped = True
            log.info(
                "Early stopping after epoch %d: no better validation loss since epoch %d.", number, self.best_epoch
            )
        self._commit()
        return stop

    def clear(self) -> None:
        """Deletes the snapshots and the state: what is left becomes the run directory."""
        for path in [*self.work.glob("epoch-*.npz"), *self.work.glob(".tmp-*"), self.work / STATE_FILE]:
            path.unlink(missing_ok=True)

    def _snapshot(self, model, epoch: int) -> str:
        name = f"epoch-{epoch:03d}.npz"
        tmp = self.work / f".tmp-{name}"
        with open(tmp, "wb") as f:
            np.savez(f, *model.get_weights(), *(v.numpy() for v in model.optimizer.variables))
        os.replace(tmp, self.work / name)
        return name

    def _load(self, model, name: str, *, optimizer: bool) -> None:
        with np.load(self.work / name) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        model.set_weights(arrays[: len(model.weights)])
        if optimizer:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            variables, values = model.optimizer.variables, arrays[len(model.weights) :]
            if len(values) != len(variables):
                raise CacheError(
                    f"{self.work / name} holds {len(values)} optimizer variables, the optimizer has "
                    f"{len(variables)}. Delete {self.work} to start this fine-tuning afresh."
                )
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _commit(self) -> None:
        raw = {"format": STATE_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        del raw["work"]
        raw["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        tmp = self.work / f".tmp-{STATE_FILE}"
        tmp.write_text(json.dumps(raw, indent=1))
        os.replace(tmp, self.work / STATE_FILE)
        for path in self.work.glob("epoch-*.npz"):
            if path.name not in (self.last, self.best):
                path.unlink()


# ------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class FinetuneRun:
    run_dir: Path
    metrics: dict[str, Any]
    up_to_date: bool = False

    def summary(self) -> str:
        m = self.metrics
        parts = ["finetune" + (" (up to date, not retrained)" if self.up_to_date else "")]
        for split in ("validation", "test"):
            if m["after"].get(split):
                before = m["before"][split]["accuracy"] if m["before"].get(split) else None
                change = f" (before {before:.4f})" if before is not None else ""
                parts.append(f"{split} accuracy {m['after'][split]['accuracy']:.4f}{change}")
        parts.append(f"{m['seconds_per_epoch']:.1f} s/epoch -> {self.run_dir}")
        return ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """The result as JSON (`--json`): what `make bench` reads instead of the summary line."""
        return {
            "stage": "finetune",
            "run_dir": str(self.run_dir),
            "up_to_date": self.up_to_date,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class _Origin:
    """Where the head comes from: a stage-2 run, or none (warm-up or scratch)."""

    name: str
    run_dir: Path | None = None
    head: Head | None = None
    record: Mapping[str, Any] | None = None
    trained: str | None = None  # a fingerprint of its metrics.json: which training of that run
    trained_mtime: int | None = None  # st_mtime_ns of its metrics.json: the same for runs written before


@dataclass(frozen=True)
class _Job:
    """One fine-tuning, resolved: its settings, where its head comes from, where it writes."""

    features: FeaturesConfig  # resolved: the image size filled in
    config: FinetuneConfig
    origin: _Origin
    run_dir: Path
    identity: Mapping[str, Any]  # config.json of the run; a finished run with another is not current
    per_class: int | None  # few-shot: train on the stage-2 head's own examples per class
    subset_seed: int

    @property
    def work(self) -> Path:
        """Where training state and outputs gather; one per identity, so other settings never resume it."""
        return self.run_dir.with_name(f"{self.run_dir.name}.partial-{fingerprint(self.identity)}")


@dataclass(frozen=True)
class _Data:
    """The data source, loaded once, and the datasets made from it."""

    source: DataSource
    train_split: SplitSource  # the train split, or the few shots of it
    train: Any
    validation: Any
    test: Any | None

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def binary(self) -> bool:
        return len(self.source.class_names) == 2


def finetune_run_dir(
    features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig, *, head_run: Path | None = None
) -> Path:
    """`runs/<stage-2 run>__ft-<at>`; without a stage-2 head, `<features>__<origin>__ft-<at>`."""
    _, _, path = resolve(features)
    few = f"__{head.train_per_class}-per-class" if head.train_per_class is not None else ""
    if config.from_scratch:
        base = f"{path.stem}__scratch{few}"
    elif config.head_epochs:
        base = f"{path.stem}__images{config.head_epochs}{few}"
    else:
        base = Path(head_run).name if head_run else run_dir_for(path, head).name
    at = "frozen" if config.epochs == 0 else slugify(config.fine_tune_at.replace(":", ""))
    return Path(config.runs_dir) / f"{base}__ft-{at}"


def finetune(
    features: FeaturesConfig,
    head: HeadConfig,
    config: FinetuneConfig,
    *,
    head_run: Path | None = None,
    progress: bool = True,
    make_head: bool = False,
    callbacks: Sequence[Any] = (),
) -> FinetuneRun:
    """Runs stage 3 and writes its run directory; see the module docstring.

    `features` and `head` locate the stage-2 run (or `head_run` names it); with
    `make_head` a warm start first runs stages 1 and 2 as `make head` would (each a no-op
    when up to date), so `make finetune` needs no rule of its own for when a head is
    needed (`FinetuneConfig.warm_starts` decides). `callbacks`
    are extra Keras callbacks (tests interrupt training with one). The stage-2 run is
    read under its lock, then the run directory is locked from the "is it up to date?"
    check to the rename (`pipeline.locks.exclusive`; never both at once), so a second
    run with the same settings waits, then finds the run finished.
    """
    if make_head and config.warm_starts and head_run is None:
        _make_head(features, head, progress=progress)
    job = _resolve_job(features, head, config, head_run)
    with exclusive(job.run_dir, what="fine-tuning run directory"):
        return _finished(job) or _run(job, progress=progress, callbacks=callbacks)


def _run(job: _Job, *, progress: bool, callbacks: Sequence[Any]) -> FinetuneRun:
    """The recipe, under the lock on the run directory (which also guards its `.partial-<digest>` folder)."""
    data = _load_data(job)
    parts = build_model(job.features, job.config, job.origin.head, len(data.class_names))
    training = Resumable.open(job.work)
    if training.epochs_done:
        log.info("Resuming %s after epoch %d.", job.work, training.epochs_done)
    fit = functools.partial(
        _fit,
        parts.model,
        data=data,
        training=training,
        progress=progress,
        callbacks=[*callbacks, _tensorboard(job.work)],
    )
    counts = {
        "frozen": _phase_head(parts, job.config, data, training, fit),
        "finetune": _phase_finetune(parts, job.config, data, training, fit),
    }
    metrics = _evaluate_run(job, parts, data, training, counts)
    return _write_run(job, parts, data, training, metrics)


def _make_head(features: FeaturesConfig, head: HeadConfig, *, progress: bool) -> None:
    """Stages 1 and 2 for the warm start, as `make head` runs them (no-ops when up to date)."""
    from pipeline.features.extract import extract_features
    from pipeline.heads.train import train_head

    result = extract_features(features, progress=progress)
    train_head(result.path, head, expect=resolve(features)[1])


def _resolve_job(features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig, head_run: Path | None) -> _Job:
    """Checks the options, reads the stage-2 run to start from and names the run directory."""
    features, key, features_path = resolve(features)
    _check_options(features, config)
    origin = _origin(features, key, features_path, head, config, head_run)
    per_class, subset_seed = _few_shot_setting(origin, head)
    identity = {
        "features": features.to_dict(),
        "features_key": key,
        "finetune": config.to_dict(),
        "head_run": _head_identity(origin),
        "train_per_class": per_class,
    }
    run_dir = finetune_run_dir(features, head, config, head_run=origin.run_dir)
    return _Job(features, config, origin, run_dir, identity, per_class, subset_seed)


def _load_data(job: _Job) -> _Data:
    """Loads the data source once; the datasets and, at the end, the predictions grid use it."""
    source = load_source(job.features.data, seed=job.features.seed)
    _check_source(source, job.origin)
    binary = len(source.class_names) == 2
    train_split = source.splits["train"]
    if job.per_class is not None:
        train_split = few_shot(train_split, job.per_class, source.class_names, seed=job.subset_seed)

    def dataset(split: SplitSource, shuffle_seed: int | None = None):
        return image_dataset(
            split, job.features.image_size, job.config.batch_size, binary=binary, shuffle_seed=shuffle_seed
        )

    test = source.splits.get("test")
    return _Data(
        source,
        train_split,
        train=dataset(train_split, shuffle_seed=job.config.seed),
        validation=dataset(source.splits["validation"]),
        test=None if test is None else dataset(test),
    )


def _phase_head(
    parts: FinetuneModel, config: FinetuneConfig, data: _Data, training: Resumable, fit: Callable[..., None]
) -> dict[str, int]:
    """Phase 1, the backbone frozen: `head_epochs` (often 0) of a fresh head on images.

    Its result, the warm-started model when there is no phase 1, is evaluated once
    and becomes the first best model. Returns the frozen model's parameter counts.
    """
    parts.freeze_backbone()
    _compile(parts.model, config, config.head_learning_rate, data.binary)
    if training.epochs_done < config.head_epochs:
        training.restore_last(parts.model)
        fit(phase="head", epochs=config.head_epochs, patience=None)
    elif training.before is None:
        training.restore_last(parts.model)  # phase 1 finished in an earlier run
    if training.before is None:
        training.start_finetuning(parts.model, _evaluate(parts.model, data), epoch=config.head_epochs)
    return parameter_counts(parts.model)


def _phase_finetune(
    parts: FinetuneModel, config: FinetuneConfig, data: _Data, training: Resumable, fit: Callable[..., None]
) -> dict[str, int]:
    """Phase 2: unfreeze from `fine_tune_at`, recompile, train at a low rate; ends on the best model.

    Returns the parameter counts of the model as fine-tuned.
    """
    if config.epochs:
        parts.unfreeze(batch_norm=config.from_scratch)
    _compile(parts.model, config, config.resolved_learning_rate, data.binary)
    total = config.head_epochs + config.epochs
    if config.epochs and not training.stopped and training.epochs_done < total:
        if training.epochs_done > config.head_epochs:
            training.restore_last(parts.model)  # weights and optimizer of the last fine-tuning epoch
        else:
            training.restore_best(parts.model)  # the starting point
        fit(phase="finetune", epochs=total, patience=config.patience or None)
    training.restore_best(parts.model)
    return parameter_counts(parts.model)


def _fit(
    model,
    *,
    phase: str,
    epochs: int,
    patience: int | None,
    data: _Data,
    training: Resumable,
    progress: bool,
    callbacks: Sequence[Any],
) -> None:
    log.info(
        "%s: epochs %d-%d",
        "Fine-tuning" if phase == "finetune" else "Training the head on images",
        training.epochs_done + 1,
        epochs,
    )
    with warnings.catch_warnings():
        # A dataset that skips unreadable images has no known length, which Keras
        # reports at the end of every epoch; the tf.data pipeline does the shuffling.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
        model.fit(
            data.train,
            validation_data=data.validation,
            epochs=epochs,
            initial_epoch=training.epochs_done,
            callbacks=[training.callback(phase=phase, patience=patience), *callbacks],
            verbose=1 if progress else 0,
            shuffle=False,
        )


def _evaluate_run(
    job: _Job, parts: FinetuneModel, data: _Data, training: Resumable, counts: Mapping[str, dict[str, int]]
) -> dict[str, Any]:
    """metrics.json: the fine-tuned model evaluated, beside the starting point and the training record."""
    config, at, backbone = job.config, parts.fine_tune_at, parts.backbone
    finetune_epochs = [h for h in training.history if h["phase"] == "finetune"]
    return {
        "stage": "finetune",
        "backbone": job.features.backbone,
        "fine_tune_at": None
        if at is None
        else {
            "requested": config.fine_tune_at,
            "index": at,
            "layer": backbone.layers[at].name,
            "layers": len(backbone.layers),
        },
        "learning_rate": config.resolved_learning_rate,
        "optimizer": config.optimizer,
        "head_run": str(job.origin.run_dir) if job.origin.run_dir else job.origin.name,
        "train_examples": data.train_split.size,
        "train_per_class": job.per_class,
        "best_epoch": training.best_epoch,
        "epochs_run": training.epochs_done,
        "stopped_early": training.stopped,
        "parameters": dict(counts),
        "seconds_per_epoch": _mean([h["seconds"] for h in finetune_epochs or training.history]),
        "training_seconds": round(sum(h["seconds"] for h in training.history), 2),
        "before": training.before,
        "after": _evaluate(parts.model, data),
    }


def few_shot(split: SplitSource, per_class: int, class_names: Sequence[str], *, seed: int) -> SplitSource:
    """`split` restricted to the examples `make head TRAIN_PER_CLASS=per_class` trains on.

    The subset is chosen by split index (`data.stratified_rows`), so it is the one the
    stage-2 head saw, and the seed workflow of `make bench`/`make compare` trains on the
    same few shots as the heads it is measured against.
    """
    labels, index = [], []
    for label, position in split.records(0).map(lambda r: (r["label"], r["index"])).as_numpy_iterator():
        labels.append(label)
        index.append(position)
    labels, index = np.asarray(labels, dtype=np.int64), np.asarray(index, dtype=np.int64)
    return split.at(index[stratified_rows(labels, index, per_class, list(class_names), seed=seed)])


def _few_shot_setting(origin: _Origin, head: HeadConfig) -> tuple[int | None, int]:
    """(examples per class, seed) to train on: the stage-2 head's own, else `head`'s."""
    chosen = origin.record["head"] if origin.record else head.to_dict()
    return chosen.get("train_per_class"), chosen.get("seed", 0)


def _check_options(features: FeaturesConfig, config: FinetuneConfig) -> None:
    if features.num_shards > 1:
        raise ConfigError(
            "Fine-tuning uses the whole dataset: drop SHARD/NUM_SHARDS "
            f"(received shard {features.shard_index} of {features.num_shards})."
        )
    if config.from_scratch:
        if features.weights != "none":
            raise ConfigError(
                f"FROM_SCRATCH=1 trains from random weights: set WEIGHTS=none. Received: WEIGHTS={features.weights}."
            )
        if config.head_epochs:
            raise ConfigError("FROM_SCRATCH=1 trains everything at once: set HEAD_EPOCHS=0.")
    elif features.weights == "none":
        raise ConfigError(
            f"Fine-tuning needs a pretrained backbone, but WEIGHTS=none makes {features.backbone} random. "
            "Set WEIGHTS=imagenet or WEIGHTS=/path/to/weights.h5 (or FROM_SCRATCH=1 to train from scratch)."
        )


def _origin(
    features: FeaturesConfig,
    key: Mapping[str, Any],
    features_path: Path,
    head: HeadConfig,
    config: FinetuneConfig,
    head_run: Path | None,
) -> _Origin:
    """The stage-2 run to warm-start from, checked against the backbone asked for."""
    if config.from_scratch:
        return _Origin("scratch")
    if not config.warm_starts:
        return _Origin(f"a fresh head trained {config.head_epochs} epochs on images")
    run_dir = Path(head_run) if head_run else run_dir_for(features_path, head)
    if not run_dir.parent.is_dir():
        return _read_origin(run_dir, key)  # nothing there to wait for: the error says what to do
    with exclusive(run_dir, what="run directory"):  # not while `make head` replaces it
        return _read_origin(run_dir, key)


def _read_origin(run_dir: Path, key: Mapping[str, Any]) -> _Origin:
    found = runs.read_run(run_dir)
    if found is None:
        raise CacheError(
            f"No stage-2 head to warm-start from in {run_dir}. Train one first with `make head HEAD=dense` "
            "and the same variables, or pass HEAD_EPOCHS=N to train a head on images with the backbone "
            "frozen for N epochs first."
        )
    record = found.config
    stored = record["features_key"]
    wanted = {
        "backbone": key["backbone"],
        "image_size": key["image_size"],
        "pooling": key["pooling"],
        "weights": key["weights"],
        "dataset": key["dataset"],
    }
    differs = [f"{k}: head {stored.get(k)!r}, asked {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if differs:
        raise CacheError(
            f"The head in {run_dir} was trained on other features than this fine-tuning asks for "
            f"({'; '.join(differs)}). Use the same BACKBONE/IMAGE_SIZE/POOLING/WEIGHTS/data as its "
            "`make head`, or train a head for these settings."
        )
    return _Origin(
        run_dir.name,
        run_dir=run_dir,
        head=load_head(run_dir),
        record=record,
        trained=fingerprint(found.metrics),
        trained_mtime=(run_dir / runs.METRICS).stat().st_mtime_ns,
    )


def _head_identity(origin: _Origin, *, trained: str | int | None = None) -> Any:
    """The stage-2 run a fine-tuning starts from: its place, its head config and which training of it."""
    if origin.run_dir is None:
        return origin.name
    return {
        "run": str(origin.run_dir),
        "head": origin.record["head"],
        "trained": origin.trained if trained is None else trained,
    }


def _check_source(source: DataSource, origin: _Origin) -> None:
    missing = [s for s in ("train", "validation") if s not in source.splits]
    if missing:
        raise DataError(
            f"Fine-tuning needs train and validation splits; {source.name} has no "
            f"{' or '.join(missing)} (available: {', '.join(source.splits)})."
        )
    if origin.head is not None and origin.head.n_classes_ != len(source.class_names):
        raise CacheError(
            f"The head in {origin.run_dir} has {origin.head.n_classes_} classes, the data "
            f"{len(source.class_names)}. Retrain the head with `make head`."
        )


def _finished(job: _Job) -> FinetuneRun | None:
    """The finished run of `job` if its config.json holds the job's identity.

    Runs written before the stage-2 run was identified by a fingerprint of its
    metrics.json hold that file's modification time (an int) instead; they stay
    current while it is unchanged.
    """
    found = runs.read_run(job.run_dir)
    if found is None:
        return None
    identity = job.identity
    stored = found.config.get("head_run")
    if isinstance(stored, Mapping) and isinstance(stored.get("trained"), int):
        identity = {**identity, "head_run": _head_identity(job.origin, trained=job.origin.trained_mtime)}
    if not found.matches(identity):
        return None
    return FinetuneRun(run_dir=job.run_dir, metrics=found.metrics, up_to_date=True)


def _tensorboard(work: Path):
    import keras

    return keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"))


def _evaluate(model, data: _Data) -> dict[str, Any]:
    results = {}
    for name, dataset in (("validation", data.validation), ("test", data.test)):
        if dataset is None:
            results[name] = None
            continue
        proba, labels = predict(model, dataset)
        results[name] = classification_metrics(proba, labels, data.class_names)
    return results


def _mean(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 3) if values else 0.0


# ---------------------------------------------------------------------- outputs
def _write_run(
    job: _Job, parts: FinetuneModel, data: _Data, training: Resumable, metrics: dict[str, Any]
) -> FinetuneRun:
    """The model, records and figures, written into the `.partial` folder, which is then renamed."""
    work, features, config, class_names = job.work, job.features, job.config, data.class_names
    training.clear()
    parts.classifier(features.image_size).save(work / MODEL_FILE)
    runs.write_records(work, class_names=class_names, config=job.identity, metrics=metrics)
    runs.write_history(
        work, ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"], training.history
    )
    figures = [_learning_curves(job.origin, training, work / runs.LEARNING_CURVES, config)]
    scored = "test" if metrics["after"]["test"] else "validation"
    figures.append(
        plots.confusion_matrix(
            metrics["after"][scored]["confusion_matrix"],
            class_names,
            work / runs.CONFUSION_MATRIX,
            title=f"fine-tuned, {scored} split",
        )
    )
    grid = _predictions_grid(parts, features, data.source, scored, class_names, config, work / runs.TOP_LOSSES)
    if grid:
        figures.append(grid)
    runs.write_report(work, report(metrics, [f.name for f in figures]))
    runs.publish(work, job.run_dir)
    return FinetuneRun(run_dir=job.run_dir, metrics=metrics)


def _learning_curves(origin: _Origin, training: Resumable, path: Path, config: FinetuneConfig) -> Path:
    """The stage-2 curves (dense head) or the warm-up epochs, then fine-tuning, with a marker."""
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    earlier = dict(getattr(origin.head, "history_", None) or {})
    history = {n: list(earlier.get(n, [])) for n in names}
    marker = len(history["loss"]) + config.head_epochs
    for h in training.history:
        for n in names:
            history[n].append(h.get(n, float("nan")))
    return plots.learning_curves(history, path, marker=marker if config.epochs else None)


def _predictions_grid(
    parts: FinetuneModel,
    features: FeaturesConfig,
    source: DataSource,
    split: str,
    class_names: list[str],
    config: FinetuneConfig,
    path: Path,
) -> Path | None:
    """The `grid_images` images of `split` the fine-tuned model gets most wrong or is
    least sure of (highest -log p(true), fastai's top losses), one more pass over it."""
    if config.grid_images == 0:
        return None
    try:
        proba, labels, positions = _split_predictions(parts.model, features, source.splits[split], config.batch_size)
    except Exception as err:  # the plot is optional; the metrics are not
        log.warning("No top-losses grid: cannot read the %s images back (%s).", split, err)
        return None
    return runs.top_losses_grid(
        proba,
        labels,
        positions,
        class_names,
        count=config.grid_images,
        split=split,
        path=path,
        read=lambda chosen: load_images(features, split, positions[chosen], source=source),
        title=f"fine-tuned model: top losses on {split} images",
    )


def _split_predictions(
    model,
    features: FeaturesConfig,
    split: SplitSource,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,), split positions (N,)) of every readable image of `split`."""
    import tensorflow as tf

    records = split.records(0)
    batches = (
        records.map(
            lambda r: (decode_and_resize(r["image"], features.image_size), r["label"], r["index"]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    positions = []

    def images_and_labels():
        for images, labels, index in batches:
            positions.append(np.asarray(index))
            yield images, labels

    proba, labels = predict(model, images_and_labels())
    return proba, labels, np.concatenate(positions).astype(np.int64)


def report(metrics: Mapping[str, Any], figures: list[str]) -> str:
    """Before/after accuracy, parameter counts and time per epoch, then the figures."""
    at = metrics["fine_tune_at"]
    unfrozen = (
        f"Unfrozen from layer {at['index']} ({at['layer']}) of {at['layers']}"
        if at
        else "No fine-tuning phase: the backbone stayed frozen"
    )
    lines = [
        f"# Fine-tuned {metrics['backbone']}",
        "",
        f"Warm start: {metrics['head_run']}. {unfrozen}; {metrics['optimizer']} at {metrics['learning_rate']:g}.",
        "",
        "| split | n | accuracy before | accuracy after | loss before | loss after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split in ("validation", "test"):
        before, after = metrics["before"].get(split), metrics["after"].get(split)
        if after:
            lines.append(
                f"| {split} | {after['n']} | {before['accuracy']:.4f} | {after['accuracy']:.4f} | "
                f"{before['loss']:.4f} | {after['loss']:.4f} |"
            )
    p = metrics["parameters"]
    lines += [
        "",
        "| parameters | trainable | non-trainable |",
        "|---|---:|---:|",
        f"| frozen backbone | {p['frozen']['trainable']:,} | {p['frozen']['non_trainable']:,} |",
        f"| fine-tuning | {p['finetune']['trainable']:,} | {p['finetune']['non_trainable']:,} |",
        "",
        f"Epochs run: {metrics['epochs_run']} (best: {metrics['best_epoch']}), "
        f"{metrics['seconds_per_epoch']:.1f} s per fine-tuning epoch, {metrics['training_seconds']:.0f} s in all.",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
