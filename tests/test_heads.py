"""Tests of the pipeline.heads heads on synthetic Gaussian blobs (no features files, no models).

Heads that several tests share are fitted once per module; every fit pins its seed.
"""

from __future__ import annotations

import json
import logging
import warnings

import keras
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score

from pipeline.errors import ConfigError, DataError, NotFittedError
from pipeline.heads.base import Head
from pipeline.heads.dense import DenseHead
from pipeline.heads.logistic import ABSENT_CLASS_LOGIT, DEFAULT_CS, LogisticHead
from pipeline.heads.registry import HEADS, create_head, list_heads, load_head


def make_blobs(n, d, k, *, seed, sep=4.0, weights=None):
    """`n` float32 `(n, d)` points around `k` random centres `sep` apart (roughly)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep / np.sqrt(2.0)
    y = rng.choice(k, size=n, p=weights).astype(np.int64)
    X = centers[y] + rng.normal(size=(n, d))
    return X.astype(np.float32), y


def make_splits(d, k, *, seed, sep=4.0, n=(300, 100, 200), weights=None):
    X, y = make_blobs(sum(n), d, k, seed=seed, sep=sep, weights=weights)
    a, b = n[0], n[0] + n[1]
    return {"train": (X[:a], y[:a]), "val": (X[a:b], y[a:b]), "test": (X[b:], y[b:])}


DATA = {2: make_splits(32, 2, seed=0), 4: make_splits(48, 4, seed=1)}

# (id, head name, hyper-parameters); dense heads use a short schedule.
CASES = [
    ("logistic", "logistic", {}),
    ("dense", "dense", {"epochs": 15, "batch_size": 32}),
    ("dense_hidden", "dense", {"hidden": 16, "epochs": 15}),
]


def fit(name, params, k, **fit_kwargs):
    (X, y), (Xv, yv) = DATA[k]["train"], DATA[k]["val"]
    return create_head(name, **params).fit(X, y, Xv, yv, **fit_kwargs)


@pytest.fixture(scope="module")
def fitted():
    """{(case id, K): fitted head}, fitted lazily and once per module."""
    cache = {}

    def get(case_id, k):
        if (case_id, k) not in cache:
            _, name, params = next(c for c in CASES if c[0] == case_id)
            cache[case_id, k] = fit(name, params, k)
        return cache[case_id, k]

    return get


def numpy_layer(X, kernel, bias, activation):
    logits = X.astype(np.float64) @ kernel.astype(np.float64) + bias
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


CASE_IDS = [c[0] for c in CASES]
KS = [2, 4]


# ---------------------------------------------------------------- registry
def test_registry_names():
    assert list_heads() == ["dense", "logistic"]
    assert HEADS == {"logistic": LogisticHead, "dense": DenseHead}
    head = create_head("dense", hidden=8, seed=3)
    assert isinstance(head, DenseHead) and isinstance(head, Head)
    assert (head.hidden, head.seed, head.name) == (8, 3, "dense")


def test_create_head_unknown_name():
    with pytest.raises(ConfigError) as info:
        create_head("x")
    assert str(info.value) == ("Unknown head 'x'. Expected one of: dense, logistic. Received: head='x'.")


def test_create_head_unknown_parameter():
    with pytest.raises(ConfigError, match=r"Unknown parameter\(s\) hiden for head 'dense'"):
        create_head("dense", hiden=8)


# ------------------------------------------------------------- predictions
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_accuracy_on_held_out_points(fitted, case_id, k):
    X, y = DATA[k]["test"]
    assert np.mean(fitted(case_id, k).predict(X) == y) >= 0.95


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_predict_proba_shape_and_normalization(fitted, case_id, k):
    head = fitted(case_id, k)
    X, _ = DATA[k]["test"]
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), k) and proba.dtype == np.float32
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    pred = head.predict(X)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))
    assert head.params_["n_features"] == X.shape[1] and head.params_["n_classes"] == k
    assert head.params_["fit_seconds"] > 0


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_predict_rejects_other_feature_width(fitted, case_id):
    with pytest.raises(DataError, match=r"feature width of X_train \(32\)"):
        fitted(case_id, 2).predict_proba(np.zeros((3, 7), np.float32))


# --------------------------------------------------------------- save/load
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_save_load_round_trip(fitted, case_id, k, tmp_path):
    head = fitted(case_id, k)
    path = head.save(tmp_path / "head")
    assert path == tmp_path / "head" / type(head).model_file and path.is_file()
    record = json.loads((tmp_path / "head" / "head.json").read_text())
    assert record["head"] == head.name and record["hyperparameters"] == json.loads(json.dumps(head.get_params()))
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == sorted(["head.json", path.name])
    X, _ = DATA[k]["test"]
    for loaded in (load_head(tmp_path / "head"), type(head).load(tmp_path / "head")):
        assert type(loaded) is type(head)
        # Bit-identical by design: the same weights and the same inputs on the same machine.
        np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
        assert loaded.params_ == head.params_
        assert loaded.get_params() == json.loads(json.dumps(head.get_params()))
    if head.name == "dense":
        assert loaded.history_ == head.history_


def test_load_errors(fitted, tmp_path):
    with pytest.raises(DataError, match="Expected a saved head in .*head.json"):
        load_head(tmp_path)
    fitted("logistic", 2).save(tmp_path)
    with pytest.raises(DataError, match="Expected a saved 'dense' head .* 'logistic'"):
        DenseHead.load(tmp_path)


@pytest.mark.parametrize("name", ["logistic", "dense"])
@pytest.mark.parametrize("method", ["predict_proba", "predict", "save", "dense_weights"])
def test_unfitted_head_raises(name, method, tmp_path):
    head = create_head(name)
    args = {
        "predict_proba": (np.zeros((2, 4)),),
        "predict": (np.zeros((2, 4)),),
        "save": (tmp_path,),
        "dense_weights": (),
    }[method]
    checked = "predict_proba" if method == "predict" else method
    with pytest.raises(NotFittedError, match=f"not fitted yet.*before {checked}"):
        getattr(head, method)(*args)
    assert not (tmp_path / "head.json").exists()


# ------------------------------------------------------------ dense_weights
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case_id", ["logistic", "dense"])
def test_dense_weights_reproduce_predict_proba(fitted, case_id, k):
    head = fitted(case_id, k)
    X, _ = DATA[k]["test"]
    kernel, bias, activation = head.dense_weights()
    units = 1 if k == 2 else k
    assert kernel.shape == (X.shape[1], units) and bias.shape == (units,)
    assert activation == ("sigmoid" if k == 2 else "softmax")
    out = numpy_layer(X, kernel, bias, activation)
    proba = head.predict_proba(X)
    if k == 2:  # one unit: the probability of class 1; columns are [1 - p, p]
        np.testing.assert_allclose(proba[:, 1], out[:, 0], atol=1e-5)
        np.testing.assert_allclose(proba[:, 0], 1 - out[:, 0], atol=1e-5)
    else:
        np.testing.assert_allclose(proba, out, atol=1e-5)


def test_dense_weights_match_a_keras_dense_layer(fitted):
    head = fitted("logistic", 4)
    kernel, bias, activation = head.dense_weights()
    layer = keras.layers.Dense(kernel.shape[1], activation=activation)
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel, bias])
    X, _ = DATA[4]["test"]
    np.testing.assert_allclose(np.asarray(layer(X)), head.predict_proba(X), atol=1e-5)


def test_dense_weights_with_hidden_layer_raises(fitted):
    with pytest.raises(ConfigError, match="hidden ReLU layer \\(hidden=16\\).*hidden=0"):
        fitted("dense_hidden", 2).dense_weights()


# ------------------------------------------------------------------ logistic
def test_logistic_records_chosen_c(fitted):
    params = fitted("logistic", 4).params_
    assert params["C_selected_on"] == "validation"
    assert params["C"] in DEFAULT_CS
    assert [g["C"] for g in params["grid"]] == sorted(DEFAULT_CS)
    assert set(params["grid"][0]) == {"C", "val_accuracy", "val_log_loss", "converged", "n_iter"}
    best = min(params["grid"], key=lambda g: (-g["val_accuracy"], g["val_log_loss"]))
    assert params["C"] == best["C"]
    assert params["converged"] is True and params["sweep_seconds"] > 0


@pytest.mark.parametrize("k", [2, 4])
def test_the_float32_sweep_scores_each_c_as_a_float64_fit_does(fitted, k):
    """The sweep runs in float32 for speed; its scores must rank C as float64 fits would."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    head = fitted("logistic", k)
    (X, y), (Xv, yv) = DATA[k]["train"], DATA[k]["val"]
    scaler = StandardScaler().fit(X.astype(np.float64))
    Z, Zv = scaler.transform(X.astype(np.float64)), scaler.transform(Xv.astype(np.float64))
    for g in head.params_["grid"]:
        model = LogisticRegression(C=g["C"], tol=head.tol, max_iter=head.max_iter).fit(Z, y)
        proba = model.predict_proba(Zv)
        assert g["val_accuracy"] == pytest.approx(float(np.mean(proba.argmax(axis=1) == yv)))
        expected_loss = -float(np.mean(np.log(proba[np.arange(len(yv)), yv])))
        assert g["val_log_loss"] == pytest.approx(expected_loss, rel=1e-2, abs=1e-4)


