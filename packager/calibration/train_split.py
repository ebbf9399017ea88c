"""Calibration and tuning images drawn from a dataset YAML's `train` split (`yqpack build --data`,
`yqpack sensitivity --data`).

A split's files are sorted by path, and datasets are often grouped by class or by capture session in that order
(custom/asl: `A0_...`, `A11_...`, ..., `Z9_...`), so the first N would calibrate on a few classes only. `spread_sample`
takes one file from each of N equal runs of the sorted list instead, seeded: the same files every build, spread
over the whole split.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from packager.calibration.calibration import CalibrationPlan, image_hashes, list_images, split_calibration_and_tuning
from packager.core.contracts import ConfigError
from packager.datasets.data_yaml import DataYaml

CALIBRATION_SPLIT = "train"
SAMPLE_SEED = 0  # calibration images; tuning images use SAMPLE_SEED + 1


def spread_sample(files: Sequence[Path], n: int | None, seed: int = SAMPLE_SEED) -> list[Path]:
    """`n` of `files`, one drawn at random (seeded) from each of `n` equal runs of the sorted list, in sorted
    order; all of them when `n` is None or not smaller than their number. Deterministic for one seed, whatever
    order `files` come in."""
    ordered = sorted(Path(path) for path in files)
    if n is None or n >= len(ordered):
        return ordered
    if n < 0:
        raise ValueError(f"sample size must not be negative, got {n}")
    rng = random.Random(seed)
    edges = [len(ordered) * index // n for index in range(n + 1)]
    return [ordered[rng.randrange(start, stop)] for start, stop in zip(edges, edges[1:])]


def plan_train_calibration(data: DataYaml, calib_size: int, tune_images: Path | None = None,
                           max_tune: int | None = None, needs_tuning: bool = False) -> CalibrationPlan:
    """Calibration = `calib_size` train images spread over the split; tuning = `tune_images` when given, else
    `max_tune` of the other train images, spread the same way (never a calibration image)."""
    if calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {calib_size}")
    if not data.splits.get(CALIBRATION_SPLIT):
        raise ConfigError(f"{data.where()} has no '{CALIBRATION_SPLIT}:' split to calibrate on: add one, or pass "
                          "--calib-images DIR (unlabelled images like the ones the model will see)")
    train = data.split_images(CALIBRATION_SPLIT)
    calibration = spread_sample(train, calib_size, SAMPLE_SEED)
    taken = set(calibration)
    rest = [path for path in train if path not in taken]
    if tune_images is not None:
        _, tuning = split_calibration_and_tuning(calibration, len(calibration), list_images(tune_images), max_tune)
        tuning_from = f"{len(tuning)} tuning images from {tune_images}"
    else:
        tuning = spread_sample(rest, max_tune, SAMPLE_SEED + 1)
        tuning_from = (f"{len(tuning)} tuning images of the other {len(rest)}, spread the same way "
                       f"(seed {SAMPLE_SEED + 1})")
    if needs_tuning and not tuning:
        raise ConfigError(f"--preset auto needs tuning images besides the calibration images: the "
                          f"'{CALIBRATION_SPLIT}:' split of {data.yaml_path} has {len(train)} images, all used "
                          f"for calibration; lower --calib-size or give --tune-images DIR")
    selection = (f"{len(calibration)} of the {len(train)} '{CALIBRATION_SPLIT}' images, one from each of "
                 f"{len(calibration)} runs of the sorted split (seed {SAMPLE_SEED}); {tuning_from}")
    return CalibrationPlan(data.yaml_path, calib_size, tuple(calibration), tuple(tuning), image_hashes(calibration),
                           image_hashes(tuning), split=CALIBRATION_SPLIT, selection=selection)


def train_tuning_images(data: DataYaml, max_images: int | None, calibration_hashes: dict[str, str]) -> list[Path]:
    """Tuning images from the train split (`yqpack sensitivity --data`): the images whose bytes are not a
    calibration image's (`calibration_hashes`, {sha256: name}), spread as the build spreads its tuning images."""
    from packager.core.files import sha256_file

    train = data.split_images(CALIBRATION_SPLIT)
    candidates = [path for path in train if sha256_file(path) not in calibration_hashes]
    return spread_sample(candidates, max_images, SAMPLE_SEED + 1)
