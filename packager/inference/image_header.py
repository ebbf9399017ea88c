"""Image size from the encoded header, read before anything is decoded (standard library only).

The served preprocess refuses an image whose header announces more pixels than its budget, so a 380 KB PNG
announcing 20000x20000 costs microseconds instead of seconds and gigabytes. Only the formats listed in
`FORMATS` are accepted: a format whose size cannot be read cheaply here could not be bounded before decoding.
Copied flat next to the served preprocess `model.py` with `letterbox.py` (runs in the server's Python too).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FORMATS = ("JPEG", "PNG", "BMP", "WebP", "TIFF", "PNM")
# JPEG start-of-frame markers (C0-CF without DHT C4, JPG C8, DAC CC): they carry the frame size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageHeader(NamedTuple):
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class ImageHeaderError(ValueError):
    """The bytes are not an image of an accepted format, or its header is broken (the client's fault)."""


def read_header(data: bytes) -> ImageHeader:
    """Format and size announced by the header of encoded image bytes; ImageHeaderError when unreadable."""
    data = bytes(data)
    for signature, reader in _READERS:
        if data.startswith(signature):
            try:
                header = reader(data)
            except (struct.error, IndexError, ValueError) as error:
                raise ImageHeaderError(f"broken {reader.__name__[6:]} header: {error}") from None
            if header.width < 1 or header.height < 1:
                raise ImageHeaderError(f"{header.format} header announces an empty {header.width}x{header.height} image")
            return header
    raise ImageHeaderError(f"not an image of an accepted format ({', '.join(FORMATS)}); first bytes {data[:8]!r}")


def _read_JPEG(data: bytes) -> ImageHeader:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise ValueError(f"no marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            offset += 2
            continue
        length = struct.unpack_from(">H", data, offset + 2)[0]
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return ImageHeader("JPEG", width, height)
        if marker in (0xD9, 0xDA) or length < 2:
            raise ValueError("no frame header before the image data")
        offset += 2 + length
    raise ValueError("no frame header")


def _read_PNG(data: bytes) -> ImageHeader:
    if data[12:16] != b"IHDR":
        raise ValueError("first chunk is not IHDR")
    width, height = struct.unpack_from(">II", data, 16)
    return ImageHeader("PNG", width, height)


def _read_BMP(data: bytes) -> ImageHeader:
    dib_size = struct.unpack_from("<I", data, 14)[0]
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack_from("<hh", data, 18)
    else:
        width, height = struct.unpack_from("<ii", data, 18)
    return ImageHeader("BMP", width, abs(height))  # negative height = top-down rows


def _read_WebP(data: bytes) -> ImageHeader:
    if data[8:12] != b"WEBP":
        raise ValueError("RIFF file that is not WebP")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return ImageHeader("WebP", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        bits = struct.unpack_from("<I", data, 21)[0]
        return ImageHeader("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("WebP", width, height)
    raise ValueError(f"unknown WebP chunk {chunk!r}")


def _read_TIFF(data: bytes) -> ImageHeader:
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    count = struct.unpack_from(order + "H", data, ifd)[0]
    sizes = {}
    for index in range(count):
        tag, kind, _, value = struct.unpack_from(order + "HHI4s", data, ifd + 2 + 12 * index)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            sizes[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    if len(sizes) != 2:
        raise ValueError("first directory lacks ImageWidth/ImageLength")
    return ImageHeader("TIFF", sizes[256], sizes[257])


def _read_PNM(data: bytes) -> ImageHeader:
    if data[1:2] == b"7":  # PAM: WIDTH/HEIGHT lines
        fields = dict(line.split(None, 1) for line in data[:4096].split(b"ENDHDR")[0].splitlines()[1:] if b" " in line)
        return ImageHeader("PNM", int(fields[b"WIDTH"]), int(fields[b"HEIGHT"]))
    tokens = []
    for line in data[2:4096].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            return ImageHeader("PNM", int(tokens[0]), int(tokens[1]))
    raise ValueError("no width/height")


_READERS = [
    (b"\xff\xd8\xff", _read_JPEG),
    (b"\x89PNG\r\n\x1a\n", _read_PNG),
    (b"BM", _read_BMP),
    (b"RIFF", _read_WebP),
    (b"II*\x00", _read_TIFF),
    (b"MM\x00*", _read_TIFF),
    *((b"P" + str(kind).encode(), _read_PNM) for kind in range(1, 8)),
]


# Formats whose end the DALI path can check before decoding (check_complete); the gate refuses the others.
COMPLETE_CHECKED = ("JPEG", "PNG")


def check_complete(data: bytes, header: ImageHeader) -> None:
    """Refuse JPEG/PNG bytes that end before the image does (ImageHeaderError), without decoding.

    Triton's dali backend fails every request of a batch when one image cannot be decoded (docs/gpu-prepost.md),
    and DALI's decoders refuse truncated JPEG and PNG data, so the gate in front of it checks what they would:
    a JPEG needs an end-of-image marker after its first scan (an EXIF thumbnail's own marker comes before it), a
    PNG its IEND chunk. Damage inside the compressed data is decoded (partly garbage) by DALI, not refused.
    """
    if header.format == "JPEG":
        scan = _first_scan(data)
        if data.rfind(b"\xff\xd9", scan) < 0:
            raise ImageHeaderError(f"truncated JPEG ({len(data)} bytes): no end-of-image marker after its scan")
    elif header.format == "PNG":
        if data.rfind(b"IEND", 33) < 0:
            raise ImageHeaderError(f"truncated PNG ({len(data)} bytes): no IEND chunk")
    else:
        raise ImageHeaderError(f"{header.format} is not served by the DALI preprocess (JPEG and PNG are); "
                               "render with --preprocess python to serve it")


def _first_scan(data: bytes) -> int:
    """Offset of the first start-of-scan marker at the top level of a JPEG (segments skipped by their length)."""
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise ImageHeaderError(f"broken JPEG: no marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            offset += 2
            continue
        if marker == 0xDA:
            return offset
        if marker == 0xD9:
            break
        offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]
    raise ImageHeaderError(f"truncated JPEG ({len(data)} bytes): no image data")
