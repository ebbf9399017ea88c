"""Paired bootstrap over images for accuracy ratios (e.g. INT8 mAP50-95 / FP32 mAP50-95) with a 95 % interval.

Detection is never re-run: pycocotools' per-image matching (COCOeval.evalImgs, area "all", 100 detections per
image and category) is kept, images are resampled with replacement, and only the accumulate step is recomputed.
A resample is a vector of integer image weights, scored by `weighted_ap.weighted_map` (memory linear in images +
detections, resamples in bounded chunks). With all weights 1 this reproduces pycocotools' mAP50-95 exactly
(tested). Both models of a pair are scored on the same resamples, which is what makes the interval of the ratio
narrow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from packager.core.build_records import RatioInterval  # noqa: F401  (the record the build keeps; re-exported)
# Re-exported: the per-image results are made and scored there, the intervals here.
from packager.metrics.weighted_ap import (  # noqa: F401
    CategoryResults,
    PerImageResults,
    ground_truth_only_results,
    per_image_results,
    weighted_map,
)

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95


def resample_weights(images: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(resamples, images) int counts: how often each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    offsets = (np.arange(resamples) * images)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * images).reshape(resamples, images)


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
