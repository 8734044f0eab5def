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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config_tools import ChooseConfig, DecisionsConfig, ReviewConfig
from pipeline.errors import ConfigError
from pipeline.options import check_choices, derived, option, parse_size

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_TFDS_SPLITS = {"train": "train[:40%]", "validation": "train[40%:50%]", "test": "train[50%:60%]"}
DEFAULT_DATASET = "cats_vs_dogs"
#: Feature maps: avg, max; tokens: cls, mean (of patch tokens), cls_mean, pooled (see pipeline.features.pooling).
POOLINGS = ("avg", "max", "cls", "mean", "cls_mean", "pooled")
DTYPES = ("float32", "float16")
#: RUNTIME: `auto`, or a runtime of `pipeline.features.runtimes.RUNTIMES` (a test keeps the two in step).
RUNTIMES = ("auto", "tensorflow", "openvino")
#: PRECISION: the arithmetic of the forward pass; bf16 computes other features, so it is in the key.
PRECISIONS = ("f32", "bf16")


def _check_fraction(name: str, value: float, *, upper: float = 1.0) -> None:
    if not 0.0 <= value < upper:
        raise ConfigError(f"{name} must be a fraction in [0, {upper}). Received: {name}={value!r}.")


def parse_splits(text: str) -> dict[str, str]:
    """'train=train[:40%],validation=train[40%:50%]' -> {'train': 'train[:40%]', ...}."""
    splits = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, spec = part.partition("=")
        if not sep or not spec or name not in SPLIT_NAMES:
            raise ValueError(
                f"expected NAME=SPEC pairs separated by commas, NAME one of {', '.join(SPLIT_NAMES)}; received {part!r}"
            )
        splits[name] = spec
    return splits


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split.

    Exactly one of `dataset` (a tensorflow-datasets name, split by `splits` slicing
    specs) and `data_dir` (a folder with one sub-folder per class) is set. Split
    sub-folders (`train/`, `validation/`, `test/` and their aliases, see
    `pipeline.features.sources.scan_folder`) are used as given; `val_fraction` and `test_fraction`
    carve the splits a folder lacks out of train as stratified, seeded splits.
    `test_from_validation` moves that fraction of the validation split to test, as
    the TensorFlow tutorial does (0.2).
    """

    dataset: str | None = option(None, f"tensorflow-datasets name (default: {DEFAULT_DATASET} unless DATA_DIR is set)")
    data_dir: str | None = option(None, "image folder: one sub-folder per class, or split folders (docs/features.md)")
    labels: str | None = option(None, "DATA_DIR's labels: a CSV of image,label rows, or name (cat.0.jpg: cat)")
    tfds_dir: str | None = option(None, "tensorflow-datasets data_dir holding prepared data")
    download: bool = option(True, "never download tfds data (fail at once offline)", name="no_download", invert=True)
    splits: Mapping[str, str] = option(
        help="tfds split specs NAME=SPEC,... with slicing (the default is the Keras guide's split)",
        parse=parse_splits,
        default_factory=lambda: dict(DEFAULT_TFDS_SPLITS),
    )
    val_fraction: float = option(0.1, "image folder without a validation folder: fraction of train carved out")
    test_fraction: float = option(0.1, "image folder without split folders: fraction carved out as test")
    test_from_validation: float = option(0.0, "move this fraction of validation to test (TF tutorial: 0.2)")

    def __post_init__(self) -> None:
        if self.dataset is None and self.data_dir is None:
            object.__setattr__(self, "dataset", DEFAULT_DATASET)
        if self.data_dir is not None and dict(self.splits) != DEFAULT_TFDS_SPLITS:
            raise ConfigError(
                "--splits slices tfds datasets; image folders use --val-fraction/--test-fraction "
                f"(VAL_FRACTION/TEST_FRACTION). Received: splits={dict(self.splits)!r}."
            )
        if self.labels is not None and self.data_dir is None:
            raise ConfigError(f"LABELS labels an image folder's images: set DATA_DIR too. Received: {self.labels!r}.")
        if (self.dataset is None) == (self.data_dir is None):
            raise ConfigError(
                "Expected exactly one data source, a tfds name (DATASET) or an image folder (DATA_DIR), "
                f"not both. Received: dataset={self.dataset!r}, data_dir={self.data_dir!r}."
            )
        object.__setattr__(self, "splits", dict(self.splits))
        unknown = sorted(set(self.splits) - set(SPLIT_NAMES))
        if unknown or "train" not in self.splits:
            raise ConfigError(
                f"Expected split names among {', '.join(SPLIT_NAMES)} with 'train'. Received: {self.splits!r}."
            )
        for name in ("val_fraction", "test_fraction", "test_from_validation"):
            _check_fraction(name, getattr(self, name))
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

    `image_size=None` means the backbone's native size and `pooling=None` its default
    pooling (the one its paper's linear probes use); `resolved(...)` sets both before
    use, so stored configs always hold the real values.
    """

    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = option("mobilenet_v2", "registry name or hub:<keras-hub preset> (`make backbones` lists them)")
    weights: str = option(
        "imagenet", "imagenet (hub: the preset's own), none, an .h5 weights file or a keras-hub preset folder"
    )
    image_size: int | None = option(None, "input size in pixels (default: the backbone's native size)")
    pooling: str | None = option(
        None,
        "avg/max (feature maps), cls/mean/cls_mean/pooled (tokens); default: the backbone's linear-probe pooling",
        choices=(None, *POOLINGS),
    )
    dtype: str = option("float32", "storage dtype of the features", choices=DTYPES)
    batch_size: int = option(32, "images per forward pass")
    seed: int = option(0, "seeds the folder splits, the views, the heads and fine-tuning")
    shard_index: int = option(
        0,
        "extract shard I of NUM_SHARDS of the missing rows into the store (a run without shards assembles)",
        name="shard",
    )
    num_shards: int = option(1, "number of shards")
    strict: bool = option(False, "fail on any unreadable image instead of skipping it")
    mixed_precision: bool = option(False, "run the backbone in float16 (GPUs)")
    runtime: str = option(
        "auto",
        "inference runtime of the backbone: auto (TensorFlow on a GPU, else the fastest CPU runtime), "
        "tensorflow, openvino",
        choices=RUNTIMES,
    )
    precision: str = option(
        "f32", "arithmetic of the forward pass: f32, or bf16 (CPUs with native bf16; own features)", choices=PRECISIONS
    )
    output_dir: str = option("features", "folder of the feature files", name="features_dir")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1. Received: batch_size={self.batch_size}.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be positive. Received: image_size={self.image_size}.")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"Expected 0 <= shard < num_shards. Received: shard={self.shard_index}, num_shards={self.num_shards}."
            )
        if self.weights.lower() == "none":
            object.__setattr__(self, "weights", "none")

    @property
    def weights_arg(self) -> str | None:
        """The value for keras.applications' `weights` argument."""
        return None if self.weights == "none" else self.weights

    def resolved(self, default_size: int, default_pooling: str = "avg") -> FeaturesConfig:
        """Returns a copy with `image_size` and `pooling` set (the backbone's defaults if unset)."""
        return dataclasses.replace(
            self, image_size=self.image_size or default_size, pooling=self.pooling or default_pooling
        )

    def key(self, *, weights_identity: str, decoder: str) -> dict[str, Any]:
        """The facts that determine a feature file: the model key plus how the data is split.

        Which images the data holds is not in it: rows are found by content in the
        store (`pipeline.features.contentstore`), and the file records the scan it was
        assembled from. Batch size, engine, strictness, output folder and the runtime are
        left out: they change how the work is done, not what it computes (an f32 runtime
        other than TensorFlow is verified against it before its first batch,
        docs/stage1-design.md).
        """
        if self.image_size is None:
            raise ConfigError("image_size must be resolved before computing the cache key.")
        data = self.data
        return {
            **(
                {"labels": data.labels if data.labels.startswith("name:") else Path(data.labels).name}
                if data.labels
                else {}
            ),
            "dataset": data.dataset if data.dataset is not None else data.name,
            "source": "tfds" if data.dataset is not None else "folder",
            "splits": data.splits if data.dataset is not None else None,
            "val_fraction": data.val_fraction if data.data_dir is not None else None,
            "test_fraction": data.test_fraction if data.data_dir is not None else None,
            "test_from_validation": data.test_from_validation,
            "seed": self.seed,
            "backbone": self.backbone,
            "weights": weights_identity,
            "image_size": self.image_size,
            "pooling": self.pooling,
            "precision": self.precision,
            "mixed_precision": self.mixed_precision,
            "decoder": decoder,
            "dtype": self.dtype,
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
            f"Unknown {where} config keys: {', '.join(unknown)}. Expected a subset of: {', '.join(sorted(names))}."
        )
    return cls(**raw)


