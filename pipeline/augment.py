"""The random augmentation layers shared by fine-tuning and the cached augmented views.

One definition, so a view stored by stage 1 is drawn from the same distribution as
the images stage 3 trains on. Layers act only when called with `training=True`;
at inference they pass images through, which is why they can stay inside an
exported model.
"""

from __future__ import annotations

from pipeline.config import AugmentConfig


def augmentation_layers(config: AugmentConfig, *, seed: int):
    """A `keras.Sequential` named "augmentation": (N, S, S, 3) float 0-255 -> same shape.

    Each layer gets its own seed derived from `seed`, so a run is reproducible and
    two layers never draw the same numbers. With every factor off it is an identity.
    """
    import keras

    layers = []
    if config.flip != "none":
        layers.append(keras.layers.RandomFlip(config.flip, seed=seed, name="flip"))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation, seed=seed + 1, name="rotation"))
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, seed=seed + 2, name="zoom"))
    if config.translation:
        layers.append(keras.layers.RandomTranslation(
            config.translation, config.translation, seed=seed + 3, name="translation"))
    if config.contrast:
        # value_range matches the raw 0-255 pixels the backbone's preprocessing expects.
        layers.append(keras.layers.RandomContrast(
            config.contrast, value_range=(0, 255), seed=seed + 4, name="contrast"))
    if not layers:
        layers.append(keras.layers.Identity(name="identity"))
    return keras.Sequential(layers, name="augmentation")
