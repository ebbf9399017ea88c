"""The one letterbox must produce exactly Ultralytics' LetterBox(auto=False) pixels, on awkward sizes too."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from packager.core.paths import ultralytics_offline_env
from packager.inference.letterbox import (
    LetterboxInfo,
    decode_image,
    letterbox,
    letterbox_chw_into,
    normalize_into,
    preprocess,
    preprocess_bytes,
    to_chw_float,
)

ultralytics_offline_env()
from ultralytics.data.augment import LetterBox  # noqa: E402


def ultralytics_letterbox(bgr: np.ndarray, size=(640, 640)) -> np.ndarray:
    return LetterBox(new_shape=size, auto=False, scale_fill=False, scaleup=True, center=True)(image=bgr)


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 1, 3), (640, 640)),
        ((1, 2000, 3), (640, 640)),  # one side rounds to 0 px: kept at 1 px as Ultralytics does
        ((17, 999, 3), (640, 640)),
        ((999, 17, 3), (640, 640)),
        ((1080, 1920, 3), (640, 640)),
        ((480, 640, 3), (640, 640)),  # exact fit: no padding
        ((333, 517, 3), (320, 480)),  # non-square target, odd padding split
        ((640, 640, 3), (640, 640)),  # no resize at all
    ],
)
def test_pixels_match_ultralytics(shape, size):
    image = random_image(shape)
    ours, info = letterbox(image, size)
    theirs = ultralytics_letterbox(image, size)
    assert ours.shape == theirs.shape == (size[0], size[1], 3)
    np.testing.assert_array_equal(ours, theirs)
    # The info must map the original frame onto the non-padded region.
    assert info.orig_h == shape[0] and info.orig_w == shape[1]
    resized_w, resized_h = round(shape[1] * info.scale), round(shape[0] * info.scale)
    assert info.pad_x + resized_w <= size[1] and info.pad_y + resized_h <= size[0]


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_grayscale_and_rgba_decode_like_imread(tmp_path, channels):
    """Grey and RGBA files go through decode_image exactly as cv2.imread(IMREAD_COLOR) + Ultralytics would."""
    shape = (211, 379) if channels is None else (211, 379, channels)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), random_image(shape, seed=3))
    data = path.read_bytes()
    ours, _ = letterbox(decode_image(data))
    theirs = ultralytics_letterbox(cv2.imread(str(path), cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_grayscale_and_rgba_arrays_become_bgr(channels):
    shape = (50, 70) if channels is None else (50, 70, channels)
    image = random_image(shape, seed=5)
    ours, _ = letterbox(image)
    expected_bgr = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if channels == 4 else cv2.cvtColor(
        image.reshape(50, 70), cv2.COLOR_GRAY2BGR
    )
    np.testing.assert_array_equal(ours, ultralytics_letterbox(expected_bgr))


def test_detector_layout_is_rgb_chw_unit_range():
    image = random_image((100, 200, 3), seed=7)
    chw, info = preprocess(image, (64, 64))
    letterboxed, _ = letterbox(image, (64, 64))
    assert chw.shape == (3, 64, 64) and chw.dtype == np.float32
    np.testing.assert_allclose(chw, letterboxed[:, :, ::-1].transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    # Bit for bit the float32 arithmetic of x * (1/255), whether allocated or written into a served batch.
    expected = letterboxed[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    batch = np.full((2, 3, 64, 64), np.nan, dtype=np.float32)
    assert np.shares_memory(to_chw_float(letterboxed, out=batch[1]), batch)
    np.testing.assert_array_equal(chw, expected)
    np.testing.assert_array_equal(batch[1], expected)
    assert np.isnan(batch[0]).all()
    # The served letterbox_info tensor is float32: the round trip keeps geometry to float32 precision.
    np.testing.assert_allclose(LetterboxInfo.from_array(info.as_array()), info, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, size",
    [((1, 2000, 3), (640, 640)), ((999, 17, 3), (640, 640)), ((1080, 1920, 3), (640, 640)), ((480, 640, 3), (640, 640)),
     ((333, 517, 3), (320, 480)), ((640, 640, 3), (640, 640)), ((211, 379), (640, 640)), ((211, 379, 4), (640, 640))],
)
def test_one_pass_layout_equals_letterbox_then_chw(shape, size):
    """The served preprocess writes the detector input in one pass: bit for bit the two-step formulation
    (letterbox, then to_chw_float), every pixel written (the batch starts as NaN), the same info."""
    image = random_image(shape, seed=11)
    letterboxed, want_info = letterbox(image, size)
    want = to_chw_float(letterboxed)
    batch = np.full((2, 3, *size), np.nan, dtype=np.float32)
    info = letterbox_chw_into(image, batch[1])
    np.testing.assert_array_equal(batch[1], want)
    assert info == want_info and np.isnan(batch[0]).all()
    chw, preprocess_info = preprocess(image, size)
    np.testing.assert_array_equal(chw, want)
    assert preprocess_info == want_info
    with pytest.raises(ValueError, match="3xHxW float32"):
        letterbox_chw_into(image, np.empty((3, *size), dtype=np.float64))


@pytest.mark.parametrize("shape, size", [((999, 17, 3), (640, 640)), ((480, 640, 3), (640, 640)), ((211, 379), (320, 480))])
def test_pixels_normalised_later_are_the_same_bits(shape, size):
    """The local ensemble hands its detector uint8 pixels and the detector normalises them: the float input it
    makes is bit for bit the one the float letterbox writes (calibration, evaluation, other targets)."""
    image = random_image(shape, seed=5)
    letterboxed, want_info = letterbox(image, size)
    pixels = np.zeros((3, *size), dtype=np.uint8)
    assert letterbox_chw_into(image, pixels) == want_info
    np.testing.assert_array_equal(pixels, letterboxed[..., ::-1].transpose(2, 0, 1))  # RGB planes
    normalised = np.full((3, *size), np.nan, dtype=np.float32)
    normalize_into(pixels, normalised)
    np.testing.assert_array_equal(normalised, preprocess(image, size)[0])


def test_preprocess_bytes_equals_preprocess_of_decoded(tmp_path):
    ok, encoded = cv2.imencode(".jpg", random_image((123, 77, 3), seed=9))
    assert ok
    from_bytes, info_bytes = preprocess_bytes(encoded.tobytes())
    from_array, info_array = preprocess(cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(from_bytes, from_array)
    assert info_bytes == info_array


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 10])
def test_undecodable_bytes_raise_plain_error(data):
    with pytest.raises(ValueError, match="image"):
        decode_image(data)


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5, 2), np.uint8), np.zeros((5, 5, 3), np.float32)])
def test_bad_arrays_raise_plain_error(bad):
    with pytest.raises(ValueError):
        letterbox(bad)
