"""COCO mAP50-95 under image weights, from pycocotools' per-image matching, in memory linear in images + detections.

A bootstrap resample is a vector of integer image weights: image i counted w_i times. pycocotools' per-image
matching (COCOeval.evalImgs, area "all", 100 detections per image and category) does not depend on the weights and
neither does the score order, so only the accumulate step is redone per weight vector. Only true-positive positions
matter to it: recall first reaches a threshold at a true positive, and the precision envelope (max to the right) is
attained at one, since precision only falls at false positives. So per (category, IoU threshold) and resample the
weighted running true-positive count at its true positives (a cumulative sum of their images' weights) and the
weighted running count of counted detections at the same positions are all that is needed.

The second count comes from a sparse matrix per category: row u = the u-th detection rank that is a true positive at
some IoU threshold, column = image, value = how many of that image's detections (counted at every threshold) fall
after row u-1 and at or before row u. Its product with the weights, summed down the rows, gives the count at every
such rank; the rare detections counted at some thresholds only (matched to a crowd region at others) get a small
correction matrix per threshold. Detections after a category's last true positive change nothing and are dropped.
Memory: the plan holds one entry per detection at most; resamples are processed in chunks of bounded size.
With all weights 1 this is pycocotools' mAP50-95 exactly (tested: same float operations on the same integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

# Upper bound on the elements of one (positions x resamples) float64 working array: 2 M x 8 bytes = 16 MB.
CHUNK_ELEMENTS = 2 * 2**20


@dataclass
class CategoryResults:
    """One category's detections over all images in pycocotools' sort order (score descending, stable)."""

    image_index: np.ndarray  # (D,) int32 index into PerImageResults.image_ids
    true_positive: np.ndarray  # (T, D) bool: matched and not ignored, per IoU threshold
    counted: np.ndarray  # (T, D) bool: not ignored (true or false positive)
    ground_truth: np.ndarray  # (I,) int32 non-ignored ground-truth boxes per image


@dataclass
class PerImageResults:
    """What the accumulate step needs from COCOeval.evaluate(), per category; images in COCOeval's order."""

    image_ids: list[int]
    categories: list[CategoryResults]
    recall_thresholds: np.ndarray  # (R,) pycocotools' 101 points
    _plan: object = field(default=None, repr=False, compare=False)  # cache for weighted_map

    @property
    def images(self) -> int:
        return len(self.image_ids)

    @property
    def detections(self) -> int:
        return sum(int(c.image_index.size) for c in self.categories)

    def nbytes(self) -> int:
        """Memory held by the arrays (what a caller keeps per evaluated model)."""
        return sum(c.image_index.nbytes + c.true_positive.nbytes + c.counted.nbytes + c.ground_truth.nbytes
                   for c in self.categories)


def per_image_results(evaluator, max_detections: int = 100) -> PerImageResults:
    """Collect area-"all" results from a COCOeval after evaluate() (its evalImgs, nothing re-matched)."""
    params = evaluator.params
    image_ids = list(params.imgIds)
    n_images, n_areas = len(image_ids), len(params.areaRng)
    area_all = [tuple(a) for a in params.areaRng].index((0, 1e5**2))
    categories = []
    for k in range(len(params.catIds)):
        base = k * n_areas * n_images + area_all * n_images
        scores, images, matched, ignored = [], [], [], []
        ground_truth = np.zeros(n_images, dtype=np.int32)
        for i, entry in enumerate(evaluator.evalImgs[base:base + n_images]):
            if entry is None:
                continue
            ground_truth[i] = np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)
            if not entry["dtScores"]:
                continue
            scores.append(np.asarray(entry["dtScores"][:max_detections], dtype=np.float64))
            images.append(np.full(len(scores[-1]), i, dtype=np.int32))
            matched.append(np.asarray(entry["dtMatches"])[:, :max_detections] != 0)
            ignored.append(np.asarray(entry["dtIgnore"])[:, :max_detections].astype(bool))
        if not ground_truth.any() and not scores:
            continue
        if not scores:  # ground truth, no detection: AP 0 wherever it has positives
            empty = np.zeros((len(params.iouThrs), 0), dtype=bool)
            categories.append(CategoryResults(np.zeros(0, np.int32), empty, empty, ground_truth))
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")  # pycocotools' tie order
        matched_all = np.concatenate(matched, axis=1)[:, order]
        counted_all = ~np.concatenate(ignored, axis=1)[:, order]
        categories.append(CategoryResults(np.concatenate(images)[order], matched_all & counted_all, counted_all,
                                          ground_truth))
    return PerImageResults(image_ids, categories, np.asarray(params.recThrs, dtype=np.float64))


