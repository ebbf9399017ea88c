"""Calibration tensor for INT8 PTQ: real images through the one serving letterbox, never random data.

`plan_calibration` decides once, before any heavy work, which images calibrate and which tune a build
(`CalibrationPlan`, with their content hashes); `CalibrationPlan.make_tensor` then letterboxes them.

ModelOpt silently calibrates on random data when it gets none, so every entry point here refuses to return an
empty tensor: no folder, an empty folder or only unreadable images are errors with a plain message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from packager.core.contracts import ConfigError, DataOverlapError, MissingInputError
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
    image_sha256: dict[str, str] = field(default_factory=dict)  # {sha256: file name} of the images in the tensor

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


@dataclass(frozen=True)
class CalibrationPlan:
    """Which images calibrate and which tune a build, and their content hashes ({sha256: file name}): decided once,
    then the calibration tensor, the overlap check against validation images and the manifest all read it."""

    source: Path  # the image folder, the ready tensor file, or a dataset YAML (with `split`)
    size: int  # images asked for
    calibration_files: tuple[Path, ...]  # empty for a tensor file
    tuning_files: tuple[Path, ...]
    calibration_image_hashes: dict[str, str]
    tuning_hashes: dict[str, str]
    from_tensor_file: bool = False  # --calib-data: a ready tensor, no images
    split: str | None = None  # `source` is a dataset YAML and the images come from this split of it (train_split.py)
    selection: str = ""  # how the images were chosen, for the manifest and the build's summary

    def used_images(self) -> dict[str, dict[str, str]]:
        """{role: {sha256: name}} of every image that shapes the recipe (what validation images must not be)."""
        return {"calibration": self.calibration_image_hashes, "tuning": self.tuning_hashes}

    def check_disjoint(self, validation_files, allow: bool = False) -> list[str]:
        """DataOverlapError when a validation image is one of these (by content); with `allow` a warning."""
        return check_no_overlap(validation_files, self.used_images(), allow=allow)

    def make_tensor(self, imgsz: tuple[int, int], show_progress: bool = True) -> CalibrationResult:
        """The (N, 3, H, W) calibration tensor: the planned images letterboxed, or the tensor file's first `size`."""
        if self.from_tensor_file:
            data = load_calibration_file(self.source, imgsz)[: self.size]
            return CalibrationResult(data, str(self.source.resolve()))
        result = build_calibration(self.source, imgsz, self.size, show_progress, files=list(self.calibration_files))
        if self.split is not None:
            result.source += f" [{self.split}]"  # as a dataset split is named in messages: data.yaml [train]
        result.image_sha256 = {digest: name for digest, name in self.calibration_image_hashes.items()
                               if name not in set(result.skipped)}  # an unreadable file is not in the tensor
        return result


def plan_calibration(calib_images: Path | None, calib_data: Path | None, calib_size: int,
                     tune_images: Path | None = None, max_tune: int | None = None,
                     needs_tuning: bool = False) -> CalibrationPlan:
    """Check the calibration inputs (plain errors naming the option) and split them, once: calibration = the first
    `calib_size` images of --calib-images, tuning = --tune-images or the images after those (`needs_tuning`: preset
    auto, which refuses to run without any)."""
    if calib_images is None and calib_data is None:
        raise ConfigError(
            "INT8 calibration needs real images: pass --calib-images DIR (or --calib-data FILE.npy/.npz); "
            "ModelOpt would otherwise calibrate on random data"
        )
    if calib_images is not None and calib_data is not None:
        raise ConfigError("pass either --calib-images or --calib-data, not both")
    if calib_data is not None and not Path(calib_data).is_file():
        raise MissingInputError(f"calibration data file not found: {calib_data}")
    if calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {calib_size}")
    images = list_images(calib_images) if calib_images is not None else []
    tune_files = list_images(tune_images) if tune_images is not None else None
    if needs_tuning and tune_files is None and len(images) <= calib_size:
        raise ConfigError("--preset auto needs tuning images besides the calibration images: give more "
                          "--calib-images than --calib-size, or --tune-images DIR")
    if calib_data is not None:
        calibration, tuning = [], (tune_files or [])[:max_tune]
    else:
        calibration, tuning = split_calibration_and_tuning(images, calib_size, tune_files, max_tune)
    selection = "" if calib_data is not None else f"the first {len(calibration)} of {len(images)} images, by name"
    return CalibrationPlan(Path(calib_data if calib_data is not None else calib_images), calib_size,
                           tuple(calibration), tuple(tuning), image_hashes(calibration), image_hashes(tuning),
                           from_tensor_file=calib_data is not None, selection=selection)
