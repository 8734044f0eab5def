"""`tiny`: a three-block convnet that builds in milliseconds, the backbone of tests and smoke runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import keras


def tiny_convnet(
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
