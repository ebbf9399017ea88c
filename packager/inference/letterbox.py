"""The one letterbox of yqpack: calibration, local evaluation and the served preprocess model all call this.

It must run unchanged inside the Triton server's Python (numpy<2, opencv-python-headless<4.12) and in the
build tools' env (numpy 2), so it depends on numpy and cv2 only. `repository.py` copies this file next to the
served `model.py`; nothing is re-typed there.

Geometry follows Ultralytics' LetterBox(auto=False, center=True, scaleup=True): the image is resized so that
it fits the target keeping its aspect ratio, then padded symmetrically with grey 114.
"""

from __future__ import annotations

from typing import NamedTuple

import os

import cv2
import numpy as np

try:
    from .image_header import ImageHeaderError, read_header
except ImportError:  # served: copied flat next to model.py
    from image_header import ImageHeaderError, read_header

PAD_VALUE = 114
# Served pixel budget (preprocess config parameter max_pixels): 50 MP decodes to 150 MB of BGR.
DEFAULT_MAX_PIXELS = 50_000_000
# libjpeg's warnings for damaged data (it still returns an image, partly grey); benign warnings are not listed.
_CORRUPT_JPEG = ("Corrupt JPEG data", "Premature end of JPEG file")
_INV_255 = np.float32(1.0 / 255.0)
# The grey border as the detector sees it: the same float32 product as every image pixel of value 114.
_PAD_FLOAT = np.multiply(np.array([PAD_VALUE], dtype=np.uint8), _INV_255, dtype=np.float32)[0]


class LetterboxInfo(NamedTuple):
    """How an original image maps into the letterboxed input: enough to map boxes back."""

    scale: float
    pad_x: float  # left padding, in input pixels
    pad_y: float  # top padding, in input pixels
    orig_h: int
    orig_w: int

    def as_array(self) -> np.ndarray:
        """Float32 vector [scale, pad_x, pad_y, orig_h, orig_w]: the served `letterbox_info` tensor."""
        return np.array(self, dtype=np.float32)

    @classmethod
    def from_array(cls, values) -> "LetterboxInfo":
        scale, pad_x, pad_y, orig_h, orig_w = (float(v) for v in np.asarray(values).reshape(-1)[:5])
        return cls(scale, pad_x, pad_y, int(round(orig_h)), int(round(orig_w)))


class ImageRejected(ValueError):
    """The client sent an image the server refuses: unreadable, over the pixel budget, or corrupt."""


