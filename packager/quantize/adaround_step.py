"""`yqpack build --adaround`: learned INT8 weight rounding on the finished INT8 twins (after preset auto, so units
kept precise keep their FP32 weights), written back as both twins (packager/quantize/adaround.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from packager.quantize.adaround import AdaRoundOptions, learn_rounding
from packager.quantize.int8 import QuantizeOptions, QuantizeResult, write_int8_twins


def apply_adaround(result: QuantizeResult, fp32_path: str | Path, calibration: np.ndarray, options: QuantizeOptions,
                   show_progress: bool = True) -> QuantizeResult:
    import onnx

    quantized = onnx.load(str(result.int8_fp32_path))
    result.adaround = learn_rounding(
        quantized, onnx.load(str(fp32_path)), calibration,
        AdaRoundOptions(iterations=options.adaround_iterations, device=options.adaround_device), show_progress)
    write_int8_twins(quantized, Path(result.int8_fp32_path).parent)
    return result
