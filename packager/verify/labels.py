"""What `yqpack verify` scores served mAP against: a COCO annotation file with its image folder (--images,
--annotations) or a dataset YAML's split (--data, --split: YOLO txt labels, read as Ultralytics reads them). Served
mAP, the load-test images, the annotation check and the accuracy reference all use the one chosen here.

`LabelSource` says which labels scored which images, so that verify compares a served mAP only with a build
evaluation of the same kind: a COCO file and a YOLO split score differently (crowd regions, the classes listed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.core.contracts import ConfigError, MissingInputError, YqpackError
from packager.datasets.data_yaml import DataYaml, read_data_yaml
from packager.datasets.yolo_labels import LabelCounts, load_split
from packager.evaluate.ground_truth import EVAL_SPLITS
from packager.metrics.coco_eval import CocoGroundTruth
from packager.verify.annotation_labels import LabelSet, coco_label_set, yolo_label_set
from packager.verify.inputs import ImageSet, scan_files, scan_images

FORMAT_WORDS = {"coco": "a COCO annotation file", "yolo": "YOLO txt labels"}


@dataclass(frozen=True)
class LabelSource:
    """Which labels scored which images."""

    format: str  # "coco" or "yolo"
    path: Path  # the annotation file or data.yaml, resolved
    split: str | None  # a data.yaml's split
    images: frozenset[str] | None  # the file names scored; None: not known
    classes: frozenset[str] | None  # the class names the labels list (lower case): what mAP averages over

    def describe(self) -> str:
        return f"{self.path}" + (f" [{self.split}]" if self.split else "")

    def same_file(self, other: "LabelSource") -> bool:
        return (self.format, self.path, self.split) == (other.format, other.path, other.split)


@dataclass
class VerifyLabels:
    """The ground truth of a verify run and where it came from."""

    ground_truth: CocoGroundTruth
    format: str  # "coco" or "yolo"
    path: Path  # --annotations, or the data.yaml
    split: str | None
    description: str  # one line for the report
    names: list[str]  # the classes the labels list
    image_files: list[Path] | None = None  # a split's images (YOLO); None: the --images folder's
    counts: LabelCounts | None = None

    @property
    def where(self) -> str:
        return f"{self.path} [{self.split}]" if self.split else str(self.path)

    def scan(self, images_dir: Path | None, max_images: int | None) -> ImageSet:
        """The images verify sends: the folder's (load) and its annotated ones (accuracy), or the split's."""
        if self.image_files is not None:
            return scan_files(self.image_files, self.ground_truth, max_images, self.where)
        return scan_images(Path(images_dir), self.ground_truth, max_images)

    def source(self, files: Sequence[Path]) -> LabelSource:
        """The identity of what this run scores: these labels on `files`."""
        return LabelSource(self.format, self.path.resolve(), self.split, frozenset(path.name for path in files),
                           frozenset(name.lower() for name in self.names))

    def label_set(self, files: Sequence[Path], sizes: Mapping[str, tuple[int, int]]) -> LabelSet:
        """The scored images' labels as the annotation check reads them, in the terms of their format."""
        if self.format == "yolo":
            return yolo_label_set(files, self.names, sizes)
        return coco_label_set(self.ground_truth.coco.dataset, sizes)


