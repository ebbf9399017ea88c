"""Run an ONNX graph (FP32 or ModelOpt Q/DQ) node by node in torch, with a hook after every node.

Why not onnxruntime: sequential refinement changes a node's parameters *while* the pass goes on (a convolution's
bias is corrected from its own output before anything downstream is computed; an activation's scale is chosen
from the tensor that reaches its QuantizeLinear), so one pass over the graph does what onnxruntime would need a
pass per graph depth for. Q/DQ follow ONNX: QuantizeLinear = saturate(round_half_even(x / scale) + zero point),
DequantizeLinear = (q - zero point) * scale, in float32 like onnxruntime's CPU kernels.

Covers the operators of Ultralytics detection graphs up to the head (Conv, SiLU as Sigmoid * Mul, C2f/C3k2
Split/Concat/Add, SPPF MaxPool, nearest Resize, attention MatMul/Softmax/Transpose/Reshape, DFL decode);
`run` only executes the nodes the requested outputs need, so an unsupported operator after them does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from packager.core.contracts import QuantizationError

Hook = Callable[[object, list], list]  # (onnx node, its output tensors) -> output tensors to keep
PreHook = Callable[[object, list], list]  # (onnx node, its input tensors) -> input tensors to run it with


class TorchGraph:
    def __init__(self, model, device: str = "cpu"):
        import torch
        from onnx import numpy_helper

        self.model = model
        self.device = device
        self.nodes = list(model.graph.node)
        self.constants = {}
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            self.constants[init.name] = torch.from_numpy(np.array(array)).to(device)
        self.producer = {out: index for index, node in enumerate(self.nodes) for out in node.output}

    def needed_nodes(self, outputs: Iterable[str]) -> list[int]:
        """Indices of the nodes the tensors `outputs` depend on, in graph order."""
        needed, frontier = set(), list(outputs)
        while frontier:
            index = self.producer.get(frontier.pop())
            if index is None or index in needed:
                continue
            needed.add(index)
            frontier.extend(self.nodes[index].input)
        return sorted(needed)

    def run(self, feeds: dict, outputs: list[str], hook: Hook | None = None, pre_hook: PreHook | None = None) -> dict:
        """{name: torch tensor} of `outputs`; intermediate tensors are freed as soon as nothing needs them."""
        import torch

        order = self.needed_nodes(outputs)
        uses: dict[str, int] = {}
        for index in order:
            for name in self.nodes[index].input:
                uses[name] = uses.get(name, 0) + 1
        keep = set(outputs)
        values = {name: torch.as_tensor(value).to(self.device) for name, value in feeds.items()}
        with torch.no_grad():
            for index in order:
                node = self.nodes[index]
                args = [self._value(name, values) for name in node.input]
                if pre_hook is not None:
                    args = pre_hook(node, args)
                result = _run_node(node, args)
                if hook is not None:
                    result = hook(node, result)
                values.update(zip(node.output, result))
                for name in node.input:
                    uses[name] -= 1
                    if uses[name] == 0 and name not in keep:
                        values.pop(name, None)
        return {name: values[name] for name in outputs}

    def _value(self, name: str, values: dict):
        if not name:
            return None
        if name in values:
            return values[name]
        if name in self.constants:
            return self.constants[name]
        raise QuantizationError(f"tensor {name} has no value (graph input missing from the feeds?)")


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _run_node(node, args: list) -> list:
    handler = _OPS.get(node.op_type)
    if handler is None:
        raise QuantizationError(f"sequential refinement cannot run {node.op_type} (node {node.name})")
    result = handler(args, _attributes(node))
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _quantize(args, attrs):
    import torch

    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else torch.zeros((), dtype=torch.int8)
    axis = attrs.get("axis", 1)
    scale, zero = _broadcast(scale, x, axis), _broadcast(zero, x, axis)
    low, high = (-128, 127) if zero.dtype == torch.int8 else (0, 255)
    q = torch.clamp(torch.round(x / scale) + zero.float(), low, high)
    return q.to(zero.dtype)


def _dequantize(args, attrs):
    import torch

    q, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else torch.zeros((), dtype=q.dtype)
    axis = attrs.get("axis", 1)
    scale, zero = _broadcast(scale, q, axis), _broadcast(zero, q, axis)
    return (q.float() - zero.float()) * scale


def _broadcast(value, like, axis: int):
    """A per-axis (1-D) scale or zero point shaped to broadcast along `axis` of `like`; scalars unchanged."""
    if value.dim() == 0:
        return value
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return value.reshape(shape)


def _conv(args, attrs):
    import torch.nn.functional as F

    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    pads = attrs.get("pads", [0] * (2 * (weight.dim() - 2)))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for pair in zip(pads[:half][::-1], pads[half:][::-1]) for p in pair])
        pads = [0] * len(pads)
    return F.conv2d(x, weight, bias, stride=attrs.get("strides", 1), padding=pads[:half],
                    dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


def _maxpool(args, attrs):
    import torch.nn.functional as F

    pads = attrs.get("pads", [0, 0, 0, 0])
    half = len(pads) // 2
    x = args[0]
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for pair in zip(pads[:half][::-1], pads[half:][::-1]) for p in pair], value=float("-inf"))
        pads = [0] * len(pads)
    return F.max_pool2d(x, attrs["kernel_shape"], attrs.get("strides", 1), pads[:half], attrs.get("dilations", 1),
                        ceil_mode=bool(attrs.get("ceil_mode", 0)))


def _resize(args, attrs):
    import torch.nn.functional as F

    mode = attrs.get("mode", b"nearest").decode()
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    x, scales = args[0], args[2] if len(args) > 2 else None
    sizes = args[3] if len(args) > 3 else None
    if mode != "nearest" or transform != "asymmetric" or attrs.get("nearest_mode", b"round_prefer_floor") != b"floor":
        raise QuantizationError(f"sequential refinement supports nearest/asymmetric/floor Resize only, got {mode}/"
                                f"{transform}")
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=[int(s) for s in sizes[2:]], mode="nearest")
    return F.interpolate(x, scale_factor=[float(s) for s in scales[2:]], mode="nearest")


def _split(args, attrs):
    import torch

    x, axis = args[0], attrs.get("axis", 0)
    sizes = args[1] if len(args) > 1 and args[1] is not None else attrs.get("split")
    if sizes is None:
        return torch.chunk(x, attrs["num_outputs"], dim=axis)
    return torch.split(x, [int(s) for s in sizes], dim=axis)


def _reshape(args, attrs):
    x, shape = args[0], [int(s) for s in args[1]]
    shape = [x.shape[i] if s == 0 and not attrs.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(args, attrs):
    x = args[0]
    starts, ends = [int(v) for v in args[1]], [int(v) for v in args[2]]
    axes = [int(v) for v in args[3]] if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = [int(v) for v in args[4]] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            raise QuantizationError("sequential refinement supports Slice with step 1 only")
        size = x.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1))
    return x[tuple(index)]


def _constant(args, attrs):
    import torch
    from onnx import numpy_helper

    return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))


def _ops() -> dict:
    import torch

    return {
        "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Conv": _conv, "MaxPool": _maxpool,
        "Resize": _resize, "Split": _split, "Reshape": _reshape, "Slice": _slice, "Constant": _constant,
        "Sigmoid": lambda a, _: torch.sigmoid(a[0]), "Relu": lambda a, _: torch.relu(a[0]),
        "Mul": lambda a, _: a[0] * a[1], "Add": lambda a, _: a[0] + a[1], "Sub": lambda a, _: a[0] - a[1],
        "Div": lambda a, _: a[0] / a[1], "MatMul": lambda a, _: torch.matmul(a[0], a[1]),
        "Concat": lambda a, at: torch.cat(a, dim=at["axis"]),
        "Transpose": lambda a, at: a[0].permute(*at["perm"]) if "perm" in at else a[0].permute(
            *reversed(range(a[0].dim()))),
        "Softmax": lambda a, at: torch.softmax(a[0], dim=at.get("axis", -1)),
        "Identity": lambda a, _: a[0], "Cast": _cast,
    }


def _cast(args, attrs):
    import onnx
    import torch

    dtype = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
             onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32}.get(attrs["to"])
    if dtype is None:
        raise QuantizationError(f"sequential refinement cannot Cast to ONNX type {attrs['to']}")
    return args[0].to(dtype)


class _LazyOps(dict):
    """The operator table, built on first use so importing this module does not import torch."""

    def get(self, key, default=None):
        if not self:
            self.update(_ops())
        return super().get(key, default)


_OPS = _LazyOps()
