"""The backbone's stride-4 stage, found by graph shapes: the convolutions `mixed` keeps out of INT8 besides the head.

In Ultralytics backbones (YOLOv8, YOLO11, YOLO26) the second convolution brings the image to 1/4 resolution and the
first C2f / C3k2 block works there (yolov8n: `model.1` and `model.2`, 160 x 160 at 640). Its activations have the
widest ranges of the network (SiLU outputs up to 160 while most stay below 1) at the highest resolution, and its
errors reach every later layer: measured label-free on yolov8n, `model.2` alone in INT8 loses more agreement with
FP32 than any other unit, `model.1` comes third (docs/quantization.md#int8-accuracy-recipes). Keeping the stage in
FP16 costs 6.9 % of yolov8n's convolution MACs (INT8 share 98.0 % -> 91.1 %) and lifts INT8/FP32 mAP50-95 on the
640 val2017-dev images from 0.9785 to 0.9884 with MSE activation scales (0.963 to 0.997 with max ranges).

Found by shape, not by name: every Conv whose output is at 1/STRIDE of the input resolution, in graph order, until
the first Conv below it (the backbone has moved on; a P2 detection neck later in the graph is not included).
"""

from __future__ import annotations

STRIDE = 4


def stride4_stage_convs(onnx_model, stride: int = STRIDE) -> list[str]:
    """Names of the convolutions of the backbone stage at 1/`stride` of the input resolution (graph order)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    for value in [*model.graph.input, *model.graph.output]:  # a dynamic batch of 1 for shape inference
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    height = shapes[onnx_model.graph.input[0].name][2]
    if not height or height % stride:
        return []
    found = []
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        out = shapes.get(node.output[0])
        if not out or len(out) != 4 or not out[2]:
            continue
        if out[2] == height // stride:
            found.append(node.name)
        elif out[2] < height // stride and found:
            break
    return found
