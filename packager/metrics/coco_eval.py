"""COCO evaluation with pycocotools, shared by `eval-onnx` (local) and `verify` (served).

Detections come in as {image_file_name: (n, 6) array of x1, y1, x2, y2, score, class_id in original pixels};
model class ids are mapped to the ground truth's category ids by class name. The ground truth is an annotation file
or a dataset built in memory (`CocoGroundTruth.from_dataset`, e.g. from YOLO labels).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from packager.core.build_records import CocoMetrics  # noqa: F401  (the record the build keeps; re-exported)
from packager.core.contracts import ConfigError, MissingInputError
from packager.metrics.weighted_ap import PerImageResults, ground_truth_only_results, per_image_results


@dataclass(frozen=True)
class ClassMapping:
    """Model classes matched to ground-truth categories by name (case-insensitive)."""

    category_ids: list[int | None]  # per model class; None: not in the ground truth, its detections are not scored
    unscored: list[str]  # the names of those classes, for reports


class CocoGroundTruth:
    """An annotation file, its images by file name, and the class-id -> category-id mapping for a model."""

    image_paths: list[Path] | None = None  # each image's path, where the ground truth knows them (from_dataset)

    def __init__(self, annotations_path: str | Path):
        from pycocotools.coco import COCO

        self.path = Path(annotations_path)
        if not self.path.is_file():
            raise MissingInputError(f"annotation file not found: {self.path}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco = COCO(str(self.path))
        self.image_ids = {img["file_name"]: img["id"] for img in self.coco.dataset["images"]}

    @classmethod
    def from_dataset(cls, dataset: dict, source: str, images: str | Path | Sequence[Path] | None = None
                     ) -> "CocoGroundTruth":
        """A ground truth held in memory: a COCO instances dict (images, annotations, categories). `source` names
        it in messages; `images` is the folder of its images or each image's path in `dataset["images"]` order."""
        from pycocotools.coco import COCO

        ground_truth = cls.__new__(cls)
        ground_truth.path = Path(source)
        ground_truth.coco = COCO()
        ground_truth.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth.coco.createIndex()
        names = [img["file_name"] for img in dataset["images"]]
        ground_truth.image_ids = {img["file_name"]: img["id"] for img in dataset["images"]}
        if len(ground_truth.image_ids) != len(names):  # detections are keyed by file name
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ConfigError(f"{source}: image file names must be unique, repeated: {repeated[:5]}")
        if isinstance(images, (str, Path)):
            ground_truth.image_paths = [Path(images) / name for name in names]
        elif images is not None:
            ground_truth.image_paths = [Path(path) for path in images]
            if [path.name for path in ground_truth.image_paths] != names:
                raise ValueError("image paths must follow the dataset's images, one each, in order")
        return ground_truth

    def class_mapping(self, class_names: list[str]) -> ClassMapping:
        """Each model class's category id by name. Model classes the ground truth lacks are left out of scoring;
        a ground-truth category the model lacks could never be detected, so it is refused."""
        by_name = {cat["name"].lower(): cat["id"] for cat in self.coco.dataset["categories"]}
        model = {name.lower() for name in class_names}
        lacking = [cat["name"] for cat in self.coco.dataset["categories"] if cat["name"].lower() not in model]
        if lacking:
            raise ConfigError(
                f"{len(lacking)} class(es) of {self.path.name} are not classes of the model, e.g. {lacking[:10]}: "
                f"the model cannot detect them (model classes: {list(class_names)[:10]}"
                f"{' ...' if len(class_names) > 10 else ''})"
            )
        category_ids = [by_name.get(name.lower()) for name in class_names]
        return ClassMapping(category_ids, [name for name, cat in zip(class_names, category_ids) if cat is None])

    def category_ids_for(self, class_names: list[str]) -> list[int]:
        """COCO category id of each model class, matched by name (case-insensitive)."""
        by_name = {cat["name"].lower(): cat["id"] for cat in self.coco.dataset["categories"]}
        missing = [name for name in class_names if name.lower() not in by_name]
        if missing:
            raise ConfigError(
                f"{len(missing)} model class name(s) have no category in {self.path.name}, e.g. {missing[:5]}"
            )
        return [by_name[name.lower()] for name in class_names]

    def image_files(self, images_dir: str | Path | None = None) -> list[Path]:
        """Annotated images that exist in `images_dir`, in annotation order; without it, the paths the ground
        truth was built with (`from_dataset`)."""
        if images_dir is None:
            if self.image_paths is None:
                raise ConfigError(f"{self.path.name} does not say where its images are: give the images folder")
            return list(self.image_paths)
        images_dir = Path(images_dir)
        return [images_dir / name for name in self.image_ids if (images_dir / name).is_file()]


def to_coco_results(
    detections: dict[str, np.ndarray], ground_truth: CocoGroundTruth, class_names: list[str]
) -> list[dict]:
    category_ids = ground_truth.class_mapping(class_names).category_ids
    results = []
    for file_name, dets in detections.items():
        image_id = ground_truth.image_ids.get(Path(file_name).name)
        if image_id is None:
            raise KeyError(f"image {file_name} is not in {ground_truth.path.name}")
        for x1, y1, x2, y2, score, class_id in np.asarray(dets, dtype=np.float64).reshape(-1, 6):
            category_id = category_ids[int(class_id)]
            if category_id is None:  # a model class the ground truth does not have: not scored
                continue
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(score, 5),
                }
            )
    return results


def evaluate(
    detections: dict[str, np.ndarray],
    ground_truth: CocoGroundTruth,
    class_names: list[str],
    results_json: str | Path | None = None,
) -> CocoMetrics:
    """mAP of `detections` over exactly the images they cover (every image needs an entry, even empty)."""
    return evaluate_images(detections, ground_truth, class_names, results_json).metrics


@dataclass
class CocoEvaluation:
    """The summary metrics and pycocotools' per-image results behind them (for the bootstrap intervals)."""

    metrics: CocoMetrics
    per_image: PerImageResults
    unscored_classes: list[str] = field(default_factory=list)  # model classes the ground truth lacks (not scored)


def evaluate_images(
    detections: dict[str, np.ndarray],
    ground_truth: CocoGroundTruth,
    class_names: list[str],
    results_json: str | Path | None = None,
) -> CocoEvaluation:
    """Like `evaluate`, also keeping COCOeval's per-image matching results."""
    from pycocotools.cocoeval import COCOeval

    results = to_coco_results(detections, ground_truth, class_names)
    unscored = ground_truth.class_mapping(class_names).unscored
    if results_json is not None:
        Path(results_json).write_text(json.dumps(results))
    image_ids = sorted(ground_truth.image_ids[Path(name).name] for name in detections)
    if not results:
        return CocoEvaluation(CocoMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, len(image_ids), 0),
                              ground_truth_only_results(ground_truth.coco, image_ids), unscored)
    with contextlib.redirect_stdout(io.StringIO()):
        predictions = ground_truth.coco.loadRes(results)
        evaluator = COCOeval(ground_truth.coco, predictions, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    metrics = CocoMetrics(stats[0], stats[1], stats[2], stats[3], stats[4], stats[5], len(image_ids), len(results))
    return CocoEvaluation(metrics, per_image_results(evaluator), unscored)
