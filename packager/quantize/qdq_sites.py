"""Where a ModelOpt Q/DQ graph keeps its numbers: activation quantizers, quantized convolutions, their initializers.

The accuracy refinements (activation_scales.py, bias_correction.py) change *values* only: an activation
quantizer's per-tensor scale, a convolution's bias. Node list, Q/DQ placement, zero points (0: symmetric), weight
scales (per output channel) and tensor names stay ModelOpt's, so TensorRT sees the graph ModelOpt made.

In ModelOpt's INT8 graph every quantized FP32 tensor has one QuantizeLinear -> DequantizeLinear pair whose scale
and zero-point initializers both nodes read; the DQ output feeds every consumer of the tensor (convolutions, and
the Add / Concat / MaxPool / Resize beside them). A quantized convolution reads DQ(activation), DQ(weight) and an
FP32 bias initializer (with `dq_only` the weight is stored as INT8 and only the DQ is left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class ActivationQuantizer:
    tensor: str  # the FP32 tensor that is quantized (a graph input or a node output)
    scale: str  # scale initializer, shared by its QuantizeLinear and DequantizeLinear
    zero_point: str
    consumers: tuple[str, ...]  # nodes reading the DequantizeLinear output


@dataclass(frozen=True)
class ConvSite:
    """A convolution of the graph: what feeds it and where its bias lives."""

    conv: str  # node name
    output: str  # its output tensor (before the activation)
    activation: ActivationQuantizer | None  # None: the convolution reads an FP32 tensor (kept precise)
    weight: str  # the FP32 weight initializer (or the INT8 one with dq_only)
    weight_scale: str | None  # per-output-channel scale initializer; None when the weight is not quantized
    bias: str | None  # bias initializer, None when the convolution has no bias
    channels: int

    @property
    def quantized(self) -> bool:
        return self.activation is not None and self.weight_scale is not None


def initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def read(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(initializers(model)[name])


def write(model, name: str, value: np.ndarray) -> None:
    """Replace an initializer's value in place, keeping its name, data type and shape."""
    from onnx import numpy_helper

    init = initializers(model)[name]
    old = numpy_helper.to_array(init)
    if old.shape != value.shape:
        raise ValueError(f"initializer {name}: shape {value.shape} does not match {old.shape}")
    init.CopyFrom(numpy_helper.from_array(value.astype(old.dtype), name))


def activation_quantizers(model) -> list[ActivationQuantizer]:
    """Every Q/DQ pair on a non-constant tensor, in graph order."""
    inits = initializers(model)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        dequantizers = [n for n in readers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        consumers = tuple(n.name for dq in dequantizers for n in readers.get(dq.output[0], []))
        found.append(ActivationQuantizer(node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else "",
                                         consumers))
    return found


def conv_sites(model) -> list[ConvSite]:
    """Every Conv node with its input quantizer (if any), weight, weight scale and bias, in graph order."""
    inits = initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    quantizer_of = {q.tensor: q for q in activation_quantizers(model)}
    dq_source = {}  # DQ output -> quantized FP32 tensor
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            dq_source[node.output[0]] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
    sites = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        activation = quantizer_of.get(dq_source.get(node.input[0]) or "")
        weight, weight_scale = _weight_and_scale(node.input[1], producers, inits)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        channels = int(inits[weight].dims[0])
        sites.append(ConvSite(node.name, node.output[0], activation, weight, weight_scale, bias, channels))
    return sites


def _weight_and_scale(name: str, producers, inits) -> tuple[str, str | None]:
    """(weight initializer, its scale initializer or None) behind a convolution's weight input."""
    if name in inits:
        return name, None
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        raise ValueError(f"convolution weight {name} is neither an initializer nor dequantized")
    source = dq.input[0]
    if source in inits:  # dq_only: INT8 weight stored directly
        return source, dq.input[1]
    q = producers.get(source)
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
        raise ValueError(f"convolution weight {name} does not come from a quantized initializer")
    return q.input[0], dq.input[1]


def quantized_weight(model, site: ConvSite) -> np.ndarray:
    """The INT8 values the weight quantizer produces (what TensorRT multiplies with)."""
    weight = read(model, site.weight)
    if weight.dtype == np.int8:
        return weight.astype(np.int32)
    scale = read(model, site.weight_scale).reshape(-1, *([1] * (weight.ndim - 1)))
    return np.clip(np.round(weight / scale), INT8_MIN, INT8_MAX).astype(np.int32)
