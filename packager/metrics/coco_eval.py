"""COCO evaluation with pycocotools, shared by `eval-onnx` (local) and `verify` (served).

Detections come in as {image_file_name: (n, 6) array of x1, y1, x2, y2, score, class_id in original pixels};
model class ids are mapped to the annotation file's category ids by class name.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packager.core.build_records import CocoMetrics  # noqa: F401  (the record the build keeps; re-exported)
from packager.core.contracts import ConfigError, MissingInputError
from packager.metrics.weighted_ap import PerImageResults, ground_truth_only_results, per_image_results


class CocoGroundTruth:
    """An annotation file, its images by file name, and the class-id -> category-id mapping for a model."""

    def __init__(self, annotations_path: str | Path):
        from pycocotools.coco import COCO

        self.path = Path(annotations_path)
        if not self.path.is_file():
            raise MissingInputError(f"annotation file not found: {self.path}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco = COCO(str(self.path))
        self.image_ids = {img["file_name"]: img["id"] for img in self.coco.dataset["images"]}

    def category_ids_for(self, class_names: list[str]) -> list[int]:
        """COCO category id of each model class, matched by name (case-insensitive)."""
        by_name = {cat["name"].lower(): cat["id"] for cat in self.coco.dataset["categories"]}
        missing = [name for name in class_names if name.lower() not in by_name]
        if missing:
            raise ConfigError(
                f"{len(missing)} model class name(s) have no category in {self.path.name}, e.g. {missing[:5]}"
            )
        return [by_name[name.lower()] for name in class_names]

    def image_files(self, images_dir: str | Path) -> list[Path]:
        """Annotated images that exist in `images_dir`, in annotation order."""
        images_dir = Path(images_dir)
        return [images_dir / name for name in self.image_ids if (images_dir / name).is_file()]


def to_coco_results(
    detections: dict[str, np.ndarray], ground_truth: CocoGroundTruth, class_names: list[str]
) -> list[dict]:
    category_ids = ground_truth.category_ids_for(class_names)
    results = []
    for file_name, dets in detections.items():
        image_id = ground_truth.image_ids.get(Path(file_name).name)
        if image_id is None:
            raise KeyError(f"image {file_name} is not in {ground_truth.path.name}")
        for x1, y1, x2, y2, score, class_id in np.asarray(dets, dtype=np.float64).reshape(-1, 6):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[int(class_id)],
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


def evaluate_images(
    detections: dict[str, np.ndarray],
    ground_truth: CocoGroundTruth,
    class_names: list[str],
    results_json: str | Path | None = None,
) -> CocoEvaluation:
    """Like `evaluate`, also keeping COCOeval's per-image matching results."""
    from pycocotools.cocoeval import COCOeval

    results = to_coco_results(detections, ground_truth, class_names)
    if results_json is not None:
        Path(results_json).write_text(json.dumps(results))
    image_ids = sorted(ground_truth.image_ids[Path(name).name] for name in detections)
    if not results:
        return CocoEvaluation(CocoMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, len(image_ids), 0),
                              ground_truth_only_results(ground_truth.coco, image_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        predictions = ground_truth.coco.loadRes(results)
        evaluator = COCOeval(ground_truth.coco, predictions, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    metrics = CocoMetrics(stats[0], stats[1], stats[2], stats[3], stats[4], stats[5], len(image_ids), len(results))
    return CocoEvaluation(metrics, per_image_results(evaluator))
