"""Backbone registry: named keras.applications constructors and how to feed them.

Each `BackboneSpec` carries what a caller needs to use a backbone without knowing
its Keras module: the constructor, the preprocessing its ImageNet weights expect,
its native and minimal input sizes and the width of its pooled features.
`build_extractor` turns a spec into the one backbone contract of this project:

    images (N, S, S, 3) float32, raw 0-255  ->  features (N, feature_dim) float32

with the preprocessing inside the model, so a saved or exported model takes raw
images. The registry is the only module-level state; nothing is built at import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import types
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import keras
import numpy as np

from pipeline.errors import ConfigError, WeightsUnavailableError

logger = logging.getLogger(__name__)

PREPROCESSING_MODES = ("tf", "caffe", "torch", "none")
POOLINGS = ("avg", "max")

# Constants of keras.applications.imagenet_utils.preprocess_input.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

_HASH_BLOCK_BYTES = 1 << 20
_URL_FETCH_FAILURE = re.compile(r"URL fetch failure on (\S+?): ")


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone.

    `preprocessing` is the `Preprocess` mode its ImageNet weights were trained
    with ("none" when the model rescales raw pixels itself); `feature_dim` is the
    channel count of its last feature map, hence the width of pooled features;
    `min_size` is the smallest square input the architecture accepts.
    """

    name: str
    family: str
    builder: Callable[..., keras.Model]
    preprocessing: str
    default_size: int
    feature_dim: int
    min_size: int = 32
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretrained: bool = True


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds `spec` to the registry; a name can be registered once only."""
    if not isinstance(spec, BackboneSpec):
        raise ConfigError(
            f"Expected a BackboneSpec. Received: spec of type {type(spec).__name__}."
        )
    if spec.preprocessing not in PREPROCESSING_MODES:
        raise ConfigError(
            f"Expected preprocessing to be one of {', '.join(PREPROCESSING_MODES)}. "
            f"Received: preprocessing={spec.preprocessing!r} for backbone "
            f"{spec.name!r}."
        )
    if spec.name in _REGISTRY:
        raise ConfigError(
            f"Backbone {spec.name!r} is already registered; choose another name. "
            f"Received: backbone={spec.name!r}."
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under `name`; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown backbone {name!r}. Expected one of: "
            f"{', '.join(list_backbones())}. Received: backbone={name!r}."
        ) from None


def weights_identity(weights: str | os.PathLike | None) -> str:
    """A string that changes whenever the weights do, for cache keys and metadata.

    "none" and "imagenet" stand for themselves; a file is identified by the
    sha256 of its content, so renaming it keeps cached features valid and
    replacing it invalidates them.
    """
    if weights is None:
        return "none"
    if weights == "imagenet":
        return "imagenet"
    path = _check_weights(weights)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """Maps raw 0-255 RGB pixels to what a backbone's weights expect.

    Modes follow `keras.applications.imagenet_utils.preprocess_input` for
    channels-last input: "tf" scales to [-1, 1]; "caffe" flips RGB to BGR and
    subtracts the ImageNet BGR means; "torch" scales to [0, 1] and standardizes
    with the ImageNet mean and std; "none" passes pixels through for models that
    rescale themselves. Living inside the model, it travels with saved models.
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Expected mode to be one of {', '.join(PREPROCESSING_MODES)}. "
                f"Received: mode={mode!r}."
            )
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "none":
            return x
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            x = x / 255.0
            mean, std = _TORCH_MEAN, _TORCH_STD
        else:
            x = keras.ops.flip(x, axis=-1)
            mean, std = _CAFFE_BGR_MEAN, None
        x = x + keras.ops.convert_to_tensor(-np.array(mean), dtype=x.dtype)
        if std is not None:
            x = x / keras.ops.convert_to_tensor(np.array(std), dtype=x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def build_extractor(
    spec: BackboneSpec | str,
    *,
    image_size: int,
    weights: str | os.PathLike | None,
    pooling: str = "avg",
    mixed_precision: bool = False,
) -> keras.Model:
    """Builds a frozen feature extractor: raw images in, pooled features out.

    Args:
        spec: a `BackboneSpec` or a registered name.
        image_size: side S of the square (N, S, S, 3) float32 input, 0-255 pixels.
        weights: None (random), "imagenet" (Keras's cache or download) or the path
            of a Keras .h5 weights file for this architecture without its top.
        pooling: "avg" or "max" over the last feature map.
        mixed_precision: builds under "mixed_float16"; the global dtype policy is
            restored afterwards and the output stays float32.

    Returns:
        A functional model named "<name>_extractor" with input layer "images",
        the non-trainable base model as layer "backbone" (called with
        training=False so BatchNormalization stays in inference mode even when
        fine-tuning) and output layer "pooling" of shape (N, feature_dim) float32.

    Raises:
        ConfigError: an invalid option, or one Keras rejects for this backbone.
        WeightsUnavailableError: ImageNet weights are neither cached nor
            downloadable; the message names the file and where to put it.
    """
    if not isinstance(spec, BackboneSpec):
        spec = get_backbone(spec)
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(
            f"image_size must be an integer. Received: image_size={image_size!r}."
        )
    if image_size < spec.min_size:
        raise ConfigError(
            f"Backbone {spec.name!r} needs images of at least {spec.min_size}x"
            f"{spec.min_size} pixels (native size {spec.default_size}). Received: "
            f"image_size={image_size}."
        )
    if pooling not in POOLINGS:
        raise ConfigError(
            f"Expected pooling to be one of {', '.join(POOLINGS)}. "
            f"Received: pooling={pooling!r}."
        )
    if weights is not None and weights != "imagenet":
        weights = _check_weights(weights)
    if weights == "imagenet" and not spec.pretrained:
        raise ConfigError(
            f"Backbone {spec.name!r} has no ImageNet weights; use weights=None (random "
            f"initialization) or a weights file saved from it. Received: weights={weights!r}."
        )

    previous_policy = keras.config.dtype_policy()
    try:
        if mixed_precision:
            keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input(
            shape=(image_size, image_size, 3), dtype="float32", name="images"
        )
        # float32 keeps the mean subtraction precise; the backbone casts afterwards.
        x = Preprocess(spec.preprocessing, name="preprocess", dtype="float32")(inputs)
        base = _build_base(spec, image_size=image_size, weights=weights)
        base.name = "backbone"
        base.trainable = False
        x = base(x, training=False)
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else (
            keras.layers.GlobalMaxPooling2D
        )
        # A float32 layer casts its input, so features are float32 in any policy.
        outputs = pool(name="pooling", dtype="float32")(x)
        model = keras.Model(inputs, outputs, name=f"{spec.name}_extractor")
    finally:
        keras.config.set_dtype_policy(previous_policy)
    logger.info(
        "Built %s: %dx%d px, weights=%s, pooling=%s, mixed_precision=%s, %d features",
        model.name, image_size, image_size, weights, pooling, mixed_precision,
        spec.feature_dim,
    )
    return model


def _check_weights(weights: str | os.PathLike) -> str:
    """The path of an existing weights file, or a ConfigError saying what to pass."""
    try:
        path = os.fspath(weights)
    except TypeError:
        path = None
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConfigError(
            "weights must be None, 'imagenet' or the path to an existing weights "
            f"file. Received: weights={weights!r} (no such file)."
        )
    return path


def _build_base(spec: BackboneSpec, *, image_size: int, weights: str | None):
    """Calls the spec's builder, turning Keras's failures into pipeline errors."""
    models_dir = _keras_models_dir()
    cached_before = _listdir(models_dir) if weights == "imagenet" else set()
    broken_links = {f for f in cached_before if not os.path.exists(os.path.join(models_dir, f))}
    try:
        return spec.builder(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            pooling=None,
            **spec.builder_kwargs,
        )
    except ConfigError:
        raise
    except ValueError as err:
        # e.g. NASNet or MobileNet ImageNet weights that exist for one size only.
        raise ConfigError(
            f"Keras cannot build backbone {spec.name!r} with image_size={image_size}"
            f", weights={weights!r}: {err}"
        ) from err
    except Exception as err:
        file_name = _failed_download(err)
        if weights != "imagenet" or file_name is None:
            raise
        if file_name in broken_links:
            raise WeightsUnavailableError(
                f"Cannot use ImageNet weights for {spec.name}: "
                f"{os.path.join(models_dir, file_name)} is a broken "
                "symbolic link. Point it at the weights file, or pass WEIGHTS=/path/to/that.h5."
            ) from err
        if file_name in cached_before:
            # get_file re-downloads a cached file whose hash differs from the
            # official one, and deletes it when that download fails.
            raise WeightsUnavailableError(
                f"Cannot use ImageNet weights for {spec.name}: Keras found "
                f"{file_name!r} in {models_dir}{os.sep} but its hash differs from the "
                "official file, so it deleted it and tried to download it again (no "
                "network?). Pass WEIGHTS=/path/to/that.h5 instead: a path is loaded "
                "without a hash check."
            ) from err
        raise WeightsUnavailableError(
            f"Cannot download ImageNet weights for {spec.name} (no network?). Put "
            f"{file_name!r} in {models_dir}{os.sep} or pass "
            "WEIGHTS=/path/to/that.h5."
        ) from err


def _listdir(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _failed_download(err: Exception) -> str | None:
    """The file name in keras.utils.get_file's "URL fetch failure on <url>: ..."."""
    match = _URL_FETCH_FAILURE.match(str(err))
    if match is None:
        return None
    return os.path.basename(urllib.parse.urlsplit(match.group(1)).path) or None


def _keras_models_dir() -> str:
    """The folder keras.utils.get_file caches weights in.

    Keras reads KERAS_HOME once, when it is imported, and falls back to
    /tmp/.keras when that folder is not writable; asking Keras (and mirroring
    the fallback) names the folder it really looked in.
    """
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:  # Keras moved its private accessor: use its documented rule.
        home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")


def _tiny_convnet(
    include_top: bool = True,
    weights: str | None = None,
    input_tensor=None,
    input_shape=None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str = "tiny",
) -> keras.Model:
    """A three-block convnet for tests and smoke runs, called like keras.applications.

    `weights` is None or the path of a file saved from it: fine-tuning tests use one
    as their "pretrained" backbone.

    Its initializers carry fixed seeds, so every build has identical weights
    without touching the global random state. It has BatchNormalization layers
    so fine-tuning code paths meet them as they would in a real backbone.
    """
    if weights == "imagenet":
        raise ConfigError(
            "Backbone 'tiny' has no ImageNet weights; use weights=None or a weights file "
            f"saved from it. Received: weights={weights!r}."
        )
    if input_tensor is None:
        inputs = keras.Input(shape=input_shape or (None, None, 3))
    else:
        inputs = input_tensor
    x = inputs
    for block, filters in enumerate((16, 32, 32), start=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=block),
            name=f"block{block}_conv",
        )(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=0),
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        # A file saved from tiny (`save_weights`), like keras.applications' weights=path.
        model.load_weights(weights)
    return model


def _register_all() -> None:
    """The built-in registry; dims and modes as in keras.applications' own tests."""
    apps = keras.applications
    table = [
        # name, family, builder, preprocessing, default_size, feature_dim, min_size,
        # builder_kwargs
        ("mobilenet", "MobileNet", apps.MobileNet, "tf", 224, 1024, 32, {"alpha": 1.0}),
        ("mobilenet_075", "MobileNet", apps.MobileNet, "tf", 224, 768, 32,
         {"alpha": 0.75}),
        ("mobilenet_v2", "MobileNetV2", apps.MobileNetV2, "tf", 224, 1280, 32, {}),
        # With include_top=False MobileNetV3 ends at its last conv (576 / 960);
        # the 1024 / 1280 "last point" conv belongs to the classification top.
        ("mobilenet_v3_small", "MobileNetV3", apps.MobileNetV3Small, "none", 224, 576,
         32, {"include_preprocessing": True}),
        ("mobilenet_v3_large", "MobileNetV3", apps.MobileNetV3Large, "none", 224, 960,
         32, {"include_preprocessing": True}),
        ("xception", "Xception", apps.Xception, "tf", 299, 2048, 71, {}),
        ("inception_v3", "InceptionV3", apps.InceptionV3, "tf", 299, 2048, 75, {}),
        ("inception_resnet_v2", "InceptionResNetV2", apps.InceptionResNetV2, "tf", 299,
         1536, 75, {}),
        ("resnet50", "ResNet", apps.ResNet50, "caffe", 224, 2048, 32, {}),
        ("resnet101", "ResNet", apps.ResNet101, "caffe", 224, 2048, 32, {}),
        ("resnet152", "ResNet", apps.ResNet152, "caffe", 224, 2048, 32, {}),
        ("resnet50_v2", "ResNetV2", apps.ResNet50V2, "tf", 224, 2048, 32, {}),
        ("resnet101_v2", "ResNetV2", apps.ResNet101V2, "tf", 224, 2048, 32, {}),
        ("resnet152_v2", "ResNetV2", apps.ResNet152V2, "tf", 224, 2048, 32, {}),
        ("densenet121", "DenseNet", apps.DenseNet121, "torch", 224, 1024, 32, {}),
        ("densenet169", "DenseNet", apps.DenseNet169, "torch", 224, 1664, 32, {}),
        ("densenet201", "DenseNet", apps.DenseNet201, "torch", 224, 1920, 32, {}),
        ("vgg16", "VGG", apps.VGG16, "caffe", 224, 512, 32, {}),
        ("vgg19", "VGG", apps.VGG19, "caffe", 224, 512, 32, {}),
        ("nasnet_mobile", "NASNet", apps.NASNetMobile, "tf", 224, 1056, 32, {}),
    ]
    efficientnets = [
        (apps.EfficientNetB0, 224, 1280),
        (apps.EfficientNetB1, 240, 1280),
        (apps.EfficientNetB2, 260, 1408),
        (apps.EfficientNetB3, 300, 1536),
        (apps.EfficientNetB4, 380, 1792),
        (apps.EfficientNetB5, 456, 2048),
        (apps.EfficientNetB6, 528, 2304),
        (apps.EfficientNetB7, 600, 2560),
    ]
    for index, (builder, size, dim) in enumerate(efficientnets):
        # EfficientNet always rescales and normalizes inside the model.
        table.append((f"efficientnet_b{index}", "EfficientNet", builder, "none", size,
                      dim, 32, {}))
    efficientnets_v2 = [
        ("b0", apps.EfficientNetV2B0, 224, 1280),
        ("b1", apps.EfficientNetV2B1, 240, 1280),
        ("b2", apps.EfficientNetV2B2, 260, 1408),
        ("b3", apps.EfficientNetV2B3, 300, 1536),
        ("s", apps.EfficientNetV2S, 384, 1280),
        ("m", apps.EfficientNetV2M, 480, 1280),
        ("l", apps.EfficientNetV2L, 480, 1280),
    ]
    for variant, builder, size, dim in efficientnets_v2:
        table.append((f"efficientnet_v2_{variant}", "EfficientNetV2", builder, "none",
                      size, dim, 32, {"include_preprocessing": True}))
    convnexts = [
        ("tiny", apps.ConvNeXtTiny, 768),
        ("small", apps.ConvNeXtSmall, 768),
        ("base", apps.ConvNeXtBase, 1024),
        ("large", apps.ConvNeXtLarge, 1536),
        ("xlarge", apps.ConvNeXtXLarge, 2048),
    ]
    for variant, builder, dim in convnexts:
        table.append((f"convnext_{variant}", "ConvNeXt", builder, "none", 224, dim, 32,
                      {"include_preprocessing": True}))
    for name, family, builder, mode, size, dim, min_size, kwargs in table:
        register_backbone(
            BackboneSpec(
                name=name,
                family=family,
                builder=builder,
                preprocessing=mode,
                default_size=size,
                feature_dim=dim,
                min_size=min_size,
                builder_kwargs=types.MappingProxyType(kwargs),
            )
        )
    register_backbone(
        BackboneSpec(
            name="tiny",
            family="Tiny",
            builder=_tiny_convnet,
            preprocessing="tf",
            default_size=32,
            feature_dim=32,
            min_size=16,
            pretrained=False,  # no ImageNet weights; a file saved from it loads
        )
    )


_register_all()
