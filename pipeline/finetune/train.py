"""`make finetune`, stage 3: augmented end-to-end fine-tuning, warm-started from the stage-2 head.

The model is the one the Keras guide and the TensorFlow tutorial teach::

    images (S, S, 3) 0-255 -> augmentation -> the backbone's preprocessing
        -> backbone(training=False) -> pooling -> head (Dropout + Dense) -> logits

The head starts from the stage-2 run (a dense head is copied with its Dropout; a
logistic head becomes Dropout + a Dense layer carrying its coefficients), so a low
learning rate only refines a converged head. `head_epochs > 0` instead trains a
fresh head on images with the backbone frozen first, the tutorials' first phase. A
few-shot head (`TRAIN_PER_CLASS=N`) is fine-tuned on the same N images per class it
was trained on.

Run directory `runs/<stage-2 run>__ft-<fine_tune_at>/`::

    model.keras, labels.txt        raw uint8 images of any size in, probabilities out
    config.json                    features config + key, the stage-2 run, finetune config
    metrics.json                   validation/test before and after, parameter counts, s/epoch
    history.csv, tensorboard/      one row per epoch (warm-up and fine-tuning)
    learning_curves.png            the stage-2 curves continued, a "start fine-tuning" marker
    confusion_matrix.png, top_losses.png, report.md

`finetune` is a recipe of named steps: resolve (`job.resolve_job`), build
(`data.load_data`, which loads the data source once, and `model.build_model`),
phase 1 (`_phase_head`), phase 2 (`_phase_finetune`), evaluate
(`report.evaluate_run`) and write (`report.write_run`).

While training, state lives in `<run dir>.partial-<digest>/` (`checkpoints.Resumable`),
so a rerun with the same settings resumes after the last finished epoch and keeps
the best model so far; the run directory appears only at the end, when the best
weights are restored.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import FeaturesConfig, FinetuneConfig, HeadConfig
from pipeline.features.extract import resolve
from pipeline.finetune.checkpoints import Resumable
from pipeline.finetune.data import FinetuneData, load_data
from pipeline.finetune.job import FinetuneRun, Job, finished, resolve_job
from pipeline.finetune.model import FinetuneModel, build_model, compile_model, parameter_counts
from pipeline.finetune.report import evaluate, evaluate_run, write_run
from pipeline.locks import exclusive

log = logging.getLogger(__name__)


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
    elif head.exclude is not None:  # EXCLUDE records its rows as decisions first, as `make head` does
        from pipeline.audit.exclusion import record_exclusion
        from pipeline.features.extract import resolve

        _, key, path = resolve(features)
        record_exclusion(path, head, key)
    job = resolve_job(features, head, config, head_run)
    with exclusive(job.run_dir, what="fine-tuning run directory"):
        return finished(job) or _run(job, progress=progress, callbacks=callbacks)


def _run(job: Job, *, progress: bool, callbacks: Sequence[Any]) -> FinetuneRun:
    """The recipe, under the lock on the run directory (which also guards its `.partial-<digest>` folder)."""
    data = load_data(job)
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
    metrics = evaluate_run(job, parts, data, training, counts)
    return write_run(job, parts, data, training, metrics)


def _make_head(features: FeaturesConfig, head: HeadConfig, *, progress: bool) -> None:
    """Stages 1 and 2 for the warm start, as `make head` runs them (no-ops when up to date)."""
    from pipeline.features.extract import extract_features
    from pipeline.heads.train import train_head

    result = extract_features(features, progress=progress)
    train_head(result.path, head, expect=resolve(features)[1])


def _phase_head(
    parts: FinetuneModel, config: FinetuneConfig, data: FinetuneData, training: Resumable, fit: Callable[..., None]
) -> dict[str, int]:
    """Phase 1, the backbone frozen: `head_epochs` (often 0) of a fresh head on images.

    Its result, the warm-started model when there is no phase 1, is evaluated once
    and becomes the first best model. Returns the frozen model's parameter counts.
    """
    parts.freeze_backbone()
    compile_model(parts.model, config, config.head_learning_rate, data.binary)
    if training.epochs_done < config.head_epochs:
        training.restore_last(parts.model)
        fit(phase="head", epochs=config.head_epochs, patience=None)
    elif training.before is None:
        training.restore_last(parts.model)  # phase 1 finished in an earlier run
    if training.before is None:
        training.start_finetuning(parts.model, evaluate(parts.model, data), epoch=config.head_epochs)
    return parameter_counts(parts.model)


def _phase_finetune(
    parts: FinetuneModel, config: FinetuneConfig, data: FinetuneData, training: Resumable, fit: Callable[..., None]
) -> dict[str, int]:
    """Phase 2: unfreeze from `fine_tune_at`, recompile, train at a low rate; ends on the best model.

    Returns the parameter counts of the model as fine-tuned.
    """
    if config.epochs:
        parts.unfreeze(batch_norm=config.from_scratch)
    compile_model(parts.model, config, config.resolved_learning_rate, data.binary)
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
    data: FinetuneData,
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


def _tensorboard(work: Path):
    import keras

    return keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"))
