"""Real ModelOpt INT8 PTQ: Q/DQ on the convolutions, none on the head kept precise, twins with the same scales."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from packager.pipeline.manifest import ARTIFACT_FILES, artifact_path, sha256_file
from packager.quantize.int8 import (
    EXTREME_OP_TYPES,
    QuantizeOptions,
    head_nodes_to_keep_precise,
    quantize_int8_twins,
    quantized_node_names,
)

# Ultralytics' own ModelOpt export keeps these out of INT8; our structural finder must cover at least them.
ULTRALYTICS_HEAD_PATTERNS = [r".*\.2/Conv$", r".*/dfl/"]


def load(build, variant):
    return onnx.load(str(artifact_path(build, variant)))


def ops_by_name(model):
    return {node.name: node.op_type for node in model.graph.node}


def quantize_scales(model) -> dict[str, float]:
    """Scale of every QuantizeLinear, keyed by the tensor it quantizes (fp16-mixed inserts Casts: follow them)."""
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    producers = {out: node for node in model.graph.node for out in node.output}
    scales = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source = node.input[0]
        while source in producers and producers[source].op_type == "Cast":
            source = producers[source].input[0]
        scale = initializers.get(node.input[1], constants.get(node.input[1]))
        scales[source] = np.asarray(scale, dtype=np.float32)
    return scales


def test_int8_twins_quantize_convs_but_not_the_head(yolov8n_build):
    fp32 = load(yolov8n_build, "fp32")
    head = set(head_nodes_to_keep_precise(fp32))
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    assert set(manifest["quantization"]["excluded_nodes"]) >= head
    for variant in ("int8", "int8-fp32"):
        model = load(yolov8n_build, variant)
        ops = ops_by_name(model)
        quantized = set(quantized_node_names(model))
        quantized_convs = [name for name in quantized if ops[name] == "Conv"]
        all_convs = [name for name, op in ops.items() if op == "Conv"]
        assert len(quantized_convs) >= 0.8 * len(all_convs), f"{variant}: only {len(quantized_convs)} convs quantized"
        assert not quantized & head, f"{variant}: head nodes quantized: {sorted(quantized & head)}"
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops.values())


def test_mixed_keeps_the_stride4_stage_precise(yolov8n_build):
    """Found by shape: on yolov8n the convolutions of model.1 and model.2 (160 x 160 at 640), none later."""
    from packager.quantize.early_stage import stride4_stage_convs

    fp32 = load(yolov8n_build, "fp32")
    stage = stride4_stage_convs(fp32)
    assert stage and all(name.startswith(("/model.1/", "/model.2/")) for name in stage)
    assert {"/model.1/conv/Conv", "/model.2/cv1/conv/Conv", "/model.2/cv2/conv/Conv"} <= set(stage)
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    assert set(stage) <= set(manifest["quantization"]["excluded_nodes"])
    assert not set(stage) & set(quantized_node_names(load(yolov8n_build, "int8")))
    assert "/model.0/conv/Conv" in quantized_node_names(load(yolov8n_build, "int8"))  # the stem stays INT8


def test_structural_head_finder_covers_ultralytics_patterns(yolov8n_build):
    fp32 = load(yolov8n_build, "fp32")
    head = set(head_nodes_to_keep_precise(fp32))
    expected = {n.name for n in fp32.graph.node if any(re.match(p, n.name) for p in ULTRALYTICS_HEAD_PATTERNS)}
    assert len(expected) >= 7  # 3 box + 3 class output convs + DFL
    assert expected <= head
    # ... and it stays in the head: no backbone/neck layer (model.0 - model.21) is kept out.
    assert all(name.startswith("/model.22/") for name in head), sorted(head)


def test_twins_share_one_calibration(yolov8n_build):
    """Same Q/DQ placement and scales in both twins; only the high-precision part differs (fp16 vs fp32)."""
    mixed, faithful = load(yolov8n_build, "int8"), load(yolov8n_build, "int8-fp32")
    mixed_scales, faithful_scales = quantize_scales(mixed), quantize_scales(faithful)
    assert mixed_scales.keys() == faithful_scales.keys() and len(faithful_scales) > 50
    for tensor, scale in faithful_scales.items():
        np.testing.assert_allclose(mixed_scales[tensor], scale, rtol=1e-3, err_msg=tensor)
    float_types = lambda m: {i.data_type for i in m.graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}  # noqa: E731
    assert onnx.TensorProto.FLOAT16 in float_types(mixed)
    assert onnx.TensorProto.FLOAT16 not in float_types(faithful)


def test_fp16_baseline_keeps_fp32_io(yolov8n_build):
    model = load(yolov8n_build, "fp16")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    types = {i.data_type for i in model.graph.initializer if i.name in conv_weights}
    assert types == {onnx.TensorProto.FLOAT16}


def test_manifest_describes_the_build(yolov8n_build):
    manifest = json.loads((yolov8n_build / "manifest.json").read_text())
    assert manifest["model_name"] == "yolov8n" and manifest["imgsz"] == [640, 640]
    assert manifest["input"] == {"name": "images", "shape": [-1, 3, 640, 640], "dtype": "float32"}
    assert manifest["output"] == {"name": "output0", "shape": [-1, 84, 8400], "dtype": "float32"}
    assert manifest["dynamic_batch"] is True and manifest["max_batch"] == 8 and len(manifest["class_names"]) == 80
    assert set(manifest["artifacts"]) == {"fp32", "fp16", "int8", "int8-fp32", "int8-u8", "int8-check", "calib"}
    assert manifest["schema"] == 2 and manifest["head_format"] == "raw" and manifest["stride"] == 32
    for variant, entry in manifest["artifacts"].items():
        assert entry["path"] == ARTIFACT_FILES[variant]
        assert entry["sha256"] == sha256_file(yolov8n_build / entry["path"])
    quant = manifest["quantization"]
    assert quant["preset"] == "mixed" and quant["calibration_method"] == "mse"
    assert quant["calibration_eps"] == ["cpu"] and quant["dq_only"] is False
    assert quant["excluded_ops"] == ["Add"]  # mixed keeps residual adds precise
    assert manifest["calibration"]["count"] == 64
    assert all(manifest["versions"][k] for k in ("python", "yqpack", "ultralytics", "modelopt", "onnx", "onnxruntime", "torch", "numpy"))
    calib = np.load(yolov8n_build / "calib.npy", mmap_mode="r")
    assert calib.shape == (64, 3, 640, 640) and calib.dtype == np.float32


@pytest.mark.slow
def test_extreme_preset_quantizes_the_head_too(yolov8n_build, tmp_path):
    calib = np.load(yolov8n_build / "calib.npy")[:4]
    result = quantize_int8_twins(
        artifact_path(yolov8n_build, "fp32"), calib, tmp_path, QuantizeOptions(preset="extreme", exclude_ops=["Softmax"])
    )
    model = onnx.load(str(result.int8_fp32_path))
    ops = ops_by_name(model)
    quantized = set(quantized_node_names(model))
    head = set(head_nodes_to_keep_precise(load(yolov8n_build, "fp32")))
    assert quantized & head, "extreme must quantize the head as well"
    assert {"Sigmoid", "Concat"} <= {ops[n] for n in quantized}
    # (DFL's Softmax is the only consumer of its input, so "fed by a DequantizeLinear" means "quantized" here.)
    assert "Softmax" not in {ops[n] for n in quantized}, "--exclude-ops must win over the preset"
    assert result.excluded_nodes == [] and set(result.op_types_to_quantize) <= set(EXTREME_OP_TYPES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8-fp32.onnx", "model.int8-u8.onnx", "model.int8.onnx"]


def test_quantize_refuses_missing_calibration(yolov8n_build, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), np.zeros((0, 3, 640, 640), np.float32), tmp_path)
    with pytest.raises(ValueError, match="preset"):
        quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), np.zeros((1, 3, 640, 640), np.float32), tmp_path,
                            QuantizeOptions(preset="aggressive"))
    with pytest.raises(ValueError, match="static-batch"):
        quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), np.zeros((1, 3, 640, 640), np.float32), tmp_path,
                            QuantizeOptions(calibrate_per_node=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_derived_fp16_twin_equals_modelopt_fp16_quantization(yolov8n_build, tmp_path):
    """Our one-calibration fp16-mixed twin is what ModelOpt's quantize(high_precision_dtype="fp16") writes."""
    import shutil

    from modelopt.onnx.quantization import quantize

    from packager.evaluate.onnx_eval import onnx_session

    calib = np.load(yolov8n_build / "calib.npy")[:8]
    ours = quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), calib, tmp_path / "ours",
                               QuantizeOptions(calibration_method="max"))
    shutil.copyfile(artifact_path(yolov8n_build, "fp32"), tmp_path / "model.onnx")
    quantize(
        onnx_path=str(tmp_path / "model.onnx"), quantize_mode="int8", calibration_data={"images": calib},
        calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp16", dq_only=False,
        nodes_to_exclude=[re.escape(name) + "$" for name in ours.excluded_nodes], op_types_to_exclude=ours.excluded_ops,
        output_path=str(tmp_path / "direct.onnx"), log_level="WARNING",
    )
    x = calib[:2]
    derived = onnx_session(ours.int8_path).run(None, {"images": x})[0]
    direct = onnx_session(tmp_path / "direct.onnx").run(None, {"images": x})[0]
    np.testing.assert_array_equal(derived, direct)