def slugify(text: str) -> str:
    """Makes `text` safe as one part of a file name ('cats_vs_dogs:4.0.1' -> 'cats_vs_dogs-4.0.1')."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")
    return slug or "data"


def fingerprint(value: Any, *, length: int = 10) -> str:
    """A short, stable digest of a JSON-able value: the one identity helper of the pipeline.

    Feature file names, run identities, comparison rows and exclusions all use it, so
    "the same settings" means the same canonical JSON everywhere: keys sorted, tuples
    as lists, paths (`default=str`) as text.
    """
    canonical = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


#: The fields of `FeaturesConfig.key` that determine a row of features from an image's bytes.
MODEL_KEY_FIELDS = ("backbone", "weights", "image_size", "pooling", "precision", "mixed_precision", "decoder", "dtype")


def model_key(key: Mapping[str, Any]) -> dict[str, Any]:
    """The model key of a feature file's key: what a row of the content store depends on."""
    return {name: key[name] for name in MODEL_KEY_FIELDS}


def store_dir_name(key: Mapping[str, Any]) -> str:
    """'<backbone>__<size>px__<pooling>[__<precision>]__<model-key hash>': a model key's store folder."""
    parts = [key["backbone"], f"{key['image_size']}px", key["pooling"]]
    if key["precision"] != "f32":
        parts.append(key["precision"])
    return "__".join([*parts, fingerprint(model_key(key))])


