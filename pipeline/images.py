"""Image decoding shared by every stage: encoded bytes -> upright RGB pixels.

Extraction, augmented views, fine-tuning, the predictions grid and `make predict`
all decode here, so a model sees the same pixels in training and in use.

Phone cameras store JPEG pixels in sensor orientation plus an EXIF orientation tag
(0x0112, values 2-8) saying how to turn them upright; `tf.io.decode_image` ignores
the tag, so without this module a portrait photo reaches the backbone sideways.
The tag is read inside the graph (no `py_function`, so tf.data keeps decoding in
parallel) and applied with a transpose and a strided slice before resizing. Every
doubt reads as orientation 1 (as stored): a PNG, an untagged JPEG or corrupt EXIF
bytes decode exactly as before, and odd bytes never raise.

Cost is counted in ops: in a tf.data map each op costs about 0.7 us whatever it
does, and a `tf.cond`, `tf.switch_case` or `tf.while_loop` costs as much as all
the ops it holds, taken or not. A step-by-step walk of the JPEG segments and the
TIFF structure took about 140 ops, 15-20% of decoding and resizing a 23 kB JPEG;
one RE2 match of the layouts that cameras and editors write (`_EXIF_ORIENTATION`)
and a table look-up take about 15 ops, 3-5%.

TensorFlow is imported inside the functions: importing this module is free. Pictures for
people (`read_images`) are read with PIL where the data is an image folder.
"""

from __future__ import annotations

from dataclasses import dataclass

# Part of the features' cache key: features decoded by another decoder are not reused.
DECODER = "decode_image, EXIF orientation applied"

# The orientation's place in the first bytes of a JPEG, as one RE2 pattern (see the
# module docstring for why a match, not a walk). RE2 reads text as UTF-8: `\C`
# matches any byte, and every byte the pattern checks is below 0x80, so literals
# match bytes; SOI (FF D8) is checked apart. Matched: Exif APP1 right after SOI
# (cameras, phones) or after a plain 16-byte JFIF APP0 (editors, PIL); IFD0 right
# after the TIFF header (offset 8, as writers put it); Orientation among its first
# 24 entries (entries are sorted by tag and 0x0112 is among the lowest). Other
# layouts read as 1.
_EXIF_ORIENTATION = (
    r"^\C\C"  # SOI
    r"(?:\C\C\x00\x10JFIF\x00\C{9})?"  # a JFIF APP0 segment (16 bytes), as editors write before Exif
    r"\C\C\C\CExif\x00\x00"  # the APP1 marker, its length and the Exif header
    # TIFF header with IFD0 right after it (offset 8), then up to 24 entries before
    # Orientation (tag 0x0112, type SHORT, count 1) and its value 1-8, in either byte order.
    r"(?:II\*\x00\x08\x00\x00\x00\C\C(?:\C{12}){0,23}\x12\x01\x03\x00\x01\x00\x00\x00([\x01-\x08])\x00"
    r"|MM\x00\*\x00\x00\x00\x08\C\C(?:\C{12}){0,23}\x01\x12\x00\x03\x00\x00\x00\x01\x00([\x01-\x08]))"
    r"\C*$"
)
_HEAD_BYTES = 512  # covers the pattern's longest match (326 bytes before the trailing \C*)
# Per orientation 1-8: the axes' order, then the steps along height and width.
_TRANSPOSES = ((0, 1, 2),) * 4 + ((1, 0, 2),) * 4
_STEPS = ((1, 1, 1), (1, -1, 1), (-1, -1, 1), (-1, 1, 1)) * 2


