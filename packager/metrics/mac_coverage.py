"""INT8 coverage: the share of convolution MACs that run quantized, read from the ONNX graph.

A convolution runs in INT8 (or FP8) under TensorRT's explicit quantization when both its input and its weight
come from a DequantizeLinear (directly, or through a Cast in fp16-mixed graphs). MACs per image come from the
graph: output H x W x Cout x kernel x (Cin / groups), with output shapes from onnx shape inference. This is the
CPU-side proxy for the TensorRT INT8 speed-up: a recipe cannot buy accuracy by silently quantizing nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from packager.core.build_records import ConvCoverage

_CONV_OPS = ("Conv",)
_QUANTIZED_TYPES = {"int8": {3, 2}, "fp8": {17, 18, 19, 20}}  # onnx TensorProto: INT8, UINT8, FLOAT8 variants


def conv_coverage(model) -> ConvCoverage:
    """Coverage of an onnx.ModelProto or a path to one (batch 1: symbolic batch dims count as 1)."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes, types = {}, {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        tensor = info.type.tensor_type
        types[info.name] = tensor.elem_type
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
    for init in graph.initializer:
        types[init.name], shapes[init.name] = init.data_type, list(init.dims)
    producers = {out: node for node in graph.node for out in node.output}
    total, convs = 0, 0
    quantized = {p: 0 for p in _QUANTIZED_TYPES}
    quantized_convs = {p: 0 for p in _QUANTIZED_TYPES}
    for node in graph.node:
        if node.op_type not in _CONV_OPS:
            continue
        out_shape, weight_shape = shapes.get(node.output[0]), shapes.get(node.input[1])
        if not out_shape or not weight_shape:
            raise ValueError(f"no shape for convolution {node.name}: shape inference could not resolve it")
        macs = int(np.prod(out_shape[2:], dtype=np.int64) * np.prod(weight_shape, dtype=np.int64))
        total += macs
        convs += 1
        precision = _quantized_precision(node, producers, types)
        if precision is not None:
            quantized[precision] += macs
            quantized_convs[precision] += 1
    return ConvCoverage(total, quantized, convs, quantized_convs)


def _quantized_precision(node, producers, types) -> str | None:
    """"int8"/"fp8" when input and weight both come from DequantizeLinear of that type, else None."""
    found = []
    for name in node.input[:2]:
        producer = producers.get(name)
        if producer is not None and producer.op_type == "Cast":
            producer = producers.get(producer.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        # The quantized type: the zero point's type when present, else the DequantizeLinear input's.
        source = producer.input[2] if len(producer.input) > 2 and producer.input[2] else producer.input[0]
        found.append(next((p for p, codes in _QUANTIZED_TYPES.items() if types.get(source) in codes), None))
    return found[0] if found[0] is not None and found[0] == found[1] else None
