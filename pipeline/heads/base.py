"""The `Head` base class: the estimator contract every head keeps, and the saved-head directory.

A head maps pooled backbone features, float32 `(N, D)`, to class probabilities,
float32 `(N, K)`. Heads follow the scikit-learn estimator shape: the constructor only
stores hyper-parameters, `fit` validates its inputs and sets trailing-underscore
state (`params_`, `n_features_`, `n_classes_`, ...), `get_params` returns the
constructor's arguments (so `sklearn.base.clone` works), and an unfitted head raises
`NotFittedError`. The base class is not scikit-learn's `BaseEstimator`, so that the
dense head, and every TensorFlow command that loads a head, never imports scikit-learn.
Everything here is numpy in, numpy out; reading feature files and writing run
directories belongs to the callers.

A saved head is a directory::

    head_dir/
        head.json      # {"head": "logistic"|"dense", hyper-parameters, params_, ...}
        head.joblib    # LogisticHead: the fitted scaler and LogisticRegression
        head.keras     # DenseHead: the Keras model (logits out)

`Head.load` rebuilds one of its own class; `pipeline.heads.registry.load_head` reads
`head.json` and dispatches on its `"head"` name.

Binary problems (`K == 2`) still get two probability columns, `[1 - p, p]`, where
`p` is the probability of class 1; `dense_weights()` then returns one sigmoid unit
that computes `p`.
"""

from __future__ import annotations

import abc
import inspect
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError, DataError, NotFittedError
from pipeline.heads.validation import as_features, as_views, validate_fit_inputs

log = logging.getLogger(__name__)

JSON_NAME = "head.json"
FORMAT_VERSION = 1
#: The values of every head's `class_weight`.
CLASS_WEIGHTS = (None, "balanced")


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

    #: Float32 copies of the train rows that `fit` holds at its peak: what a memory budget
    #: must allow for training in memory.
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
        X, y, Xv, yv, K = validate_fit_inputs(X_train, y_train, X_val, y_val, n_classes)
        V = None if views is None else as_views(views, len(X), X.shape[1])
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
        X = as_features(X, "X", n_features=self.n_features_)
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
        record = read_record(directory)
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


def read_record(directory: Path) -> dict[str, Any]:
    """The `head.json` record saved in `directory`, refused when missing or of another format."""
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