def test_logistic_refit_equals_explicit_c(fitted):
    chosen = fitted("logistic", 4)
    X, y = DATA[4]["train"]
    given = LogisticHead(C=chosen.params_["C"]).fit(X, y)
    assert given.params_["C_selected_on"] == "given" and "grid" not in given.params_
    Xt, _ = DATA[4]["test"]
    # Bit-identical by design: two deterministic fits of the same data and C in one process.
    np.testing.assert_array_equal(given.predict_proba(Xt), chosen.predict_proba(Xt))


def test_logistic_sweep_needs_validation_data():
    X, y = DATA[2]["train"]
    with pytest.raises(ConfigError, match="C=None selects C on validation data"):
        LogisticHead().fit(X, y)


def test_logistic_custom_grid():
    (X, y), (Xv, yv) = DATA[2]["train"], DATA[2]["val"]
    head = LogisticHead(Cs=[1.0, 0.01]).fit(X, y, Xv, yv)
    assert [g["C"] for g in head.params_["grid"]] == [0.01, 1.0]


def test_logistic_non_convergence_is_recorded_not_spammed(caplog):
    X, y = DATA[4]["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with caplog.at_level(logging.WARNING, logger="pipeline.heads.logistic"):
            head = LogisticHead(C=100.0, max_iter=2).fit(X, y)
    assert head.params_["converged"] is False
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "did not converge in max_iter=2" in messages[0]


def test_logistic_rejects_callbacks():
    X, y = DATA[2]["train"]
    with pytest.raises(ConfigError, match="apply to the 'dense' head only"):
        LogisticHead(C=1.0).fit(X, y, callbacks=[keras.callbacks.History()])


# --------------------------------------------------------------------- dense
def test_dense_history_and_early_stopping(fitted):
    head = fitted("dense", 4)
    assert set(head.history_) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    run = head.params_["epochs_run"]
    assert all(len(v) == run for v in head.history_.values())
    best = head.params_["best_epoch"]
    assert 1 <= best <= run
    assert head.params_["val_loss"] == min(head.history_["val_loss"])
    # Restored weights are the best epoch's: their validation loss matches it.
    Xv, yv = DATA[4]["val"]
    proba = head.predict_proba(Xv).astype(np.float64)
    loss = -np.mean(np.log(proba[np.arange(len(yv)), yv]))
    assert loss == pytest.approx(head.history_["val_loss"][best - 1], rel=1e-3)


def test_dense_stops_early_and_restores_best():
    (X, y), (Xv, yv) = DATA[2]["train"], DATA[2]["val"]
    head = DenseHead(epochs=40, patience=0, learning_rate=0.05).fit(X, y, Xv, yv)
    assert head.params_["stopped_early"] is True
    assert head.params_["epochs_run"] < 40
    assert head.params_["best_epoch"] == int(np.argmin(head.history_["val_loss"])) + 1


def test_dense_without_validation_runs_all_epochs():
    X, y = DATA[2]["train"]
    head = DenseHead(epochs=3).fit(X, y)
    assert head.params_["epochs_run"] == head.params_["best_epoch"] == 3
    assert set(head.history_) == {"loss", "accuracy"}


def test_dense_passes_callbacks():
    X, y = DATA[2]["train"]
    epochs = []
    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs.append(e))
    DenseHead(epochs=2).fit(X, y, callbacks=[callback])
    assert epochs == [0, 1]