def decode_image(image_bytes):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> (H, W, 3) uint8, upright.

    `decode_image` sniffs the format from the bytes (a PNG named .jpg works) and
    converts grayscale, RGBA, CMYK and 16-bit images to 8-bit RGB; GIFs give their
    first frame. A JPEG's EXIF orientation is then applied (H and W swap for 5-8).
    """
    import tensorflow as tf

    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return apply_orientation(image, exif_orientation(image_bytes))


#: Interpolations both `tf.image.resize` (stage 1) and `keras.layers.Resizing` (export) offer.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")


@dataclass(frozen=True)
class Resize:
    """How a decoded image becomes the backbone's `size` x `size` input.

    The default squashes to a square, bilinear without antialiasing, as
    `keras.utils.image_dataset_from_directory` does and keras.applications' weights
    expect. A keras-hub preset brings its own (`pipeline.features.hub`): DINOv2 and
    CLIP crop the largest central square and resize bicubically. The exported model
    resizes with `keras_layer()`, which computes the same pixels.
    """

    size: int
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    antialias: bool = False

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}.")

    @property
    def mode(self) -> str:
        """The resize without its size, as feature files and the cache key record it."""
        crop = "central square cropped" if self.crop_to_aspect_ratio else "aspect ratio not kept"
        return f"{self.interpolation}{', antialiased' if self.antialias else ''}, {crop}"

    @property
    def is_default(self) -> bool:
        return self.mode == Resize(self.size).mode

    def __call__(self, image):
        """An (H, W, C) image -> (size, size, C) float32."""
        import tensorflow as tf

        if self.crop_to_aspect_ratio:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            side = tf.minimum(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            image = image[top : top + side, left : left + side]
        return tf.image.resize(image, (self.size, self.size), method=self.interpolation, antialias=self.antialias)

    def keras_layer(self, name: str = "resize"):
        """The same resize as a Keras layer, for models that take images of any size."""
        import keras

        return keras.layers.Resizing(
            self.size,
            self.size,
            interpolation=self.interpolation,
            crop_to_aspect_ratio=self.crop_to_aspect_ratio,
            antialias=self.antialias,
            name=name,
        )


def decoder_identity(resize: Resize) -> str:
    """The decoder part of the model key: the default resize keeps the key it always had."""
    return DECODER if resize.is_default else f"{DECODER}; {resize.mode}"


def decode_and_resize(image_bytes, resize: Resize):
    """Encoded image bytes -> (S, S, 3) float32 in [0, 255], upright (see `decode_image`)."""
    import tensorflow as tf

    image = resize(decode_image(image_bytes))
    return tf.ensure_shape(image, (resize.size, resize.size, 3))


def tf_error_message(err: Exception) -> str:
    """The first line of a TensorFlow op error, without its `{{function_node ...}}` prefix and
    ` [Op:...]` suffix: what a user needs to know about an unreadable image."""
    message = getattr(err, "message", str(err))
    message = message.split("}}", 1)[-1].strip()
    message = message.split(" [Op:", 1)[0].strip()
    return message.splitlines()[0] if message else type(err).__name__


def apply_orientation(image, orientation):
    """Turns an (H, W, C) image stored in EXIF `orientation` (int32 1-8) upright.

    The transforms are those of PIL's `ImageOps.exif_transpose`: 2 mirror, 3 rotate
    180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise; each is a transpose (or not) then a strided slice with steps
    of +-1. Both ops hand an untouched image through without copying it, so
    orientation 1 costs two small ops, where a `tf.switch_case` would cost all of
    its branches.
    """
    import tensorflow as tf

    index = tf.cast(orientation, tf.int32) - 1
    image = tf.transpose(image, tf.gather(_TRANSPOSES, index))
    channels = image.shape[-1]
    image = tf.strided_slice(image, [0, 0, 0], [0, 0, 0], tf.gather(_STEPS, index), begin_mask=7, end_mask=7)
    image.set_shape((None, None, channels))  # static only: no op
    return image


def exif_orientation(image_bytes):
    """The EXIF orientation of encoded image bytes: an int32 scalar in 1-8.

    1 (as stored) unless the bytes are a JPEG with an Exif orientation entry in
    IFD0 laid out as cameras, phones and editors write it (`_EXIF_ORIENTATION`):
    not for other formats, untagged JPEGs, garbage EXIF, values outside 1-8, or an
    orientation that is not a SHORT. Never raises: odd bytes just do not match.
    """
    import tensorflow as tf

    head = tf.strings.substr(image_bytes, 0, _HEAD_BYTES)
    value = tf.strings.regex_replace(head, _EXIF_ORIENTATION, r"\1\2", replace_global=False)
    matched = tf.equal(tf.strings.length(value), 1) & tf.equal(tf.strings.substr(image_bytes, 0, 2), b"\xff\xd8")
    number = tf.cast(tf.reduce_max(tf.io.decode_raw(value, tf.uint8, fixed_length=1)), tf.int32)
    return tf.where(matched, number, 1)


# --- images for people to look at -------------------------------------------------------
def read_image_file(path, size: int):
    """An image file as upright uint8 RGB (H, W, 3) fitting in `size` x `size`, with PIL.

    For pictures people look at (top losses, contact sheets), not for the backbone: PIL
    needs no TensorFlow, so the logistic head's run and the audit stay quick.
    `ImageOps.exif_transpose` applies the same orientation tag as `decode_image`. A JPEG
    is decoded at the smallest DCT scale that still covers `size` (`Image.draft`).
    Raises OSError or ValueError for an unreadable file.
    """
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= size (~3x faster)
        upright = ImageOps.exif_transpose(image).convert("RGB")
    upright.thumbnail((size, size))
    return np.asarray(upright)
