"""Where an evaluation's ground truth comes from: a COCO annotation file with its images folder, or a dataset
YAML's split (YOLO txt labels, read as Ultralytics reads them). The one place that decides; the CLI only parses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packager.core.contracts import ConfigError, MissingInputError
from packager.datasets.yolo_labels import LabelCounts, load_split
from packager.metrics.coco_eval import CocoGroundTruth

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class ValidationSet:
    """The ground truth and the images scored against it."""

    ground_truth: CocoGroundTruth
    image_files: list[Path]
    description: str  # one line for reports, e.g. "data.yaml [val]: 144 images, 144 boxes"
    counts: LabelCounts | None = None  # a dataset YAML's split only


def validation_files(images_dir: str | Path, annotations: str | Path) -> tuple[CocoGroundTruth, list[Path]]:
    """The annotation file and the annotated images present in `images_dir` (what the evaluation uses)."""
    ground_truth = CocoGroundTruth(annotations)
    if not Path(images_dir).is_dir():
        raise MissingInputError(f"validation image folder not found: {images_dir}")
    image_files = ground_truth.image_files(images_dir)
    if not image_files:
        raise ConfigError(f"none of the images listed in {Path(annotations).name} are in {images_dir}")
    return ground_truth, image_files


def validation_set(images_dir: str | Path | None = None, annotations: str | Path | None = None,
                   data: str | Path | None = None, split: str = "val") -> ValidationSet:
    """`data` (a data.yaml) and its `split`, or `images_dir` with its COCO `annotations`: exactly one of the two."""
    if data is not None:
        if images_dir is not None or annotations is not None:
            raise ConfigError("give either --data or --val-images with --val-annotations, not both")
        if split not in EVAL_SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
        dataset = load_split(data, split)
        return ValidationSet(dataset.ground_truth(), list(dataset.image_paths),
                             f"{dataset.source}: {dataset.counts.describe()}", dataset.counts)
    if images_dir is None or annotations is None:
        raise ConfigError("evaluation needs --data (a dataset YAML) or both --val-images and --val-annotations")
    ground_truth, image_files = validation_files(images_dir, annotations)
    return ValidationSet(ground_truth, image_files, f"{Path(annotations).name}: {len(image_files)} images in "
                                                    f"{images_dir}")
