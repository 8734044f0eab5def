"""Light classifier heads trained on cached feature arrays (stage 2).

A head maps pooled backbone features, float32 `(N, D)`, to class probabilities,
float32 `(N, K)`. Heads follow the scikit-learn estimator shape: the constructor only
stores hyper-parameters, `fit` validates its inputs and sets trailing-underscore
state (`params_`, `n_features_`, `n_classes_`, ...), `get_params` returns the
constructor's arguments (so `sklearn.base.clone` works), and an unfitted head raises
`NotFittedError`. The base class is not scikit-learn's `BaseEstimator`: importing
scikit-learn takes 0.8 s that the dense head, and every TensorFlow command that loads
a head, never needs. Everything here is numpy in, numpy out; reading
feature files and writing run directories belongs to the callers.

Two heads are registered in `HEADS` and built by name with `create_head`:

- `"logistic"`: `LogisticHead`, a standardized multinomial logistic regression whose
  `C` is picked on the validation split (the linear-probe protocol of Kornblith et
  al. 2019 and CLIP).
- `"dense"`: `DenseHead`, the Keras transfer-learning guide's head (dropout and one
  Dense layer on logits, optionally one hidden ReLU layer), trained with Adam and
  early stopping on the validation loss.

A saved head is a directory::

    head_dir/
        head.json      # {"head": "logistic"|"dense", hyper-parameters, params_, ...}
        head.joblib    # LogisticHead: the fitted scaler and LogisticRegression
        head.keras     # DenseHead: the Keras model (logits out)

`load_head(head_dir)` reads `head.json` and dispatches on its `"head"` name.

Binary problems (`K == 2`) still get two probability columns, `[1 - p, p]`, where
`p` is the probability of class 1; `dense_weights()` then returns one sigmoid unit
that computes `p`.
"""

from __future__ import annotations

import abc
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError, DataError, NotFittedError
from pipeline.metrics import accuracy, log_loss, probabilities

log = logging.getLogger(__name__)

JSON_NAME = "head.json"
FORMAT_VERSION = 1
#: The C grid of the logistic sweep: 13 values, 1e-4 ... 1e2, half a decade apart.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
CLASS_WEIGHTS = (None, "balanced")
#: Logit given by `LogisticHead.dense_weights` to a class that was absent from
#: `y_train` (possible with an explicit `n_classes`): `exp(-1e4)` is 0 in float32,
#: so the exported layer gives it probability 0, as `predict_proba` does, while the
#: logit stays finite (no NaN gradients when the layer warm-starts fine-tuning).
ABSENT_CLASS_LOGIT = -1.0e4
_PREDICT_BATCH = 4096
#: Keras `steps_per_execution` of DenseHead: 16 train steps per graph call is ~1.8x
#: faster on CPU for these tiny models and gives identical weights; batch-level
#: callbacks (e.g. TensorBoard with update_freq="batch") see every 16th batch.
_STEPS_PER_EXECUTION = 16


# --------------------------------------------------------------------------- checks
def _as_features(X: Any, name: str, *, n_features: int | None = None) -> np.ndarray:
    """Return `X` as a finite float32 `(N, D)` array, or raise `DataError`."""
    try:
        X = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(
            f"{name} must be a numeric (N, D) feature array. Received: {err}. Fix: pass the features as a numpy array."
        ) from None
    if X.ndim != 2:
        raise DataError(
            f"{name} must be a 2-D array of features (N, D). Received: shape "
            f"{X.shape}. Fix: pass pooled features, e.g. X.reshape(len(X), -1)."
        )
    if X.shape[0] == 0:
        raise DataError(
            f"{name} must hold at least one example. Received: shape {X.shape}. Fix: check that the split is not empty."
        )
    if n_features is not None and X.shape[1] != n_features:
        raise DataError(
            f"{name} must have the feature width of X_train ({n_features}). "
            f"Received: shape {X.shape}. Fix: use features from the same backbone "
            "and pooling for every split."
        )
    bad = ~np.isfinite(X)
    if bad.any():
        raise DataError(
            f"{name}: features contain {int(bad.sum())} NaN/inf values (in "
            f"{int(bad.any(axis=1).sum())} of {len(X)} rows). Expected finite "
            "floats. Fix: re-extract the features (float16 overflow?) or drop those "
            "rows."
        )
    return X


