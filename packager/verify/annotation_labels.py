"""The labels the annotation check judges, read in the terms of their format: a COCO annotation file, or the YOLO
txt labels of a dataset YAML's split. Each format invites its own mistakes, and the report names them in its words.

YOLO labels are normalised `class cx cy w h` rows, so a COCO file's typical mistakes (normalised or x1,y1,x2,y2
bboxes, resized images) either cannot happen or look different there. What a YOLO converter or a mix-up gets
wrong instead, and what still lies inside [0, 1] (pixel coordinates are refused by the label reader, with a hint):
- `x1 y1 x2 y2` corners, or the top-left `x y w h`, written where YOLO wants the centre `cx cy w h`;
- labels of flipped images (x -> 1 - x, y -> 1 - y);
- class ids off by one, or written in the model's class order instead of the data.yaml's names;
- labels of another split or dataset: boxes that do not match the images at all, which no fix explains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from packager.datasets.data_yaml import label_path
from packager.datasets.yolo_labels import read_label_file
from packager.verify.annotation_check import (
    COCO_MISTAKES,
    AnnotatedImage,
    AnnotationCheck,
    KnownMistakes,
    check_annotations,
)


class Ensemble(Protocol):
    """What the check needs of a served ensemble (verify's ServedEnsemble has it; gates and the report import
    annotation_check, so this names no class of verify's)."""

    name: str
    family: str
    precision: str
    class_names: list[str]


@dataclass(frozen=True)
class LabelSet:
    """The scored images' labels as the check reads them: boxes, category id -> name, the format's mistakes."""

    images: list[AnnotatedImage]
    category_names: dict[int, str]
    mistakes: KnownMistakes


def coco_label_set(dataset: Mapping, sizes: Mapping[str, tuple[int, int]]) -> LabelSet:
    """A COCO instances `dataset` (the parsed JSON) on the decoded images `sizes` ({file name: (width, height)})."""
    names = {int(category["id"]): str(category["name"]) for category in dataset.get("categories", [])}
    return LabelSet(annotated_images(dataset, sizes), names, COCO_MISTAKES)


def annotated_images(dataset: Mapping, sizes: Mapping[str, tuple[int, int]]) -> list[AnnotatedImage]:
    """The images of a COCO instances `dataset` (the parsed JSON) that `sizes` ({file name: (width, height)} of
    the decoded image files) covers, in `sizes`' order."""
    by_name = {image["file_name"]: image for image in dataset.get("images", [])}
    per_image: dict[object, list[dict]] = {}
    for annotation in dataset.get("annotations", []):
        per_image.setdefault(annotation.get("image_id"), []).append(annotation)
    result = []
    for name, (width, height) in sizes.items():
        listed = by_name.get(name)
        if listed is None:
            continue
        annotations = [a for a in per_image.get(listed.get("id"), []) if len(a.get("bbox") or []) == 4]
        result.append(AnnotatedImage(
            name=name, width=int(width), height=int(height),
            listed_width=listed.get("width"), listed_height=listed.get("height"),
            boxes=np.array([a["bbox"] for a in annotations], np.float64).reshape(-1, 4),
            category_ids=np.array([int(a.get("category_id", -1)) for a in annotations], np.int64),
            crowd=np.array([bool(a.get("iscrowd", 0)) for a in annotations], bool),
        ))
    return result


def yolo_label_set(image_paths: Sequence[Path], names: Sequence[str],
                   sizes: Mapping[str, tuple[int, int]]) -> LabelSet:
    """The YOLO labels of `image_paths` (found by Ultralytics' rule), read again as written: the ground truth
    clips boxes to the image, which would hide how a wrongly written row lies. Category ids are the class indices
    of the data.yaml's `names`, so the report speaks of the ids in the label files."""
    images = []
    for path in image_paths:
        width, height = sizes[path.name]
        rows = np.array(read_label_file(label_path(path), len(names)).rows, np.float64).reshape(-1, 5)
        scale = np.array([width, height, width, height], np.float64)
        x1y1, x2y2 = rows[:, 1:3], rows[:, 3:5]
        images.append(AnnotatedImage(
            name=path.name, width=int(width), height=int(height), listed_width=None, listed_height=None,
            boxes=np.concatenate([x1y1, x2y2 - x1y1], axis=1) * scale,
            category_ids=rows[:, 0].astype(np.int64), crowd=np.zeros(len(rows), bool),
        ))
    return LabelSet(images, dict(enumerate(names)), YOLO_MISTAKES)


# Each fix takes the boxes as read (pixels, top-left x, y, width, height of the row read as `cx cy w h`) and
# returns what the row meant.
def _mirrored_x(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([image.width - b[:, 0] - b[:, 2], b[:, 1], b[:, 2], b[:, 3]], axis=1)


def _mirrored_y(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([b[:, 0], image.height - b[:, 1] - b[:, 3], b[:, 2], b[:, 3]], axis=1)


def _corners(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    # read as centre x1 and width x2: the box starts at x + w/2 (= x1) and ends at w (= x2)
    x1, y1 = b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    return np.stack([x1, y1, b[:, 2] - x1, b[:, 3] - y1], axis=1)


def _top_left(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, b[:, 2], b[:, 3]], axis=1)


YOLO_BOX_FIXES: dict[str, Callable[[np.ndarray, AnnotatedImage], np.ndarray]] = {
    "labels are mirrored left-right (each row's cx is 1 - cx: the image was flipped after labelling?)": _mirrored_x,
    "labels are mirrored upside down (each row's cy is 1 - cy: the image was flipped after labelling?)": _mirrored_y,
    "label rows hold corners 'class x1 y1 x2 y2', not YOLO's 'class cx cy w h'": _corners,
    "label rows hold the top-left corner 'class x y w h', not YOLO's centre 'class cx cy w h'": _top_left,
}


def _yolo_class_fixes(class_ids: Sequence[int | None]) -> dict[str, Callable[[int], int | None]]:
    """Fixes of a class id as written in a label file; `class_ids[c]`: the data.yaml index of model class c."""
    by_model_class = list(class_ids)
    return {
        "class ids are off by one, +1 (each label's class is its index in the data.yaml names + 1)": lambda a: a - 1,
        "class ids are off by one, -1 (each label's class is its index in the data.yaml names - 1)": lambda a: a + 1,
        "class ids follow the model's class list, not the data.yaml names":
            lambda a: by_model_class[a] if 0 <= a < len(by_model_class) else None,
    }


YOLO_MISTAKES = KnownMistakes(
    YOLO_BOX_FIXES, _yolo_class_fixes, "class ids",
    "labels of another split or dataset? (an image's labels are read from its path with /images/ -> /labels/ "
    "and the extension .txt)")


# The ensemble of a model family whose detections judge the annotations: the most precise one served.
PREFERRED_PRECISIONS = ("fp32", "fp16")


def check_served_annotations(models: Sequence[Ensemble], confident: Mapping[str, Mapping[str, np.ndarray]],
                             labels: LabelSet, unfit_judge: str | None = None) -> list[AnnotationCheck]:
    """One check per model family on the detections of its most precise served ensemble (`confident`: ensemble ->
    image name -> rows, from the accuracy pass), model classes matched to the labels' by name. `unfit_judge`, why
    the served model cannot judge (its build has random weights): the numbers are still measured and shown, the
    verdict is "unfit judge"."""
    by_name = {str(name).lower(): category for category, name in labels.category_names.items()}
    order = {precision: rank for rank, precision in enumerate(PREFERRED_PRECISIONS)}
    checks = []
    for family in dict.fromkeys(model.family for model in models):
        members = [model for model in models if model.family == family and model.name in confident]
        if members:
            judge = min(members, key=lambda model: order.get(model.precision, len(order)))
            class_category_ids = [by_name.get(name.lower()) for name in judge.class_names]
            check = check_annotations(judge.name, confident[judge.name], labels.images, class_category_ids,
                                      labels.category_names, labels.mistakes)
            if unfit_judge is not None:
                check.verdict, check.cause = "unfit judge", unfit_judge
            checks.append(check)
    return checks