def ground_truth_only_results(coco, image_ids: list[int], iou_thresholds: int = 10) -> PerImageResults:
    """Per-image results of a model with no detections at all (every category with ground truth scores 0)."""
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    counts: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_ids)):
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            continue
        counts.setdefault(ann["category_id"], np.zeros(len(image_ids), dtype=np.int32))[index[ann["image_id"]]] += 1
    empty = np.zeros((iou_thresholds, 0), dtype=bool)
    categories = [CategoryResults(np.zeros(0, dtype=np.int32), empty, empty, gt) for _, gt in sorted(counts.items())]
    return PerImageResults(list(image_ids), categories, np.linspace(0.0, 1.0, 101))


@dataclass
class _ThresholdPlan:
    """One IoU threshold of one category: its true positives in score order."""

    images: np.ndarray  # (n,) image of each true positive
    union_rows: np.ndarray  # (n,) row of the category's union_counts at each true positive
    extra_counts: sparse.csr_matrix | None  # (n, I) detections counted at this threshold only, by true positive


@dataclass
class _CategoryPlan:
    index: int  # into PerImageResults.categories
    union_counts: sparse.csr_matrix  # (U, I), see the module docstring
    thresholds: list[_ThresholdPlan]


@dataclass
class _Plan:
    ground_truth: np.ndarray  # (K, I) float64
    categories: list[_CategoryPlan]
    iou_thresholds: int
    longest: int  # most rows of any (positions x resamples) array: bounds the chunk of resamples


def _counts_by_row(rows: np.ndarray, images: np.ndarray, shape: tuple[int, int]) -> sparse.csr_matrix:
    """Sparse (row, image) -> number of detections (duplicates summed)."""
    return sparse.csr_matrix((np.ones(rows.size), (rows, images)), shape=shape)


def _category_plan(index: int, category: CategoryResults, n_images: int) -> _CategoryPlan | None:
    union_ranks = np.flatnonzero(category.true_positive.any(axis=0))
    if union_ranks.size == 0:
        return None  # no true positive at any IoU threshold: AP 0 wherever it has positives
    last = union_ranks[-1]
    counted = category.counted[:, :last + 1]
    images = category.image_index[:last + 1]
    everywhere = counted.all(axis=0)
    ranks = np.flatnonzero(everywhere)
    union_counts = _counts_by_row(np.searchsorted(union_ranks, ranks), images[ranks], (union_ranks.size, n_images))
    thresholds = []
    for true_positive, counted_here in zip(category.true_positive, counted):
        tp_ranks = np.flatnonzero(true_positive)
        if tp_ranks.size == 0:
            continue  # no true positive at this IoU: precision 0 at every recall threshold
        extra = np.flatnonzero(counted_here[:tp_ranks[-1] + 1] & ~everywhere[:tp_ranks[-1] + 1])
        extra_counts = (_counts_by_row(np.searchsorted(tp_ranks, extra), images[extra], (tp_ranks.size, n_images))
                        if extra.size else None)
        thresholds.append(_ThresholdPlan(images[tp_ranks], np.searchsorted(union_ranks, tp_ranks), extra_counts))
    return _CategoryPlan(index, union_counts, thresholds)


