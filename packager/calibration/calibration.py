"""Calibration tensor for INT8 PTQ: real images through the one serving letterbox, never random data.

ModelOpt silently calibrates on random data when it gets none, so every entry point here refuses to return an
empty tensor: no folder, an empty folder or only unreadable images are errors with a plain message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from packager.core.contracts import DataOverlapError
from packager.inference.letterbox import preprocess, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_CALIB_SIZE = 64


@dataclass
class CalibrationResult:
    """The calibration tensor (N, 3, H, W) float32 and where it came from."""

    data: np.ndarray
    source: str
    skipped: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.data.shape[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.save(path, self.data)
        return path


def list_images(images_dir: str | Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name so a build is reproducible."""
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise FileNotFoundError(f"calibration image folder not found: {images_dir}")
    if not images_dir.is_dir():
        raise ValueError(f"--calib-images must be a folder of images, got a file: {images_dir}")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in calibration folder {images_dir}: "
            "INT8 calibration needs real, representative images"
        )
    return files


def split_calibration_and_tuning(
    files: list[Path],
    calib_size: int,
    tune_files: list[Path] | None = None,
    max_tune: int | None = None,
) -> tuple[list[Path], list[Path]]:
    """(calibration files, tuning files): calibration = the first `calib_size` of `files` (sorted by name), tuning
    = `tune_files` when given (e.g. from --tune-images), else the rest of `files`; at most `max_tune` of them.

    The two lists never share a file: a tuning file that is also a calibration file (same resolved path) is
    dropped. Content-hash checks against validation images live with the gate, not here.
    """
    if calib_size < 0:
        raise ValueError(f"calibration size must not be negative, got {calib_size}")
    calibration = list(files[:calib_size])
    candidates = list(files[calib_size:]) if tune_files is None else list(tune_files)
    taken = {p.resolve() for p in calibration}
    tuning = [p for p in candidates if p.resolve() not in taken]
    if len(tuning) < len(candidates):
        log.warning("%d tuning image(s) are also calibration images: not used for tuning",
                    len(candidates) - len(tuning))
    return calibration, tuning[:max_tune] if max_tune is not None else tuning


def build_calibration(
    images_dir: str | Path,
    imgsz: tuple[int, int],
    count: int = DEFAULT_CALIB_SIZE,
    show_progress: bool = True,
    files: list[Path] | None = None,
) -> CalibrationResult:
    """Letterbox the first `count` readable images of `images_dir` (sorted by name) into one tensor.

    With `files` (e.g. the calibration part of `split_calibration_and_tuning`) only those are read, so a corrupt
    file never pulls in a tuning image. Unreadable files are skipped with a warning; none usable is a ValueError.
    """
    if count < 1:
        raise ValueError(f"calibration size must be at least 1, got {count}")
    files = list_images(images_dir) if files is None else files
    tensors: list[np.ndarray] = []
    skipped: list[str] = []
    iterator = iter(files)
    steps = track(range(min(count, len(files))), description="Calibration images", disable=not show_progress)
    for _ in steps:
        # Keep reading past corrupt files until `count` good images or the folder runs out.
        for path in iterator:
            try:
                chw, _ = preprocess(read_image(path), imgsz)
            except (ValueError, OSError) as error:
                log.warning("skipping calibration image %s: %s", path.name, error)
                skipped.append(path.name)
                continue
            tensors.append(chw)
            break
    if not tensors:
        raise ValueError(
            f"none of the {len(files)} image file(s) in {images_dir} could be decoded "
            f"(skipped: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})"
        )
    if len(tensors) < count:
        log.warning("only %d usable calibration image(s) in %s (asked for %d)", len(tensors), images_dir, count)
    return CalibrationResult(np.stack(tensors), str(Path(images_dir).resolve()), skipped)


def load_calibration_file(path: str | Path, imgsz: tuple[int, int] | None = None) -> np.ndarray:
    """A ready calibration tensor from .npy or .npz (first array, or the one named `images`), checked.

    Must be (N, 3, H, W) float-like with N >= 1 and finite values; H, W must match `imgsz` when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data file not found: {path}")
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise ValueError(f"{path} holds no arrays")
            key = "images" if "images" in archive.files else archive.files[0]
            data = archive[key]
    else:
        raise ValueError(f"calibration data must be a .npy or .npz file, got {path.name}")
    if data.ndim != 4 or data.shape[1] != 3 or data.shape[0] < 1:
        raise ValueError(f"calibration data in {path.name} must have shape (N>=1, 3, H, W), got {data.shape}")
    if imgsz is not None and tuple(data.shape[2:]) != tuple(imgsz):
        raise ValueError(
            f"calibration data in {path.name} is {data.shape[2]}x{data.shape[3]}, the model input is "
            f"{imgsz[0]}x{imgsz[1]}"
        )
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"calibration data in {path.name} contains NaN or infinite values")
    return data


def image_hashes(files) -> dict[str, str]:
    """{sha256 of the file bytes: file name}: the identity of an image whatever it is called."""
    from packager.core.files import sha256_file

    return {sha256_file(path): Path(path).name for path in files}


def find_overlap(validation_files, used: dict[str, dict[str, str]]) -> list[str]:
    """Validation images whose bytes equal an image in `used` ({role: {sha256: name}}, role e.g. "calibration"),
    as readable lines "val.jpg = calibration image calib_007.jpg"."""
    overlaps = []
    for digest, name in image_hashes(validation_files).items():
        for role, hashes in used.items():
            if digest in hashes:
                overlaps.append(f"{name} = {role} image {hashes[digest]}")
    return overlaps


def check_no_overlap(validation_files, used: dict[str, dict[str, str]], allow: bool = False) -> list[str]:
    """Raise DataOverlapError when a validation image is also a calibration/tuning image (by content hash);
    with `allow` only log a loud warning. Returns the overlaps found."""
    overlaps = find_overlap(validation_files, used)
    if overlaps:
        message = (f"{len(overlaps)} validation image(s) were also used to build the model, so the accuracy "
                   f"gate would be measured on seen data: {'; '.join(overlaps[:5])}"
                   f"{' ...' if len(overlaps) > 5 else ''}. Use disjoint image sets")
        if not allow:
            raise DataOverlapError(message + " (or --allow-overlap to go on anyway)")
        log.warning("OVERLAP: %s", message)
    return overlaps


def calibration_files(images_dir: str | Path, result: CalibrationResult) -> list[Path]:
    """The files `build_calibration` letterboxed into `result`: the first readable ones, sorted by name."""
    skipped = set(result.skipped)
    return [p for p in list_images(images_dir) if p.name not in skipped][: result.count]
