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

While training, state lives in `<run dir>.partial-<digest>/`: the weights (optimizer
included) of the last finished epoch and of the best one, and `state.json`, written
last and by rename, which names them. A rerun with the same settings resumes after
the last finished epoch and keeps the best model so far; the run directory appears
only at the end, when the best weights are restored.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline import plots
from pipeline.augment import augmentation_layers
from pipeline.backbones import get_backbone
from pipeline.extractor import build_extractor
from pipeline.config import (
    FeaturesConfig,
    FinetuneConfig,
    HeadConfig,
    key_digest,
    slugify,
)
from pipeline.data import DataSource, SplitSource, load_source
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.export import image_classifier
from pipeline.extract import resolve
from pipeline.heads import Head, load_head, logits_loss_and_accuracy
from pipeline.images import decode_and_resize, load_images
from pipeline.locks import exclusive
from pipeline.metrics import classification_metrics, probabilities
from pipeline.train import run_dir_for, stratified_rows

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
BEST_WEIGHTS = "best.weights.npz"
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
        f"FINE_TUNE_AT={text!r} is neither a layer index, `all`, `blocks:N` nor a layer name of "
        f"{backbone.name}.{hint}"
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
        return image_classifier(self.extractor, self.head, image_size=image_size,
                                name=f"{self.extractor.name.removesuffix('_extractor')}_finetuned")


def build_model(features: FeaturesConfig, config: FinetuneConfig, head: Head | None, n_classes: int) -> FinetuneModel:
    """The fine-tuning model, its head copied from `head` (a fresh one when None)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    spec = get_backbone(features.backbone)
    extractor = build_extractor(spec, image_size=features.image_size, weights=features.weights_arg,
                                pooling=features.pooling, mixed_precision=config.mixed_precision)
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
    outputs = keras.layers.Dense(units, kernel_initializer=keras.initializers.GlorotUniform(seed=config.seed),
                                 name="logits")(x)
    return keras.Model(inputs, outputs, name="head")


def _compile(model, config: FinetuneConfig, learning_rate: float, binary: bool) -> None:
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
                  "sgd": keras.optimizers.SGD}
    optimizer = optimizers[config.optimizer](learning_rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    loss, accuracy = logits_loss_and_accuracy(binary)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])


# -------------------------------------------------------------------- the data
def image_dataset(split: SplitSource, image_size: int, batch_size: int, *, binary: bool,
                  shuffle_seed: int | None = None):
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


# --------------------------------------------------------------- training state
@dataclass
class TrainingState:
    """What survives an interruption; written last, by rename, after the weights."""

    history: list[dict[str, Any]] = field(default_factory=list)
    last_weights: str | None = None
    best_epoch: int | None = None
    best_loss: float = math.inf
    before: dict[str, Any] | None = None
    stopped: bool = False

    @property
    def epochs_done(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @classmethod
    def load(cls, work: Path) -> TrainingState:
        path = work / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        raw["best_loss"] = math.inf if raw.get("best_loss") is None else raw["best_loss"]
        return cls(**raw)

    def save(self, work: Path) -> None:
        raw = dataclasses.asdict(self)
        raw["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        tmp = work / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(raw, indent=1))
        os.replace(tmp, work / STATE_FILE)


def _save_weights(model, path: Path) -> None:
    """Writes `path` atomically: an interrupted save never replaces a good file."""
    tmp = path.with_name(f".tmp-{path.name}")
    model.save_weights(tmp)
    os.replace(tmp, path)


def _save_model_weights(model, path: Path) -> None:
    """The model's weights alone, atomically: they load under any later `compile`.

    (A Keras weights file also holds the optimizer's state, which does not fit an
    optimizer compiled for another set of trainable layers.)
    """
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, *model.get_weights())
    os.replace(tmp, path)


def _load_model_weights(model, path: Path) -> None:
    with np.load(path) as saved:
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])


def _restore(model, path: Path) -> None:
    """Loads weights saved with `_save_weights`, optimizer state included."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(path)


