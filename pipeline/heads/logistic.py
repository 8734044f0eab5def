"""The logistic head: a standardized multinomial logistic regression, the linear probe of stage 2.

Its `C` is picked on the validation split, the linear-probe protocol of Kornblith et
al. 2019 and CLIP. scikit-learn is imported only when the head fits or loads, so
importing this module stays as light as numpy.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.heads.base import CLASS_WEIGHTS, Head
from pipeline.heads.validation import check_choice, check_number
from pipeline.metrics import accuracy, log_loss

log = logging.getLogger(__name__)

#: The C grid of the logistic sweep: 13 values, 1e-4 ... 1e2, half a decade apart.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
#: Logit given by `LogisticHead.dense_weights` to a class that was absent from
#: `y_train` (possible with an explicit `n_classes`): `exp(-1e4)` is 0 in float32,
#: so the exported layer gives it probability 0, as `predict_proba` does, while the
#: logit stays finite (no NaN gradients when the layer warm-starts fine-tuning).
ABSENT_CLASS_LOGIT = -1.0e4


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
            The products here are thin, `(N, D) @ (D, K)`, so more threads mostly
            contend with other work for the cores. None keeps the BLAS default (worth
            it only for large N and K on many cores).
    """

    name = "logistic"
    model_file = "head.joblib"
    libraries = ("numpy", "sklearn")
    fit_imports = ("sklearn.linear_model", "sklearn.preprocessing")
    views_use = "stacked as rows"
    memory_copies = 4  # the rows, the standardized copy, scikit-learn's working arrays

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
            check_number("C", self.C, low=0, low_inclusive=False)
        if isinstance(self.Cs, (str, bytes)) or len(np.atleast_1d(self.Cs)) == 0:
            raise ConfigError(
                f"The 'Cs' parameter must be a non-empty sequence of positive floats. Received: Cs={self.Cs!r}."
            )
        for c in np.atleast_1d(self.Cs).tolist():
            check_number("Cs", c, low=0, low_inclusive=False)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_number("max_iter", self.max_iter, integer=True, low=1)
        check_number("seed", self.seed, integer=True, low=0)
        check_number("tol", self.tol, low=0, low_inclusive=False)
        if self.blas_threads is not None:
            check_number("blas_threads", self.blas_threads, integer=True, low=1)

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
        _refuse_callbacks(callbacks)
        Z, Zv = self._standardize(X, Xv)
        params: dict[str, Any] = {"class_weight": self.class_weight}
        if self.C is None:
            C = self._select_C(Z, y, Zv, yv, params, verbose=verbose)
        else:
            C = float(self.C)
            params["C_selected_on"] = "given"
        params.update(self._fit_final(Z, y, C))
        if Zv is not None:
            accuracy, loss = _accuracy_and_log_loss(self._proba_scaled(Zv), yv)
            params.update(val_accuracy=accuracy, val_log_loss=loss)
        return params

    def _standardize(self, X: np.ndarray, Xv: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Fits the scaler on the train rows; returns both splits standardized, in float64.

        Float64 because float32 means, variances and loss gradients are too coarse for
        the final fit's tol=1e-6.
        """
        from sklearn.preprocessing import StandardScaler

        X64 = X.astype(np.float64)
        self.scaler_ = StandardScaler().fit(X64)
        Z = self.scaler_.transform(X64)
        del X64
        return Z, None if Xv is None else self.scaler_.transform(Xv.astype(np.float64))

    def _new_model(self, C: float, *, warm_start: bool) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(
            C=C,
            class_weight=self.class_weight,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.seed,
            warm_start=warm_start,
        )

    def _select_C(self, Z, y, Zv, yv, params: dict[str, Any], *, verbose: int) -> float:
        """Sweeps `Cs`, warm-started, on the validation split; records the grid in `params`, returns the best C.

        The sweep runs in float32: it only ranks the C values, which float32 does as
        well as float64 while moving half the bytes through lbfgs's products.
        """
        if Zv is None:
            raise ConfigError(
                "LogisticHead with C=None selects C on validation data. Received: "
                "X_val=None. Fix: pass X_val and y_val, or set C (e.g. C=1.0)."
            )
        sweep = self._new_model(1.0, warm_start=True)
        sweep_start = time.perf_counter()
        Z32, Zv32 = Z.astype(np.float32), Zv.astype(np.float32)
        grid = [
            self._sweep_step(sweep, C, Z32, y, Zv32, yv, verbose)
            for C in sorted(float(c) for c in np.atleast_1d(self.Cs))
        ]
        del Z32, Zv32
        best = min(grid, key=lambda g: (-g["val_accuracy"], g["val_log_loss"], g["C"]))
        params.update(C_selected_on="validation", grid=grid, sweep_seconds=round(time.perf_counter() - sweep_start, 4))
        return best["C"]

    def _sweep_step(self, sweep, C: float, Z, y, Zv, yv, verbose: int) -> dict[str, Any]:
        """Refits the warm-started `sweep` model at `C` and scores it on the validation split."""
        sweep.set_params(C=C)
        converged = _fit_quietly(sweep, Z, y)
        self.model_ = sweep
        accuracy, loss = _accuracy_and_log_loss(self._proba_scaled(Zv), yv)
        log.log(
            logging.INFO if verbose else logging.DEBUG,
            "logistic C=%.3g: val_accuracy=%.4f val_log_loss=%.4f",
            C,
            accuracy,
            loss,
        )
        return {
            "C": C,
            "val_accuracy": accuracy,
            "val_log_loss": loss,
            "converged": converged,
            "n_iter": int(np.max(sweep.n_iter_)),
        }

    def _fit_final(self, Z: np.ndarray, y: np.ndarray, C: float) -> dict[str, Any]:
        """Fits the kept model from scratch at `C`, so a chosen C and a given one give the same head."""
        model = self._new_model(C, warm_start=False)
        converged = _fit_quietly(model, Z, y)
        self.model_ = model
        if not converged:
            log.warning(
                "LogisticHead: lbfgs did not converge in max_iter=%d iterations at C=%g; increase max_iter or lower C.",
                self.max_iter,
                C,
            )
        return {"C": C, "converged": converged, "n_iter": int(np.max(model.n_iter_))}

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


#: scikit-learn's guess that labels with many distinct values might be a regression target:
#: ours are class indices by construction, and many classes of few images each are a
#: normal long-tailed dataset, not a mistake.
_REGRESSION_GUESS = "The number of unique classes is greater than 50% of the number of samples"


def _fit_quietly(model: Any, X: np.ndarray, y: np.ndarray) -> bool:
    """Fit `model` with ConvergenceWarning (and `_REGRESSION_GUESS`) silenced; return whether it converged."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        elif not str(w.message).startswith(_REGRESSION_GUESS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return converged


def _refuse_callbacks(callbacks: Sequence[Any] | None) -> None:
    if callbacks:
        raise ConfigError(
            "callbacks are Keras callbacks and apply to the 'dense' head only. "
            f"Received: callbacks={list(callbacks)!r} for head='logistic'. Fix: "
            "pass callbacks=None."
        )


def _accuracy_and_log_loss(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scored exactly as the run's metrics score it (`pipeline.metrics`)."""
    return accuracy(proba, y), log_loss(proba, y)
