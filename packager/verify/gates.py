"""Precision comparison and pass/fail gates of `yqpack verify` (pure functions over measured numbers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from packager.verify.annotation_check import MIN_BOX_PRECISION, NOT_JUDGED, AnnotationCheck
from packager.metrics.intervals import PerImageResults, RatioInterval, paired_ratio
from packager.metrics.coco_eval import CocoMetrics
from packager.verify.loadtest import LevelResult

# Reference precision for comparisons: the most precise one served.
REFERENCE_ORDER = ("fp32", "fp16")


@dataclass
class ServedAccuracy:
    """Accuracy pass of one served ensemble."""

    model: str  # Triton ensemble name, e.g. yolov8n_int8
    family: str  # model name without the precision, e.g. yolov8n
    precision: str
    metrics: CocoMetrics | None  # None when no image could be evaluated
    images: int
    errors: int
    error_messages: list[str]
    failed_files: list[str] = field(default_factory=list)  # scored as images without detections

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """One precision against its family's reference precision."""

    model: str
    precision: str
    reference_model: str
    reference_precision: str
    map50_95: float
    reference_map50_95: float
    map_delta: float
    map_ratio: float
    peak_throughput: float
    reference_peak_throughput: float
    speedup: float  # peak throughput over the reference's peak throughput
    speedup_per_concurrency: dict[int, float]
    interval: RatioInterval | None = None  # paired bootstrap over images of map_ratio
    mac_coverage: float | None = None  # share of conv MACs in this precision's quantized type (from --build)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateResult:
    gate: str  # the CLI flag, e.g. --min-map-ratio
    model: str
    passed: bool
    value: float
    threshold: float
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateThresholds:
    min_map_ratio: float = 0.99
    max_errors: int = 0
    min_throughput: float | None = None
    max_p99_ms: float | None = None


def peak_throughput(levels: Sequence[LevelResult]) -> float:
    return max((level.throughput for level in levels), default=0.0)


def compare_precisions(
    accuracy: Sequence[ServedAccuracy],
    load: dict[str, list[LevelResult]],
    per_image: dict[str, PerImageResults] | None = None,
    coverage: dict[str, float] | None = None,
) -> list[Comparison]:
    """Each non-reference precision against fp32 (if served) else fp16 of the same model family; with
    `per_image` (model -> pycocotools per-image results) the ratio gets a paired bootstrap interval, with
    `coverage` (precision -> quantized MAC share) the coverage is attached."""
    per_image, coverage = per_image or {}, coverage or {}
    comparisons = []
    for family in dict.fromkeys(item.family for item in accuracy):
        members = {item.precision: item for item in accuracy if item.family == family}
        reference = next((members[p] for p in REFERENCE_ORDER if p in members), None)
        if reference is None or reference.metrics is None:
            continue
        ref_levels = {level.concurrency: level.throughput for level in load.get(reference.model, [])}
        ref_peak = peak_throughput(load.get(reference.model, []))
        for item in members.values():
            if item is reference or item.metrics is None:
                continue
            levels = load.get(item.model, [])
            peak = peak_throughput(levels)
            ref_map = reference.metrics.map50_95
            comparisons.append(
                Comparison(
                    model=item.model,
                    precision=item.precision,
                    reference_model=reference.model,
                    reference_precision=reference.precision,
                    map50_95=item.metrics.map50_95,
                    reference_map50_95=ref_map,
                    map_delta=item.metrics.map50_95 - ref_map,
                    map_ratio=item.metrics.map50_95 / ref_map if ref_map > 0 else float("nan"),
                    peak_throughput=peak,
                    reference_peak_throughput=ref_peak,
                    speedup=peak / ref_peak if ref_peak > 0 else float("nan"),
                    speedup_per_concurrency={
                        level.concurrency: level.throughput / ref_levels[level.concurrency]
                        for level in levels
                        if ref_levels.get(level.concurrency)
                    },
                    interval=_served_interval(item, reference, per_image),
                    mac_coverage=coverage.get(item.precision),
                )
            )
    return comparisons