# --------------------------------------------------------------- determinism
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_same_seed_same_predictions(fitted, case_id):
    _, name, params = next(c for c in CASES if c[0] == case_id)
    first, second = fitted(case_id, 4), fit(name, params, 4)
    X, _ = DATA[4]["test"]
    # Bit-identical by design: the same seeded computation twice in one process.
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))
    if name == "dense":
        assert first.history_ == second.history_
    else:
        assert first.params_["grid"] == second.params_["grid"]


def test_other_seed_other_dense_weights(fitted):
    other = fit("dense", {"epochs": 15, "seed": 1}, 4)
    assert not np.array_equal(other.dense_weights()[0], fitted("dense", 4).dense_weights()[0])


# ------------------------------------------------------------ class weights
@pytest.mark.parametrize(
    "name,params",
    [
        ("logistic", {"C": 0.01}),
        ("dense", {"epochs": 10}),
    ],
)
def test_balanced_class_weight_improves_mean_recall(name, params):
    data = make_splits(16, 2, seed=5, sep=1.5, n=(600, 200, 1000), weights=[0.93, 0.07])
    (X, y), (Xt, yt) = data["train"], data["test"]
    plain = create_head(name, **params).fit(X, y)
    balanced = create_head(name, class_weight="balanced", **params).fit(X, y)
    assert balanced.params_["class_weight"] == "balanced"
    assert balanced_accuracy_score(yt, balanced.predict(Xt)) > balanced_accuracy_score(yt, plain.predict(Xt)) + 0.02
    if name == "dense":
        weights = balanced.params_["class_weights"]
        assert set(weights) == {"0", "1"} and weights["1"] > 1 > weights["0"]


