"""Typed, validated configuration: the one place option values are checked.

Configuration flows one way: Make variables -> CLI flags -> these frozen dataclasses ->
plain arguments. `to_dict` is what gets written into every artifact; `from_dict`
rebuilds a config from it and rejects unknown keys, so a stored config can never be
read as something it was not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import ConfigError

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_TFDS_SPLITS = {
    "train": "train[:40%]",
    "validation": "train[40%:50%]",
    "test": "train[50%:60%]",
}
POOLINGS = ("avg", "max")
DTYPES = ("float32", "float16")


def _check_fraction(name: str, value: float, *, upper: float = 1.0) -> None:
    if not 0.0 <= value < upper:
        raise ConfigError(
            f"{name} must be a fraction in [0, {upper}). Received: {name}={value!r}."
        )


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split.

    Exactly one of `dataset` (a tensorflow-datasets name, split by `splits` slicing
    specs) and `data_dir` (a folder with one sub-folder per class) is set. A folder
    that has `train/` and `validation/` (and optionally `test/`) sub-folders is used
    as already split; otherwise `val_fraction` and `test_fraction` carve stratified,
    seeded splits out of it. `test_from_validation` moves that fraction of the
    validation split to test, as the TensorFlow tutorial does (0.2).
    """

    dataset: str | None = "cats_vs_dogs"
    data_dir: str | None = None
    tfds_dir: str | None = None
    download: bool = True
    splits: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TFDS_SPLITS))
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    test_from_validation: float = 0.0

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.data_dir is None):
            raise ConfigError(
                "Expected exactly one data source: a tfds name (DATASET) or an image "
                f"folder (DATA_DIR). Received: dataset={self.dataset!r}, "
                f"data_dir={self.data_dir!r}."
            )
        object.__setattr__(self, "splits", dict(self.splits))
        unknown = sorted(set(self.splits) - set(SPLIT_NAMES))
        if unknown or "train" not in self.splits:
            raise ConfigError(
                f"Expected split names among {', '.join(SPLIT_NAMES)} including "
                f"'train'. Received: splits={self.splits!r}."
            )
        _check_fraction("val_fraction", self.val_fraction)
        _check_fraction("test_fraction", self.test_fraction)
        _check_fraction("test_from_validation", self.test_from_validation)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "val_fraction + test_fraction must leave examples for training. "
                f"Received: {self.val_fraction} + {self.test_fraction}."
            )

    @property
    def name(self) -> str:
        """A short, file-name-safe name of the dataset."""
        raw = self.dataset if self.dataset is not None else Path(self.data_dir).resolve().name
        return slugify(raw)


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything that stage 1 needs; the fields that change the output form the key.

    `image_size=None` means the backbone's native size and is resolved by
    `resolved(...)` before use, so stored configs always hold the real size.
    """

    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    image_size: int | None = None
    pooling: str = "avg"
    dtype: str = "float32"
    batch_size: int = 32
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    strict: bool = False
    mixed_precision: bool = False
    output_dir: str = "features"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"pooling must be one of {', '.join(POOLINGS)}. Received: pooling={self.pooling!r}."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"dtype must be one of {', '.join(DTYPES)}. Received: dtype={self.dtype!r}."
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1. Received: batch_size={self.batch_size}.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be positive. Received: image_size={self.image_size}.")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                "Expected 0 <= shard < num_shards. Received: "
                f"shard={self.shard_index}, num_shards={self.num_shards}."
            )
        if self.weights.lower() == "none":
            object.__setattr__(self, "weights", "none")

    @property
    def weights_arg(self) -> str | None:
        """The value for keras.applications' `weights` argument."""
        return None if self.weights == "none" else self.weights

    def resolved(self, default_size: int) -> FeaturesConfig:
        """Returns a copy with `image_size` set (the backbone's native size if unset)."""
        return dataclasses.replace(self, image_size=self.image_size or default_size)

    def key(self, *, data_fingerprint: str, weights_identity: str) -> dict[str, Any]:
        """The facts that determine the features; files with different keys never mix.

        Batch size, strictness and output folder are left out: they change how the
        work is done, not what it computes.
        """
        if self.image_size is None:
            raise ConfigError("image_size must be resolved before computing the cache key.")
        data = self.data
        return {
            "dataset": data.dataset if data.dataset is not None else data.name,
            "source": "tfds" if data.dataset is not None else "folder",
            "data_fingerprint": data_fingerprint,
            "splits": data.splits if data.dataset is not None else None,
            "val_fraction": data.val_fraction if data.data_dir is not None else None,
            "test_fraction": data.test_fraction if data.data_dir is not None else None,
            "test_from_validation": data.test_from_validation,
            "seed": self.seed,
            "backbone": self.backbone,
            "weights": weights_identity,
            "image_size": self.image_size,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "mixed_precision": self.mixed_precision,
            "shard": [self.shard_index, self.num_shards],
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeaturesConfig:
        raw = dict(raw)
        data = _build(DataConfig, raw.pop("data", {}), "data")
        return _build(cls, {**raw, "data": data}, "features")


def _build(cls: type, raw: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"Unknown {where} config keys: {', '.join(unknown)}. Expected a subset of: "
            f"{', '.join(sorted(names))}."
        )
    return cls(**raw)


def slugify(text: str) -> str:
    """Makes `text` safe as one part of a file name ('cats_vs_dogs:4.0.1' -> 'cats_vs_dogs-4.0.1')."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")
    return slug or "data"


def key_digest(key: Mapping[str, Any]) -> str:
    """A short, stable hash of a key, for file names."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def feature_file_name(config: FeaturesConfig, key: Mapping[str, Any]) -> str:
    """'<dataset>__<backbone>__<weights>__<size>px__<pooling>[__f16]__<hash>[__shard-I-of-N].h5'.

    The readable parts let people find their file; the hash covers everything else in
    the key (split specs, seed, the weights file's digest, ...).
    """
    weights = config.weights if config.weights in ("imagenet", "none") else "file"
    parts = [config.data.name, config.backbone, weights, f"{config.image_size}px", config.pooling]
    if config.dtype == "float16":
        parts.append("f16")
    if config.mixed_precision:
        parts.append("mp")
    parts.append(key_digest({k: v for k, v in key.items() if k != "shard"}))
    if config.num_shards > 1:
        parts.append(f"shard-{config.shard_index}-of-{config.num_shards}")
    return "__".join(parts) + ".h5"


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, name: str = "size") -> int:
    """'2GB' -> 2_000_000_000 bytes, '512MiB' -> 536_870_912, '1e9' -> 1_000_000_000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{name} must be a positive size such as 2GB, 512MB or 1.5GiB. Received: {name}={text!r}."
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")


@dataclass(frozen=True)
class AugmentConfig:
    """The random augmentation of stage 3 and of the cached augmented views.

    Factors mean what they mean for `keras.layers.Random*`: `rotation` is a fraction
    of a full turn (0.1 = up to +-36 degrees), `zoom` and `translation` fractions of
    the image side, `contrast` the contrast factor. 0 (or flip "none") turns a layer
    off. The default is the TensorFlow tutorial's: horizontal flip, rotation 0.1.
    """

    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.0
    contrast: float = 0.0
    translation: float = 0.0

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise ConfigError(f"flip must be one of {', '.join(FLIPS)}. Received: flip={self.flip!r}.")
        for name in ("rotation", "zoom", "contrast", "translation"):
            _check_fraction(name, getattr(self, name))

    @property
    def is_identity(self) -> bool:
        return self.flip == "none" and not (self.rotation or self.zoom or self.contrast or self.translation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AugmentConfig:
        return _build(cls, raw, "augment")


#: A view's random draws are seeded by the example's position times this stride plus
#: the draw number, so positions must stay below (2**31 - 2) / VIEW_DRAW_STRIDE (TF's
#: stateless seeds are int32); 16 covers the at most 7 draws of the augmentation layers.
VIEW_DRAW_STRIDE = 16
MAX_VIEW_POSITION = (2**31 - 2) // VIEW_DRAW_STRIDE


@dataclass(frozen=True)
class ViewsConfig:
    """Augmented views of the train split cached beside its plain features (stage 1).

    `num_views` views of every train image, each the backbone's features of the image
    after `augment` (the layers of `pipeline.augment`, shared with stage 3). View `v`
    of the example at position `p` depends only on (`seed`, `v`, `p`), never on batch
    size, shards or interruptions. Views are not part of the features' key: adding
    them to a finished file keeps its plain features, and `num_views` may grow later
    with the same `augment` and `seed` (the first views stay as they are).
    """

    num_views: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        if self.num_views < 0:
            raise ConfigError(f"num_views must be >= 0. Received: num_views={self.num_views} (AUG_VIEWS).")
        if self.num_views and self.augment.is_identity:
            raise ConfigError(
                "Augmented views need at least one augmentation, but every AUG_* setting is off "
                f"(Received: augment={self.augment.to_dict()}). Set e.g. AUG_FLIP=horizontal, or AUG_VIEWS=0."
            )

    def identity(self) -> dict[str, Any]:
        """What must match for stored views to be reused or extended: augmentation and seed."""
        return {"augment": self.augment.to_dict(), "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ViewsConfig:
        return _build(cls, raw, "views")


HEAD_NAMES = ("logistic", "dense")


@dataclass(frozen=True)
class HeadConfig:
    """Stage 2: which head to train on cached features, and how.

    `C=None` lets the logistic head choose C on the validation split. The dense head
    stops early on validation loss and keeps its best epoch.

    `views` is how many of the file's augmented train views to train on (the first
    ones): `None` means all of them for the dense head and none for the logistic one
    (its sweep over C would pay for every stacked row), 0 turns them off.
    `train_per_class` trains on a seeded, stratified subset of the train split with
    that many examples per class (few-shot runs); validation and test stay whole.
    `memory_budget` ("2GB", "512MiB"; None: a quarter of this machine's RAM) bounds the
    memory the train rows may take: past it the dense head streams them from the
    file and the logistic head refuses (see `pipeline.train`).
    """

    head: str = "logistic"
    C: float | None = None
    hidden: int = 0
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 5
    class_weight: str | None = None
    seed: int = 0
    runs_dir: str = "runs"
    grid_images: int = 16
    views: int | None = None
    train_per_class: int | None = None
    memory_budget: str | None = None

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "MEMORY_BUDGET")
        if self.head not in HEAD_NAMES:
            raise ConfigError(
                f"Unknown head {self.head!r}. Expected one of: {', '.join(HEAD_NAMES)}. "
                f"Received: head={self.head!r}."
            )
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(
                f"class_weight must be 'balanced' or unset. Received: class_weight={self.class_weight!r}."
            )
        if self.grid_images < 0:
            raise ConfigError(f"grid_images must be >= 0. Received: grid_images={self.grid_images}.")
        if self.views is not None and self.views < 0:
            raise ConfigError(f"views must be >= 0 or unset. Received: views={self.views} (VIEWS).")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError(
                f"train_per_class must be >= 1 or unset. Received: train_per_class={self.train_per_class} "
                "(TRAIN_PER_CLASS)."
            )

    def views_used(self, available: int) -> int:
        """The number of views to train on, given the file's `available` views.

        Asking for more views than the file has, or for views of a file without any,
        is an error rather than a silent fallback to fewer.
        """
        if self.views is None:
            return available if self.head == "dense" else 0
        if self.views > available:
            have = f"only {available}" if available else "no"
            raise ConfigError(
                f"Asked to train on {self.views} augmented views, but the feature file has {have} views. "
                f"Run `make features AUG_VIEWS={self.views}` (same AUG_* settings) first, or lower VIEWS."
            )
        return self.views

    def head_params(self) -> dict[str, Any]:
        """The constructor arguments of the chosen head."""
        if self.head == "logistic":
            return {"C": self.C, "class_weight": self.class_weight, "seed": self.seed}
        return {
            "hidden": self.hidden, "dropout": self.dropout, "epochs": self.epochs,
            "batch_size": self.batch_size, "learning_rate": self.learning_rate,
            "patience": self.patience, "class_weight": self.class_weight, "seed": self.seed,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> HeadConfig:
        return _build(cls, raw, "head")


OPTIMIZERS = ("adam", "rmsprop", "sgd")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3: end-to-end fine-tuning, warm-started from a stage-2 head.

    `fine_tune_at` says where the trainable top of the backbone begins: a layer index
    (the TensorFlow tutorial unfreezes MobileNetV2 from layer 100), a layer name or
    name prefix, `blocks:N` for the top N blocks, or `all`. BatchNormalization layers
    stay frozen everywhere.

    `head_epochs > 0` trains a fresh head on images with the backbone frozen first
    (the tutorials' first phase) instead of starting from the stage-2 head;
    `from_scratch` trains everything from random weights (`weights=none`), the
    control row of `make compare`. `learning_rate=None` follows the seeds: Adam at
    1e-5 (Keras guide), otherwise a tenth of the head's rate (TensorFlow tutorial).
    """

    fine_tune_at: str = "100"
    epochs: int = 10
    head_epochs: int = 0
    optimizer: str = "adam"
    learning_rate: float | None = None
    head_learning_rate: float = 1e-3
    batch_size: int = 32
    patience: int = 3
    dropout: float = 0.2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    from_scratch: bool = False
    mixed_precision: bool = False
    seed: int = 0
    runs_dir: str = "runs"
    grid_images: int = 16

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}. Received: optimizer={self.optimizer!r}."
            )
        for name in ("epochs", "head_epochs", "patience", "grid_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0. Received: {name}={getattr(self, name)}.")
        if self.epochs + self.head_epochs == 0:
            raise ConfigError("Nothing to train: epochs and head_epochs are both 0.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1. Received: batch_size={self.batch_size}.")
        for name in ("learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0. Received: {name}={value}.")
        _check_fraction("dropout", self.dropout)
        if not str(self.fine_tune_at).strip():
            raise ConfigError("fine_tune_at must not be empty: a layer index, a layer name, blocks:N or all.")
        object.__setattr__(self, "fine_tune_at", str(self.fine_tune_at).strip())
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))

    @property
    def resolved_learning_rate(self) -> float:
        """The fine-tuning rate: as given, else the seeds' defaults (see the class docstring)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-5 if self.optimizer == "adam" else self.head_learning_rate / 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FinetuneConfig:
        return _build(cls, raw, "finetune")


ENGINE_NAMES = ("local", "ray")
#: Images per unit of work of a distributed run: small enough that a lost worker costs
#: seconds, large enough that scheduling costs nothing next to the forward passes.
DEFAULT_SHARD_SIZE = 1000


@dataclass(frozen=True)
class EngineConfig:
    """How stage 1 runs, never what it computes: none of it enters the key or the file.

    `name` "local" runs in this process; "ray" splits every split into contiguous
    shards of `shard_size` images and runs them on `workers` Ray actors, started on a
    local cluster or on the one at `address`. `workers=None` means one per GPU of the
    cluster (one on a cluster without GPUs) and `gpus_per_worker=None` means 1 on a
    cluster with GPUs, else 0. A shard is tried `max_attempts` times before the run
    fails naming it.
    """

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.name not in ENGINE_NAMES:
            raise ConfigError(
                f"engine must be one of {', '.join(ENGINE_NAMES)}. Received: ENGINE={self.name!r}."
            )
        if self.name == "local":
            given = [f"{n}={v!r}" for n, v in (("WORKERS", self.workers), ("GPUS_PER_WORKER", self.gpus_per_worker),
                                               ("RAY_ADDRESS", self.address)) if v is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} configure(s) ENGINE=ray, but the engine is local (one process). "
                    "Set ENGINE=ray, or drop the setting."
                )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1. Received: WORKERS={self.workers}.")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0. Received: GPUS_PER_WORKER={self.gpus_per_worker}.")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1. Received: shard_size={self.shard_size}.")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1. Received: max_attempts={self.max_attempts}.")
