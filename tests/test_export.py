"""Export: yolov8n.pt and the YOLO11 graph (yolo11n.yaml, random init) to dynamic-batch, fixed-640 ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from packager.calibration.calibration import build_calibration
from packager.export.onnx_export import export_onnx, parse_imgsz
from packager.inference.letterbox import preprocess, read_image
from packager.evaluate.onnx_eval import onnx_session
from packager.quantize.int8 import QuantizeOptions, head_nodes_to_keep_precise, quantize_int8_twins, quantized_node_names


def input_dims(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


@pytest.fixture(scope="module")
def yolov8n_export(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.fp32.onnx"
    before = sorted((assets / "weights").iterdir())
    result = export_onnx(assets / "weights" / "yolov8n.pt", out)
    # Ultralytics writes beside the weights unless told otherwise: the read-only assets must stay untouched.
    assert sorted((assets / "weights").iterdir()) == before
    return result


def test_yolov8n_export_has_dynamic_batch_fixed_size(yolov8n_export, assets):
    result = yolov8n_export
    assert result.onnx_path.is_file()
    assert result.model_name == "yolov8n" and len(result.class_names) == 80 and result.class_names[0] == "person"
    assert result.input_name == "images" and result.output_name == "output0"
    assert result.input_shape == [-1, 3, 640, 640] and result.output_shape == [-1, 84, 8400]
    assert result.opset >= 17 and result.dynamic_batch
    assert input_dims(result.onnx_path)[1:] == [3, 640, 640]
    # Fixed H/W let the anchor arithmetic fold away: no shape ops left for TensorRT to re-derive per profile.
    assert not {"Shape", "Range", "ConstantOfShape"} & {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}


def test_yolov8n_export_matches_reference_onnx_for_any_batch(yolov8n_export, assets):
    """Same numbers as the sample's Ultralytics static export, for batch 1 and batch 3 (dynamic)."""
    files = sorted((assets / "coco" / "val2017").glob("*.jpg"))[:3]
    batch = np.stack([preprocess(read_image(p))[0] for p in files])
    reference = onnx_session(assets / "weights" / "yolov8n.onnx")
    expected = np.concatenate([reference.run(None, {"images": x[None]})[0] for x in batch])
    ours = onnx_session(yolov8n_export.onnx_path)
    np.testing.assert_allclose(ours.run(None, {"images": batch})[0], expected, rtol=0, atol=2e-3)
    np.testing.assert_allclose(ours.run(None, {"images": batch[:1]})[0], expected[:1], rtol=0, atol=2e-3)


def test_existing_onnx_is_adopted_with_its_static_batch(assets, tmp_path):
    result = export_onnx(assets / "weights" / "yolov8n.onnx", tmp_path / "model.fp32.onnx")
    assert not result.dynamic_batch and result.input_shape == [1, 3, 640, 640]
    assert result.class_names[:2] == ["person", "bicycle"]


def test_existing_onnx_with_other_size_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="640x640"):
        export_onnx(assets / "weights" / "yolov8n.onnx", tmp_path / "model.fp32.onnx", imgsz=(320, 320))
    assert not (tmp_path / "model.fp32.onnx").exists()


@pytest.mark.parametrize("value, expected", [("640", (640, 640)), ("640,480", (640, 480)), (320, (320, 320))])
def test_parse_imgsz(value, expected):
    assert parse_imgsz(value) == expected


@pytest.mark.parametrize("value", ["0", "641", "abc", "640,480,320", "-640", 16])
def test_parse_imgsz_rejects_bad_sizes(value):
    with pytest.raises(ValueError, match="imgsz"):
        parse_imgsz(value)


@pytest.mark.slow
def test_yolo11n_random_init_exports_and_quantizes(assets, tmp_path):
    """The YOLO11 graph (C2PSA attention) exports and quantizes; BatchNorm re-estimated on real images first."""
    calibration = build_calibration(assets / "coco" / "calib2017", (640, 640), count=8, show_progress=False)
    result = export_onnx("yolo11n.yaml", tmp_path / "model.fp32.onnx", batchnorm_images=calibration.data)
    model = onnx.load(str(result.onnx_path))
    assert any("attn" in node.name for node in model.graph.node), "YOLO11's attention block is missing"
    assert result.input_shape == [-1, 3, 640, 640] and result.output_shape == [-1, 84, 8400]

    # Re-estimated statistics keep activations alive: class scores must not all collapse to a constant.
    raw = onnx_session(result.onnx_path).run(None, {"images": calibration.data[:2]})[0]
    # Without it the head sees ~nothing: two different images give the same output to 1e-5 and the class
    # scores of one pyramid level are a constant (Detect's bias prior).
    level0 = raw[:, 4:, : 80 * 80]
    assert np.isfinite(raw).all()
    assert np.abs(raw[0] - raw[1]).max() > 1.0, "outputs do not depend on the image"
    assert level0.std() / level0.mean() > 0.1, f"class scores nearly constant: {level0.mean()} +- {level0.std()}"

    head = head_nodes_to_keep_precise(model)
    quantized = quantize_int8_twins(result.onnx_path, calibration.data, tmp_path / "q", QuantizeOptions())
    names = set(quantized_node_names(onnx.load(str(quantized.int8_fp32_path))))
    assert any("attn" in name for name in names), "attention convs/matmuls should be quantized"
    assert not names & set(head)
    assert quantized.int8_path.is_file()


def test_the_input_size_defaults_to_the_size_the_model_was_trained_at(assets, tmp_path):
    """A user's best.pt trained at 416 is built at 416 unless --imgsz says otherwise (Ultralytics records the training
    imgsz in the checkpoint); a model .yaml, or a checkpoint without the record, gets 640."""
    import torch

    from packager.export.onnx_export import model_imgsz

    assert model_imgsz(assets / "custom" / "asl" / "yolov8n-asl.pt") == (416, 416)
    assert model_imgsz(assets / "weights" / "yolov8n.pt") == (640, 640)
    assert model_imgsz("yolo11n.yaml") == (640, 640)
    checkpoint = torch.load(assets / "custom" / "asl" / "yolov8n-asl.pt", map_location="cpu", weights_only=False)
    checkpoint["train_args"]["imgsz"] = [480, 640]
    torch.save(checkpoint, tmp_path / "rect.pt")
    assert model_imgsz(tmp_path / "rect.pt") == (480, 640)
    del checkpoint["train_args"]
    torch.save(checkpoint, tmp_path / "bare.pt")
    assert model_imgsz(tmp_path / "bare.pt") == (640, 640)
