"""COCO mAP of a build's ONNX variants on CPU (onnxruntime or OpenVINO), the serving letterbox and postprocess.

The same Q/DQ ONNX scores differently per runtime: onnxruntime emulates INT8 (quantize -> dequantize -> float
math), OpenVINO runs integer kernels with its own rounding and accumulation, as a served INT8 engine does.

`int8` (fp16-mixed) is meant for TensorRT: onnxruntime's CPU QuantizeLinear truncates FP16 inputs, so on CPU
the faithful stand-in for INT8 accuracy is the `int8-fp32` twin (identical scales). The gate compares that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track

from packager.metrics.intervals import DEFAULT_RESAMPLES, DEFAULT_SEED, PerImageResults, RatioInterval, paired_ratio
from packager.calibration.calibration import check_no_overlap
from packager.metrics.coco_eval import CocoGroundTruth, CocoMetrics, evaluate_images
from packager.evaluate.ground_truth import ValidationSet, validation_files, validation_set  # noqa: F401 (re-exported)
from packager.metrics.mac_coverage import conv_coverage
from packager.inference.letterbox import preprocess, read_image
from packager.core.contracts import AccuracyGateError, ConfigError, HeadFormat
from packager.core.manifest import BuildManifest
from packager.inference.postprocess import EVAL_THRESHOLDS, Thresholds, postprocess
from packager.inference.runtime import CompiledModel, RuntimeOptions, open_model

DEFAULT_VARIANTS = ("fp32", "fp16", "int8-fp32")
GATED_VARIANT = "int8-fp32"
# ModelOpt's FP8 Q/DQ runs on onnxruntime CPU only unoptimized: with graph optimizations on, onnxruntime fuses
# Q/DQ pairs into QLinear* kernels that reject float8 types.
UNOPTIMIZED_VARIANTS = ("fp8", "fp8-fp32")
DEFAULT_MIN_MAP_RATIO = 0.99


@dataclass
class BuildGateResult:
    variant: str
    reference_map: float
    variant_map: float
    min_ratio: float
    interval: RatioInterval | None = None  # paired bootstrap over images

    @property
    def ratio(self) -> float:
        return self.variant_map / self.reference_map if self.reference_map > 0 else 0.0

    @property
    def passed(self) -> bool:
        return self.variant_map >= self.min_ratio * self.reference_map

    @property
    def margin(self) -> float:
        """What the gate tests: a loss of at most 1 - min_ratio."""
        return abs(1.0 - self.min_ratio)

    @property
    def decidable(self) -> bool | None:
        """False when the interval is wider than the margin tested: too few images to tell pass from fail."""
        return None if self.interval is None else not self.interval.too_small_to_decide(self.margin)

    def message(self) -> str:
        text = f"{self.variant} mAP50-95 {self.variant_map:.4f} vs fp32 {self.reference_map:.4f} (ratio {self.ratio:.4f}"
        interval = self.interval
        if interval is None:
            return text + f", required >= {self.min_ratio})"
        text += (f", {interval.confidence:.0%} interval {interval.low:.4f}-{interval.high:.4f} over {interval.images} "
                 f"images, {interval.resamples} paired bootstrap resamples; required >= {self.min_ratio})")
        if not self.decidable:
            text += (f"; TOO FEW IMAGES TO DECIDE: the interval is {interval.width:.3f} wide, wider than the "
                     f"{self.margin:.3f} margin tested (about {interval.images_needed(self.margin / 2):,} images "
                     f"would narrow it to +-{self.margin / 2:.3f}, extrapolated)")
        return text


@dataclass
class BuildEvaluation:
    """COCO metrics of each variant, pycocotools' per-image results behind them, each variant's ratio vs fp32
    with its paired bootstrap interval, the quantized share of convolution MACs, and any overlap found between
    the validation images and the build's calibration images."""

    metrics: dict[str, CocoMetrics]
    per_image: dict[str, PerImageResults]
    intervals: dict[str, RatioInterval] = field(default_factory=dict)
    coverage: dict[str, float] = field(default_factory=dict)
    overlaps: list[str] = field(default_factory=list)
    # What ran each variant, as opened (an INT8 self-check can move one to onnxruntime), and its notes.
    runtimes: dict[str, str] = field(default_factory=dict)
    runtime_notes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dataset: str = ""  # the ground truth and its images, one line
    unscored_classes: list[str] = field(default_factory=list)  # model classes the ground truth lacks: not scored

    def runtime_label(self) -> str:
        """The first variant's runtime, then each variant that ran elsewhere, e.g. 'openvino (f32 hint); int8-fp32:
        onnxruntime'."""
        if not self.runtimes:
            return ""
        first = next(iter(self.runtimes.values()))
        return "; ".join([first] + [f"{variant}: {label}" for variant, label in self.runtimes.items()
                                    if label != first])

    def as_dict(self) -> dict:
        """{variant: metrics + ratio_vs_fp32 (with interval) + quantized_mac_coverage} (eval-onnx --json)."""
        out = {}
        for variant, metrics in self.metrics.items():
            out[variant] = metrics.as_dict()
            if variant in self.intervals:
                out[variant]["ratio_vs_fp32"] = self.intervals[variant].as_dict()
            if variant in self.coverage:
                out[variant]["quantized_mac_coverage"] = round(self.coverage[variant], 5)
        return out

    def ratios(self, reference: str = "fp32", resamples: int = DEFAULT_RESAMPLES,
               seed: int = DEFAULT_SEED) -> dict[str, RatioInterval]:
        """Every other variant against `reference`: mAP50-95 ratio with its paired bootstrap interval."""
        if reference not in self.per_image:
            return {}
        return {variant: paired_ratio(results, self.per_image[reference], variant, reference, resamples, seed)
                for variant, results in self.per_image.items() if variant != reference}