def _checkpoint_callback(work: Path, state: TrainingState, *, phase: str, patience: int | None):
    """A Keras callback: after every epoch, save weights, the best weights and the state.

    The best model is tracked in the fine-tuning phase; `patience` (None: never)
    stops training that many epochs after the best one.
    """
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            number = epoch + 1
            seconds = time.perf_counter() - self.started
            last = work / f"epoch-{number:03d}.weights.h5"
            _save_weights(self.model, last)
            entry = {"epoch": number, "phase": phase, "seconds": round(seconds, 3),
                     **{k: float(v) for k, v in (logs or {}).items()}}
            state.history = [h for h in state.history if h["epoch"] < number] + [entry]
            previous, state.last_weights = state.last_weights, last.name
            if phase == "finetune" and entry.get("val_loss", math.inf) < state.best_loss:
                _save_model_weights(self.model, work / BEST_WEIGHTS)
                state.best_loss, state.best_epoch = entry["val_loss"], number
            if patience is not None and state.best_epoch is not None and number - state.best_epoch >= patience:
                self.model.stop_training = True
                state.stopped = True
                log.info("Early stopping after epoch %d: no better validation loss since epoch %d.",
                         number, state.best_epoch)
            state.save(work)
            if previous and previous != last.name:
                (work / previous).unlink(missing_ok=True)

    return Checkpoint()


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


@dataclass(frozen=True)
class _Origin:
    """Where the head comes from: a stage-2 run, or none (warm-up or scratch)."""

    name: str
    run_dir: Path | None = None
    head: Head | None = None
    record: Mapping[str, Any] | None = None
    trained: int | None = None  # st_mtime_ns of its metrics.json: which training of that run


def finetune_run_dir(features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig,
                     *, head_run: Path | None = None) -> Path:
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


def finetune(features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig, *,
             head_run: Path | None = None, progress: bool = True,
             callbacks: Sequence[Any] = ()) -> FinetuneRun:
    """Runs stage 3 and writes its run directory; see the module docstring.

    `features` and `head` locate the stage-2 run (or `head_run` names it); `callbacks`
    are extra Keras callbacks (tests interrupt training with one). The stage-2 run is
    read under its lock, then the run directory is locked from the "is it up to date?"
    check to the rename (`pipeline.locks.exclusive`; never both at once), so a second
    run with the same settings waits, then finds the run finished.
    """
    features, key, features_path = resolve(features)
    _check_options(features, config)
    origin = _origin(features, key, features_path, head, config, head_run)
    run_dir = finetune_run_dir(features, head, config, head_run=origin.run_dir)
    per_class, subset_seed = _few_shot_setting(origin, head)
    identity = {"features": features.to_dict(), "features_key": key, "finetune": config.to_dict(),
                "head_run": _head_identity(origin), "train_per_class": per_class}
    with exclusive(run_dir, what="fine-tuning run directory"):
        return _finetune(features, config, origin, run_dir, identity, per_class, subset_seed,
                         progress=progress, callbacks=callbacks)