# --------------------------------------------------------- absent classes
@pytest.mark.parametrize("name,params", [("logistic", {}), ("dense", {"epochs": 5})])
def test_n_classes_keeps_a_column_for_a_class_absent_from_train(name, params):
    (X, y), (Xv, yv) = DATA[4]["train"], DATA[4]["val"]
    keep = y != 2
    head = create_head(name, **params).fit(X[keep], y[keep], Xv, yv, n_classes=5)
    Xt, _ = DATA[4]["test"]
    proba = head.predict_proba(Xt)
    assert proba.shape == (len(Xt), 5) and head.params_["classes_present"] == [0, 1, 3]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(numpy_layer(Xt, *head.dense_weights()), proba, atol=1e-5)
    if name == "logistic":
        assert np.all(proba[:, [2, 4]] == 0)
        assert np.all(head.dense_weights()[1][[2, 4]] == ABSENT_CLASS_LOGIT)


def test_binary_fit_inside_a_multiclass_head():
    (X, y), _ = DATA[4]["train"], None
    keep = y < 2
    head = LogisticHead(C=1.0).fit(X[keep], y[keep], n_classes=3)
    Xt, _ = DATA[4]["test"]
    kernel, bias, activation = head.dense_weights()
    assert activation == "softmax" and kernel.shape == (X.shape[1], 3)
    np.testing.assert_allclose(numpy_layer(Xt, kernel, bias, activation), head.predict_proba(Xt), atol=1e-5)