def onnx_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's own warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def detect_images(
    model_path: str | Path,
    image_files: list[Path],
    imgsz: tuple[int, int],
    thresholds: Thresholds = EVAL_THRESHOLDS,
    label: str = "",
    show_progress: bool = True,
    runtime: RuntimeOptions | None = None,
    head_format: HeadFormat = HeadFormat.RAW,
    optimize: bool = True,
) -> dict[str, np.ndarray]:
    """Run one ONNX model over images, one at a time: {file name: (n, 6) detections in original pixels}.

    `head_format` is the build's (`ModelSpec.head`): raw decodes + NMS, end2end selects the head's rows.
    `optimize=False` (FP8 Q/DQ): onnxruntime with graph optimizations off, whatever `runtime` says.
    A build's variant is opened as evaluation opens it (INT8 with its u8 twin and self-check) by `open_variant`.
    """
    options = (runtime or RuntimeOptions()) if optimize else RuntimeOptions("onnxruntime", graph_optimizations=False)
    return detect_with(open_model(model_path, options), image_files, imgsz, thresholds, label, show_progress,
                       head_format)


def detect_with(model: CompiledModel, image_files: list[Path], imgsz: tuple[int, int],
                thresholds: Thresholds = EVAL_THRESHOLDS, label: str = "", show_progress: bool = True,
                head_format: HeadFormat = HeadFormat.RAW) -> dict[str, np.ndarray]:
    """`detect_images` with a model already opened (its runtime's notes are printed first)."""
    for note in model.choice.notes:
        Console(stderr=True).print(f"[yellow]{note}[/]")
    detections = {}
    for path in track(image_files, description=f"Evaluating {label or model.path.name}", disable=not show_progress):
        chw, info = preprocess(read_image(path), imgsz)
        detections[path.name] = postprocess(model.run(chw[None])[0], info, thresholds, HeadFormat(head_format).value)
    return detections


def evaluate_build(
    build_dir: str | Path,
    images_dir: str | Path,
    annotations: str | Path,
    variants=DEFAULT_VARIANTS,
    show_progress: bool = True,
    runtime: RuntimeOptions | None = None,
) -> dict[str, CocoMetrics]:
    """mAP of each ONNX variant of a build on the annotated images found in `images_dir` (`runtime`: which
    runtime runs them, OpenVINO with the f32 hint by default)."""
    return evaluate_build_detailed(build_dir, images_dir, annotations, variants, show_progress, runtime=runtime).metrics


def evaluate_build_detailed(
    build_dir: str | Path,
    images_dir: str | Path | None = None,
    annotations: str | Path | None = None,
    variants=DEFAULT_VARIANTS,
    show_progress: bool = True,
    allow_overlap: bool = False,
    runtime: RuntimeOptions | None = None,
    data: str | Path | None = None,
    split: str = "val",
    validation: ValidationSet | None = None,
) -> BuildEvaluation:
    """Like `evaluate_build`, plus ratios vs fp32 with bootstrap intervals and MAC coverage. The ground truth:
    `validation` if given, else a dataset YAML's `split` (`data`) or `annotations` with the images in `images_dir`
    (`ground_truth.validation_set`). Refuses (or, with `allow_overlap`, warns) when a validation image is one of
    the build's calibration images."""
    manifest = BuildManifest.load(build_dir)
    validation = validation or validation_set(images_dir, annotations, data, split)
    class_names = list(manifest.model.class_names)
    unscored = validation.ground_truth.class_mapping(class_names).unscored  # refuses classes the model lacks, now
    used = manifest.calibration.used_images() if manifest.calibration is not None else {}
    overlaps = check_no_overlap(validation.image_files, used, allow=allow_overlap)
    result = evaluate_variants(build_dir, manifest, validation.ground_truth, validation.image_files, variants,
                               show_progress, runtime)
    result.overlaps, result.dataset, result.unscored_classes = overlaps, validation.description, unscored
    return result