def _finetune(features: FeaturesConfig, config: FinetuneConfig, origin: _Origin, run_dir: Path,
              identity: Mapping[str, Any], per_class: int | None, subset_seed: int, *, progress: bool,
              callbacks: Sequence[Any]) -> FinetuneRun:
    """`finetune` under the lock on `run_dir`, which also guards its `.partial-<digest>` folder."""
    finished = _finished(run_dir, identity)
    if finished:
        return finished

    source = load_source(features.data, seed=features.seed)
    _check_source(source, origin)
    class_names = list(source.class_names)
    binary = len(class_names) == 2
    parts = build_model(features, config, origin.head, len(class_names))
    size, batch = features.image_size, config.batch_size
    train_split = source.splits["train"]
    if per_class is not None:
        train_split = few_shot(train_split, per_class, class_names, seed=subset_seed)
    train = image_dataset(train_split, size, batch, binary=binary, shuffle_seed=config.seed)
    validation = image_dataset(source.splits["validation"], size, batch, binary=binary)
    test = image_dataset(source.splits["test"], size, batch, binary=binary) if "test" in source.splits else None

    work = run_dir.with_name(f"{run_dir.name}.partial-{key_digest(identity)}")
    work.mkdir(parents=True, exist_ok=True)
    state = TrainingState.load(work)
    if state.epochs_done:
        log.info("Resuming %s after epoch %d.", work, state.epochs_done)
    counts = {}
    fit = dict(train=train, validation=validation, work=work, state=state, progress=progress,
               callbacks=[*callbacks, _tensorboard(work)])

    # Phase 1 (optional): a fresh head on images, the backbone frozen.
    parts.freeze_backbone()
    _compile(parts.model, config, config.head_learning_rate, binary)
    counts["frozen"] = parameter_counts(parts.model)
    if config.head_epochs and state.epochs_done < config.head_epochs:
        _resume(parts.model, work, state)
        _fit(parts.model, phase="head", epochs=config.head_epochs, patience=None, **fit)
    elif state.before is None:
        _resume(parts.model, work, state)  # phase 1 finished in an earlier run
    if state.before is None:
        # The starting point of fine-tuning is the first "best" model: fine-tuning
        # that never beats it leaves the warm-started model in place.
        state.before = _evaluate(parts.model, validation, test, class_names)
        state.best_loss = state.before["validation"]["loss"]
        state.best_epoch = config.head_epochs
        _save_model_weights(parts.model, work / BEST_WEIGHTS)
        state.save(work)

    # Phase 2: unfreeze from fine_tune_at, recompile, train at a low rate.
    if config.epochs:
        parts.unfreeze(batch_norm=config.from_scratch)
    _compile(parts.model, config, config.resolved_learning_rate, binary)
    counts["finetune"] = parameter_counts(parts.model)
    total = config.head_epochs + config.epochs
    if config.epochs and not state.stopped and state.epochs_done < total:
        if state.epochs_done > config.head_epochs:
            _resume(parts.model, work, state)  # weights and optimizer of the last fine-tuning epoch
        else:
            _load_model_weights(parts.model, work / BEST_WEIGHTS)  # the starting point
        _fit(parts.model, phase="finetune", epochs=total, patience=config.patience or None, **fit)
    _load_model_weights(parts.model, work / BEST_WEIGHTS)

    after = _evaluate(parts.model, validation, test, class_names)
    finetune_epochs = [h for h in state.history if h["phase"] == "finetune"]
    metrics = {
        "stage": "finetune",
        "backbone": features.backbone,
        "fine_tune_at": None if parts.fine_tune_at is None else {
            "requested": config.fine_tune_at, "index": parts.fine_tune_at,
            "layer": parts.backbone.layers[parts.fine_tune_at].name, "layers": len(parts.backbone.layers)},
        "learning_rate": config.resolved_learning_rate,
        "optimizer": config.optimizer,
        "head_run": str(origin.run_dir) if origin.run_dir else origin.name,
        "train_examples": train_split.size,
        "train_per_class": per_class,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epochs_done,
        "stopped_early": state.stopped,
        "parameters": counts,
        "seconds_per_epoch": _mean([h["seconds"] for h in finetune_epochs or state.history]),
        "training_seconds": round(sum(h["seconds"] for h in state.history), 2),
        "before": state.before,
        "after": after,
    }
    _write_run(work, parts, features, origin, identity, metrics, state, class_names, config)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(work, run_dir)
    return FinetuneRun(run_dir=run_dir, metrics=metrics)