def load_labels(images_dir: Path | None, annotations: Path | None, data: Path | None,
                split: str | None) -> VerifyLabels:
    """--data [--split], or --images with --annotations: exactly one of the two."""
    if data is not None:
        if images_dir is not None or annotations is not None:
            raise ConfigError("give either --data PATH/data.yaml (its --split is verified: images and labels) or "
                              "--images DIR with --annotations FILE, not both")
        split = split or "val"
        if split not in EVAL_SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
        yaml = read_data_yaml(data)
        dataset = load_split(yaml, split)
        return VerifyLabels(dataset.ground_truth(), "yolo", yaml.yaml_path, split,
                            f"{dataset.source}: {dataset.counts.describe()} (YOLO txt labels)", list(yaml.names),
                            list(dataset.image_paths), dataset.counts)
    if split is not None:
        raise ConfigError(f"--split {split} names a split of --data: pass --data PATH/data.yaml too")
    if images_dir is None or annotations is None:
        raise ConfigError("verify scores served mAP on labelled images: give --data PATH/data.yaml [--split val|test], "
                          f"or --images DIR with --annotations FILE (missing: "
                          f"{'--images' if images_dir is None else '--annotations'})")
    if not Path(annotations).is_file():
        raise MissingInputError(f"annotation file not found: {annotations}")
    ground_truth = CocoGroundTruth(annotations)
    names = [str(category["name"]) for category in ground_truth.coco.dataset.get("categories", [])]
    return VerifyLabels(ground_truth, "coco", Path(annotations), None,
                        f"{Path(annotations)} (a COCO annotation file) on the images of {images_dir}", names)


def recorded_source(config: Mapping | None) -> tuple[LabelSource | None, str]:
    """What a build's recorded evaluation scored, from its manifest's `config` (the build's --data and --split, or
    --val-images and --val-annotations), and what could not be known about it ("" when everything could)."""
    config = config or {}
    try:
        if config.get("data"):
            yaml: DataYaml = read_data_yaml(config["data"])
            split = str(config.get("split") or "val")
            images = frozenset(path.name for path in yaml.split_images(split))
            return LabelSource("yolo", yaml.yaml_path.resolve(), split, images,
                               frozenset(name.lower() for name in yaml.names)), ""
        if config.get("val_annotations"):
            annotations = Path(config["val_annotations"])
            if not annotations.is_file():
                return LabelSource("coco", annotations.resolve(), None, None, None), \
                    f"its annotation file {annotations} is gone, so its images could not be listed"
            ground_truth = CocoGroundTruth(annotations)
            classes = frozenset(str(c["name"]).lower() for c in ground_truth.coco.dataset.get("categories", []))
            folder = Path(config["val_images"]) if config.get("val_images") else None
            images = (frozenset(path.name for path in ground_truth.image_files(folder))
                      if folder is not None and folder.is_dir() else None)
            note = "" if images is not None else f"its image folder {folder} is gone, so its images could not be listed"
            return LabelSource("coco", annotations.resolve(), None, images, classes), note
    except (OSError, ValueError, YqpackError) as error:  # moved or edited since the build: say so, keep going
        return None, f"what it evaluated could not be read again ({error})"
    return None, "its manifest does not record what it evaluated"


def compare_sources(recorded: LabelSource | None, unknown: str, scored: LabelSource) -> tuple[bool, str]:
    """Whether a build evaluation of `recorded` (with the same image count) is a reference for `scored`, and the
    words the report gives the choice ("" when it is the same labels on the same images)."""
    if recorded is None:
        return True, f"matched by image count only: {unknown}"
    if recorded.format != scored.format:
        return False, (f"the build's evaluation scored {FORMAT_WORDS[recorded.format]} ({recorded.describe()}), "
                       f"this run {FORMAT_WORDS[scored.format]}: the two score differently (crowd regions, the "
                       f"classes listed), so it is no reference here")
    if recorded.images is not None and recorded.images != scored.images:
        return False, (f"the build's evaluation scored {len(recorded.images - scored.images)} image(s) this run "
                       f"does not ({recorded.describe()})")
    if recorded.classes is not None and recorded.classes != scored.classes:
        return False, (f"the build's evaluation scored other classes ({recorded.describe()} lists "
                       f"{len(recorded.classes)}, this run's labels {len(scored.classes or ())})")
    notes = [unknown] if unknown else []
    if not recorded.same_file(scored):
        # The point of an independent reference: a wrong copy of the labels fails --max-map-drift.
        notes.append(f"scored on {recorded.describe()}, not on this run's {scored.describe()} (same images and "
                     f"classes): labels that differ on purpose need a build evaluated on them")
    return True, "; ".join(notes)