def evaluate_variants(build_dir: str | Path, manifest: BuildManifest, ground_truth: CocoGroundTruth,
                      image_files: list[Path], variants=DEFAULT_VARIANTS, show_progress: bool = True,
                      runtime: RuntimeOptions | None = None) -> BuildEvaluation:
    """COCO metrics of each variant on `image_files`, ratios vs fp32 with their intervals, MAC coverage (the
    caller has checked the images against the build's calibration images)."""
    imgsz = manifest.model.imgsz
    metrics, per_image, runtimes, notes = {}, {}, {}, {}
    for variant in variants:
        model = open_variant(build_dir, manifest, variant, runtime)
        runtimes[variant], notes[variant] = model.label, model.choice.notes
        # One variant's detections and pycocotools evaluator alive at a time; what stays is the compact per-image
        # results (a few bytes per detection) the intervals need.
        evaluation = evaluate_images(
            detect_with(model, image_files, imgsz, label=variant, show_progress=show_progress,
                        head_format=manifest.model.head),
            ground_truth, list(manifest.model.class_names))
        del model
        metrics[variant], per_image[variant] = evaluation.metrics, evaluation.per_image
    result = BuildEvaluation(metrics, per_image, runtimes=runtimes, runtime_notes=notes)
    result.intervals = result.ratios()
    result.coverage = coverage_by_variant(build_dir, manifest, variants)
    return result


def int8_runtime_files(build_dir: str | Path, manifest: BuildManifest, variant: str) -> dict:
    """What `open_model` needs to run an INT8 variant on OpenVINO: the u8-activation twin and the self-check images
    (empty for other variants, and for a build made before yqpack wrote them: onnxruntime then runs it)."""
    if variant != "int8-fp32":
        return {}
    files = {}
    if "int8-u8" in manifest.artifacts:
        files["u8_twin"] = manifest.artifact_path(build_dir, "int8-u8")
    if "int8-check" in manifest.artifacts:
        files["check_images"] = np.load(manifest.artifact_path(build_dir, "int8-check"))
    return files


def open_variant(build_dir: str | Path, manifest: BuildManifest, variant: str,
                 runtime: RuntimeOptions | None = None) -> CompiledModel:
    """One build variant opened as evaluation runs it: FP8 Q/DQ on unoptimized onnxruntime, INT8 with its self-check."""
    options = (RuntimeOptions("onnxruntime", graph_optimizations=False) if variant in UNOPTIMIZED_VARIANTS
               else runtime or RuntimeOptions())
    return open_model(manifest.artifact_path(build_dir, variant), options,
                      **int8_runtime_files(build_dir, manifest, variant))


def coverage_by_variant(build_dir: str | Path, manifest: BuildManifest, variants) -> dict[str, float]:
    """Share of convolution MACs each quantized variant runs in its quantized type (int8 or fp8): as the build
    recorded it (both twins of a precision share one recipe), else measured on the graph."""
    coverage = {}
    for variant in variants:
        precision = variant.split("-")[0]
        if precision not in ("int8", "fp8"):
            continue
        recorded = manifest.quantization.mac_coverage(precision) if manifest.quantization is not None else None
        coverage[variant] = recorded if recorded is not None else conv_coverage(
            manifest.artifact_path(build_dir, variant)).share(precision)
    return coverage


def check_gate(
    metrics: dict[str, CocoMetrics],
    min_ratio: float = DEFAULT_MIN_MAP_RATIO,
    variant: str = GATED_VARIANT,
    interval: RatioInterval | None = None,
) -> BuildGateResult:
    """Raise AccuracyGateError unless `variant` mAP50-95 >= min_ratio x fp32 mAP50-95 (on the point estimate;
    the interval, when given, is reported with a plain warning when it is wider than the margin tested)."""
    if "fp32" not in metrics or variant not in metrics:
        raise ConfigError(f"the accuracy gate needs fp32 and {variant} results, got {', '.join(metrics)}")
    gate = BuildGateResult(variant, metrics["fp32"].map50_95, metrics[variant].map50_95, min_ratio, interval)
    if not gate.passed:
        kind = "FP8" if variant.startswith("fp8") else "INT8"
        raise AccuracyGateError(f"{kind} accuracy gate failed: {gate.message()}")
    return gate