def few_shot(split: SplitSource, per_class: int, class_names: Sequence[str], *, seed: int) -> SplitSource:
    """`split` restricted to the examples `make head TRAIN_PER_CLASS=per_class` trains on.

    The subset is chosen by split index (`train.stratified_rows`), so it is the one the
    stage-2 head saw, and the seed workflow of `make bench`/`make compare` trains on the
    same few shots as the heads it is measured against.
    """
    import tensorflow as tf

    labels, index = [], []
    for label, position in split.records(0).map(lambda r: (r["label"], r["index"])).as_numpy_iterator():
        labels.append(label)
        index.append(position)
    labels, index = np.asarray(labels, dtype=np.int64), np.asarray(index, dtype=np.int64)
    keep = index[stratified_rows(labels, index, per_class, list(class_names), seed=seed)]
    wanted = np.zeros(split.total, bool)
    wanted[keep] = True
    wanted = tf.constant(wanted)

    def records(start: int):
        return split.records(0).filter(lambda r: tf.gather(wanted, r["index"])).skip(start)

    return dataclasses.replace(split, size=len(keep), records=records)


def _few_shot_setting(origin: _Origin, head: HeadConfig) -> tuple[int | None, int]:
    """(examples per class, seed) to train on: the stage-2 head's own, else `head`'s."""
    chosen = origin.record["head"] if origin.record else head.to_dict()
    return chosen.get("train_per_class"), chosen.get("seed", 0)


def _check_options(features: FeaturesConfig, config: FinetuneConfig) -> None:
    if features.num_shards > 1:
        raise ConfigError("Fine-tuning uses the whole dataset: drop SHARD/NUM_SHARDS "
                          f"(received shard {features.shard_index} of {features.num_shards}).")
    if config.from_scratch:
        if features.weights != "none":
            raise ConfigError("FROM_SCRATCH=1 trains from random weights: set WEIGHTS=none. "
                              f"Received: WEIGHTS={features.weights}.")
        if config.head_epochs:
            raise ConfigError("FROM_SCRATCH=1 trains everything at once: set HEAD_EPOCHS=0.")
    elif features.weights == "none":
        raise ConfigError(
            f"Fine-tuning needs a pretrained backbone, but WEIGHTS=none makes {features.backbone} random. "
            "Set WEIGHTS=imagenet or WEIGHTS=/path/to/weights.h5 (or FROM_SCRATCH=1 to train from scratch)."
        )


def _origin(features: FeaturesConfig, key: Mapping[str, Any], features_path: Path, head: HeadConfig,
            config: FinetuneConfig, head_run: Path | None) -> _Origin:
    """The stage-2 run to warm-start from, checked against the backbone asked for."""
    if config.from_scratch:
        return _Origin("scratch")
    if config.head_epochs:
        return _Origin(f"a fresh head trained {config.head_epochs} epochs on images")
    run_dir = Path(head_run) if head_run else run_dir_for(features_path, head)
    if not run_dir.parent.is_dir():
        return _read_origin(run_dir, key)  # nothing there to wait for: the error says what to do
    with exclusive(run_dir, what="run directory"):  # not while `make head` replaces it
        return _read_origin(run_dir, key)


