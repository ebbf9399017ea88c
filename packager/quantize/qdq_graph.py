"""Q/DQ graph surgery on a ModelOpt-quantized ONNX model: quantizable units, keeping units precise, INT8 coverage.

A *unit* is a group of quantized compute nodes that are kept precise or quantized together: one Ultralytics
module `/model.N/`, and inside the detection head (the module whose nodes produce the graph output) one unit per
branch and level (`model.22/cv3.1`: the class branch on P4) plus the decode tail (`model.22/decode`: DFL conv,
concats). Any unit can be refined one level deeper (`model.4/m.0`, `model.22/cv3.1/cv3.1.2`) with `refine`.

Keeping a unit precise = rewiring each of its nodes' inputs from a DequantizeLinear's output to the matching
QuantizeLinear's input (the FP32 tensor or FP32 weight initializer), then dropping Q/DQ nodes nobody reads.
Activation scales are per tensor and computed from the FP32 graph during calibration, so the scales of every
other Q/DQ pair stay what a calibration with this unit excluded would have produced (tested against ModelOpt's
own `nodes_to_exclude`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from packager.metrics.mac_coverage import conv_coverage

_MODULE = re.compile(r"^/(model\.\d+)/")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "model.8", "model.22/cv3.1.2", "model.4/m.0"
    nodes: tuple[str, ...]  # quantized compute nodes of the unit, graph order
    conv_macs: int  # multiply-accumulates of the unit's convolutions per image


def quantized_inputs(model) -> dict[str, list[int]]:
    """{compute node name: indices of its inputs fed by a Q->DQ pair} (weights and activations)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear":
                q = producers.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    found.setdefault(node.name, []).append(index)
    return found


def head_module(model) -> str | None:
    """The Ultralytics module producing the graph's first output (the Detect head), e.g. "model.22"."""
    output = model.graph.output[0].name
    producers = {out: node for node in model.graph.node for out in node.output}
    # The output node itself may be unnamed by module (e.g. a final Concat); walk up until a module name shows.
    frontier, seen = [output], set()
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        match = _MODULE.match(node.name)
        if match:
            return match.group(1)
        frontier.extend(node.input)
    return None


def unit_name(node_name: str, head: str | None, refine: Iterable[str] = ()) -> str:
    """The unit a node belongs to (see the module docstring); nodes outside any module form unit "other".

    A unit named in `refine` is split one level deeper: `model.4` -> `model.4/m.0`, `model.4/cv1`, ...;
    `model.22/cv2.0` -> `model.22/cv2.0/cv2.0.1`. Loose ops of a refined module (Concat, Split) keep its name.
    """
    match = _MODULE.match(node_name)
    if not match:
        return "other"
    module = match.group(1)
    parts = node_name.strip("/").split("/")
    if module == head:
        # Box/class branches per level (cv2.<level>, cv3.<level>); everything else is the decode tail.
        if len(parts) >= 3 and re.fullmatch(r"cv\d+\.\d+", parts[1]):
            base = f"{module}/{parts[1]}"
            return f"{base}/{parts[2]}" if base in refine and len(parts) >= 4 else base
        return f"{module}/decode"
    if module in refine and len(parts) >= 3:
        return f"{module}/{parts[1]}"
    return module


def find_units(model, refine: Iterable[str] = ()) -> list[Unit]:
    """Quantized compute nodes of `model` grouped into units, in graph order of their first node."""
    refine = tuple(refine)
    head = head_module(model)
    macs = conv_macs(model)
    quantized = quantized_inputs(model)
    grouped: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in quantized:
            grouped.setdefault(unit_name(node.name, head, refine), []).append(node.name)
    return [Unit(name, tuple(nodes), sum(macs.get(n, 0) for n in nodes)) for name, nodes in grouped.items()]


def keep_precise(model, node_names: Iterable[str]):
    """A copy of `model` with the Q/DQ inputs of `node_names` removed (those nodes read the FP32 tensors)."""
    import onnx

    targets = set(node_names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = {o: node for node in out.graph.node for o in node.output}
    for node in out.graph.node:
        if node.name not in targets or node.op_type in _QDQ_OPS:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    _drop_unused_qdq(out)
    return out


def only_quantized(model, node_names: Iterable[str]):
    """A copy of `model` where only `node_names` keep their Q/DQ inputs."""
    keep = set(node_names)
    return keep_precise(model, [name for name in quantized_inputs(model) if name not in keep])


def _drop_unused_qdq(model) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads (repeat: a dead DQ makes its Q dead), then dead initializers."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [n for n in model.graph.node if n.op_type in _QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for initializer in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(initializer)


def conv_macs(model, batch: int = 1) -> dict[str, int]:
    """{Conv node: MACs per image} = output elements x kernel size x input channels / groups, from shapes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_with_batch(model, batch))
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    initializers = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    producers = {o: n for n in inferred.graph.node for o in n.output}
    macs = {}
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        weight = _weight_shape(node.input[1], initializers, producers)
        out_shape = shapes.get(node.output[0])
        if weight is None or not out_shape or 0 in out_shape:
            continue
        # weight (C_out, C_in/groups, kH, kW): each output element needs C_in/groups x kH x kW MACs.
        macs[node.name] = int(np.prod(out_shape[1:]) * np.prod(weight[1:]))
    return macs


def int8_conv_mac_share(model) -> float:
    """Share of convolution MACs that run in INT8: the CPU-side proxy for INT8 speed (one definition, coverage.py)."""
    return conv_coverage(model).share("int8")


def _weight_shape(name, initializers, producers):
    # A quantized weight arrives through DequantizeLinear(QuantizeLinear(initializer)) or DequantizeLinear(int8).
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type not in _QDQ_OPS + ("Cast",):
            return None
        name = node.input[0]
    return initializers[name]


def _with_batch(model, batch: int):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in list(out.graph.input) + list(out.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del out.graph.value_info[:]
    return out


def downstream_submodel(model, node_names: Iterable[str]):
    """(submodel, cut tensors): the part of `model` that the Q/DQ inputs of `node_names` can influence.

    In an "only these nodes quantized" variant everything outside that part computes exactly what the FP32 model
    computes, so the submodel fed with cached FP32 values of the cut tensors gives the variant's output.
    """
    import onnx

    targets = set(node_names)
    nodes = list(model.graph.node)
    producers = {o: node for node in nodes for o in node.output}
    start = set(targets)
    for node in nodes:  # the Q/DQ pairs in front of the targets belong to the changed part
        if node.name in targets:
            for name in node.input:
                dq = producers.get(name)
                if dq is not None and dq.op_type == "DequantizeLinear":
                    start.add(dq.name)
                    q = producers.get(dq.input[0])
                    if q is not None and q.op_type == "QuantizeLinear":
                        start.add(q.name)
    changed: set[str] = set()
    part = []
    for node in nodes:  # ONNX nodes are topologically sorted
        if node.name in start or any(name in changed for name in node.input):
            part.append(node)
            changed.update(node.output)
    initializers = {i.name: i for i in model.graph.initializer}
    cut = sorted({name for node in part for name in node.input
                  if name and name not in changed and name not in initializers})
    used = {name for node in part for name in node.input}
    graph = onnx.helper.make_graph(
        part, "downstream", [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in cut],
        list(model.graph.output), [initializers[name] for name in sorted(used & set(initializers))])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return sub, cut
