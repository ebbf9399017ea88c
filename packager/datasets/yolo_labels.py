"""YOLO txt labels -> an in-memory COCO ground truth, checked as Ultralytics 8.4.190 checks them
(`verify_image_label` in ultralytics/data/utils.py) but refusing, with file and line, what it would skip.

A row is `class cx cy w h` (normalised) or a polygon `class x1 y1 x2 y2 ...` (reduced to its bounding box, as
Ultralytics does); a file holding any row of more than 6 values is a polygon file, and may not mix in box rows.
Values may stray 0.01 outside [0, 1] (Ultralytics' tolerance); boxes are then clipped to the image, as Ultralytics'
validator clips them. Exact duplicate rows are dropped and counted, as Ultralytics drops them. A missing or empty
label file is a background image. Image sizes are those of the decoded image after EXIF rotation: the pixels the
served letterbox sees and the detections are in.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from packager.core.contracts import ConfigError
from packager.datasets.data_yaml import DataYaml, label_path, read_data_yaml
from packager.inference.letterbox import ImageRejected, read_image
from packager.metrics.coco_eval import CocoGroundTruth

TOLERANCE = 0.01  # Ultralytics accepts normalised values in [-0.01, 1.01]
MIN_POLYGON_POINTS = 3


@dataclass(frozen=True)
class LabelCounts:
    """What a split holds, for reports."""

    images: int
    background_images: int  # no boxes: no label file, or an empty one
    missing_label_files: int
    boxes: int
    polygons: int  # boxes reduced from polygon rows
    duplicates_removed: int

    def describe(self) -> str:
        extras = [f"{self.background_images} background"] if self.background_images else []
        if self.missing_label_files:
            extras.append(f"{self.missing_label_files} without a label file")
        boxes = f"{self.boxes} boxes" + (f" ({self.polygons} from polygons)" if self.polygons else "")
        dropped = f", {self.duplicates_removed} duplicate rows dropped" if self.duplicates_removed else ""
        return f"{self.images} images" + (f" ({', '.join(extras)})" if extras else "") + f", {boxes}{dropped}"


@dataclass(frozen=True)
class LabelFile:
    """One image's labels: class index and normalised x1, y1, x2, y2 per box."""

    rows: list[tuple[int, float, float, float, float]]
    polygons: int
    duplicates_removed: int
    found: bool  # the label file exists


@dataclass
class YoloDataset:
    """A split as a COCO instances dict (ids: images 1.. in path order, category = class index + 1)."""

    source: str  # names the split in messages, e.g. "/data/asl/data.yaml [val]"
    names: list[str]
    image_paths: list[Path]
    dataset: dict
    counts: LabelCounts

    def ground_truth(self) -> CocoGroundTruth:
        return CocoGroundTruth.from_dataset(self.dataset, self.source, self.image_paths)


def load_split(data: DataYaml | str | Path, split: str = "val") -> YoloDataset:
    """A data.yaml's split (`train`, `val` or `test`) with its labels, as a COCO dataset."""
    if not isinstance(data, DataYaml):
        data = read_data_yaml(data)
    return yolo_dataset(data.split_images(split), data.names, f"{data.yaml_path} [{split}]")


def yolo_dataset(image_paths: Sequence[Path], names: Sequence[str], source: str) -> YoloDataset:
    """COCO dataset of these images, each with its labels found by Ultralytics' rule (`label_path`)."""
    image_paths = [Path(path) for path in image_paths]
    _refuse_repeated_names(image_paths, source)
    labels = [read_label_file(label_path(path), len(names)) for path in image_paths]
    sizes = _image_sizes(image_paths)
    images, annotations = [], []
    for image_id, (path, (width, height), label) in enumerate(zip(image_paths, sizes, labels), start=1):
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for class_index, x1, y1, x2, y2 in label.rows:
            x1, x2 = (min(max(x * width, 0.0), float(width)) for x in (x1, x2))
            y1, y2 = (min(max(y * height, 0.0), float(height)) for y in (y1, y2))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_index + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    counts = LabelCounts(
        images=len(image_paths),
        background_images=sum(not label.rows for label in labels),
        missing_label_files=sum(not label.found for label in labels),
        boxes=len(annotations),
        polygons=sum(label.polygons for label in labels),
        duplicates_removed=sum(label.duplicates_removed for label in labels),
    )
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return YoloDataset(source, list(names), image_paths, dataset, counts)


