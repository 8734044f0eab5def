"""The dense head: the Keras transfer-learning guide's Dropout and Dense layers, trained on cached features.

Keras and TensorFlow are imported only when the head builds, trains or loads a model,
and scikit-learn only for `class_weight="balanced"`, so importing this module costs
what numpy costs. `logits_loss_and_accuracy` is the training objective it shares
with stage 3, which continues training the same head.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError
from pipeline.heads.base import CLASS_WEIGHTS, Head
from pipeline.heads.validation import check_choice, check_number, validate_labels_and_val
from pipeline.metrics import probabilities

_PREDICT_BATCH = 4096
#: Keras `steps_per_execution` of DenseHead: several train steps per graph call save the
#: per-call overhead that dominates these tiny models and give identical weights;
#: batch-level callbacks (e.g. TensorBoard with update_freq="batch") see every 16th batch.
_STEPS_PER_EXECUTION = 16


class DenseHead(Head):
    """The Keras transfer-learning guide's head, trained on cached features.

    Architecture: `Input(D) -> Dropout(dropout) -> [Dense(hidden, relu) ->
    Dropout(dropout)] -> Dense(U)` with logits out: U == 1 and binary
    cross-entropy for K == 2, U == K and sparse categorical cross-entropy otherwise.
    Adam(learning_rate); with validation data, EarlyStopping on `val_loss` with
    `restore_best_weights=True` (the restored epoch is `params_["best_epoch"]`,
    1-based). The same seed gives identical weights: `fit` calls
    `keras.utils.set_random_seed(seed)` (which also seeds Python's and numpy's global
    generators) and seeds the initializers, dropout and shuffling explicitly.

    With augmented `views` (V, N, D), each epoch is still one pass over the N train
    examples, but every example comes as one of its V + 1 versions (the plain
    features or one of its views), drawn uniformly and afresh each epoch (seeded).
    Keeping the plain version among the draws keeps the un-augmented images, which
    are what validation, test and prediction see, in the training distribution; an
    epoch costs what it costs without views, and the head meets a new augmentation
    of an example in most epochs, as it would when augmenting images on the fly.

    After fit: `model_` (the Keras model, logits out), `history_` (the History dict:
    loss, accuracy, val_loss, val_accuracy per epoch), `params_` with `best_epoch`,
    `epochs_run`, `stopped_early` and the balanced `class_weights` if any.
    """

    name = "dense"
    model_file = "head.keras"
    libraries = ("numpy", "keras")
    fit_imports = ("keras",)  # TensorFlow comes with it
    views_use = "sampled per example per epoch"

    @classmethod
    def default_views(cls, available: int) -> int:
        """Every view the file has: sampling one per example per epoch costs nothing extra."""
        return available

    def training_callbacks(self, work_dir: Path) -> list[Any]:
        import keras

        return [keras.callbacks.TensorBoard(log_dir=str(Path(work_dir) / "tensorboard"))]

    @property
    def parameter_count(self) -> int:
        self._check_fitted("parameter_count")
        return int(self.model_.count_params())

    def logits_model(self) -> Any:
        """A copy of the trained Keras model, its Dropout layers included."""
        import keras

        self._check_fitted("logits_model")
        model = keras.models.clone_model(self.model_)
        model.set_weights(self.model_.get_weights())
        model.name = "head"
        return model

    def finetune_model(self, *, dropout: float, seed: int) -> Any:
        """The head's own copy: it carries its trained Dropout already."""
        return self.logits_model()

    memory_copies = 3  # the rows, the stacked versions, TensorFlow's constant

    def __init__(
        self,
        hidden: int = 0,
        dropout: float = 0.2,
        epochs: int = 20,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        patience: int = 5,
        class_weight: str | None = None,
        seed: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed

    def _check_hyperparameters(self) -> None:
        check_number("hidden", self.hidden, integer=True, low=0)
        check_number("dropout", self.dropout, low=0, high=1)
        check_number("epochs", self.epochs, integer=True, low=1)
        check_number("batch_size", self.batch_size, integer=True, low=1)
        check_number("learning_rate", self.learning_rate, low=0, low_inclusive=False)
        check_number("patience", self.patience, integer=True, low=0)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_number("seed", self.seed, integer=True, low=0)

    def _build(self, n_features: int, units: int) -> Any:
        import keras

        init = keras.initializers.GlorotUniform
        inputs = keras.Input(shape=(n_features,), name="features")
        x = keras.layers.Dropout(self.dropout, seed=self.seed, name="dropout")(inputs)
        if self.hidden:
            x = keras.layers.Dense(
                self.hidden, activation="relu", kernel_initializer=init(seed=self.seed + 1), name="hidden"
            )(x)
            x = keras.layers.Dropout(self.dropout, seed=self.seed + 2, name="hidden_dropout")(x)
        outputs = keras.layers.Dense(units, kernel_initializer=init(seed=self.seed + 3), name="logits")(x)
        return keras.Model(inputs, outputs, name=f"{self.name}_head")

    def _compile(self, n_features: int) -> None:
        import keras

        keras.utils.set_random_seed(self.seed)
        binary = self.n_classes_ == 2
        self.model_ = self._build(n_features, 1 if binary else self.n_classes_)
        loss, accuracy = logits_loss_and_accuracy(binary)
        self.model_.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=loss,
            metrics=[accuracy],
            steps_per_execution=_STEPS_PER_EXECUTION,
        )

    def _targets(self, labels: np.ndarray) -> np.ndarray:
        return labels.astype(np.float32)[:, None] if self.n_classes_ == 2 else labels

    def _weight_lookup(self, y: np.ndarray, params: dict[str, Any]) -> np.ndarray | None:
        """Per-class sample weights (`class_weight="balanced"`), recorded in `params`; else None."""
        params.update(class_weight=self.class_weight, class_weights=None)
        if self.class_weight != "balanced":
            return None
        weights = _balanced_weights(y)
        params["class_weights"] = weights
        lookup = np.zeros(self.n_classes_, dtype=np.float32)
        lookup[list(weights)] = list(weights.values())
        return lookup

    def _fit(self, X, y, Xv, yv, *, callbacks, verbose, views=None):
        import tensorflow as tf

        self._compile(X.shape[1])
        params: dict[str, Any] = {}
        lookup = self._weight_lookup(y, params)
        tensors: tuple[np.ndarray, ...] = (X, self._targets(y))
        if lookup is not None:
            tensors += (lookup[y],)
        if views is None:
            train = (
                tf.data.Dataset.from_tensor_slices(tensors)
                .shuffle(len(X), seed=self.seed, reshuffle_each_iteration=True)
                .batch(self.batch_size)
            )
        else:
            train = self._view_dataset(X, views, tensors[1:])
            params.update(view_use="sampled: one of plain + views per example per epoch, uniformly")
        return self._train(train, Xv, yv, params, callbacks=callbacks, verbose=verbose)

    def fit_streamed(self, train, X_val=None, y_val=None, *, n_classes=None, callbacks=None, verbose=0, memory_budget):
        """See `Head.fit_streamed`: one sequential pass over the file per epoch, within `memory_budget`.

        The epoch's order differs from `fit`'s full shuffle, which needs every row at
        hand: blocks of rows (the file's chunks) come in a seeded random order, a
        window of blocks (as many rows as a quarter of the budget holds) is read, each
        row takes one of its V + 1 versions (plain or a view, uniformly, as in `fit`)
        and the window's rows are shuffled. Batches run across windows, so an epoch is
        still ceil(N / batch_size) steps over every row once. Same seed, same weights;
        against `fit` the weights differ by the order of the steps, not in kind.
        """
        self._start_fit()
        y, Xv, yv, K = validate_labels_and_val(train.labels, len(train), train.n_features, X_val, y_val, n_classes)
        self._set_shape(train.n_features, K, y)
        start = time.perf_counter()
        self._compile(train.n_features)
        params: dict[str, Any] = {}
        lookup = self._weight_lookup(y, params)
        window = max(
            train.block_rows, memory_budget // (4 * 4 * train.n_features) // train.block_rows * train.block_rows
        )
        failures: list[Exception] = []
        dataset = self._streamed_dataset(train, y, lookup, window, failures)
        params.update(
            streamed={"window_rows": window, "block_rows": train.block_rows, "memory_budget_bytes": memory_budget}
        )
        if train.num_views:
            params.update(view_use="sampled: one of plain + views per example per epoch, uniformly")
        try:
            params = self._train(dataset, Xv, yv, params, callbacks=callbacks, verbose=verbose)
        except Exception:
            if failures:  # raised inside tf.data, which rewraps it; the original says more
                raise failures[0] from None
            raise
        self._finish_fit(params, start, n_views=train.num_views, n_train=len(train), n_val=0 if Xv is None else len(Xv))
        return self

    def _streamed_dataset(
        self, train, y: np.ndarray, lookup: np.ndarray | None, window: int, failures: list[Exception]
    ):
        """Batches of (features, targets[, weights]) read from `train` (a FeatureRows), as `fit_streamed` says."""
        import tensorflow as tf

        n, block, versions, bs = len(train), train.block_rows, train.num_views + 1, self.batch_size
        starts = np.arange(0, n, block)
        per_window = max(1, window // block)
        epochs = iter(range(1 << 62))
        targets = self._targets(y)

        def batches():
            rng = np.random.default_rng([self.seed, next(epochs)])
            order = rng.permutation(len(starts))
            carry = np.zeros(0, np.int64), np.zeros((0, train.n_features), np.float32)
            for w in range(0, len(order), per_window):
                rows, features = [carry[0]], [carry[1]]
                for b in np.sort(order[w : w + per_window]):  # file order within a window
                    a, z = int(starts[b]), min(n, int(starts[b]) + block)
                    table = train.read(a, z)
                    version = rng.integers(0, versions, z - a) if versions > 1 else np.zeros(z - a, np.int64)
                    rows.append(np.arange(a, z))
                    features.append(table[version, np.arange(z - a)])
                rows, features = np.concatenate(rows), np.concatenate(features)
                if not np.isfinite(features).all():
                    bad = rows[~np.isfinite(features).all(axis=1)]
                    failures.append(
                        DataError(
                            f"X_train: features contain NaN/inf values (in {len(bad)} rows read so far, the first "
                            f"train row {int(bad.min())}). Expected finite floats. Fix: re-extract the features "
                            "(float16 overflow?) or drop those rows."
                        )
                    )
                    raise failures[-1]
                shuffle = rng.permutation(len(rows))
                rows, features = rows[shuffle], features[shuffle]
                last = w + per_window >= len(order)
                full = len(rows) if last else len(rows) // bs * bs
                for i in range(0, full, bs):
                    r = rows[i : i + bs]
                    yield (features[i : i + bs], targets[r]) + (() if lookup is None else (lookup[y[r]],))
                carry = rows[full:], features[full:]

        target_spec = tf.TensorSpec(
            (None, 1) if self.n_classes_ == 2 else (None,), tf.float32 if self.n_classes_ == 2 else tf.int64
        )
        signature = (tf.TensorSpec((None, train.n_features), tf.float32), target_spec)
        if lookup is not None:
            signature += (tf.TensorSpec((None,), tf.float32),)
        steps = -(-n // bs)
        return (
            tf.data.Dataset.from_generator(batches, output_signature=signature)
            .apply(tf.data.experimental.assert_cardinality(steps))
            .prefetch(2)
        )

    def _train(self, train, Xv, yv, params: dict[str, Any], *, callbacks, verbose) -> dict[str, Any]:
        """Runs Keras `fit` on the `train` dataset with early stopping on (Xv, yv); returns `params`."""
        import keras
        import tensorflow as tf

        all_callbacks = list(callbacks or [])
        validation = None
        stopper = None
        if Xv is not None:
            validation = tf.data.Dataset.from_tensor_slices((Xv, self._targets(yv))).batch(max(self.batch_size, 1024))
            stopper = keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True
            )
            all_callbacks.append(stopper)
        history = self.model_.fit(
            train,
            validation_data=validation,
            epochs=self.epochs,
            callbacks=all_callbacks,
            verbose=verbose,
            shuffle=False,  # the dataset shuffles
        )
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        epochs_run = len(self.history_["loss"])
        params.update(
            epochs_run=epochs_run,
            best_epoch=epochs_run if stopper is None else stopper.best_epoch + 1,
            stopped_early=epochs_run < self.epochs,
        )
        if stopper is not None:
            best = params["best_epoch"] - 1
            params.update(val_loss=self.history_["val_loss"][best], val_accuracy=self.history_["val_accuracy"][best])
        return params

    def _view_dataset(self, X: np.ndarray, views: np.ndarray, columns: tuple[np.ndarray, ...]):
        """Batches of (features, targets[, weights]): each row one of its V + 1 versions.

        Rows are shuffled and versions drawn afresh every epoch, both seeded (tf.data
        re-randomizes them on each pass, deterministically for the seed).
        """
        import tensorflow as tf

        table = tf.constant(np.concatenate([X[None], views]))  # (V + 1, N, D)
        columns = tuple(tf.constant(c) for c in columns)
        versions = len(views) + 1
        rows = tf.data.Dataset.range(len(X)).shuffle(len(X), seed=self.seed, reshuffle_each_iteration=True)
        draws = tf.data.Dataset.random(seed=self.seed + 4, rerandomize_each_iteration=True)

        def pick(row, draw):
            version = tf.math.floormod(draw, versions)
            features = tf.gather_nd(table, tf.stack([version, row], axis=1))
            return (features, *(tf.gather(c, row) for c in columns))

        return tf.data.Dataset.zip(rows, draws).batch(self.batch_size).map(pick)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(self.model_(X[i : i + _PREDICT_BATCH], training=False))
                for i in range(0, len(X), _PREDICT_BATCH)
            ]
        )

    def _predict_proba(self, X):
        return probabilities(self._logits(X))

    def dense_weights(self):
        """See `Head.dense_weights`; only for `hidden=0` (one Dense layer)."""
        self._check_fitted("dense_weights")
        if self.hidden:
            raise ConfigError(
                "dense_weights() needs a head that is one Dense layer on the features. "
                f"Received: a DenseHead with a hidden ReLU layer (hidden={self.hidden}), "
                "whose probabilities are not an affine map of the features. Fix: "
                "export head.model_ itself, or train with hidden=0."
            )
        kernel, bias = (np.asarray(w, dtype=np.float32) for w in self.model_.get_layer("logits").get_weights())
        return kernel, bias, "sigmoid" if self.n_classes_ == 2 else "softmax"

    def _extra_record(self):
        return {"history": self.history_}

    def _save_model(self, path):
        self.model_.save(path)

    def _load_model(self, path, record):
        import keras

        self.model_ = keras.saving.load_model(path, compile=False)
        self.history_ = record.get("history", {})


def logits_loss_and_accuracy(binary: bool) -> tuple[Any, Any]:
    """Loss and accuracy for a head that outputs logits: one for 2 classes, K otherwise.

    Shared by the dense head and stage 3, which continues training the same head.
    """
    import keras

    if binary:
        # One logit: class 1 iff it is positive.
        return (
            keras.losses.BinaryCrossentropy(from_logits=True),
            keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
        )
    return (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
    )


def _balanced_weights(y: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(y)
    weights = compute_class_weight("balanced", classes=classes, y=y)
    return {int(c): float(w) for c, w in zip(classes, weights)}
