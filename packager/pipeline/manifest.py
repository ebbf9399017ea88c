"""The manifest of a finished build, from what its stages returned: the model contract, artifact hashes, tool
versions and the calibration, quantization and evaluation records (`BuildManifest` and the records themselves are
packager/core/manifest.py and build_records.py)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from packager.calibration.calibration import CalibrationPlan, CalibrationResult
from packager.core.build_records import (
    LETTERBOX,
    CalibrationRecord,
    ConvCoverage,
    EvaluationRecord,
    Fp8Record,
    GateRecord,
    QuantizationRecord,
    TuningRecord,
)
from packager.core.contracts import ModelSpec, TensorSpec
from packager.core.files import sha256_file
from packager.core.manifest import ARTIFACT_FILES, MANIFEST_NAME, Artifact, BuildManifest
from packager.evaluate.onnx_eval import BuildEvaluation, BuildGateResult
from packager.export.onnx_export import ExportResult
from packager.quantize.fp8 import Fp8Result
from packager.quantize.int8 import QuantizeOptions, QuantizeResult, modelopt_calibration_method

__all__ = ["ARTIFACT_FILES", "MANIFEST_NAME", "artifact_entries", "artifact_path", "assemble_manifest",
           "evaluation_record", "library_versions", "sha256_file"]

_VERSIONED_PACKAGES = {
    "yqpack": "yqpack",
    "ultralytics": "ultralytics",
    "modelopt": "nvidia-modelopt",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime-gpu",
    "torch": "torch",
    "numpy": "numpy",
}


def assemble_manifest(build_dir: Path, exported: ExportResult, plan: CalibrationPlan, calibration: CalibrationResult,
                      quantization: QuantizeResult, options: QuantizeOptions, coverage: dict[str, ConvCoverage],
                      fp8: Fp8Result | None, max_batch: int, config: dict | None = None) -> BuildManifest:
    """The manifest of a finished build; `max_batch` is the one asked for (a static-batch export keeps its own)."""
    versions = library_versions()
    max_batch = max_batch if exported.dynamic_batch else exported.input_shape[0]
    spec = ModelSpec(
        name=exported.model_name,
        head=exported.head_format,
        input=TensorSpec(exported.input_name, tuple(exported.input_shape)),
        output=TensorSpec(exported.output_name, tuple(exported.output_shape)),
        class_names=tuple(exported.class_names),
        imgsz=tuple(exported.imgsz),
        stride=exported.stride,
        dynamic_batch=exported.dynamic_batch,
        max_batch=max_batch,
    )
    return BuildManifest(
        model=spec,
        source_model=exported.source_model,
        opset=exported.opset,
        artifacts=artifact_entries(build_dir),
        yqpack_version=versions["yqpack"],
        versions=versions,
        quantization=quantization_record(quantization, options, coverage, fp8),
        calibration=calibration_record(plan, calibration, used_by_auto=quantization.auto is not None),
        config=config,
    )


def calibration_record(plan: CalibrationPlan, calibration: CalibrationResult, used_by_auto: bool) -> CalibrationRecord:
    tuning = plan.tuning_files
    return CalibrationRecord(
        source=calibration.source, count=calibration.count, skipped=tuple(calibration.skipped), letterbox=LETTERBOX,
        # Tuning images (preset auto): never calibration images, see split_calibration_and_tuning.
        tuning=TuningRecord(len(tuning), tuple(p.name for p in tuning), "preset auto" if used_by_auto else None),
        image_sha256=dict(calibration.image_sha256), tuning_image_sha256=dict(plan.tuning_hashes),
        selection=plan.selection,
    )


def quantization_record(quantization: QuantizeResult, options: QuantizeOptions, coverage: dict[str, ConvCoverage],
                        fp8: Fp8Result | None) -> QuantizationRecord:
    """The INT8 recipe and what it quantized, with the MAC coverage measured on each quantized artifact."""
    return QuantizationRecord(
        preset=quantization.preset,
        calibration_method=options.calibration_method,
        calibration_eps=tuple(options.calibration_eps),
        dq_only=options.dq_only,
        calibrate_per_node=options.calibrate_per_node,
        trt_plugins=tuple(options.trt_plugins),
        excluded_nodes=tuple(quantization.excluded_nodes),
        excluded_node_patterns=tuple(options.exclude_nodes),
        excluded_ops=tuple(quantization.excluded_ops),
        op_types_to_quantize=None if quantization.op_types_to_quantize is None else tuple(
            quantization.op_types_to_quantize),
        quantized_nodes=quantization.quantized_nodes,
        wall_time_s=quantization.wall_time_s,
        int8_mac_coverage=round(coverage["int8"].share("int8"), 5),
        conv_coverage=dict(coverage),
        fp8=None if fp8 is None else Fp8Record(fp8.quantized_nodes, round(coverage["fp8"].share("fp8"), 5),
                                               fp8.wall_time_s, modelopt_calibration_method(options.calibration_method)),
        auto=quantization.auto.as_dict() if quantization.auto else None,
        stride4_precise=options.stride4_precise and quantization.preset == "mixed",
        activation_scales=quantization.activation_scales.as_dict() if quantization.activation_scales else None,
        adaround=quantization.adaround.as_dict() if quantization.adaround else None,
    )


def evaluation_record(evaluation: BuildEvaluation, gates: list[BuildGateResult], min_ratio: float,
                      runtime_label: str, attempts: list[dict] = ()) -> EvaluationRecord:
    """What the build's accuracy gate measured and decided (`attempts`: each INT8 preset gated, in order)."""
    return EvaluationRecord(
        metrics=dict(evaluation.metrics), ratios_vs_fp32=dict(evaluation.intervals), runtime=runtime_label,
        min_ratio=min_ratio, gates=tuple(GateRecord(g.variant, g.ratio, g.passed, g.decidable) for g in gates),
        attempts=tuple(attempts),
    )


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, distribution in _VERSIONED_PACKAGES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    if versions["onnxruntime"] is None:  # a plain onnxruntime install (never beside onnxruntime-gpu)
        try:
            versions["onnxruntime"] = metadata.version("onnxruntime")
        except metadata.PackageNotFoundError:
            pass
    return versions


def artifact_entries(build_dir: str | Path, variants=tuple(ARTIFACT_FILES)) -> dict[str, Artifact]:
    """{variant: Artifact(path, sha256)} for the artifacts present in `build_dir`."""
    build_dir = Path(build_dir)
    return {
        variant: Artifact(ARTIFACT_FILES[variant], sha256_file(build_dir / ARTIFACT_FILES[variant]))
        for variant in variants
        if (build_dir / ARTIFACT_FILES[variant]).is_file()
    }


def artifact_path(build_dir: str | Path, variant: str) -> Path:
    """Absolute path of an artifact (`fp32`, `fp16`, `int8`, `int8-fp32`, `calib`, ...) listed in the manifest."""
    return BuildManifest.load(build_dir).artifact_path(build_dir, variant)
