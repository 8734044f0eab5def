"""Decoding: EXIF orientation applied in the graph, everything else untouched."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.config import DataConfig, FeaturesConfig
from pipeline.features.extract import extract_features, resolve
from pipeline.features.store import read_features
from pipeline.images import DECODER, Resize, decode_and_resize, decode_image, exif_orientation

T = Image.Transpose
# PIL's ImageOps.exif_transpose: the transform that turns stored pixels upright.
UPRIGHT = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_270,
    7: T.TRANSVERSE,
    8: T.ROTATE_90,
}
# Its inverse: upright pixels -> what a camera stores with that tag.
STORED = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}

_traced = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])


def orientation_of(encoded: bytes) -> int:
    """The orientation as tf.data computes it: in a traced graph (traced once)."""
    return int(_traced(tf.constant(encoded)))


def upright_image(height=64, width=48) -> np.ndarray:
    """A smooth, asymmetric picture (sides multiples of 16: little JPEG noise)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * y / height, 255 * x / width, 128 + 0 * x], -1)
    pixels[: height // 4, : width // 3] = (250, 250, 20)  # a block in the top-left corner
    return pixels.astype(np.uint8)


def tagged_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """The JPEG a phone writes: pixels in sensor orientation plus the EXIF tag."""
    image = Image.fromarray(upright)
    stored = image if orientation == 1 else image.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def turned_upright(jpeg: bytes, orientation: int) -> np.ndarray:
    """The stored pixels as TensorFlow decodes them, turned upright by PIL: the reference."""
    stored = Image.fromarray(tf.io.decode_jpeg(jpeg, channels=3).numpy())
    return np.asarray(stored if orientation == 1 else stored.transpose(UPRIGHT[orientation]))


def plain_jpeg(pixels=None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(upright_image() if pixels is None else pixels).save(buffer, "JPEG", quality=95, **save)
    return buffer.getvalue()


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding `payload` inserted right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def exif_payload(orientation: int, order: str = "<", kind: int = 3, entries_before: int = 2) -> bytes:
    """b"Exif\\0\\0" + a TIFF header in byte order `order` + IFD0 with an orientation entry."""
    mark = b"II" if order == "<" else b"MM"
    entries = [struct.pack(order + "HHI4s", 0x0100 + i, 2, 4, b"abc\0") for i in range(entries_before)]
    value = struct.pack(order + "H2x", orientation) if kind == 3 else struct.pack(order + "I", orientation)
    entries.append(struct.pack(order + "HHI", 0x0112, kind, 1) + value)
    ifd = struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", 0)
    return b"Exif\0\0" + mark + struct.pack(order + "HI", 42, 8) + ifd


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tagged_jpegs_decode_upright(orientation):
    upright = upright_image()
    jpeg = tagged_jpeg(upright, orientation)
    assert orientation_of(jpeg) == orientation
    decoded = decode_image(tf.constant(jpeg)).numpy()
    np.testing.assert_array_equal(decoded, turned_upright(jpeg, orientation))  # exactly PIL's transform
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright).mean() < 2.0  # the upright picture, up to JPEG noise
    if orientation != 1:
        stored = tf.io.decode_jpeg(jpeg, channels=3).numpy()
        assert stored.shape != upright.shape or np.abs(stored.astype(int) - upright).mean() > 20


def test_features_of_tagged_jpegs_equal_those_of_the_upright_images(tmp_path):
    """Stage 1 end to end: a tagged JPEG gives the features of its upright pixels."""
    folder = tmp_path / "photos"
    for name in ("tagged", "upright"):
        (folder / name).mkdir(parents=True)
    for orientation in range(1, 9):
        jpeg = tagged_jpeg(upright_image(), orientation)
        (folder / "tagged" / f"{orientation}.jpg").write_bytes(jpeg)
        Image.fromarray(turned_upright(jpeg, orientation)).save(folder / "upright" / f"{orientation}.png")
    data = DataConfig(dataset=None, data_dir=str(folder), val_fraction=0.0, test_fraction=0.0)
    config = FeaturesConfig(
        data=data, backbone="tiny", weights="none", image_size=40, batch_size=4, output_dir=str(tmp_path / "features")
    )
    train = read_features(extract_features(config, progress=False).path).splits["train"]
    rows = dict(zip(train.ids, train.features))
    tagged = np.stack([rows[f"tagged/{o}.jpg"] for o in range(1, 9)])
    upright = np.stack([rows[f"upright/{o}.png"] for o in range(1, 9)])
    np.testing.assert_allclose(tagged, upright, atol=1e-5)
    assert not np.allclose(tagged[5], tagged[0], atol=1e-3)  # the picture matters: not a constant
    assert resolve(config)[1]["decoder"] == DECODER  # features of another decoder are not reused


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_hand_written_exif_in_either_byte_order(order):
    jpeg = with_app1(plain_jpeg(), exif_payload(6, order, entries_before=5))
    assert orientation_of(jpeg) == 6
    assert decode_image(tf.constant(jpeg)).shape == (48, 64, 3)


def test_exif_after_a_jfif_segment_is_found():
    jfif = plain_jpeg()
    assert jfif[2:4] == b"\xff\xe0"  # PIL writes JFIF APP0 first
    app0_end = 4 + struct.unpack(">H", jfif[4:6])[0]
    segment = b"\xff\xe1" + struct.pack(">H", len(exif_payload(8)) + 2) + exif_payload(8)
    assert orientation_of(jfif[:app0_end] + segment + jfif[app0_end:]) == 8


def test_untagged_and_non_jpeg_images_are_untouched():
    pixels = upright_image()
    png = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(png, "PNG", exif=exif.tobytes())  # PNG eXIf chunk: not a JPEG, not turned
    gif = io.BytesIO()
    Image.fromarray(pixels).save(gif, "GIF")
    for encoded in (plain_jpeg(), plain_jpeg(exif=Image.Exif().tobytes()), png.getvalue(), gif.getvalue()):
        assert orientation_of(encoded) == 1
        expected = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(decode_image(tf.constant(encoded)).numpy(), expected)
        np.testing.assert_array_equal(
            decode_and_resize(tf.constant(encoded), Resize(24)).numpy(),
            tf.image.resize(expected, (24, 24)).numpy(),
        )


@pytest.mark.parametrize(
    "payload",
    [
        b"Exif\0\0",  # no TIFF header
        b"Exif\0\0XX*\0\x08\0\0\0",  # unknown byte order
        b"Exif\0\0II\x2b\0\x08\0\0\0",  # not 42
        b"Exif\0\0II*\0\xff\xff\xff\x7f",  # IFD0 far beyond the file
        exif_payload(6)[:30],  # IFD0 cut short
        exif_payload(9),  # orientation out of range
        exif_payload(0),
        exif_payload(6, kind=2),  # orientation stored as ASCII
        exif_payload(6, kind=4),  # as a LONG (the standard says SHORT)
        b"Exif\0\0" + bytes(range(256)) * 4,
    ],
    ids=["empty", "order", "magic", "offset", "short", "nine", "zero", "ascii", "long", "garbage"],
)
def test_corrupt_exif_never_raises_and_leaves_the_pixels(payload):
    jpeg = with_app1(plain_jpeg(), payload)
    assert orientation_of(jpeg) == 1
    expected = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    np.testing.assert_array_equal(decode_image(tf.constant(jpeg)).numpy(), expected)


def test_random_bytes_give_orientation_one_or_a_tag():
    rng = np.random.default_rng(0)
    header = plain_jpeg()[:2]
    for n in (0, 1, 2, 3, 7, 40, 500):
        for _ in range(20):
            noise = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for data in (noise, header + noise, header + b"\xff\xe1" + noise):
                assert 1 <= orientation_of(data) <= 8
    assert int(exif_orientation(tf.constant(b""))) == 1  # eagerly too


def test_damaged_tagged_jpegs_never_raise():
    rng = np.random.default_rng(1)
    jpeg = bytearray(tagged_jpeg(upright_image(), 6))
    for _ in range(200):
        damaged = bytearray(jpeg)
        for position in rng.integers(0, 200, rng.integers(1, 4)):
            damaged[position] = rng.integers(0, 256)
        assert 1 <= orientation_of(bytes(damaged[: rng.integers(2, 400)] if rng.random() < 0.3 else damaged)) <= 8


@pytest.mark.parametrize(
    "resize",
    [Resize(16), Resize(16, "bicubic", crop_to_aspect_ratio=True), Resize(16, "area", crop_to_aspect_ratio=True)],
    ids=["squash-bilinear", "crop-bicubic", "crop-area"],
)
@pytest.mark.parametrize("shape", [(40, 24, 3), (24, 40, 3), (17, 17, 3)])
def test_the_exported_models_resize_layer_computes_stage_1s_pixels(resize, shape):
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    stage1 = resize(tf.constant(image)).numpy()
    exported = np.asarray(resize.keras_layer()(image[np.newaxis]))[0]
    assert stage1.shape == exported.shape == (16, 16, 3)
    np.testing.assert_allclose(stage1, exported, atol=1e-3)


def test_cropping_resizes_the_central_square_only():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (24, 24, 3)).astype(np.float32)
    wide = np.concatenate([rng.integers(0, 256, (24, 8, 3)), square, rng.integers(0, 256, (24, 8, 3))], axis=1)
    crop = Resize(16, "bicubic", crop_to_aspect_ratio=True)
    np.testing.assert_array_equal(crop(tf.constant(wide, tf.float32)).numpy(), crop(tf.constant(square)).numpy())
    squash = Resize(16)(tf.constant(wide, tf.float32)).numpy()
    assert not np.allclose(squash, crop(tf.constant(square)).numpy(), atol=1.0)  # the default keeps the borders


def test_the_default_resize_keeps_the_decoder_key_and_another_gets_its_own():
    from pipeline.images import decoder_identity

    assert Resize(224).mode == "bilinear, aspect ratio not kept"
    assert decoder_identity(Resize(160)) == DECODER  # stores written before resize modes stay valid
    other = decoder_identity(Resize(160, "bicubic", crop_to_aspect_ratio=True))
    assert other != DECODER and "bicubic, central square cropped" in other
    with pytest.raises(ValueError, match="Unknown interpolation 'cubic'"):
        Resize(16, "cubic")
