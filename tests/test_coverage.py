"""INT8 MAC coverage from the graph: a hand-built ONNX with a known answer, and the real mixed yolov8n build."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from packager.metrics.mac_coverage import conv_coverage


def _tiny_model() -> onnx.ModelProto:
    """x (1,3,8,8) -> A: 3x3 conv 3->4 in INT8 (input and weight dequantized) -> B: 1x1 conv 4->2 in float
    -> C: grouped 3x3 conv 2->2 (groups 2) with only its weight dequantized (input float: not INT8)."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "wa_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "wa_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wa_zero"),
        numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.integers(-100, 100, (2, 1, 3, 3)).astype(np.int8), "wc_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "wc_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "wc_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wa_q", "wa_scale", "wa_zero"], ["wa"], name="dq_wa", axis=0),
        helper.make_node("Conv", ["x_dq", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="conv_b"),
        helper.make_node("DequantizeLinear", ["wc_q", "wc_scale", "wc_zero"], ["wc"], name="dq_wc"),
        helper.make_node("Conv", ["b", "wc"], ["y"], name="conv_c", pads=[1, 1, 1, 1], group=2),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def test_coverage_known_answer():
    model = _tiny_model()
    # The model is real: onnxruntime runs it and the output has the shape the MAC count assumes.
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0]
    assert y.shape == (1, 2, 8, 8)
    coverage = conv_coverage(model)
    macs_a, macs_b, macs_c = 8 * 8 * 4 * 3 * 3 * 3, 8 * 8 * 2 * 4, 8 * 8 * 2 * 1 * 3 * 3
    assert coverage.total_macs == macs_a + macs_b + macs_c
    assert coverage.quantized_macs["int8"] == macs_a and coverage.quantized_convolutions["int8"] == 1
    assert coverage.share("int8") == macs_a / (macs_a + macs_b + macs_c)
    assert coverage.share("fp8") == 0


def test_coverage_of_the_mixed_build(yolov8n_build):
    fp32 = conv_coverage(yolov8n_build / "onnx" / "model.fp32.onnx")
    int8 = conv_coverage(yolov8n_build / "onnx" / "model.int8-fp32.onnx")
    mixed = conv_coverage(yolov8n_build / "onnx" / "model.int8.onnx")
    # yolov8n at 640: Ultralytics reports 8.7 GFLOPs, i.e. ~4.35 G multiply-accumulates (biases not counted here).
    assert 4.2e9 < fp32.total_macs < 4.5e9 and fp32.convolutions == 64
    assert fp32.share("int8") == 0
    assert int8.total_macs == fp32.total_macs
    # mixed keeps the head's output convs, the DFL conv and the stride-4 stage precise, everything else is INT8.
    from packager.quantize.early_stage import stride4_stage_convs

    stage = stride4_stage_convs(onnx.load(str(yolov8n_build / "onnx" / "model.fp32.onnx")))
    assert len(stage) == 5  # model.1's conv, model.2's cv1, m.0.cv1, m.0.cv2, cv2
    assert 0 < int8.convolutions - int8.quantized_convolutions["int8"] <= 7 + len(stage)
    assert 0.9 < int8.share("int8") < 0.92  # 91.1 %: the stage is 6.9 % of the MACs
    assert mixed.quantized_macs == int8.quantized_macs  # the fp16-mixed twin (Casts around DQ) counts the same