def feature_file_name(config: FeaturesConfig, key: Mapping[str, Any]) -> str:
    """'<dataset>__<backbone>__<weights>__<size>px__<pooling>[__f16][__mp][__bf16]__<hash>.h5'.

    The readable parts let people find their file; the hash covers everything else in
    the key (split specs, seed, the weights file's digest, ...). The images are not in
    it: when the folder changes, the file is reassembled in place.
    """
    weights = config.weights if config.weights in ("imagenet", "none") else "file"
    parts = [config.data.name, slugify(config.backbone), weights, f"{config.image_size}px", config.pooling]
    if config.dtype == "float16":
        parts.append("f16")
    if config.mixed_precision:
        parts.append("mp")
    if config.precision != "f32":
        parts.append(config.precision)
    parts.append(fingerprint(dict(key)))
    return "__".join(parts) + ".h5"


FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")


@dataclass(frozen=True)
class AugmentConfig:
    """The random augmentation of stage 3 and of the cached augmented views.

    Factors mean what they mean for `keras.layers.Random*`: `rotation` is a fraction
    of a full turn (0.1 = up to +-36 degrees), `zoom` and `translation` fractions of
    the image side, `contrast` the contrast factor. 0 (or flip "none") turns a layer
    off. The default is the TensorFlow tutorial's: horizontal flip, rotation 0.1.
    """

    flip: str = option("horizontal", "random flips", name="aug_flip", choices=FLIPS)
    rotation: float = option(0.1, "fraction of a full turn (0.1: up to 36 degrees)", name="aug_rotation")
    zoom: float = option(0.0, "fraction of the image side", name="aug_zoom")
    contrast: float = option(0.0, "contrast factor", name="aug_contrast")
    translation: float = option(0.0, "fraction of the image side", name="aug_translation")

    def __post_init__(self) -> None:
        check_choices(self)
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

    num_views: int = option(0, "make features: also cache K augmented views of every train image", name="aug_views")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = derived("seed", 0)

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
#: The findings of `make audit` that `make head EXCLUDE=...` can leave out of training.
AUDIT_KINDS = ("duplicates", "label", "outlier")