def _plan(results: PerImageResults) -> _Plan:
    if results._plan is None:
        n_images = results.images
        plans = [_category_plan(k, category, n_images) for k, category in enumerate(results.categories)]
        plans = [plan for plan in plans if plan is not None]
        ground_truth = (np.stack([c.ground_truth for c in results.categories]).astype(np.float64)
                        if results.categories else np.zeros((0, n_images)))
        longest = max([p.union_counts.shape[0] for p in plans] + [1])
        thresholds = results.categories[0].true_positive.shape[0] if results.categories else 10
        results._plan = _Plan(ground_truth, plans, thresholds, longest)
    return results._plan


def weighted_map(results: PerImageResults, weights: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """mAP50-95 (area all, 100 detections) for each row of `weights` (B, I); a row of ones = pycocotools' value.

    Resamples are processed `chunk_elements // (most true-positive positions of a category)` at a time, so the
    working memory stays near a few `chunk_elements` float64 arrays whatever the number of resamples.
    """
    weights = np.atleast_2d(np.asarray(weights))
    plan = _plan(results)
    chunk = max(1, chunk_elements // plan.longest)
    return np.concatenate([np.zeros(0)] + [_weighted_map_chunk(results, plan, weights[i:i + chunk])
                                           for i in range(0, len(weights), chunk)])


def _padded_uniform_thresholds(thresholds: np.ndarray) -> np.ndarray | None:
    """pycocotools' evenly spaced 0..1 recall thresholds followed by +inf twice; None for any others."""
    steps = len(thresholds) - 1
    if steps < 1 or not np.allclose(thresholds, np.linspace(0.0, 1.0, steps + 1), rtol=0, atol=1e-9):
        return None
    return np.append(thresholds, [np.inf, np.inf])


def _thresholds_reached(recall: np.ndarray, thresholds: np.ndarray, padded: np.ndarray | None) -> np.ndarray:
    """How many recall thresholds are <= each recall (pycocotools: searchsorted(rc, recThrs, 'left') finds the
    first position whose recall reaches each threshold, so a threshold is first reached where this count grows).

    For evenly spaced thresholds (`padded`, from _padded_uniform_thresholds) the count starts from the guess
    floor(recall x steps) and moves up past each threshold <= recall, twice: exact, since the true count is the
    guess, +1 or +2 whatever the rounding on either side; several times faster than searchsorted.
    """
    if padded is None:
        return np.searchsorted(thresholds, recall, side="right")
    count = (recall * (len(thresholds) - 1)).astype(np.intp)  # recall >= 0: truncation is floor
    np.minimum(count, len(thresholds) - 1, out=count)
    for _ in range(2):
        count += padded.take(count) <= recall
    return count


def _weighted_map_chunk(results: PerImageResults, plan: _Plan, weights: np.ndarray) -> np.ndarray:
    columns = np.ascontiguousarray(weights.T, dtype=np.float64)  # (I, b): a resample per column
    positives = plan.ground_truth @ columns  # (K, b)
    valid = positives > 0
    per_category = np.zeros_like(positives)
    thresholds = results.recall_thresholds
    padded = _padded_uniform_thresholds(thresholds)
    for category in plan.categories:
        seen_union = np.cumsum(category.union_counts @ columns, axis=0)  # (U, b)
        # A category without positives in a resample is left out (valid), its recall is never looked at.
        category_positives = np.where(valid[category.index], positives[category.index], 1.0)
        for threshold in category.thresholds:
            tp = np.cumsum(columns[threshold.images], axis=0)  # (n, b) running weighted true positives
            seen = seen_union[threshold.union_rows]
            if threshold.extra_counts is not None:
                seen += np.cumsum(threshold.extra_counts @ columns, axis=0)
            precision = tp / (seen + np.spacing(1))  # pycocotools: tp / (fp + tp + eps)
            envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
            reached = _thresholds_reached(tp / category_positives, thresholds, padded)
            newly = np.empty_like(reached)  # recall thresholds first reached at each true positive
            newly[0] = reached[0]
            np.subtract(reached[1:], reached[:-1], out=newly[1:])
            per_category[category.index] += np.einsum("ij,ij->j", envelope, newly)
    per_category /= plan.iou_thresholds * len(thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid.any(axis=0), (per_category * valid).sum(axis=0) / valid.sum(axis=0), np.nan)
