"""Do the annotations describe these images? A check of verify's annotation file that needs no reference mAP.

The drift gate compares served mAP with the build's own evaluation; when that evaluation was made on the same
annotation file, mirrored boxes or shifted category ids score equally low on both sides and pass. This check asks
the served model instead: its confident detections (score >= 0.5) should land on annotated boxes (class-agnostic
IoU >= 0.5) and, where they do, name the annotated category. When they don't, each known mistake is undone in turn
(mirrored boxes, corner or centre boxes written as x,y,width,height, normalised coordinates, resized images;
category ids shifted by one or written as class indices); the one that restores agreement names the cause. Each
label format names its own mistakes (`KnownMistakes`: COCO JSON here, YOLO txt labels in annotation_labels.py).

Pure functions over numpy arrays and plain records: the caller supplies detections, boxes and image sizes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

CONFIDENT_SCORE = 0.5  # detections the check trusts
MATCH_IOU = 0.5
DUPLICATE_IOU = 0.7  # multi-label NMS can keep one box under two labels: the check counts the box once
CROWD_IOA = 0.5  # a detection mostly inside a crowd region is neither right nor wrong

# Thresholds measured on yolov8n FP32 (docs/robustness.md#annotation-check): the healthy sets sit far from each.
MIN_IMAGES = 8
MIN_DETECTIONS = 20
MIN_BOX_PRECISION = 0.4  # share of confident detections on an annotated box
FIX_GAIN = 1.5  # a fix must match this many times the boxes matched as given ...
MIN_FIX_PRECISION = 0.4  # ... and reach this precision, to be named the cause
MIN_CLASS_AGREEMENT = 0.5  # share of matched pairs whose detected class is the annotated category
CLASS_FIX_MARGIN = 0.1  # a category fix must raise that share by this much to be named the cause
MIN_CLASS_PAIRS = 10
# A class whose matched boxes mostly carry one other category: ids swapped or permuted (healthy sets: none).
MIN_SWAP_PAIRS = 10
MIN_SWAP_SHARE = 0.75
# Verdicts that neither pass nor fail the annotations: too few images or detections, or a judge that cannot
# detect (random weights: its confident detections land anywhere, on right and wrong annotations alike).
NOT_JUDGED = ("too few", "unfit judge")


@dataclass(frozen=True)
class AnnotatedImage:
    """One annotated image as the annotation file states it, and the size of the image file itself."""

    name: str
    width: int  # of the decoded image: detections are in its pixels
    height: int
    listed_width: int | None  # what the annotation file says
    listed_height: int | None
    boxes: np.ndarray  # (n, 4) x, y, width, height as written in the file (YOLO: its boxes in pixels, unclipped)
    category_ids: np.ndarray  # (n,) int
    crowd: np.ndarray  # (n,) bool

    @property
    def size_mismatch(self) -> bool:
        return self.listed_width is not None and (self.listed_width, self.listed_height) != (self.width, self.height)


@dataclass
class BoxAgreement:
    """Class-agnostic overlap of the confident detections with the annotated boxes, after one box fix."""

    fix: str  # "as given" or the mistake undone
    detections: int  # confident, not on a crowd region
    boxes: int  # annotated, not crowd
    matched: int
    precision: float  # matched / detections
    recall: float  # matched / boxes


@dataclass
class ClassAgreement:
    fix: str
    pairs: int
    agreeing: int
    agreement: float


@dataclass
class AnnotationCheck:
    """The verdict ("pass", "fail", or one of NOT_JUDGED), its plain-words cause, and the numbers behind it."""

    model: str  # whose detections were used
    verdict: str
    cause: str
    images: int
    size_mismatches: int  # images whose size in the annotation file differs from the file's
    unknown_category_annotations: int  # annotations whose category id is not in the file's categories
    boxes: list[BoxAgreement] = field(default_factory=list)  # as given first, then each fix
    classes: list[ClassAgreement] = field(default_factory=list)  # as given first, then each fix
    confusions: list[str] = field(default_factory=list)  # most frequent disagreeing pairs, as words
    swapped: list[str] = field(default_factory=list)  # classes whose boxes mostly carry one other category
    ids: str = "category ids"  # what the label format calls its class numbers, for the report
    unjudged_detections: int = 0  # confident detections of model classes the labels lack: not judged

    @property
    def passed(self) -> bool:
        return self.verdict != "fail"

    @property
    def as_given(self) -> BoxAgreement | None:
        return self.boxes[0] if self.boxes else None

    @property
    def class_agreement(self) -> ClassAgreement | None:
        return self.classes[0] if self.classes else None

    def as_dict(self) -> dict:
        return asdict(self)


BoxFix = Callable[[np.ndarray, AnnotatedImage], np.ndarray]


def _mirror_x(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([image.width - b[:, 0] - b[:, 2], b[:, 1], b[:, 2], b[:, 3]], axis=1)


def _mirror_y(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([b[:, 0], image.height - b[:, 1] - b[:, 3], b[:, 2], b[:, 3]], axis=1)


def _corners(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _centres(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 2], b[:, 3]], axis=1)


def _normalised(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    return b * np.array([image.width, image.height, image.width, image.height], np.float64)


def _resized(b: np.ndarray, image: AnnotatedImage) -> np.ndarray:
    if not image.size_mismatch or not image.listed_width or not image.listed_height:
        return b  # this image's size is right (or unknown)
    sx, sy = image.width / image.listed_width, image.height / image.listed_height
    return b * np.array([sx, sy, sx, sy], np.float64)


# The mistake each fix undoes, as the cause the report names.
BOX_FIXES: dict[str, BoxFix] = {
    "annotated boxes are mirrored horizontally (left-right)": _mirror_x,
    "annotated boxes are mirrored vertically (upside down)": _mirror_y,
    "bbox holds x1,y1,x2,y2 corners, not COCO's x,y,width,height": _corners,
    "bbox holds centre x,y,width,height (YOLO style), not COCO's top-left x,y,width,height": _centres,
    "bbox is normalised to 0-1, not in pixels": _normalised,
    "annotations are in the pixels of differently sized images (the sizes in the file differ from the images')":
        _resized,
}


def _category_fixes(class_category_ids: Sequence[int | None]) -> dict[str, Callable[[int], int | None]]:
    """Fixes of a category id as written; each maps it to the id the model's classes use (None: no such id)."""
    by_index = list(class_category_ids)
    return {
        "category ids are shifted by +1 (each is its category's id + 1)": lambda a: a - 1,
        "category ids are shifted by -1 (each is its category's id - 1)": lambda a: a + 1,
        "category ids are 0-based class indices, not the file's category ids":
            lambda a: by_index[a] if 0 <= a < len(by_index) else None,
        "category ids are 1-based class indices, not the file's category ids":
            lambda a: by_index[a - 1] if 1 <= a <= len(by_index) else None,
    }


