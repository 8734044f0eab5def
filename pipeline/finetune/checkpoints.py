"""Resumable training: epoch snapshots of weights and optimizer, and the state file that names them."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CacheError

log = logging.getLogger(__name__)


STATE_FILE = "state.json"
#: Version of state.json; a state of another version is discarded, not resumed.
STATE_FORMAT = 2


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

    Not `keras.callbacks.BackupAndRestore`: it keeps only the last epoch, resets the
    epochs of a later `fit` and writes in place, so a kill can leave files that fail
    every rerun (docs/performance-audit-finetune.md).
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
