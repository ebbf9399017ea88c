"""The u8-activation twin of an INT8 Q/DQ model: the same values, activations stored as uint8 with zero point 128.

OpenVINO's CPU plugin runs ModelOpt's symmetric s8 activations right only on AMX: on the AVX512-VNNI and AVX-VNNI
kernels (Cascade Lake, Ice Lake, Alder Lake; AMD Zen 4) the s8-activation convolutions give wrong outputs
(yolov8n INT8 mAP ~0.002 of FP32's), while u8 activations, the layout those kernels are written for, come out
right (docs/cpu-openvino.md). The rewrite changes no value: an s8 code q with zero point 0 becomes the u8 code
q + 128 with zero point 128, so (u - 128) * scale == q * scale and round(x / s) + 128 clips at the same points.
Weights keep their symmetric s8 Q/DQ, and `model.int8.onnx` (TensorRT, which requires symmetric s8) is untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

U8_ZERO_POINT = 128
U8_TWIN_FILE = "model.int8-u8.onnx"  # beside model.int8-fp32.onnx (core/manifest.py: the `int8-u8` artifact)
# How many calibration images the build keeps, letterboxed as uint8, for the runtime's INT8 self-check
# (inference/int8_cpu.py): enough to see wrong kernels (their distance is ~1.0 on every image, the right file's
# 0.13-0.18), few enough to add ~0.3 s to a model's load.
CHECK_IMAGES = 4


def to_u8_activations(model):
    """A copy of `model` (onnx ModelProto) whose activation QuantizeLinear/DequantizeLinear pairs carry uint8 zero
    point 128 instead of int8 zero point 0; weight Q/DQ (fed by initializers) keep their s8 values."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    constant_outputs = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    u8_zero_points: dict[str, str] = {}  # s8 zero-point initializer -> its u8 replacement

    def u8_zero_point(name: str) -> str:
        if name not in u8_zero_points:
            s8 = numpy_helper.to_array(initializers[name])
            if s8.dtype != np.int8 or np.any(s8 != 0):
                raise ValueError(f"activation zero point {name} is {s8.dtype} {s8.ravel()[:4]}, not symmetric int8 0")
            new_name = f"{name}_u8"
            graph.initializer.append(numpy_helper.from_array(np.full(s8.shape, U8_ZERO_POINT, np.uint8), new_name))
            u8_zero_points[name] = new_name
        return u8_zero_points[name]

    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.input[0] in constant_outputs:
            continue  # a weight (or constant) quantizer: s8 stays
        if len(node.input) < 3 or node.input[2] not in initializers:
            raise ValueError(f"{node.name}: activation QuantizeLinear without an initializer zero point")
        node.input[2] = u8_zero_point(node.input[2])
        for dequantize in consumers.get(node.output[0], []):
            if dequantize.op_type != "DequantizeLinear":
                raise ValueError(f"{node.name} feeds {dequantize.op_type} {dequantize.name}, not a DequantizeLinear")
            dequantize.input[2] = u8_zero_point(dequantize.input[2])
        rewritten += 1
    if rewritten == 0:
        raise ValueError("no activation QuantizeLinear found: not an INT8 Q/DQ model")
    still_used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def write_check_images(calibration: np.ndarray, out_path: str | Path, count: int = CHECK_IMAGES) -> Path:
    """The first `count` calibration images (float32 in [0, 1], the serving letterbox) as uint8 pixels: what the
    runtime's INT8 self-check runs (a quarter of the bytes; x * 255 restores the letterbox's pixels exactly)."""
    pixels = np.rint(np.asarray(calibration[:count], dtype=np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    np.save(out_path, pixels)
    return Path(out_path)