def _served_interval(item: ServedAccuracy, reference: ServedAccuracy,
                     per_image: dict[str, PerImageResults]) -> RatioInterval | None:
    # Paired only over images both models answered; a failed request leaves an image out of one side.
    a, b = per_image.get(item.model), per_image.get(reference.model)
    if a is None or b is None or a.image_ids != b.image_ids:
        return None
    return paired_ratio(a, b, item.model, reference.model)


def _interval_detail(comparison: Comparison, min_ratio: float) -> str:
    interval = comparison.interval
    if interval is None:
        return ""
    text = f", 95% interval {interval.low:.4f}-{interval.high:.4f} over {interval.images} images"
    if interval.too_small_to_decide(abs(1 - min_ratio)):
        text += (f"; too few images to decide: the interval ({interval.width:.3f} wide) is wider than the "
                 f"{abs(1 - min_ratio):.3f} margin tested")
    return text


def evaluate_gates(
    thresholds: GateThresholds,
    accuracy: Sequence[ServedAccuracy],
    comparisons: Sequence[Comparison],
    load: dict[str, list[LevelResult]],
    detector_load: dict[str, list[LevelResult]] | None = None,
) -> list[GateResult]:
    """Every gate for every model; a gate that cannot be measured (no mAP, no load numbers) fails.

    Bare-detector load (a benchmark) is held to --max-errors only.
    """
    gates = map_ratio_gates(thresholds.min_map_ratio, accuracy, comparisons)
    for model in dict.fromkeys([item.model for item in accuracy] + list(load)):
        levels = load.get(model, [])
        errors = sum(item.errors for item in accuracy if item.model == model) + sum(level.errors for level in levels)
        gates.append(errors_gate(model, errors, thresholds.max_errors))
        if thresholds.min_throughput is not None:
            gates.append(throughput_gate(model, levels, thresholds.min_throughput))
        if thresholds.max_p99_ms is not None:
            gates.append(p99_gate(model, levels, thresholds.max_p99_ms))
    for model, levels in (detector_load or {}).items():
        errors = sum(level.errors for level in levels)
        gates.append(errors_gate(model, errors, thresholds.max_errors, " (bare detector)"))
    return gates


def map_ratio_gates(min_ratio: float, accuracy: Sequence[ServedAccuracy],
                    comparisons: Sequence[Comparison]) -> list[GateResult]:
    """--min-map-ratio for every model compared with its reference; a model with no mAP at all fails it."""
    gates = []
    compared = {comparison.model: comparison for comparison in comparisons}
    for item in accuracy:
        if item.model in compared:
            ratio = compared[item.model].map_ratio
            passed = not math.isnan(ratio) and ratio >= min_ratio
            gates.append(
                GateResult(
                    "--min-map-ratio",
                    item.model,
                    passed,
                    ratio,
                    min_ratio,
                    f"mAP50-95 ratio vs {compared[item.model].reference_model} is {ratio:.4f}"
                    + ("" if passed else f", {min_ratio - ratio:.4f} below the minimum")
                    + _interval_detail(compared[item.model], min_ratio),
                )
            )
        elif item.metrics is None:
            gates.append(
                GateResult("--min-map-ratio", item.model, False, float("nan"), min_ratio,
                           "no mAP: every accuracy request failed")
            )
    return gates


def errors_gate(model: str, errors: int, max_errors: int, what: str = "") -> GateResult:
    passed = errors <= max_errors
    return GateResult("--max-errors", model, passed, float(errors), float(max_errors),
                      f"{errors} failed request(s){what}" + ("" if passed else f", {errors - max_errors} over"))


def throughput_gate(model: str, levels: Sequence[LevelResult], min_throughput: float) -> GateResult:
    peak = peak_throughput(levels)
    passed = bool(levels) and peak >= min_throughput
    return GateResult("--min-throughput", model, passed, peak, min_throughput,
                      f"peak {peak:.2f} img/s" + ("" if passed else f", {min_throughput - peak:.2f} img/s short"))


