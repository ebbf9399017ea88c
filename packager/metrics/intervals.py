"""Paired bootstrap over images for accuracy ratios (e.g. INT8 mAP50-95 / FP32 mAP50-95) with a 95 % interval.

Detection is never re-run: pycocotools' per-image matching (COCOeval.evalImgs, area "all", 100 detections per
image and category) is kept, images are resampled with replacement, and only the accumulate step is recomputed.
A resample is a vector of integer image weights; since a detection's rank in the score order does not depend on
the weights, the score sort is done once and each resample is a weighted cumulative sum (vectorised over
resamples). With all weights 1 this reproduces pycocotools' mAP50-95 exactly (tested). Both models of a pair are
scored on the same resamples, which is what makes the interval of the ratio narrow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from packager.core.build_records import RatioInterval  # noqa: F401  (the record the build keeps; re-exported)

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95


@dataclass
class CategoryResults:
    """One category's detections over all images in pycocotools' sort order (score descending, stable)."""

    image_index: np.ndarray  # (D,) index into PerImageResults.image_ids
    true_positive: np.ndarray  # (T, D) bool: matched and not ignored, per IoU threshold
    counted: np.ndarray  # (T, D) bool: not ignored (true or false positive)
    ground_truth: np.ndarray  # (I,) non-ignored ground-truth boxes per image


@dataclass
class PerImageResults:
    """What the accumulate step needs from COCOeval.evaluate(), per category; images in COCOeval's order."""

    image_ids: list[int]
    categories: list[CategoryResults]
    recall_thresholds: np.ndarray  # (R,) pycocotools' 101 points
    _counts: object = field(default=None, repr=False, compare=False)  # cache for weighted_map

    @property
    def images(self) -> int:
        return len(self.image_ids)


def per_image_results(evaluator, max_detections: int = 100) -> PerImageResults:
    """Collect area-"all" results from a COCOeval after evaluate() (its evalImgs, nothing re-matched)."""
    params = evaluator.params
    image_ids = list(params.imgIds)
    n_images, n_areas = len(image_ids), len(params.areaRng)
    area_all = [tuple(a) for a in params.areaRng].index((0, 1e5**2))
    n_thresholds = len(params.iouThrs)
    categories = []
    for k in range(len(params.catIds)):
        base = k * n_areas * n_images + area_all * n_images
        scores, images, matched, ignored = [], [], [], []
        ground_truth = np.zeros(n_images, dtype=np.int64)
        for i in range(n_images):
            entry = evaluator.evalImgs[base + i]
            if entry is None:
                continue
            ground_truth[i] = np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)
            scores.append(np.asarray(entry["dtScores"][:max_detections], dtype=np.float64))
            images.append(np.full(len(scores[-1]), i, dtype=np.int64))
            matched.append(np.asarray(entry["dtMatches"])[:, :max_detections] != 0)
            ignored.append(np.asarray(entry["dtIgnore"])[:, :max_detections].astype(bool))
        if not scores:
            continue
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="mergesort")  # pycocotools' tie order
        matched_all = np.concatenate(matched, axis=1)[:, order] if all_scores.size else np.zeros((n_thresholds, 0), bool)
        ignored_all = np.concatenate(ignored, axis=1)[:, order] if all_scores.size else np.zeros((n_thresholds, 0), bool)
        categories.append(CategoryResults(np.concatenate(images)[order], matched_all & ~ignored_all, ~ignored_all,
                                          ground_truth))
    return PerImageResults(image_ids, categories, np.asarray(params.recThrs, dtype=np.float64))


def ground_truth_only_results(coco, image_ids: list[int], iou_thresholds: int = 10) -> PerImageResults:
    """Per-image results of a model with no detections at all (every category with ground truth scores 0)."""
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    counts: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_ids)):
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            continue
        counts.setdefault(ann["category_id"], np.zeros(len(image_ids), dtype=np.int64))[index[ann["image_id"]]] += 1
    empty = np.zeros((iou_thresholds, 0), dtype=bool)
    categories = [CategoryResults(np.zeros(0, dtype=np.int64), empty, empty, gt) for _, gt in sorted(counts.items())]
    return PerImageResults(list(image_ids), categories, np.linspace(0.0, 1.0, 101))