@dataclass(frozen=True)
class KnownMistakes:
    """The mistakes one label format invites, as the fixes the check tries, and its words for the rest."""

    boxes: dict[str, BoxFix]
    categories: Callable[[Sequence[int | None]], dict[str, Callable[[int], int | None]]]
    ids: str  # "category ids" (COCO) or "class ids" (YOLO)
    unexplained: str  # boxes that no fix explains: what that usually means


COCO_MISTAKES = KnownMistakes(BOX_FIXES, _category_fixes, "category ids", "annotations of another image set?")


def confident_rows(detections: np.ndarray) -> np.ndarray:
    """The rows (x1, y1, x2, y2, score, class) the check uses, one per box (the best label of a duplicate)."""
    rows = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    rows = rows[rows[:, 4] >= CONFIDENT_SCORE]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    kept: list[int] = []
    for index in range(len(rows)):
        if not kept or _iou(rows[index, :4], rows[kept, :4]).max() <= DUPLICATE_IOU:
            kept.append(index)
    return rows[kept]


def _iou(box: np.ndarray, boxes: np.ndarray, of_box_only: bool = False) -> np.ndarray:
    """IoU of one x1,y1,x2,y2 box with many (`of_box_only`: the share of `box` inside each)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter, area = w * h, (box[2] - box[0]) * (box[3] - box[1])
    union = area if of_box_only else area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], axis=1)


def _match(rows: np.ndarray, image: AnnotatedImage, boxes: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """Greedy by score, as COCO matches: (detections counted, [(detected class, annotated category)] matched)."""
    gt = _xyxy(boxes)
    real, crowd = gt[~image.crowd], gt[image.crowd]
    categories = image.category_ids[~image.crowd]
    taken = np.zeros(len(real), bool)
    counted, pairs = 0, []
    for row in rows:
        if len(real):
            iou = np.where(taken, -1.0, _iou(row[:4], real))
            best = int(iou.argmax())
            if iou[best] >= MATCH_IOU:
                taken[best] = True
                counted += 1
                pairs.append((int(row[5]), int(categories[best])))
                continue
        if len(crowd) and _iou(row[:4], crowd, of_box_only=True).max() >= CROWD_IOA:
            continue
        counted += 1
    return counted, pairs


def _box_agreement(fix: str, images: Sequence[AnnotatedImage], detections: Mapping[str, np.ndarray],
                   transform: BoxFix | None) -> tuple[BoxAgreement, list[tuple[int, int]]]:
    counted, boxes, pairs = 0, 0, []
    for image in images:
        fixed = image.boxes if transform is None else transform(image.boxes.astype(np.float64), image)
        image_counted, image_pairs = _match(detections.get(image.name, np.zeros((0, 6))), image, fixed)
        counted += image_counted
        boxes += int((~image.crowd).sum())
        pairs += image_pairs
    matched = len(pairs)
    return BoxAgreement(fix, counted, boxes, matched, matched / counted if counted else 0.0,
                        matched / boxes if boxes else 0.0), pairs


def _class_agreements(pairs: list[tuple[int, int]], class_category_ids: Sequence[int | None],
                      mistakes: KnownMistakes) -> list[ClassAgreement]:
    expected = [(class_category_ids[cls] if 0 <= cls < len(class_category_ids) else None, ann) for cls, ann in pairs]
    results = [_agreement("as given", [(e, ann) for e, ann in expected])]
    for fix, undo in mistakes.categories(class_category_ids).items():
        results.append(_agreement(fix, [(e, undo(ann)) for e, ann in expected]))
    return results


def _agreement(fix: str, pairs: list[tuple[int | None, int | None]]) -> ClassAgreement:
    agreeing = sum(1 for e, ann in pairs if e is not None and e == ann)
    return ClassAgreement(fix, len(pairs), agreeing, agreeing / len(pairs) if pairs else 0.0)


def check_annotations(
    model: str,
    detections: Mapping[str, np.ndarray],
    images: Sequence[AnnotatedImage],
    class_category_ids: Sequence[int | None],
    category_names: Mapping[int, str] | None = None,
    mistakes: KnownMistakes = COCO_MISTAKES,
) -> AnnotationCheck:
    """Judge `images`' annotations by `model`'s `detections` ({image name: (n, 6) x1, y1, x2, y2, score, class}
    in the image's pixels, any score: the confident ones are kept here). `class_category_ids[c]` is the annotation
    file's category id of model class c (None: the labels lack that class, its detections are not judged);
    `category_names` (id -> name) makes the confusions readable; `mistakes`, those the label format invites."""
    names = dict(category_names or {})
    known = set(names) if names else None
    rows = {image.name: confident_rows(detections.get(image.name, np.zeros((0, 6)))) for image in images}
    # A class the labels do not have would count as a detection on no box: the labels cannot be judged by it.
    unlabelled = [c for c, category in enumerate(class_category_ids) if category is None]
    unjudged = 0
    if unlabelled:
        for name, image_rows in rows.items():
            keep = ~np.isin(image_rows[:, 5].astype(np.int64), unlabelled)
            unjudged += int((~keep).sum())
            rows[name] = image_rows[keep]
    check = AnnotationCheck(
        model=model, verdict="pass", cause="", images=len(images),
        size_mismatches=sum(image.size_mismatch for image in images),
        unknown_category_annotations=0 if known is None else sum(
            int(sum(int(c) not in known for c in image.category_ids)) for image in images),
        ids=mistakes.ids, unjudged_detections=unjudged,
    )
    as_given, pairs = _box_agreement("as given", images, rows, None)
    check.boxes = [as_given]
    fixed_pairs = {}
    for fix, transform in mistakes.boxes.items():
        if transform is _resized and not check.size_mismatches:
            continue  # nothing to rescale
        agreement, fix_pairs = _box_agreement(fix, images, rows, transform)
        check.boxes.append(agreement)
        fixed_pairs[fix] = fix_pairs
    confident = sum(len(image_rows) for image_rows in rows.values())
    if len(images) < MIN_IMAGES or confident < MIN_DETECTIONS:
        check.verdict = "too few"
        check.cause = (f"too few images to judge: {len(images)} images with {confident} confident detections "
                       f"(needs {MIN_IMAGES} images and {MIN_DETECTIONS} detections)")
        check.classes = _class_agreements(pairs, class_category_ids, mistakes)
        return check
    box_cause, class_pairs = _box_verdict(check, pairs, fixed_pairs, mistakes)
    check.classes = _class_agreements(class_pairs, class_category_ids, mistakes)
    check.confusions = _confusions(class_pairs, class_category_ids, names)
    check.swapped = _swapped(class_pairs, class_category_ids, names)
    class_cause = _class_verdict(check)
    causes = [cause for cause in (box_cause, class_cause) if cause]
    if causes:
        check.verdict, check.cause = "fail", "; ".join(causes)
    else:
        given = check.class_agreement
        check.cause = (f"{as_given.precision:.0%} of {as_given.detections} confident detections lie on an annotated "
                       f"box, {given.agreement:.0%} of those with the annotated class")
    return check


def _box_verdict(check: AnnotationCheck, pairs, fixed_pairs, mistakes: KnownMistakes
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The box cause ("" when the boxes agree) and the matched pairs to judge classes on."""
    as_given = check.as_given
    best = max(check.boxes[1:], key=lambda agreement: agreement.matched)
    if best.matched >= FIX_GAIN * max(as_given.matched, 1) and best.precision >= MIN_FIX_PRECISION:
        return (f"{best.fix}: {as_given.precision:.0%} of {as_given.detections} confident detections lie on an "
                f"annotated box as given, {best.precision:.0%} once undone"), fixed_pairs[best.fix]
    if as_given.precision < MIN_BOX_PRECISION:
        hint = (f"; the file gives another size than the image for {check.size_mismatches} of {check.images} images"
                if check.size_mismatches else "")
        return (f"the annotated boxes do not match what the model detects: only {as_given.precision:.0%} of "
                f"{as_given.detections} confident detections lie on an annotated box (at least "
                f"{MIN_BOX_PRECISION:.0%} expected) and no known mistake explains it - {mistakes.unexplained}"
                f"{hint}"), pairs
    return "", pairs


def _class_verdict(check: AnnotationCheck) -> str:
    given = check.class_agreement
    if given is None or given.pairs < MIN_CLASS_PAIRS:
        return ""
    best = max(check.classes[1:], key=lambda agreement: agreement.agreement)
    text = f"{given.agreement:.0%} of {given.pairs} detections on an annotated box name its category"
    # Only a mistake turns a fix into an improvement: on true ids a fix agrees only where it changes nothing.
    if best.agreement >= MIN_CLASS_AGREEMENT and best.agreement >= given.agreement + CLASS_FIX_MARGIN:
        return f"{best.fix}: {text} as given, {best.agreement:.0%} once undone"
    if check.swapped:
        return f"{check.ids} are swapped between classes: {', '.join(check.swapped[:3])} ({text})"
    if given.agreement >= MIN_CLASS_AGREEMENT:
        return ""
    text += f" (at least {MIN_CLASS_AGREEMENT:.0%} expected)"
    confused = f"; most often {', '.join(check.confusions[:3])}" if check.confusions else ""
    return f"{check.ids} do not match the model's class names: {text}{confused}"


def _swapped(pairs: list[tuple[int, int]], class_category_ids: Sequence[int], names: Mapping[int, str]) -> list[str]:
    by_class: dict[int, Counter] = {}
    for cls, ann in pairs:
        by_class.setdefault(cls, Counter())[ann] += 1
    words = []
    for cls, counts in sorted(by_class.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counts.values())
        expected = class_category_ids[cls] if 0 <= cls < len(class_category_ids) else None
        (annotated, count), = counts.most_common(1)
        if total >= MIN_SWAP_PAIRS and annotated != expected and count >= MIN_SWAP_SHARE * total:
            words.append(f"'{names.get(expected, cls)}' detections lie on boxes annotated {annotated} "
                         f"'{names.get(annotated, '?')}' ({count} of {total})")
    return words


def _confusions(pairs: list[tuple[int, int]], class_category_ids: Sequence[int], names: Mapping[int, str],
                top: int = 5) -> list[str]:
    counts = Counter((cls, ann) for cls, ann in pairs
                     if not (0 <= cls < len(class_category_ids) and class_category_ids[cls] == ann))
    words = []
    for (cls, ann), count in counts.most_common(top):
        detected = class_category_ids[cls] if 0 <= cls < len(class_category_ids) else None
        words.append(f"'{names.get(detected, cls)}' annotated as {ann} '{names.get(ann, '?')}' ({count}x)")
    return words