def p99_gate(model: str, levels: Sequence[LevelResult], max_p99_ms: float) -> GateResult:
    """The worst level decides; no level at all fails."""
    worst = max(levels, key=lambda level: _nan_high(level.latency.p99_ms), default=None)
    value = _nan_high(worst.latency.p99_ms) if worst else float("inf")
    passed = worst is not None and value <= max_p99_ms
    where = f" at concurrency {worst.concurrency}" if worst else ""
    return GateResult("--max-p99-ms", model, passed, value, max_p99_ms,
                      f"worst p99 {value:.1f} ms{where}" + ("" if passed else f", {value - max_p99_ms:.1f} ms over"))


@dataclass
class AbsoluteGates:
    """Accuracy gates that hold a single precision too: served mAP against the build's own ONNX evaluation."""

    max_map_drift: float = 0.005  # |served - eval-onnx of the same ONNX|, mAP50-95
    min_map: float | None = None  # floor on served mAP50-95


@dataclass(frozen=True)
class AccuracyReference:
    """What the served mAP of one ensemble must equal: the build's own evaluation of the ONNX it serves."""

    model: str
    variant: str
    map50_95: float
    images: int
    source: str
    annotations: str | None = None  # the annotation file it was scored with here; None: recorded by the build


def absolute_accuracy_gates(
    gates: AbsoluteGates,
    accuracy: Sequence[ServedAccuracy],
    references: dict[str, AccuracyReference | None],
) -> list[GateResult]:
    """--max-map-drift for every served model (fails when there is no reference to compare with, unless
    --min-map holds the model instead) and --min-map when given. A model without a mAP fails both."""
    results = []
    for item in accuracy:
        served = item.metrics.map50_95 if item.metrics else float("nan")
        reference = references.get(item.model)
        if reference is not None:
            drift = abs(served - reference.map50_95) if item.metrics else float("inf")
            passed = drift <= gates.max_map_drift
            results.append(GateResult(
                "--max-map-drift", item.model, passed, drift, gates.max_map_drift,
                f"served mAP50-95 {served:.4f} vs {reference.map50_95:.4f} from {reference.source}"
                + ("" if passed else f": off by {drift:.4f}, over the {gates.max_map_drift:g} allowed")))
        elif gates.min_map is None:
            results.append(GateResult(
                "--max-map-drift", item.model, False, float("nan"), gates.max_map_drift,
                "no reference mAP for the served ONNX: pass --build DIR (the build it was rendered from) "
                "or hold it to --min-map"))
        if gates.min_map is not None:
            passed = item.metrics is not None and served >= gates.min_map
            results.append(GateResult(
                "--min-map", item.model, passed, served, gates.min_map,
                f"served mAP50-95 {served:.4f}" + ("" if passed else f", below the minimum {gates.min_map:g}")))
    return results


def annotation_gates(checks: Sequence[AnnotationCheck]) -> list[GateResult]:
    """The annotation check of each model family: fails on annotations that do not describe the images (named
    cause); a check that could not judge (too few images, a model with random weights) passes, saying so."""
    results = []
    for check in checks:
        precision = check.as_given.precision if check.as_given else float("nan")
        detail = f"not judged: {check.cause}" if check.verdict in NOT_JUDGED else check.cause
        results.append(GateResult("annotations", check.model, check.passed, precision, MIN_BOX_PRECISION, detail))
    return results


def readiness_gates(not_ready: dict[str, str]) -> list[GateResult]:
    """A model the server lists but does not serve (failed to load) fails verify instead of being skipped."""
    return [GateResult("ready", model, False, 0.0, 1.0, f"not ready on the server: {reason}")
            for model, reason in not_ready.items()]


def decide_status(gates: Sequence[GateResult], incomplete_reason: str | None) -> str:
    """incomplete beats everything (numbers from a dead server prove nothing), then any failed gate."""
    if incomplete_reason is not None:
        return "incomplete"
    return "fail" if any(not gate.passed for gate in gates) else "pass"


def _nan_high(value: float) -> float:
    # A level without a single successful request has no latency: treat it as infinitely slow.
    return float("inf") if math.isnan(value) else value
