"""FP8 (ModelOpt `quantize_mode="fp8"`, E4M3) twins from the INT8 build's export, calibration and exclusions.

`model.fp8.onnx` (fp16 elsewhere) is for TensorRT on compute capability >= 8.9; `model.fp8-fp32.onnx` (same
scales, fp32 elsewhere) is its onnxruntime CPU stand-in for evaluation.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packager.core.contracts import ConfigError, QuantizationError
from packager.quantize.int8 import NoGpuProbeNoise, QuantizeOptions, modelopt_calibration_method, quantized_node_names


@dataclass
class Fp8Result:
    fp8_path: Path  # FP8 Q/DQ, FP16 elsewhere: for TensorRT on compute capability >= 8.9
    fp8_fp32_path: Path  # same scales, FP32 elsewhere: the onnxruntime CPU stand-in (unoptimized sessions)
    quantized_nodes: int
    wall_time_s: float


def quantize_fp8_twins(
    fp32_path: str | Path,
    calibration: np.ndarray,
    out_dir: str | Path,
    excluded_nodes: list[str],
    excluded_ops: list[str],
    options: QuantizeOptions | None = None,
) -> Fp8Result:
    """ModelOpt `quantize_mode="fp8"` (E4M3) from the same export and calibration tensor as INT8, keeping the
    same nodes and op types precise; writes `model.fp8-fp32.onnx` and its fp16-mixed twin `model.fp8.onnx`.

    ModelOpt's FP8 mode quantizes Conv, Gemm, MatMul and Add only (max or entropy calibration, as for INT8).
    """
    import onnx
    from modelopt.onnx.autocast import convert_to_f16
    from modelopt.onnx.quantization import quantize

    options = options or QuantizeOptions()
    if calibration is None or len(calibration) == 0:
        raise ConfigError("FP8 quantization needs calibration data (real images), got none")
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    started = time.perf_counter()
    modelopt_logger = logging.getLogger("modelopt.onnx")
    noise_filter = NoGpuProbeNoise()
    modelopt_logger.addFilter(noise_filter)
    try:
        with tempfile.TemporaryDirectory(prefix="yqpack-fp8-") as tmp:
            work_input, fp32_twin = Path(tmp) / "model.onnx", Path(tmp) / "model.fp8-fp32.onnx"
            shutil.copyfile(fp32_path, work_input)
            quantize(
                onnx_path=str(work_input), quantize_mode="fp8",
                calibration_data={input_name: np.ascontiguousarray(calibration, dtype=np.float32)},
                calibration_method=modelopt_calibration_method(options.calibration_method), calibration_eps=list(options.calibration_eps),
                op_types_to_exclude=list(excluded_ops) or None,
                nodes_to_exclude=[re.escape(name) + "$" for name in excluded_nodes],
                high_precision_dtype="fp32", output_path=str(fp32_twin), log_level="WARNING",
            )
            if not fp32_twin.is_file():
                raise QuantizationError("ModelOpt finished without writing the FP8 model (see its log above)")
            quantized = onnx.load(str(fp32_twin))
            mixed = convert_to_f16(quantized, low_precision_type="fp16", keep_io_types=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            fp8_fp32_path, fp8_path = out_dir / "model.fp8-fp32.onnx", out_dir / "model.fp8.onnx"
            shutil.move(str(fp32_twin), fp8_fp32_path)
            onnx.save(mixed, str(fp8_path))
    finally:
        modelopt_logger.removeFilter(noise_filter)
    return Fp8Result(fp8_path, fp8_fp32_path, len(quantized_node_names(quantized)),
                     round(time.perf_counter() - started, 2))