def resample_weights(images: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(resamples, images) int counts: how often each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    offsets = (np.arange(resamples) * images)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * images).reshape(resamples, images)


@dataclass
class _TruePositiveCounts:
    """Per image, the running true-positive and non-ignored counts at every true-positive position of every
    (category, IoU threshold) side by side: resample weights enter only through one matrix product."""

    tp: np.ndarray  # (I, N)
    seen: np.ndarray  # (I, N)
    column_category: np.ndarray  # (N,) category index of each column
    segment_starts: np.ndarray  # (S,) first column of each (category, IoU threshold) segment
    segment_category: np.ndarray  # (S,)
    ground_truth: np.ndarray  # (I, K)
    iou_thresholds: int


def _true_positive_counts(results: PerImageResults) -> _TruePositiveCounts:
    if results._counts is not None:
        return results._counts
    tp_columns, seen_columns, starts, segment_category, start = [], [], [], [], 0
    n_images = len(results.image_ids)
    for k, category in enumerate(results.categories):
        one_hot = np.zeros((n_images, category.image_index.size))
        one_hot[category.image_index, np.arange(category.image_index.size)] = 1.0
        running_seen: dict[bytes, np.ndarray] = {}  # the ignore mask rarely differs between IoU thresholds
        for true_positive, counted in zip(category.true_positive, category.counted):
            columns = np.flatnonzero(true_positive)
            if columns.size == 0:
                continue  # no true positive at this IoU: precision 0 at every recall threshold
            key = counted.tobytes()
            if key not in running_seen:
                running_seen[key] = np.cumsum(one_hot * counted, axis=1)
            tp_columns.append(np.cumsum(one_hot[:, columns], axis=1))
            seen_columns.append(running_seen[key][:, columns])
            starts.append(start)
            segment_category.append(k)
            start += columns.size
    n_categories = len(results.categories)
    ground_truth = (np.stack([c.ground_truth for c in results.categories], axis=1) if n_categories
                    else np.zeros((n_images, 0)))
    segment_category = np.asarray(segment_category, dtype=np.int64)
    sizes = np.diff(np.append(starts, start)).astype(np.int64)
    results._counts = _TruePositiveCounts(
        np.hstack(tp_columns) if tp_columns else np.zeros((n_images, 0)),
        np.hstack(seen_columns) if seen_columns else np.zeros((n_images, 0)),
        np.repeat(segment_category, sizes), np.asarray(starts, dtype=np.int64), segment_category,
        ground_truth.astype(np.float64),
        results.categories[0].true_positive.shape[0] if n_categories else 10,
    )
    return results._counts