def read_label_file(path: Path, num_classes: int) -> LabelFile:
    """The rows of one label file (missing file: no rows); ConfigError naming file and line for a bad row."""
    if not path.is_file():
        return LabelFile([], 0, 0, found=False)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: a label file must be UTF-8 text") from None
    lines = [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    polygon_file = any(len(values) > 6 for _, values in lines)
    rows, seen, polygons, duplicates = [], set(), 0, 0
    for number, values in lines:
        where = f"{path}, line {number}"
        numbers = _numbers(values, where)
        class_index = _class_index(numbers[0], num_classes, where)
        if polygon_file:
            box = _polygon_box(numbers[1:], where)
        else:
            box = _box(numbers[1:], where)
        key = (class_index, *numbers[1:])
        if key in seen:  # Ultralytics drops exact duplicates
            duplicates += 1
            continue
        seen.add(key)
        polygons += polygon_file
        rows.append((class_index, *box))
    return LabelFile(rows, polygons, duplicates, found=True)


def _numbers(values: list[str], where: str) -> list[float]:
    numbers = []
    for value in values:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        numbers.append(number)
    return numbers


def _class_index(value: float, num_classes: int, where: str) -> int:
    if value != int(value) or not 0 <= value < num_classes:
        # One past the last index: the typical 1-based converter (COCO category ids are 1-based).
        hint = "; class ids off by one? YOLO class ids start at 0" if value == num_classes else ""
        raise ConfigError(f"{where}: class {value:g} is not a class index of the dataset (0-{num_classes - 1}, "
                          f"from its names){hint}")
    return int(value)


def _check_range(values: list[float], what: str, where: str) -> None:
    outside = [v for v in values if not -TOLERANCE <= v <= 1 + TOLERANCE]
    if outside:
        # Values of 2 and more are no rounding overshoot: the commonest converter mistake, boxes left in pixels.
        hint = ("; pixel coordinates instead of normalised? YOLO labels divide x and w by the image width, y and h "
                "by its height" if max(outside) >= 2 else "")
        raise ConfigError(f"{where}: {what} {outside[0]:g} is outside [0, 1] (normalised coordinates, "
                          f"tolerance {TOLERANCE:g}){hint}")


def _box(values: list[float], where: str) -> tuple[float, float, float, float]:
    if len(values) != 4:
        raise ConfigError(f"{where}: a box row is 'class cx cy w h' (5 values), found {len(values) + 1}")
    cx, cy, w, h = values
    _check_range(values, "value", where)
    if w < 0 or h < 0:
        raise ConfigError(f"{where}: negative box size {w:g} x {h:g}")
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _polygon_box(values: list[float], where: str) -> tuple[float, float, float, float]:
    if len(values) == 4:
        raise ConfigError(f"{where}: a box row in a polygon label file (rows of one file are all boxes "
                          f"'class cx cy w h' or all polygons 'class x1 y1 x2 y2 ...')")
    if len(values) % 2 or len(values) < 2 * MIN_POLYGON_POINTS:
        raise ConfigError(f"{where}: a polygon row is 'class x1 y1 x2 y2 ...' with at least {MIN_POLYGON_POINTS} "
                          f"points, found {len(values)} coordinates")
    _check_range(values, "coordinate", where)
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _refuse_repeated_names(image_paths: list[Path], source: str) -> None:
    first: dict[str, Path] = {}
    for path in image_paths:
        if path.name in first:
            other = first[path.name]
            if other == path:
                raise ConfigError(f"{source}: image {path} is listed twice")
            raise ConfigError(f"{source}: two images share the file name {path.name} ({other} and {path}); "
                              f"evaluation keys images by file name, so rename one")
        first[path.name] = path


def _image_sizes(image_paths: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of each decoded image: the served decoder applies EXIF orientation."""
    def size(path: Path) -> tuple[int, int]:
        try:
            height, width = read_image(path).shape[:2]
        except (ImageRejected, OSError) as error:
            raise ConfigError(f"{path}: cannot read the image ({error})") from None
        return width, height

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # cv2 decodes outside the GIL
        return list(pool.map(size, image_paths))