def decode_image(data: bytes, max_pixels: int | None = None, reject_corrupt: bool = False) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to a BGR uint8 HxWx3 array, as cv2.imread would.

    Grayscale and RGBA are converted to 3 channels (IMREAD_COLOR). With `max_pixels`, the size announced by
    the header is checked before decoding. With `reject_corrupt`, data libjpeg reports as corrupt ("Corrupt
    JPEG data: ...", otherwise only a log line and a partly grey image) is refused. Raises ImageRejected
    (a ValueError) with a plain message.
    """
    if data is None or len(data) == 0:
        raise ImageRejected("empty image bytes")
    if max_pixels is not None:
        check_pixel_budget(data, max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    if reject_corrupt:
        image, warnings = _imdecode_with_warnings(buffer)
        if warnings:
            raise ImageRejected(f"corrupt image data ({len(data)} bytes): {warnings}")
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageRejected(f"could not decode image ({len(data)} bytes): not a JPEG/PNG/BMP/WebP or truncated")
    return image


def check_pixel_budget(data: bytes, max_pixels: int) -> None:
    """Refuse bytes whose header is unreadable or announces more than `max_pixels` pixels (nothing decoded)."""
    try:
        header = read_header(data)
    except ImageHeaderError as error:
        raise ImageRejected(str(error)) from None
    if header.pixels > max_pixels:
        raise ImageRejected(
            f"{header.format} of {header.width}x{header.height} = {header.pixels / 1e6:.1f} MP is over the "
            f"{max_pixels / 1e6:g} MP pixel budget (preprocess parameter max_pixels)"
        )


def _imdecode_with_warnings(buffer: np.ndarray) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode with libjpeg's warnings caught: they go to file descriptor 2, not to Python."""
    capture = os.memfd_create("yqpack-decode-warnings")
    saved = os.dup(2)
    try:
        os.dup2(capture, 2)
        try:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
        os.lseek(capture, 0, os.SEEK_SET)
        text = os.read(capture, 4096).decode("utf-8", "replace")
    finally:
        os.close(saved)
        os.close(capture)
    if text:
        os.write(2, text.encode())  # still in the server log
    warnings = [line for line in text.splitlines() if line.startswith(_CORRUPT_JPEG)]
    return image, "; ".join(warnings)


def read_image(path) -> np.ndarray:
    """Read an image file to BGR uint8 HxWx3 with the same decoder the server uses."""
    with open(path, "rb") as handle:
        return decode_image(handle.read())


def letterbox(image: np.ndarray, size: tuple[int, int] = (640, 640)) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize with unchanged aspect ratio and pad to `size` (height, width). Returns (HxWx3 uint8, info).

    Accepts HxW (grayscale), HxWx1, HxWx3 and HxWx4 arrays; grey/alpha are converted to 3-channel BGR.
    """
    resized, (top, bottom, left, right), info = _resize_for_letterbox(image, size)
    image = cv2.copyMakeBorder(
        resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE, PAD_VALUE, PAD_VALUE)
    )
    return image, info


def letterbox_chw_into(image: np.ndarray, out: np.ndarray) -> LetterboxInfo:
    """`to_chw_float(letterbox(image, out.shape[1:])[0], out)` in one pass, the same bits (tested): the resized
    image is written straight into its window of `out` and only the border is filled, so no padded uint8 copy
    and no full-size channel planes are made (half the time of the two steps on the served path).

    A uint8 `out` gets the letterboxed RGB pixels themselves, a quarter of the bytes: `normalize_into` then makes
    the same float32 input from them wherever the detector runs (the local target's served detector)."""
    if out.ndim != 3 or out.shape[0] != 3 or out.dtype not in (np.float32, np.uint8):
        raise ValueError(f"expected a 3xHxW float32 or uint8 output, got {out.dtype} {out.shape}")
    resized, (top, _, left, _), info = _resize_for_letterbox(image, out.shape[1:])
    height, width = resized.shape[:2]
    pad = _PAD_FLOAT if out.dtype == np.float32 else PAD_VALUE
    out[:, :top], out[:, top + height :] = pad, pad
    out[:, top : top + height, :left], out[:, top : top + height, left + width :] = pad, pad
    _write_chw(resized, out[:, top : top + height, left : left + width])
    return info


def normalize_into(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], the detector's input scale; the one product every path uses, so an input
    normalised here has the same bits as one letterboxed straight to float32."""
    return np.multiply(pixels, _INV_255, out=out, dtype=np.float32)


def _resize_for_letterbox(image: np.ndarray, size) -> tuple[np.ndarray, tuple[int, int, int, int], LetterboxInfo]:
    """The letterbox geometry, shared by both layouts: (resized BGR image, (top, bottom, left, right), info)."""
    image = _as_bgr(image)
    target_h, target_w = int(size[0]), int(size[1])
    orig_h, orig_w = image.shape[:2]
    scale = min(target_h / orig_h, target_w / orig_w)
    resized_w, resized_h = resized_size(orig_h, orig_w, scale)
    pad_w, pad_h = (target_w - resized_w) / 2, (target_h - resized_h) / 2
    if (orig_w, orig_h) != (resized_w, resized_h):
        image = cv2.resize(image, (resized_w, resized_h), interpolation=cv2.INTER_LINEAR)
    # The +-0.1 splits an odd padding as Ultralytics does: one pixel more at the bottom/right.
    top, bottom = int(round(pad_h - 0.1)), int(round(pad_h + 0.1))
    left, right = int(round(pad_w - 0.1)), int(round(pad_w + 0.1))
    return image, (top, bottom, left, right), LetterboxInfo(scale, float(left), float(top), orig_h, orig_w)


def resized_size(orig_h: int, orig_w: int, scale: float) -> tuple[int, int]:
    """(width, height) of the image inside the letterbox; each side rounded, never below 1 pixel (as Ultralytics)."""
    return max(int(round(orig_w * scale)), 1), max(int(round(orig_h * scale)), 1)


def to_chw_float(letterboxed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BGR HxWx3 uint8 -> RGB 3xHxW float32 in [0, 1], the detector's input layout; written into `out` if given."""
    if out is None:
        out = np.empty((3, *letterboxed.shape[:2]), dtype=np.float32)
    _write_chw(letterboxed, out)
    return out


def _write_chw(bgr: np.ndarray, out: np.ndarray) -> None:
    # Plane by plane from contiguous channel copies: a third faster than a strided transpose, and no temporary.
    for channel, plane in enumerate(cv2.split(bgr)[::-1]):
        if out.dtype == np.uint8:
            out[channel] = plane
        else:
            normalize_into(plane, out[channel])


def preprocess(image: np.ndarray, size: tuple[int, int] = (640, 640)) -> tuple[np.ndarray, LetterboxInfo]:
    """Letterbox a BGR image and lay it out as the detector input (3xHxW float32)."""
    out = np.empty((3, int(size[0]), int(size[1])), dtype=np.float32)
    return out, letterbox_chw_into(image, out)


def preprocess_bytes(data: bytes, size: tuple[int, int] = (640, 640)) -> tuple[np.ndarray, LetterboxInfo]:
    """Encoded bytes -> detector input: what the served preprocess model does for one request."""
    return preprocess(decode_image(data), size)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 3:
        return image
    raise ValueError(f"expected 1, 3 or 4 channels, got {image.shape[2]}")
