"""The build's manifest: the model contract, artifacts, versions and what quantization and calibration did."""

from __future__ import annotations

from pathlib import Path

from packager.calibration.calibration import CalibrationResult
from packager.core.contracts import BuildManifest, ModelSpec, TensorSpec
from packager.metrics.mac_coverage import ConvCoverage
from packager.export.onnx_export import ExportResult
from packager.build.records import artifact_entries, library_versions
from packager.quantize.int8 import QuantizeOptions, QuantizeResult, modelopt_calibration_method
from packager.quantize.fp8 import Fp8Result


def assemble_manifest(build_dir: Path, exported: ExportResult, calibration: CalibrationResult,
                      quantization: QuantizeResult, tuning: list[Path], options: QuantizeOptions,
                      max_batch: int) -> BuildManifest:
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
        quantization={
            "tool": "nvidia-modelopt onnx PTQ",
            "quantize_mode": "int8",
            "preset": quantization.preset,
            "stride4_precise": options.stride4_precise and quantization.preset == "mixed",
            "calibration_method": options.calibration_method,
            "calibration_eps": list(options.calibration_eps),
            "dq_only": options.dq_only,
            "calibrate_per_node": options.calibrate_per_node,
            "trt_plugins": list(options.trt_plugins),
            "excluded_nodes": quantization.excluded_nodes,
            "excluded_node_patterns": list(options.exclude_nodes),
            "excluded_ops": quantization.excluded_ops,
            "op_types_to_quantize": quantization.op_types_to_quantize,
            "quantized_nodes": quantization.quantized_nodes,
            "high_precision_dtype": {"int8": "fp16", "int8-fp32": "fp32"},
            "twins_from_one_calibration": True,
            "fp16_conversion": "modelopt.onnx.autocast.convert_to_f16 (keep_io_types=True)",
            "wall_time_s": quantization.wall_time_s,
            **({"auto": quantization.auto.as_dict()} if quantization.auto else {}),
            "activation_scales": quantization.activation_scales.as_dict() if quantization.activation_scales else None,
            "adaround": quantization.adaround.as_dict() if quantization.adaround else None,
        },
        calibration={
            "source": calibration.source,
            "count": calibration.count,
            "skipped": calibration.skipped,
            "letterbox": "packager.inference.letterbox.preprocess",
            # Tuning images (preset auto): never calibration images, see split_calibration_and_tuning.
            "tuning": {"count": len(tuning), "files": [p.name for p in tuning],
                       "used_by": "preset auto" if quantization.auto else None},
        },
    )


def record_quantization_extras(manifest: BuildManifest, coverage: dict[str, ConvCoverage], fp8: Fp8Result | None,
                               used_hashes: dict[str, dict[str, str]]) -> None:
    """What was measured after quantization: MAC coverage, the FP8 twins, the sha256 of calibration/tuning images."""
    manifest.quantization["int8_mac_coverage"] = round(coverage["int8"].share("int8"), 5)
    manifest.quantization["conv_coverage"] = {k: c.as_dict() for k, c in coverage.items()}
    manifest.calibration["image_sha256"] = used_hashes["calibration"]
    manifest.calibration["tuning_image_sha256"] = used_hashes["tuning"]
    if fp8 is not None:
        manifest.quantization["fp8"] = {
            "quantize_mode": "fp8", "format": "E4M3 (float8e4m3fn) Q/DQ",
            "high_precision_dtype": {"fp8": "fp16", "fp8-fp32": "fp32"},
            "same_calibration_and_exclusions_as_int8": True, "quantized_nodes": fp8.quantized_nodes,
            # ModelOpt's own ranges: the MSE refinement (activation_scales.py) is for INT8's 8-bit grid only
            "calibration_method": modelopt_calibration_method(manifest.quantization["calibration_method"]),
            "fp8_mac_coverage": round(coverage["fp8"].share("fp8"), 5), "wall_time_s": fp8.wall_time_s,
            "served_on": "gpu target only (TensorRT, compute capability >= 8.9)",
            "cpu_evaluation": "onnxruntime CPU with graph optimizations disabled",
        }
