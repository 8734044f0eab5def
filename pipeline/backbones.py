"""Backbone registry: named keras.applications constructors and how to feed them.

Each `BackboneSpec` carries what a caller needs to use a backbone without knowing
its Keras module: the constructor, the preprocessing its ImageNet weights expect,
its native and minimal input sizes and the width of its pooled features.
`build_extractor` (in `pipeline.extractor`, also reachable from here) turns a spec
into the one backbone contract of this project:

    images (N, S, S, 3) float32, raw 0-255  ->  features (N, feature_dim) float32

with the preprocessing inside the model, so a saved or exported model takes raw
images. The registry is the only module-level state; nothing is built at import,
and Keras is not imported here: a spec names its keras.applications constructor and
resolves it when a model is built.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

PREPROCESSING_MODES = ("tf", "caffe", "torch", "none")

_HASH_BLOCK_BYTES = 1 << 20
#: Names the Keras side of this contract (`pipeline.extractor`) provides here too, loaded
#: on first use so that the registry itself never imports Keras.
_MODEL_NAMES = frozenset({"Preprocess", "build_extractor"})


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("pipeline.extractor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone.

    `preprocessing` is the `Preprocess` mode its ImageNet weights were trained
    with ("none" when the model rescales raw pixels itself); `feature_dim` is the
    channel count of its last feature map, hence the width of pooled features;
    `min_size` is the smallest square input the architecture accepts. `builder` is a
    constructor called like keras.applications', or the name of one in
    `keras.applications` (resolved by `resolve_builder`, so the registry needs no Keras).
    """

    name: str
    family: str
    builder: Callable[..., keras.Model] | str
    preprocessing: str
    default_size: int
    feature_dim: int
    min_size: int = 32
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretrained: bool = True

    def resolve_builder(self) -> Callable[..., keras.Model]:
        """The constructor itself; importing Keras if the spec names one of keras.applications."""
        if callable(self.builder):
            return self.builder
        import keras

        return getattr(keras.applications, self.builder)


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
    import keras

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
    table = [
        # name, family, builder, preprocessing, default_size, feature_dim, min_size,
        # builder_kwargs
        ("mobilenet", "MobileNet", "MobileNet", "tf", 224, 1024, 32, {"alpha": 1.0}),
        ("mobilenet_075", "MobileNet", "MobileNet", "tf", 224, 768, 32,
         {"alpha": 0.75}),
        ("mobilenet_v2", "MobileNetV2", "MobileNetV2", "tf", 224, 1280, 32, {}),
        # With include_top=False MobileNetV3 ends at its last conv (576 / 960);
        # the 1024 / 1280 "last point" conv belongs to the classification top.
        ("mobilenet_v3_small", "MobileNetV3", "MobileNetV3Small", "none", 224, 576,
         32, {"include_preprocessing": True}),
        ("mobilenet_v3_large", "MobileNetV3", "MobileNetV3Large", "none", 224, 960,
         32, {"include_preprocessing": True}),
        ("xception", "Xception", "Xception", "tf", 299, 2048, 71, {}),
        ("inception_v3", "InceptionV3", "InceptionV3", "tf", 299, 2048, 75, {}),
        ("inception_resnet_v2", "InceptionResNetV2", "InceptionResNetV2", "tf", 299,
         1536, 75, {}),
        ("resnet50", "ResNet", "ResNet50", "caffe", 224, 2048, 32, {}),
        ("resnet101", "ResNet", "ResNet101", "caffe", 224, 2048, 32, {}),
        ("resnet152", "ResNet", "ResNet152", "caffe", 224, 2048, 32, {}),
        ("resnet50_v2", "ResNetV2", "ResNet50V2", "tf", 224, 2048, 32, {}),
        ("resnet101_v2", "ResNetV2", "ResNet101V2", "tf", 224, 2048, 32, {}),
        ("resnet152_v2", "ResNetV2", "ResNet152V2", "tf", 224, 2048, 32, {}),
        ("densenet121", "DenseNet", "DenseNet121", "torch", 224, 1024, 32, {}),
        ("densenet169", "DenseNet", "DenseNet169", "torch", 224, 1664, 32, {}),
        ("densenet201", "DenseNet", "DenseNet201", "torch", 224, 1920, 32, {}),
        ("vgg16", "VGG", "VGG16", "caffe", 224, 512, 32, {}),
        ("vgg19", "VGG", "VGG19", "caffe", 224, 512, 32, {}),
        ("nasnet_mobile", "NASNet", "NASNetMobile", "tf", 224, 1056, 32, {}),
    ]
    efficientnets = [
        ("EfficientNetB0", 224, 1280),
        ("EfficientNetB1", 240, 1280),
        ("EfficientNetB2", 260, 1408),
        ("EfficientNetB3", 300, 1536),
        ("EfficientNetB4", 380, 1792),
        ("EfficientNetB5", 456, 2048),
        ("EfficientNetB6", 528, 2304),
        ("EfficientNetB7", 600, 2560),
    ]
    for index, (builder, size, dim) in enumerate(efficientnets):
        # EfficientNet always rescales and normalizes inside the model.
        table.append((f"efficientnet_b{index}", "EfficientNet", builder, "none", size,
                      dim, 32, {}))
    efficientnets_v2 = [
        ("b0", "EfficientNetV2B0", 224, 1280),
        ("b1", "EfficientNetV2B1", 240, 1280),
        ("b2", "EfficientNetV2B2", 260, 1408),
        ("b3", "EfficientNetV2B3", 300, 1536),
        ("s", "EfficientNetV2S", 384, 1280),
        ("m", "EfficientNetV2M", 480, 1280),
        ("l", "EfficientNetV2L", 480, 1280),
    ]
    for variant, builder, size, dim in efficientnets_v2:
        table.append((f"efficientnet_v2_{variant}", "EfficientNetV2", builder, "none",
                      size, dim, 32, {"include_preprocessing": True}))
    convnexts = [
        ("tiny", "ConvNeXtTiny", 768),
        ("small", "ConvNeXtSmall", 768),
        ("base", "ConvNeXtBase", 1024),
        ("large", "ConvNeXtLarge", 1536),
        ("xlarge", "ConvNeXtXLarge", 2048),
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