@pytest.mark.slow
def test_dq_only_stores_int8_weights_and_computes_the_same(yolov8n_build, tmp_path):
    """--dq-only: weights become INT8 initializers read by DequantizeLinear (no weight QuantizeLinear left), in both
    twins, and the model computes exactly what the Q/DQ-weights model of the same calibration computes."""
    from packager.evaluate.onnx_eval import onnx_session

    calib = np.load(yolov8n_build / "calib.npy", mmap_mode="r")[:8].copy()
    source = artifact_path(yolov8n_build, "fp32")
    twins = {dq_only: quantize_int8_twins(source, calib, tmp_path / str(dq_only), QuantizeOptions(dq_only=dq_only))
             for dq_only in (False, True)}

    def weight_quantizers(model) -> int:
        initializers = {init.name for init in model.graph.initializer}
        return sum(node.op_type == "QuantizeLinear" and node.input[0] in initializers for node in model.graph.node)

    def int8_conv_weights(model) -> int:
        return sum(init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4 for init in model.graph.initializer)

    with_q, dq_only = (onnx.load(str(twins[flag].int8_fp32_path)) for flag in (False, True))
    assert weight_quantizers(with_q) > 0 and int8_conv_weights(with_q) == 0
    assert weight_quantizers(dq_only) == 0 and int8_conv_weights(dq_only) == weight_quantizers(with_q)
    assert int8_conv_weights(onnx.load(str(twins[True].int8_path))) == int8_conv_weights(dq_only)
    assert quantized_node_names(dq_only) == quantized_node_names(with_q)
    x = calib[:2]
    outputs = [onnx_session(twins[flag].int8_fp32_path).run(None, {"images": x})[0] for flag in (False, True)]
    np.testing.assert_array_equal(outputs[1], outputs[0])
