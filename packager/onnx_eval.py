"""COCO mAP of a build's ONNX variants on CPU (onnxruntime or OpenVINO), the serving letterbox and postprocess.

The same Q/DQ ONNX scores differently per runtime: onnxruntime emulates INT8 (quantize -> dequantize -> float
math), OpenVINO runs integer kernels with its own rounding and accumulation, as a served INT8 engine does.

`int8` (fp16-mixed) is meant for TensorRT: onnxruntime's CPU QuantizeLinear truncates FP16 inputs, so on CPU
the faithful stand-in for INT8 accuracy is the `int8-fp32` twin (identical scales). The gate compares that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track

from .coco_eval import CocoGroundTruth, CocoMetrics, evaluate
from .letterbox import preprocess, read_image
from .contracts import AccuracyGateError, BuildManifest
from .postprocess import EVAL_THRESHOLDS, Thresholds, postprocess
from .runtime import RuntimeOptions, open_model

DEFAULT_VARIANTS = ("fp32", "fp16", "int8-fp32")
GATED_VARIANT = "int8-fp32"
DEFAULT_MIN_MAP_RATIO = 0.99


@dataclass
class GateResult:
    variant: str
    reference_map: float
    variant_map: float
    min_ratio: float

    @property
    def ratio(self) -> float:
        return self.variant_map / self.reference_map if self.reference_map > 0 else 0.0

    @property
    def passed(self) -> bool:
        return self.variant_map >= self.min_ratio * self.reference_map

    def message(self) -> str:
        return (
            f"{self.variant} mAP50-95 {self.variant_map:.4f} vs fp32 {self.reference_map:.4f} "
            f"(ratio {self.ratio:.4f}, required >= {self.min_ratio})"
        )


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
) -> dict[str, np.ndarray]:
    """Run one ONNX model over images, one at a time: {file name: (n, 6) detections in original pixels}."""
    model = open_model(model_path, runtime or RuntimeOptions())
    for note in model.choice.notes:
        Console(stderr=True).print(f"[yellow]{note}[/]")
    detections = {}
    for path in track(image_files, description=f"Evaluating {label or Path(model_path).name}", disable=not show_progress):
        chw, info = preprocess(read_image(path), imgsz)
        raw = model.run(chw[None])[0]
        detections[path.name] = postprocess(raw, info, thresholds)
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
    manifest = BuildManifest.load(build_dir)
    ground_truth = CocoGroundTruth(annotations)
    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"validation image folder not found: {images_dir}")
    image_files = ground_truth.image_files(images_dir)
    if not image_files:
        raise ValueError(f"none of the images listed in {Path(annotations).name} are in {images_dir}")
    imgsz = manifest.model.imgsz
    results = {}
    for variant in variants:
        detections = detect_images(manifest.artifact_path(build_dir, variant), image_files, imgsz, label=variant,
                                   show_progress=show_progress, runtime=runtime)
        results[variant] = evaluate(detections, ground_truth, list(manifest.model.class_names))
    return results


def check_gate(
    metrics: dict[str, CocoMetrics], min_ratio: float = DEFAULT_MIN_MAP_RATIO, variant: str = GATED_VARIANT
) -> GateResult:
    """Raise AccuracyGateError unless `variant` mAP50-95 >= min_ratio x fp32 mAP50-95."""
    if "fp32" not in metrics or variant not in metrics:
        raise ValueError(f"the accuracy gate needs fp32 and {variant} results, got {', '.join(metrics)}")
    gate = GateResult(variant, metrics["fp32"].map50_95, metrics[variant].map50_95, min_ratio)
    if not gate.passed:
        raise AccuracyGateError(f"INT8 accuracy gate failed: {gate.message()}")
    return gate