def audit_kinds(text: str, where: str) -> str:
    """'label, duplicates' -> 'duplicates,label': validated, in `AUDIT_KINDS` order."""
    given = [k.strip() for k in str(text).split(",") if k.strip()]
    unknown = sorted(set(given) - set(AUDIT_KINDS))
    if unknown or not given:
        raise ConfigError(f"{where} must be a comma-separated subset of {','.join(AUDIT_KINDS)}. Received: {text!r}.")
    return ",".join(k for k in AUDIT_KINDS if k in given)


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
    `exclude` names an `audit.json` of `make audit` on the same feature file: the
    train rows it flags (of `exclude_kinds`, comma-separated, default all of
    `AUDIT_KINDS`) are left out; validation and test rows never are.
    `decisions`, `decisions_test` and `audit_dir` are `DecisionsConfig`'s: the
    review decisions training applies (EXCLUDE records its rows there first).
    `memory_budget` ("2GB", "512MiB"; None: a quarter of this machine's RAM) bounds the
    memory the train rows may take: past it the dense head streams them from the
    file and the logistic head refuses (see `pipeline.heads.train`).
    """

    head: str = option("logistic", "logistic (linear probe) or dense (Keras Dropout + Dense)", choices=HEAD_NAMES)
    C: float | None = option(None, "logistic head and audit probe: inverse L2 strength (default: chosen on validation)")
    hidden: int = option(0, "dense: units of an optional hidden layer")
    dropout: float = option(0.2, "dense head and fine-tuning: dropout before the last layer")
    epochs: int = option(20, "dense: at most this many epochs")
    batch_size: int = option(32, "dense: batch size", name="head_batch_size")
    learning_rate: float = option(1e-3, "dense: Adam's learning rate (fine-tuning: see FINE_TUNE_LEARNING_RATE)")
    patience: int = option(5, "dense: early stopping after this many epochs without a better validation loss")
    class_weight: str | None = option(None, "balanced: weight classes by inverse frequency", choices=(None, "balanced"))
    seed: int = derived("seed", 0)
    runs_dir: str = option("runs", "folder of the run directories")
    grid_images: int = option(16, "images in the top-losses grid (0: none)")
    views: int | None = option(
        None,
        "augmented train views to train on, the first V of the file "
        "(default: dense all of them, logistic none; 0: none)",
    )
    train_per_class: int | None = option(None, "train on a seeded, stratified subset of N train examples per class")
    exclude: str | None = option(
        None, "audit/<...>/audit.json: leave the train rows it flags out (validation/test never)"
    )
    exclude_kinds: str | None = option(
        None, "with EXCLUDE: findings to leave out, some of duplicates,label,outlier (default: all three)"
    )
    memory_budget: str | None = option(
        None,
        "memory the train rows may take (e.g. 2GB; default: a quarter of RAM): "
        "past it the dense head streams them from the file",
    )
    decisions: str | None = derived("decisions", None)
    decisions_test: bool = derived("decisions_test", False)
    audit_dir: str = derived("audit_dir", "audit")

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "MEMORY_BUDGET")
        if self.exclude_kinds is not None:
            object.__setattr__(self, "exclude_kinds", audit_kinds(self.exclude_kinds, "exclude_kinds (EXCLUDE_KINDS)"))
        if self.exclude_kinds is not None and self.exclude is None:
            raise ConfigError(
                f"exclude_kinds (EXCLUDE_KINDS) selects findings of an audit; it needs exclude "
                "(EXCLUDE=audit/.../audit.json). "
                f"Received: exclude_kinds={self.exclude_kinds!r} without exclude."
            )
        if self.exclude is not None and self.decisions == "none":
            raise ConfigError(
                "EXCLUDE records its rows as decisions, and DECISIONS=none turns decisions off. "
                f"Received: exclude={self.exclude!r}, decisions='none'. Drop one of them."
            )
        check_choices(self)
        if self.grid_images < 0:
            raise ConfigError(f"grid_images must be >= 0. Received: grid_images={self.grid_images}.")
        if self.views is not None and self.views < 0:
            raise ConfigError(f"views must be >= 0 or unset. Received: views={self.views} (VIEWS).")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError(
                f"train_per_class must be >= 1 or unset. Received: train_per_class={self.train_per_class} "
                "(TRAIN_PER_CLASS)."
            )

    def views_used(self, available: int, *, default: int) -> int:
        """The number of views to train on, given the file's `available` views.

        `default` is the head's own choice when VIEWS is unset (`Head.default_views`).
        Asking for more views than the file has, or for views of a file without any,
        is an error rather than a silent fallback to fewer.
        """
        if self.views is None:
            return default
        if self.views > available:
            have = f"only {available}" if available else "no"
            raise ConfigError(
                f"Asked to train on {self.views} augmented views, but the feature file has {have} views. "
                f"Run `make features AUG_VIEWS={self.views}` (same AUG_* settings) first, or lower VIEWS."
            )
        return self.views

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

    fine_tune_at: str = option(
        "100", "first trainable backbone layer: an index, a layer name (prefix), blocks:N or all"
    )
    epochs: int = option(10, "fine-tuning epochs", name="fine_tune_epochs")
    head_epochs: int = option(0, "N > 0: train a fresh head on images N epochs first instead of using `make head`")
    optimizer: str = option("adam", "fine-tuning optimizer", choices=OPTIMIZERS)
    learning_rate: float | None = option(
        None,
        "default: 1e-5 with adam (Keras guide), LEARNING_RATE/10 otherwise (TF tutorial)",
        name="fine_tune_learning_rate",
    )
    head_learning_rate: float = derived("learning_rate", 1e-3)
    batch_size: int = option(32, "fine-tuning batch size", name="fine_tune_batch_size")
    patience: int = option(
        3, "early stopping on validation loss, best epoch kept (0: never stop)", name="fine_tune_patience"
    )
    dropout: float = derived("dropout", 0.2)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    from_scratch: bool = option(False, "train everything from random weights (needs WEIGHTS=none)")
    mixed_precision: bool = derived("mixed_precision", False)
    seed: int = derived("seed", 0)
    runs_dir: str = derived("runs_dir", "runs")
    grid_images: int = derived("grid_images", 16)

    def __post_init__(self) -> None:
        check_choices(self)
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
    def warm_starts(self) -> bool:
        """Whether training starts from a stage-2 head (`make head`): not from scratch, no warm-up on images."""
        return not self.from_scratch and not self.head_epochs

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


@dataclass(frozen=True)
class AuditConfig:
    """`make audit`: what to look for in the cached features, and how hard.

    `C` None picks the probe's regularization once with the logistic head's validation
    sweep; `duplicate_threshold` is calibrated for MobileNetV2 (docs/audit.md). The
    neighbour graph (`audit.graph`) is exact below `exact_below` rows, else a PCA to
    `pca_dim` + IVF index probing `nprobe` lists, whose `k * rerank + 1` candidates
    per row are re-scored exactly; `recall_queries` sampled rows measure its recall@k
    against exact search in every build.
    """

    folds: int = option(5, "folds of the out-of-fold logistic probe (label errors, class overlap)")
    C: float | None = derived("C", None)
    duplicate_threshold: float = option(
        0.85, "cosine similarity from which two images are near-duplicates (calibrated, see docs/audit.md)"
    )
    neighbours: int = option(10, "k of the neighbour graph (duplicates, kNN outlier score and label vote)")
    outlier_z: float = option(3.5, "robust z-score from which an example is flagged as an outlier")
    top: int = option(16, "findings per contact sheet (0: no sheets)", name="audit_top")
    seed: int = derived("seed", 0)
    audit_dir: str = derived("audit_dir", "audit")
    block_rows: int = option(32_768, "rows per block of the streamed passes over the features", name="audit_block_rows")
    exact_below: int = option(20_000, "rows below which the neighbour graph is exact (else PCA + IVF, faiss)")
    pca_dim: int = option(256, "approximate graph: PCA width of the IVF index", name="audit_pca_dim")
    nprobe: int = option(8, "approximate graph: nearest IVF lists each list is joined with", name="audit_nprobe")
    rerank: int = option(
        2, "approximate graph: k * RERANK + 1 candidates per row re-scored exactly", name="audit_rerank"
    )
    recall_queries: int = option(1000, "sampled rows on which the graph's recall@k against exact search is measured")

    def __post_init__(self) -> None:
        checks = {
            "folds": (self.folds >= 2, ">= 2 (FOLDS)"),
            "C": (self.C is None or self.C > 0, "> 0 or unset (C)"),
            "duplicate_threshold": (0 < self.duplicate_threshold <= 1, "in (0, 1] (DUPLICATE_THRESHOLD)"),
            "neighbours": (self.neighbours >= 1, ">= 1"),
            "outlier_z": (self.outlier_z > 0, "> 0"),
            "top": (self.top >= 0, ">= 0 (AUDIT_TOP)"),
            "block_rows": (self.block_rows >= 1, ">= 1"),
            "exact_below": (self.exact_below >= 0, ">= 0 (EXACT_BELOW)"),
            "pca_dim": (self.pca_dim >= 1, ">= 1 (AUDIT_PCA_DIM)"),
            "nprobe": (self.nprobe >= 1, ">= 1 (AUDIT_NPROBE)"),
            "rerank": (self.rerank >= 1, ">= 1 (AUDIT_RERANK; PCA similarities alone inflate duplicates)"),
            "recall_queries": (self.recall_queries >= 1, ">= 1 (RECALL_QUERIES)"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"{name} must be {expected}. Received: {name}={getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    name: str = option(
        "local", "how stage 1 runs: local (this process) or ray (a Ray cluster)", name="engine", choices=ENGINE_NAMES
    )
    address: str | None = option(
        None, "ENGINE=ray: an existing cluster (default: a local one started on the spot)", name="ray_address"
    )
    workers: int | None = option(None, "ENGINE=ray: Ray actors (default: one per GPU, else one)")
    gpus_per_worker: float | None = option(None, "ENGINE=ray: GPUs per actor (default: 1 where there are GPUs)")
    shard_size: int = option(DEFAULT_SHARD_SIZE, "ENGINE=ray: images per unit of work", name="ray_shard_size")
    max_attempts: int = option(
        3, "ENGINE=ray: tries of a shard before the run fails naming it", name="ray_max_attempts"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.name == "local":
            # RAY_ADDRESS is left out: exported for a cluster, it reaches every `make features`.
            given = [
                f"{n}={v!r}"
                for n, v in (("WORKERS", self.workers), ("GPUS_PER_WORKER", self.gpus_per_worker))
                if v is not None
            ]
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


#: The option sections, by the name the CLI's argument groups and `make help` use.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "features": FeaturesConfig,
    "augment": AugmentConfig,
    "views": ViewsConfig,
    "head": HeadConfig,
    "finetune": FinetuneConfig,
    "audit": AuditConfig,
    "decisions": DecisionsConfig,
    "review": ReviewConfig,
    "engine": EngineConfig,
    "choose": ChooseConfig,
}