def _read_origin(run_dir: Path, key: Mapping[str, Any]) -> _Origin:
    try:
        record = json.loads((run_dir / "config.json").read_text())
        trained = (run_dir / "metrics.json").stat().st_mtime_ns
    except (OSError, ValueError):
        raise CacheError(
            f"No stage-2 head to warm-start from in {run_dir}. Train one first with `make head HEAD=dense` "
            "and the same variables, or pass HEAD_EPOCHS=N to train a head on images with the backbone "
            "frozen for N epochs first."
        ) from None
    stored = record["features_key"]
    wanted = {"backbone": key["backbone"], "image_size": key["image_size"], "pooling": key["pooling"],
              "weights": key["weights"], "data_fingerprint": key["data_fingerprint"]}
    differs = [f"{k}: head {stored.get(k)!r}, asked {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if differs:
        raise CacheError(
            f"The head in {run_dir} was trained on other features than this fine-tuning asks for "
            f"({'; '.join(differs)}). Use the same BACKBONE/IMAGE_SIZE/POOLING/WEIGHTS/data as its "
            "`make head`, or train a head for these settings."
        )
    return _Origin(run_dir.name, run_dir=run_dir, head=load_head(run_dir), record=record, trained=trained)


def _head_identity(origin: _Origin) -> Any:
    if origin.run_dir is None:
        return origin.name
    return {"run": str(origin.run_dir), "head": origin.record["head"],
            "trained": origin.trained}


def _check_source(source: DataSource, origin: _Origin) -> None:
    missing = [s for s in ("train", "validation") if s not in source.splits]
    if missing:
        raise DataError(f"Fine-tuning needs train and validation splits; {source.name} has no "
                        f"{' or '.join(missing)} (available: {', '.join(source.splits)}).")
    if origin.head is not None and origin.head.n_classes_ != len(source.class_names):
        raise CacheError(f"The head in {origin.run_dir} has {origin.head.n_classes_} classes, the data "
                         f"{len(source.class_names)}. Retrain the head with `make head`.")


def _finished(run_dir: Path, identity: Mapping[str, Any]) -> FinetuneRun | None:
    try:
        record = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if {k: record.get(k) for k in identity} != json.loads(json.dumps(identity)):
        return None
    return FinetuneRun(run_dir=run_dir, metrics=metrics, up_to_date=True)


def _resume(model, work: Path, state: TrainingState) -> None:
    if state.last_weights:
        _restore(model, work / state.last_weights)


def _fit(model, *, phase: str, epochs: int, patience: int | None, train, validation, work: Path,
         state: TrainingState, progress: bool, callbacks: Sequence[Any]) -> None:
    log.info("%s: epochs %d-%d", "Fine-tuning" if phase == "finetune" else "Training the head on images",
             state.epochs_done + 1, epochs)
    with warnings.catch_warnings():
        # A dataset that skips unreadable images has no known length, which Keras
        # reports at the end of every epoch; the tf.data pipeline does the shuffling.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
        model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=state.epochs_done,
                  callbacks=[_checkpoint_callback(work, state, phase=phase, patience=patience), *callbacks],
                  verbose=1 if progress else 0, shuffle=False)


def _tensorboard(work: Path):
    import keras

    return keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"))


def _evaluate(model, validation, test, class_names: list[str]) -> dict[str, Any]:
    results = {}
    for name, dataset in (("validation", validation), ("test", test)):
        if dataset is None:
            results[name] = None
            continue
        proba, labels = predict(model, dataset)
        results[name] = classification_metrics(proba, labels, class_names)
    return results


def _mean(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 3) if values else 0.0