def _as_labels(y: Any, name: str, n_rows: int, x_name: str) -> np.ndarray:
    """Return `y` as an int64 `(N,)` array of non-negative labels, or raise."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(
            f"{name} must be a 1-D array of integer class indices. Received: shape "
            f"{y.shape}. Fix: pass sparse labels, e.g. y.argmax(axis=1) for one-hot."
        )
    if len(y) != n_rows:
        raise DataError(
            f"{x_name} and {name} must have the same length. Received: {n_rows} "
            f"feature rows and {len(y)} labels. Fix: pass labels aligned with the "
            "features."
        )
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y) & (y == np.round(y))):
            raise DataError(
                f"{name} must hold integer class indices. Received: dtype {y.dtype}. Fix: encode the labels as 0..K-1."
            )
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(
            f"{name} must hold class indices in [0, K). Received: labels are negative "
            f"(minimum {int(y.min())}). Fix: encode the labels as 0..K-1."
        )
    return y


def _validate_fit_inputs(
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    n_classes: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Check the arrays given to `fit`; return them converted, and K.

    K is `n_classes` when given (so a class absent from `y_train` is still an output
    column), else `max(y_train) + 1`.
    """
    X = _as_features(X_train, "X_train")
    y, Xv, yv, K = _validate_labels_and_val(y_train, len(X), X.shape[1], X_val, y_val, n_classes)
    return X, y, Xv, yv, K


def _validate_labels_and_val(
    y_train: Any,
    n_rows: int,
    n_features: int,
    X_val: Any,
    y_val: Any,
    n_classes: int | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """The checks of `_validate_fit_inputs` past X_train (whose rows may stay in a file)."""
    y = _as_labels(y_train, "y_train", n_rows, "X_train")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"y_train needs at least 2 classes; got {len(present)}: "
            f"{present.tolist()}. Fix: check the labels and the split of the training "
            "data."
        )
    max_label = int(y.max())
    if n_classes is None:
        K = max_label + 1
    else:
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
            raise ConfigError(f"n_classes must be an integer or None. Received: n_classes={n_classes!r}.")
        K = int(n_classes)
        if K <= max_label:
            raise ConfigError(
                f"n_classes must exceed the largest label in y_train ({max_label}). "
                f"Received: n_classes={K}. Fix: pass the number of class names, or "
                "leave n_classes=None."
            )
    if (X_val is None) != (y_val is None):
        raise ConfigError(
            "X_val and y_val go together. Received: "
            f"X_val={'None' if X_val is None else 'an array'}, "
            f"y_val={'None' if y_val is None else 'an array'}. Fix: pass both or "
            "neither."
        )
    if X_val is None:
        return y, None, None, K
    Xv = _as_features(X_val, "X_val", n_features=n_features)
    yv = _as_labels(y_val, "y_val", len(Xv), "X_val")
    _check_label_range(yv, "y_val", K)
    return y, Xv, yv, K


def _as_views(views: Any, n_rows: int, n_features: int) -> np.ndarray:
    """Return augmented views as a finite float32 `(V, N, D)` array aligned with X_train, or raise."""
    try:
        views = np.asarray(views, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"views must be a numeric (V, N, D) array. Received: {err}.") from None
    if views.ndim != 3 or views.shape[1:] != (n_rows, n_features):
        raise DataError(
            f"views must have shape (V, {n_rows}, {n_features}): V augmented views of every X_train row, "
            f"in X_train's order. Received: shape {views.shape}. Fix: pass store.load_views(...) of the "
            "same train rows."
        )
    if not np.isfinite(views).all():
        raise DataError(
            f"views contain {int((~np.isfinite(views)).sum())} NaN/inf values. Expected finite floats. "
            "Fix: re-extract the views (float16 overflow?)."
        )
    return views


