"""Input checks of the heads: feature arrays, labels, views and hyper-parameters, each refused with a fix.

Every head validates what `fit` receives here, so a bad array fails with the same
message whichever head is asked to train on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError


def as_features(X: Any, name: str, *, n_features: int | None = None) -> np.ndarray:
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


def as_labels(y: Any, name: str, n_rows: int, x_name: str) -> np.ndarray:
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


def validate_fit_inputs(
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
    X = as_features(X_train, "X_train")
    y, Xv, yv, K = validate_labels_and_val(y_train, len(X), X.shape[1], X_val, y_val, n_classes)
    return X, y, Xv, yv, K


def validate_labels_and_val(
    y_train: Any,
    n_rows: int,
    n_features: int,
    X_val: Any,
    y_val: Any,
    n_classes: int | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """The checks of `validate_fit_inputs` past X_train (whose rows may stay in a file)."""
    y = as_labels(y_train, "y_train", n_rows, "X_train")
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
    Xv = as_features(X_val, "X_val", n_features=n_features)
    yv = as_labels(y_val, "y_val", len(Xv), "X_val")
    check_label_range(yv, "y_val", K)
    return y, Xv, yv, K


def as_views(views: Any, n_rows: int, n_features: int) -> np.ndarray:
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


def check_label_range(y: np.ndarray, name: str, K: int) -> None:
    outside = np.unique(y[y >= K])
    if len(outside):
        raise DataError(
            f"{name} labels must lie in [0, {K}) (K = max(y_train) + 1 or "
            f"n_classes). Received: labels {outside[:10].tolist()}. Fix: pass "
            "n_classes=len(class_names) to fit so every class has an output."
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}. Received: {name}={value!r}.")


def check_number(
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
