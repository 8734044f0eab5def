"""The random augmentation layers shared by fine-tuning and the cached augmented views.

One definition, so a view stored by stage 1 is drawn from the same distribution as
the images stage 3 trains on. Layers act only when called with `training=True`;
at inference they pass images through, which is why they can stay inside an
exported model.
"""

from __future__ import annotations

from pipeline.config import VIEW_DRAW_STRIDE, AugmentConfig


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
        layers.append(
            keras.layers.RandomTranslation(config.translation, config.translation, seed=seed + 3, name="translation")
        )
    if config.contrast:
        # value_range matches the raw 0-255 pixels the backbone's preprocessing expects.
        layers.append(
            keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4, name="contrast")
        )
    if not layers:
        layers.append(keras.layers.Identity(name="identity"))
    return keras.Sequential(layers, name="augmentation")


def view_seed(seed: int, view: int) -> int:
    """The first half of view `view`'s stateless seeds: a hash of (seed, view) in [0, 2**31 - 2).

    TensorFlow folds larger seeds into int32 range (keras' `_cast_seed`), so staying
    below it keeps distinct views distinct.
    """
    import hashlib

    digest = hashlib.sha256(f"pipeline-views/{seed}/{view}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 2)


def example_augmenter(config: AugmentConfig, *, seed: int):
    """`augment(image, view, position)`: one image's augmented view, a pure function of its inputs.

    image: (S, S, 3) float32 in [0, 255]; view: a Python int; position: a scalar
    int64 tensor (the example's position in its split). Returns (S, S, 3) float32.

    Keras random layers draw from a stateful SeedGenerator, and one call draws for a
    whole batch at once, so their output would depend on batch composition and on
    how many batches came before: an interrupted run could never be resumed
    identically. Here every layer of `augmentation_layers(config)` is applied through
    its own `get_random_transformation(..., seed=...)` and `transform_images`, which
    is what its `call` does, but with stateless seeds `[view_seed(seed, view),
    position * VIEW_DRAW_STRIDE + k]` for the k-th random draw. The result depends
    only on (seed, view, position), so it can run inside a parallel, deterministic
    `tf.data` map, and shards, batch sizes and resumed runs all give the same views.
    """
    import keras
    import tensorflow as tf

    layers = [
        layer for layer in augmentation_layers(config, seed=seed).layers if not isinstance(layer, keras.layers.Identity)
    ]

    class _Draws(keras.random.SeedGenerator):
        """A SeedGenerator without a state variable: `next()` yields seed, seed + [0, 1], ...

        `keras.random.*` calls `next()` on a SeedGenerator passed as `seed`; the base
        class's variable would make the draws stateful, which is what this avoids.
        """

        def __init__(self, start):  # no super().__init__(): that creates the variable
            self.start = start
            self.draws = 0

        def next(self, ordered=True):
            if self.draws >= VIEW_DRAW_STRIDE:
                raise RuntimeError(f"More than {VIEW_DRAW_STRIDE} random draws per augmented image.")
            value = self.start + tf.constant([0, self.draws], tf.int64)
            self.draws += 1
            return value

    def augment(image, view: int, position):
        draws = _Draws(
            tf.stack([tf.constant(view_seed(seed, view), tf.int64), tf.cast(position, tf.int64) * VIEW_DRAW_STRIDE])
        )
        images = image[None]
        for layer in layers:
            transformation = layer.get_random_transformation(images, training=True, seed=draws)
            images = layer.transform_images(images, transformation, training=True)
        return tf.cast(images[0], tf.float32)

    return augment