# ---------------------------------------------------------------------- outputs
def _write_run(work: Path, parts: FinetuneModel, features: FeaturesConfig, origin: _Origin,
               identity: Mapping[str, Any], metrics: dict[str, Any], state: TrainingState,
               class_names: list[str], config: FinetuneConfig) -> None:
    for leftover in [*work.glob("epoch-*.weights.h5"), work / BEST_WEIGHTS, work / STATE_FILE]:
        leftover.unlink(missing_ok=True)
    parts.classifier(features.image_size).save(work / MODEL_FILE)
    (work / "labels.txt").write_text("\n".join(class_names) + "\n")
    (work / "config.json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    with open(work / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "phase", *names, "seconds"])
        for h in state.history:
            writer.writerow([h["epoch"], h["phase"], *(h.get(n, "") for n in names), h["seconds"]])
    figures = [_learning_curves(origin, state, work / "learning_curves.png", config)]
    scored = "test" if metrics["after"]["test"] else "validation"
    figures.append(plots.confusion_matrix(metrics["after"][scored]["confusion_matrix"], class_names,
                                          work / "confusion_matrix.png", title=f"fine-tuned, {scored} split"))
    grid = _predictions_grid(parts, features, scored, class_names, config, work / "top_losses.png")
    if grid:
        figures.append(grid)
    (work / "report.md").write_text(report(metrics, [f.name for f in figures]))


def _learning_curves(origin: _Origin, state: TrainingState, path: Path, config: FinetuneConfig) -> Path:
    """The stage-2 curves (dense head) or the warm-up epochs, then fine-tuning, with a marker."""
    names = ["loss", "accuracy", "val_loss", "val_accuracy"]
    earlier = dict(getattr(origin.head, "history_", None) or {})
    history = {n: list(earlier.get(n, [])) for n in names}
    marker = len(history["loss"]) + config.head_epochs
    for h in state.history:
        for n in names:
            history[n].append(h.get(n, float("nan")))
    return plots.learning_curves(history, path, marker=marker if config.epochs else None)


def _predictions_grid(parts: FinetuneModel, features: FeaturesConfig, split: str, class_names: list[str],
                      config: FinetuneConfig, path: Path) -> Path | None:
    """The `grid_images` images of `split` the fine-tuned model gets most wrong or is
    least sure of (highest -log p(true), fastai's top losses), one more pass over it."""
    from pipeline.train import top_loss_rows

    if config.grid_images == 0:
        return None
    try:
        proba, labels, positions = _split_predictions(parts.model, features, split, config.batch_size)
        chosen = top_loss_rows(proba, labels, config.grid_images)
        images = load_images(features, split, positions[chosen])
    except Exception as err:  # the plot is optional; the metrics are not
        log.warning("No top-losses grid: cannot read the %s images back (%s).", split, err)
        return None
    picked, truth = proba[chosen], labels[chosen]
    p_true = picked[np.arange(len(chosen)), truth]
    return plots.top_losses(
        [images[int(i)] for i in positions[chosen]], [class_names[t] for t in truth],
        [class_names[p] for p in picked.argmax(axis=1)], picked.max(axis=1).tolist(), p_true.tolist(),
        (-np.log(np.clip(p_true, 1e-15, 1))).tolist(), path,
        title=f"fine-tuned model: top losses on {split} images",
    )


def _split_predictions(model, features: FeaturesConfig, split: str, batch_size: int,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,), split positions (N,)) of every readable image of `split`."""
    import tensorflow as tf

    records = load_source(features.data, seed=features.seed).splits[split].records(0)
    batches = records.map(
        lambda r: (decode_and_resize(r["image"], features.image_size), r["label"], r["index"]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
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
    unfrozen = (f"Unfrozen from layer {at['index']} ({at['layer']}) of {at['layers']}" if at
                else "No fine-tuning phase: the backbone stayed frozen")
    lines = [f"# Fine-tuned {metrics['backbone']}", "",
             f"Warm start: {metrics['head_run']}. {unfrozen}; {metrics['optimizer']} at "
             f"{metrics['learning_rate']:g}.", "",
             "| split | n | accuracy before | accuracy after | loss before | loss after |",
             "|---|---:|---:|---:|---:|---:|"]
    for split in ("validation", "test"):
        before, after = metrics["before"].get(split), metrics["after"].get(split)
        if after:
            lines.append(f"| {split} | {after['n']} | {before['accuracy']:.4f} | {after['accuracy']:.4f} | "
                         f"{before['loss']:.4f} | {after['loss']:.4f} |")
    p = metrics["parameters"]
    lines += ["", "| parameters | trainable | non-trainable |", "|---|---:|---:|",
              f"| frozen backbone | {p['frozen']['trainable']:,} | {p['frozen']['non_trainable']:,} |",
              f"| fine-tuning | {p['finetune']['trainable']:,} | {p['finetune']['non_trainable']:,} |", "",
              f"Epochs run: {metrics['epochs_run']} (best: {metrics['best_epoch']}), "
              f"{metrics['seconds_per_epoch']:.1f} s per fine-tuning epoch, {metrics['training_seconds']:.0f} s in all.",
              ""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