def _check_label_range(y: np.ndarray, name: str, K: int) -> None:
    outside = np.unique(y[y >= K])
    if len(outside):
        raise DataError(
            f"{name} labels must lie in [0, {K}) (K = max(y_train) + 1 or "
            f"n_classes). Received: labels {outside[:10].tolist()}. Fix: pass "
            "n_classes=len(class_names) to fit so every class has an output."
        )


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}. Received: {name}={value!r}.")


def _check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bounds = f"{'[' if low_inclusive else '('}{'-inf' if low is None else low}, {'inf' if high is None else high})"
        what = "an integer" if integer else "a number"
        raise ConfigError(f"The '{name}' parameter must be {what} in {bounds}. Received: {name}={value!r}.")


# ----------------------------------------------------------------------- numerics
def _accuracy_and_log_loss(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scored exactly as the run's metrics score it (`pipeline.metrics`)."""
    return accuracy(proba, y), log_loss(proba, y)


def _balanced_weights(y: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(y)
    weights = compute_class_weight("balanced", classes=classes, y=y)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples (recursively) to JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: no half-written heads."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- base
class Head(abc.ABC):
    """A classifier on `(N, D)` float32 features; see the module docstring.

    Subclasses set `name` and implement `_fit`, `_predict_proba`, `_save_model`,
    `_load_model` and `dense_weights`. After `fit`: `n_features_` (D), `n_classes_`
    (K), `classes_present_` (labels seen in `y_train`) and `params_` (chosen
    hyper-parameters, `fit_seconds`, `n_features`, `n_classes`, ...).
    """

    name: ClassVar[str]
    model_file: ClassVar[str]
    #: The libraries a saved head depends on; their versions are stored with it.
    libraries: ClassVar[tuple[str, ...]]
    #: The modules `fit` imports (`import_libraries`).
    fit_imports: ClassVar[tuple[str, ...]]
    #: How `fit` uses augmented views, in words for reports.
    views_use: ClassVar[str]

    # ------------------------------------------------------- what callers need
    @classmethod
    def from_config(cls, config: Any) -> Head:
        """An unfitted head with the hyper-parameters of a `HeadConfig` that it takes.

        The config names each option once; every head picks the ones its constructor
        accepts, so adding a head needs no table of its arguments elsewhere.
        """
        values = config.to_dict()
        return cls(**{name: values[name] for name in cls._parameter_names() if name in values})

    @classmethod
    def _parameter_names(cls) -> list[str]:
        """The hyper-parameters: the constructor's arguments, stored under their own names."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyper-parameters, as scikit-learn's estimators give them (`deep` has no nested
        estimators to expand)."""
        return {name: getattr(self, name) for name in self._parameter_names()}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({arguments})"

    @classmethod
    def default_views(cls, available: int) -> int:
        """Augmented views to train on when VIEWS is unset, given the file's `available` views."""
        return 0

    def training_callbacks(self, work_dir: Path) -> list[Any] | None:
        """Keras callbacks for `fit` that write into the run directory being assembled."""
        return None

    def import_libraries(self) -> None:
        """Imports the libraries `fit` needs, so that a run's phases tell imports from training."""
        import importlib

        for library in self.fit_imports:
            importlib.import_module(library)

    @property
    def parameter_count(self) -> int:
        """Trainable parameters: what the head learns on the features."""
        kernel, bias, _ = self.dense_weights()
        return int(kernel.size + bias.size)

    def logits_model(self) -> Any:
        """The fitted head as a Keras model: features (N, D) -> logits (N, U).

        U == 1 for a binary head (the logit of class 1) and K otherwise, the form the
        losses with `from_logits=True` train. The default is one Dense layer carrying
        `dense_weights()`.
        """
        import keras

        self._check_fitted("logits_model")
        kernel, bias, _ = self.dense_weights()
        inputs = keras.Input((self.n_features_,), name="features")
        dense = keras.layers.Dense(kernel.shape[1], name="logits")
        outputs = dense(inputs)
        dense.set_weights([kernel, bias])
        return keras.Model(inputs, outputs, name="head")

    def finetune_model(self, *, dropout: float, seed: int) -> Any:
        """`logits_model` with the Dropout that stage 3 trains it under (features -> logits)."""
        import keras

        inputs = keras.Input((self.n_features_,), name="features")
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(inputs)
        return keras.Model(inputs, self.logits_model()(x), name="head")

    #: Float32 copies of the train rows that `fit` holds at its peak (measured by `make
    #: bench-scale`): what a memory budget must allow for training in memory.
    memory_copies: ClassVar[int] = 3

    # ----------------------------------------------------------------- public API
    def fit(
        self,
        X_train: Any,
        y_train: Any,
        X_val: Any = None,
        y_val: Any = None,
        *,
        n_classes: int | None = None,
        callbacks: Sequence[Any] | None = None,
        verbose: int = 0,
        views: Any = None,
    ) -> Head:
        """Train on `X_train` float32 `(N, D)` and `y_train` int64 `(N,)` in [0, K).

        `X_val`/`y_val` (optional, together) select hyper-parameters or stop early.
        `n_classes` fixes K when a class may be absent from `y_train`; it defaults to
        `max(y_train) + 1`. `callbacks` are Keras callbacks (DenseHead only).
        `views` (optional) are augmented views of the train rows, float32 `(V, N, D)`
        with `views[v, r]` a view of row r (label `y_train[r]`); each head says how
        it trains on them. Returns self.
        """
        self._start_fit()
        X, y, Xv, yv, K = _validate_fit_inputs(X_train, y_train, X_val, y_val, n_classes)
        V = None if views is None else _as_views(views, len(X), X.shape[1])
        if V is not None and len(V) == 0:
            V = None
        self._set_shape(X.shape[1], K, y)
        start = time.perf_counter()
        params = self._fit(X, y, Xv, yv, callbacks=callbacks, verbose=verbose, views=V)
        self._finish_fit(
            params, start, n_views=0 if V is None else len(V), n_train=len(X), n_val=0 if Xv is None else len(Xv)
        )
        return self

    def fit_streamed(
        self,
        train: Any,
        X_val: Any = None,
        y_val: Any = None,
        *,
        n_classes: int | None = None,
        callbacks: Sequence[Any] | None = None,
        verbose: int = 0,
        memory_budget: int,
    ) -> Head:
        """Like `fit`, on train rows left in their feature file, read within `memory_budget` bytes.

        `train` is a `pipeline.features.store.FeatureRows` (its views included); validation stays
        in memory. For train sets larger than memory. Heads that need every row in
        memory at once raise `ConfigError` naming the alternative.
        """
        versions = f" with {train.num_views} augmented views each" if train.num_views else ""
        raise ConfigError(
            f"The {self.name} head trains on rows in memory, but the {len(train)} train rows{versions} take "
            f"{train.nbytes / 1e9:.2f} GB as float32 and about {self.memory_copies} times that to train, "
            "over MEMORY_BUDGET="
            f"{memory_budget / 1e9:.2f} GB. Use HEAD=dense, which streams the rows from the feature file; or "
            "train on fewer rows (TRAIN_PER_CLASS, fewer VIEWS); or raise MEMORY_BUDGET."
        )

    def _start_fit(self) -> None:
        # A failed refit must not leave the previous fit's state looking valid.
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        self._check_hyperparameters()

    def _set_shape(self, n_features: int, K: int, y: np.ndarray) -> None:
        self.n_features_ = int(n_features)
        self.n_classes_ = K
        self.classes_present_ = np.unique(y)

    def _finish_fit(self, params: dict[str, Any], start: float, *, n_views: int, n_train: int, n_val: int) -> None:
        params["fit_seconds"] = round(time.perf_counter() - start, 4)
        params.update(
            n_features=self.n_features_,
            n_classes=self.n_classes_,
            n_views=n_views,
            n_train=n_train,
            n_val=n_val,
            classes_present=self.classes_present_.tolist(),
        )
        self.params_ = _jsonable(params)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Float32 `(N, K)` class probabilities; rows sum to 1.

        For K == 2 the columns are `[1 - p, p]` with `p` the probability of class 1.
        """
        self._check_fitted("predict_proba")
        X = _as_features(X, "X", n_features=self.n_features_)
        return self._predict_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        """Int64 `(N,)` most probable class per row."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the head into `directory` (created if needed); return the model file.

        The model file is written first and `head.json` last, each atomically, so a
        directory with a `head.json` always holds a complete head.
        """
        self._check_fitted("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / self.model_file
        _write_atomic(model_path, self._save_model)
        record = {
            "head": self.name,
            "format_version": FORMAT_VERSION,
            "model_file": self.model_file,
            "hyperparameters": self.get_params(),
            "n_features": self.n_features_,
            "n_classes": self.n_classes_,
            "classes_present": self.classes_present_.tolist(),
            "params": self.params_,
            "versions": _library_versions(self.libraries),
            **self._extra_record(),
        }
        text = json.dumps(_jsonable(record), indent=2, allow_nan=False)
        _write_atomic(directory / JSON_NAME, lambda p: p.write_text(text + "\n"))
        return model_path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Head:
        """Rebuild a head saved by `save` (of this class) from `directory`."""
        directory = Path(directory)
        record = _read_record(directory)
        if record["head"] != cls.name:
            raise DataError(
                f"Expected a saved '{cls.name}' head in {directory}. Received: a "
                f"'{record['head']}' head. Fix: use load_head(), which dispatches on "
                "the saved name."
            )
        model_path = directory / cls.model_file
        if not model_path.is_file():
            raise DataError(
                f"Expected {model_path} beside {JSON_NAME}. Received: no such file. Fix: train and save the head again."
            )
        current = _library_versions(cls.libraries)
        for lib, version in record.get("versions", {}).items():
            if lib in current and current[lib] != version:
                log.warning(
                    "Head in %s was saved with %s %s; loading with %s.",
                    directory,
                    lib,
                    version,
                    current.get(lib),
                )
        head = cls(**record["hyperparameters"])
        head.n_features_ = int(record["n_features"])
        head.n_classes_ = int(record["n_classes"])
        head.classes_present_ = np.asarray(record["classes_present"], dtype=np.int64)
        head.params_ = record["params"]
        head._load_model(model_path, record)
        return head

    @abc.abstractmethod
    def dense_weights(self) -> tuple[np.ndarray, np.ndarray, str]:
        """`(kernel (D, U), bias (U,), activation)` of one Dense layer on raw features.

        `activation(X @ kernel + bias)` reproduces `predict_proba(X)`: with
        activation "softmax", U == K; with "sigmoid" (K == 2), U == 1 and the unit
        is the probability of class 1, i.e. `predict_proba(X)[:, 1]`.
        """

    # ------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    def _check_hyperparameters(self) -> None: ...

    @abc.abstractmethod
    def _fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        Xv: np.ndarray | None,
        yv: np.ndarray | None,
        *,
        callbacks: Sequence[Any] | None,
        verbose: int,
        views: np.ndarray | None = None,
    ) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _save_model(self, path: Path) -> None: ...

    @abc.abstractmethod
    def _load_model(self, path: Path, record: Mapping[str, Any]) -> None: ...

    def _extra_record(self) -> dict[str, Any]:
        return {}

    def _check_fitted(self, method: str) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit(X_train, y_train, ...) before {method}()."
            )


def _library_versions(libraries: Sequence[str]) -> dict[str, str]:
    """Versions of the libraries a head depends on (importing only those)."""
    import importlib

    return {name: importlib.import_module(name).__version__ for name in libraries}


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / JSON_NAME
    if not path.is_file():
        raise DataError(
            f"Expected a saved head in {directory} ({JSON_NAME}). Received: no such "
            "file. Fix: train the head first (make head)."
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}). Fix: retrain the head.") from err
    if record.get("format_version") != FORMAT_VERSION or "head" not in record:
        raise DataError(
            f"Expected {path} with format_version {FORMAT_VERSION}. Received: "
            f"format_version={record.get('format_version')!r}. Fix: retrain the head."
        )
    return record


# ----------------------------------------------------------------------- logistic
class LogisticHead(Head):
    """Standardized logistic regression (lbfgs; multinomial when K > 2).

    If `C` is None, `fit` sweeps `Cs` from strongest to weakest regularization,
    warm-starting each fit from the previous solution, and keeps the C with the best
    validation accuracy (ties: lower validation log-loss, then smaller C). The sweep
    runs in float32, which only ranks the C values; the head is then refitted from
    scratch, in float64, on the training split with that C, so choosing C=0.1 and
    passing C=0.1 give the same model. `params_["grid"]` records the sweep's scores
    of every C. Scaler statistics come from the training split only.

    Args:
        C: inverse L2 strength; None selects it on the validation split.
        Cs: the grid searched when `C` is None (default `DEFAULT_CS`).
        class_weight: None or "balanced" (inverse class frequency).
        max_iter: lbfgs iterations per fit. A final fit that does not converge is
            logged once and recorded as `params_["converged"] = False`.
        seed: passed as `random_state`; lbfgs itself is deterministic.
        tol: lbfgs stopping tolerance on the gradient of the *mean* loss. Tighter
            than scikit-learn's 1e-4, at which warm-started fits at large C stop
            after 0 iterations and the grid scores of large C are stale copies.
        blas_threads: BLAS threads while fitting (threadpoolctl, restored after).
            The products here are thin, `(N, D) @ (D, K)`: one thread is as fast as
            two on an idle 2-core machine and 5-10x faster on a busy one. None
            keeps the BLAS default (worth it only for large N and K on many cores).
    """

    name = "logistic"
    model_file = "head.joblib"
    libraries = ("numpy", "sklearn")
    fit_imports = ("sklearn.linear_model", "sklearn.preprocessing")
    views_use = "stacked as rows"
    memory_copies = 4  # measured 4.2: the rows, the standardized copy, scikit-learn's working arrays

    def __init__(
        self,
        C: float | None = None,
        Cs: Sequence[float] = DEFAULT_CS,
        class_weight: str | None = None,
        max_iter: int = 1000,
        seed: int = 0,
        tol: float = 1e-6,
        blas_threads: int | None = 1,
    ) -> None:
        self.C = C
        self.Cs = Cs
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.seed = seed
        self.tol = tol
        self.blas_threads = blas_threads

    def _check_hyperparameters(self) -> None:
        if self.C is not None:
            _check_number("C", self.C, low=0, low_inclusive=False)
        if isinstance(self.Cs, (str, bytes)) or len(np.atleast_1d(self.Cs)) == 0:
            raise ConfigError(
                f"The 'Cs' parameter must be a non-empty sequence of positive floats. Received: Cs={self.Cs!r}."
            )
        for c in np.atleast_1d(self.Cs).tolist():
            _check_number("Cs", c, low=0, low_inclusive=False)
        _check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        _check_number("max_iter", self.max_iter, integer=True, low=1)
        _check_number("seed", self.seed, integer=True, low=0)
        _check_number("tol", self.tol, low=0, low_inclusive=False)
        if self.blas_threads is not None:
            _check_number("blas_threads", self.blas_threads, integer=True, low=1)

    def _fit(self, X, y, Xv, yv, *, callbacks, verbose, views=None):
        from threadpoolctl import threadpool_limits

        if views is not None:
            # A convex fit has no epochs to draw a fresh view in: every view is a row
            # of its own, with its source's label (the scaler sees them too).
            X = np.concatenate([X, views.reshape(-1, X.shape[1])])
            y = np.tile(y, len(views) + 1)
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            params = self._fit_logistic(X, y, Xv, yv, callbacks=callbacks, verbose=verbose)
        if views is not None:
            params.update(view_use="stacked: plain rows and every view as rows of their own", n_train_rows=len(X))
        return params

    def _fit_logistic(self, X, y, Xv, yv, *, callbacks, verbose):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if callbacks:
            raise ConfigError(
                "callbacks are Keras callbacks and apply to the 'dense' head only. "
                f"Received: callbacks={list(callbacks)!r} for head='logistic'. Fix: "
                "pass callbacks=None."
            )
        # Standardize and fit the kept model in float64: float32 means/variances and loss
        # gradients are too coarse for tol=1e-6. The sweep only ranks C values, which
        # float32 does as well (the same validation scores on cats_and_dogs_filtered,
        # log-losses within 1%) at 2.6x the speed: its (N, D) copy is half the memory
        # traffic of each of lbfgs's two products per iteration.
        X64 = X.astype(np.float64)
        self.scaler_ = StandardScaler().fit(X64)
        Z = self.scaler_.transform(X64)
        del X64
        params: dict[str, Any] = {"class_weight": self.class_weight}

        def new_model(C: float, warm_start: bool) -> LogisticRegression:
            return LogisticRegression(
                C=C,
                class_weight=self.class_weight,
                max_iter=self.max_iter,
                tol=self.tol,
                random_state=self.seed,
                warm_start=warm_start,
            )

        Zv = None if Xv is None else self.scaler_.transform(Xv.astype(np.float64))
        if self.C is None:
            if Xv is None:
                raise ConfigError(
                    "LogisticHead with C=None selects C on validation data. Received: "
                    "X_val=None. Fix: pass X_val and y_val, or set C (e.g. C=1.0)."
                )
            grid = []
            sweep = new_model(1.0, warm_start=True)
            sweep_start = time.perf_counter()
            Z32, Zv32 = Z.astype(np.float32), Zv.astype(np.float32)
            for C in sorted(float(c) for c in np.atleast_1d(self.Cs)):
                sweep.set_params(C=C)
                converged = _fit_quietly(sweep, Z32, y)
                self.model_ = sweep
                accuracy, loss = _accuracy_and_log_loss(self._proba_scaled(Zv32), yv)
                grid.append(
                    {
                        "C": C,
                        "val_accuracy": accuracy,
                        "val_log_loss": loss,
                        "converged": converged,
                        "n_iter": int(np.max(sweep.n_iter_)),
                    }
                )
                log.log(
                    logging.INFO if verbose else logging.DEBUG,
                    "logistic C=%.3g: val_accuracy=%.4f val_log_loss=%.4f",
                    C,
                    accuracy,
                    loss,
                )
            del Z32, Zv32
            best = min(grid, key=lambda g: (-g["val_accuracy"], g["val_log_loss"], g["C"]))
            C = best["C"]
            params.update(
                C_selected_on="validation", grid=grid, sweep_seconds=round(time.perf_counter() - sweep_start, 4)
            )
        else:
            C = float(self.C)
            params["C_selected_on"] = "given"
        model = new_model(C, warm_start=False)
        converged = _fit_quietly(model, Z, y)
        self.model_ = model
        if not converged:
            log.warning(
                "LogisticHead: lbfgs did not converge in max_iter=%d iterations at C=%g; increase max_iter or lower C.",
                self.max_iter,
                C,
            )
        params.update(C=C, converged=converged, n_iter=int(np.max(model.n_iter_)))
        if Zv is not None:
            accuracy, loss = _accuracy_and_log_loss(self._proba_scaled(Zv), yv)
            params.update(val_accuracy=accuracy, val_log_loss=loss)
        return params

    def _proba_scaled(self, Z: np.ndarray) -> np.ndarray:
        """Probabilities of standardized features, one column per class in [0, K)."""
        present = self.model_.predict_proba(Z)
        if len(self.classes_present_) == self.n_classes_:
            return present.astype(np.float32)
        proba = np.zeros((len(Z), self.n_classes_), dtype=np.float32)
        proba[:, self.model_.classes_] = present
        return proba

    def _predict_proba(self, X):
        return self._proba_scaled(self.scaler_.transform(X))

    def dense_weights(self):
        """See `Head.dense_weights`; the standardization is folded into the layer.

        With z = (x - mean) / scale, `z @ coef.T + b == x @ (coef / scale).T + (b -
        (mean / scale) @ coef.T)`. A class absent from `y_train` gets a zero kernel
        column and the bias `ABSENT_CLASS_LOGIT`.
        """
        self._check_fitted("dense_weights")
        D = self.n_features_
        mean = np.broadcast_to(0.0 if self.scaler_.mean_ is None else self.scaler_.mean_, D)
        scale = 1.0 if self.scaler_.scale_ is None else self.scaler_.scale_
        coef = np.asarray(self.model_.coef_, dtype=np.float64) / scale  # (C, D)
        bias = np.asarray(self.model_.intercept_, dtype=np.float64) - coef @ mean
        if self.n_classes_ == 2:
            return coef.T.astype(np.float32), bias.astype(np.float32), "sigmoid"
        if coef.shape[0] == 1:
            # Binary fit inside a K-class head: sigmoid(z) == softmax([0, z])[1].
            coef = np.concatenate([np.zeros_like(coef), coef])
            bias = np.concatenate([[0.0], bias])
        kernel = np.zeros((D, self.n_classes_))
        full_bias = np.full(self.n_classes_, ABSENT_CLASS_LOGIT)
        kernel[:, self.model_.classes_] = coef.T
        full_bias[self.model_.classes_] = bias
        return kernel.astype(np.float32), full_bias.astype(np.float32), "softmax"

    def _save_model(self, path):
        import joblib

        joblib.dump({"scaler": self.scaler_, "model": self.model_}, path)

    def _load_model(self, path, record):
        import joblib

        state = joblib.load(path)
        self.scaler_ = state["scaler"]
        self.model_ = state["model"]


def _fit_quietly(model: Any, X: np.ndarray, y: np.ndarray) -> bool:
    """Fit `model` with ConvergenceWarning silenced; return whether it converged."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return converged


# -------------------------------------------------------------------------- dense
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
    fit_imports = ("keras",)  # TensorFlow with it: seconds
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

    memory_copies = 3  # measured 3.0: the rows, the stacked versions, TensorFlow's constant

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
        _check_number("hidden", self.hidden, integer=True, low=0)
        _check_number("dropout", self.dropout, low=0, high=1)
        _check_number("epochs", self.epochs, integer=True, low=1)
        _check_number("batch_size", self.batch_size, integer=True, low=1)
        _check_number("learning_rate", self.learning_rate, low=0, low_inclusive=False)
        _check_number("patience", self.patience, integer=True, low=0)
        _check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        _check_number("seed", self.seed, integer=True, low=0)

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
        y, Xv, yv, K = _validate_labels_and_val(train.labels, len(train), train.n_features, X_val, y_val, n_classes)
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


# ----------------------------------------------------------------------- registry
HEADS: dict[str, type[Head]] = {"logistic": LogisticHead, "dense": DenseHead}


def list_heads() -> list[str]:
    """Sorted names accepted by `create_head`."""
    return sorted(HEADS)


def create_head(name: str, **params: Any) -> Head:
    """Build an unfitted head by registry name with the given hyper-parameters."""
    cls = head_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"Unknown parameter(s) {', '.join(unknown)} for head '{name}'. Expected "
            f"some of: {', '.join(accepted)}. Received: {params!r}."
        )
    return cls(**params)


def head_class(name: str) -> type[Head]:
    """The registered head class called `name`; an unknown name lists the valid ones."""
    if name not in HEADS:
        raise ConfigError(
            f"Unknown head '{name}'. Expected one of: {', '.join(list_heads())}. Received: head={name!r}."
        )
    return HEADS[name]


def load_head(directory: str | os.PathLike) -> Head:
    """Load a saved head of any registered kind, dispatching on its `head.json`."""
    record = _read_record(Path(directory))
    name = record["head"]
    if name not in HEADS:
        raise DataError(
            f"Unknown head '{name}' in {Path(directory) / JSON_NAME}. Expected one "
            f"of: {', '.join(list_heads())}. Fix: retrain the head."
        )
    return HEADS[name].load(directory)


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