def weighted_map(results: PerImageResults, weights: np.ndarray, chunk: int = 250) -> np.ndarray:
    """mAP50-95 (area all, 100 detections) for each row of `weights` (B, I); a row of ones = pycocotools' value.

    Only true-positive positions matter: recall first reaches a threshold at a true positive, and the precision
    envelope (max to the right) is attained at one, since precision only falls at false positives. The weighted
    counts at those positions are one matrix product W (B, I) @ counts (I, N), exact in float64. The mean over
    the 101 recall thresholds is then sum_j envelope_j x (thresholds first reached at column j).
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    counts = _true_positive_counts(results)
    return np.concatenate([_weighted_map_chunk(results, counts, weights[i:i + chunk])
                           for i in range(0, len(weights), chunk)])


def _weighted_map_chunk(results: PerImageResults, counts: _TruePositiveCounts, weights: np.ndarray) -> np.ndarray:
    positives = weights @ counts.ground_truth  # (B, K)
    valid = positives > 0
    per_category = np.zeros_like(positives)
    if counts.segment_starts.size:
        tp, seen = weights @ counts.tp, weights @ counts.seen  # (B, N)
        precision = tp / (seen + np.spacing(1))  # pycocotools: tp / (fp + tp + eps)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / positives[:, counts.column_category]  # pycocotools: tp / npig
        # recall thresholds reached at or before each column (pycocotools: searchsorted(rc, recThrs, 'left'))
        reached = np.searchsorted(results.recall_thresholds, recall.ravel(), side="right").reshape(recall.shape)
        newly = np.diff(reached, axis=1, prepend=0)
        newly[:, counts.segment_starts] = reached[:, counts.segment_starts]
        ends = np.append(counts.segment_starts[1:], tp.shape[1])
        envelope = np.empty_like(precision)
        for start, end in zip(counts.segment_starts, ends):
            envelope[:, start:end] = np.maximum.accumulate(precision[:, start:end][:, ::-1], axis=1)[:, ::-1]
        sums = np.add.reduceat(envelope * newly, counts.segment_starts, axis=1)  # (B, S)
        np.add.at(per_category.T, counts.segment_category, sums.T)
    per_category /= counts.iou_thresholds * len(results.recall_thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid.any(axis=1), (per_category * valid).sum(axis=1) / valid.sum(axis=1), np.nan)


def paired_ratio(
    candidate: PerImageResults,
    reference: PerImageResults,
    candidate_name: str = "candidate",
    reference_name: str = "reference",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    subset: np.ndarray | None = None,
) -> RatioInterval:
    """candidate/reference mAP50-95 and its paired percentile bootstrap interval (same resamples for both).

    `subset` (image indices) restricts everything to those images: the same as evaluating only them, since an
    image with weight 0 contributes nothing (used to measure how the interval narrows with more images).
    """
    images, (point_cand, point_ref), (cand, ref) = _paired_maps(candidate, reference, subset, resamples, seed)
    ratio = point_cand / point_ref if point_ref > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        low, high = _percentile_interval(cand / ref, confidence)
    return RatioInterval(candidate_name, reference_name, ratio, low, high, confidence, resamples, seed, images)


@dataclass
class DifferenceInterval:
    """candidate - reference mAP50-95 on the full set (e.g. two INT8 recipes' agreement with FP32), with a paired
    percentile bootstrap interval: the candidate is better beyond the noise only when `low` > 0."""

    candidate: str
    reference: str
    candidate_map: float
    reference_map: float
    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    images: int

    @property
    def decided(self) -> bool:
        """The interval excludes 0: one of the two is better on these images beyond resampling noise."""
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        return f"{self.difference:+.4f} ({self.confidence:.0%} CI {self.low:+.4f} to {self.high:+.4f}, n={self.images})"

    def as_dict(self) -> dict:
        return {**asdict(self), "decided": self.decided}


def paired_difference(
    candidate: PerImageResults,
    reference: PerImageResults,
    candidate_name: str = "candidate",
    reference_name: str = "reference",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    subset: np.ndarray | None = None,
) -> DifferenceInterval:
    """candidate - reference mAP50-95 with its paired bootstrap interval (both scored on the same resamples)."""
    images, (a, b), (cand, ref) = _paired_maps(candidate, reference, subset, resamples, seed)
    low, high = _percentile_interval(cand - ref, confidence)
    return DifferenceInterval(candidate_name, reference_name, a, b, a - b, low, high, confidence, resamples, seed,
                              images)


def resampled_interval(
    results: PerImageResults,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    subset: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(mAP50-95, low, high): one model's value and its percentile bootstrap interval over images."""
    _, full, weights = _resample_plan(results.images, subset, resamples, seed)
    return (float(weighted_map(results, full)[0]), *_percentile_interval(weighted_map(results, weights), confidence))


def _paired_maps(candidate: PerImageResults, reference: PerImageResults, subset, resamples: int, seed: int):
    """(images used, (candidate, reference) mAP on the full set, the same two over the same resamples)."""
    if candidate.image_ids != reference.image_ids:
        raise ValueError("a paired bootstrap needs both models evaluated on the same images")
    subset, full, weights = _resample_plan(candidate.images, subset, resamples, seed)
    points = (float(weighted_map(candidate, full)[0]), float(weighted_map(reference, full)[0]))
    return int(subset.size), points, (weighted_map(candidate, weights), weighted_map(reference, weights))


def _resample_plan(images: int, subset, resamples: int, seed: int):
    """(subset indices, the full-set weight row, (resamples, images) bootstrap weights zero outside the subset)."""
    subset = np.arange(images) if subset is None else np.asarray(subset)
    full = np.zeros((1, images), dtype=np.int64)
    full[0, subset] = 1
    weights = np.zeros((resamples, images), dtype=np.int64)
    weights[:, subset] = resample_weights(subset.size, resamples, seed)
    return subset, full, weights


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