# --------------------------------------------------------------- validation
def _bad_inputs():
    (X, y), (Xv, yv) = DATA[2]["train"], DATA[2]["val"]
    nan = X.copy()
    nan[3, 1] = np.nan
    nan[5, :2] = np.inf
    return [
        ("x_1d", (X[:, 0], y), {}, DataError, r"X_train must be a 2-D array .* shape \(300,\)"),
        ("length", (X, y[:-1]), {}, DataError, "same length. Received: 300 feature rows and 299 labels"),
        ("nan", (nan, y), {}, DataError, r"features contain 3 NaN/inf values \(in 2 of 300 rows\)"),
        ("one_class", (X, np.zeros_like(y)), {}, DataError, r"needs at least 2 classes; got 1: \[0\]"),
        ("negative", (X, y - 1), {}, DataError, r"labels are negative \(minimum -1\)"),
        ("y_2d", (X, np.eye(2)[y]), {}, DataError, "1-D array of integer class indices"),
        ("y_fraction", (X, y + 0.5), {}, DataError, "must hold integer class indices"),
        (
            "val_width",
            (X, y, Xv[:, :5], yv),
            {},
            DataError,
            r"X_val must have the feature width of X_train \(32\). Received: shape \(100, 5\)",
        ),
        (
            "val_label",
            (X, y, Xv, np.where(yv == 1, 2, yv)),
            {},
            DataError,
            r"y_val labels must lie in \[0, 2\) .* Received: labels \[2\].*n_classes=",
        ),
        ("val_alone", (X, y, Xv), {}, ConfigError, "X_val and y_val go together"),
        (
            "n_classes",
            (X, y),
            {"n_classes": 1},
            ConfigError,
            r"n_classes must exceed the largest label in y_train \(1\)",
        ),
        ("empty", (X[:0], y[:0]), {}, DataError, "at least one example"),
    ]


@pytest.mark.parametrize("name", ["logistic", "dense"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_fit_validates_inputs(name, case):
    _, args, kwargs, error, message = case
    head = create_head(name, C=1.0) if name == "logistic" else create_head(name)
    with pytest.raises(error, match=message):
        head.fit(*args, **kwargs)
    assert not hasattr(head, "params_")


def test_fit_accepts_float64_features_and_integral_float_labels():
    X, y = DATA[2]["train"]
    head = LogisticHead(C=1.0).fit(X.astype(np.float64), y.astype(np.float64))
    assert head.predict(X).dtype == np.int64


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("logistic", {"C": -1.0}, r"The 'C' parameter must be a number in \(0, inf\). Received: C=-1.0"),
        ("logistic", {"Cs": []}, "The 'Cs' parameter must be a non-empty sequence"),
        ("logistic", {"class_weight": "auto"}, r"class_weight must be one of \[None, 'balanced'\]"),
        ("logistic", {"max_iter": 0}, "The 'max_iter' parameter must be an integer"),
        ("dense", {"dropout": 1.0}, r"The 'dropout' parameter must be a number in \[0, 1\)"),
        ("dense", {"hidden": 2.5}, "The 'hidden' parameter must be an integer"),
        ("dense", {"learning_rate": 0}, "The 'learning_rate' parameter"),
    ],
)
def test_fit_validates_hyperparameters(name, params, message):
    X, y = DATA[2]["train"]
    with pytest.raises(ConfigError, match=message):
        create_head(name, **params).fit(X, y)
