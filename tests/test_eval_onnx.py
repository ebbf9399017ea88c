"""eval-onnx: our ONNX + letterbox + postprocess path reproduces Ultralytics' own evaluation of yolov8n.pt."""

from __future__ import annotations

import json

import pytest

from packager.cli.main import main
from packager.evaluate.onnx_eval import AccuracyGateError, check_gate
from packager.inference.runtime import RuntimeOptions, runtime_on_this_machine

# The assets README's figure. Measured here with Ultralytics 8.4.190 `model.val` + pycocotools on the same images:
# 0.4438 with rect batches, 0.4344 square (as served); the test compares with the square pipeline run in-session.
PUBLISHED_MAP50_95 = 0.416


def ground_truth_path(assets):
    return assets / "coco" / "annotations" / "instances_val2017_128.json"


@pytest.mark.slow
def test_fp32_onnx_matches_ultralytics_evaluation(onnx_eval_metrics, ultralytics_reference_metrics):
    reference = ultralytics_reference_metrics
    fp32 = onnx_eval_metrics["fp32"]
    assert fp32.images == reference.images == 128
    assert abs(reference.map50_95 - PUBLISHED_MAP50_95) < 0.03, f"reference pipeline off: {reference}"
    assert abs(fp32.map50_95 - reference.map50_95) <= 0.005, f"ours {fp32.map50_95:.4f} vs Ultralytics {reference.map50_95:.4f}"
    assert abs(fp32.map50 - reference.map50) <= 0.005


@pytest.mark.slow
def test_int8_mixed_passes_the_default_gate(onnx_eval_metrics):
    gate = check_gate(onnx_eval_metrics)
    assert gate.passed and gate.variant == "int8-fp32"
    assert onnx_eval_metrics["int8-fp32"].map50_95 > 0.35


def test_gate_fails_with_both_numbers(onnx_eval_metrics):
    ratio = onnx_eval_metrics["int8-fp32"].map50_95 / onnx_eval_metrics["fp32"].map50_95
    check_gate(onnx_eval_metrics, min_ratio=ratio - 0.01)
    with pytest.raises(AccuracyGateError) as failure:
        check_gate(onnx_eval_metrics, min_ratio=ratio + 0.01)
    message = str(failure.value)
    assert f"{onnx_eval_metrics['fp32'].map50_95:.4f}" in message and f"{onnx_eval_metrics['int8-fp32'].map50_95:.4f}" in message


def test_cli_eval_onnx_writes_json_and_gates(yolov8n_build, assets, tmp_path):
    subset = tmp_path / "val"
    subset.mkdir()
    for path in sorted((assets / "coco" / "val2017").glob("*.jpg"))[:6]:
        (subset / path.name).symlink_to(path)
    from click.testing import CliRunner

    args = ["eval-onnx", "--build", str(yolov8n_build), "--val-images", str(subset),
            "--val-annotations", str(ground_truth_path(assets)), "--variants", "fp32,int8-fp32"]
    passed = CliRunner().invoke(main, [*args, "--min-map-ratio", "0.5", "--json", str(tmp_path / "m.json")])
    assert passed.exit_code == 0, passed.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"fp32", "int8-fp32"} and metrics["fp32"]["images"] == 6
    assert 0 < metrics["fp32"]["map50_95"] <= 1
    # the default, named per number: INT8 leaves OpenVINO on CPUs without VNNI/AMX (its kernels saturate there)
    int8_runtime = runtime_on_this_machine(RuntimeOptions("openvino"), quantized=True).label
    assert {v: m["runtime"] for v, m in metrics.items()} == {"fp32": "openvino (f32 hint)", "int8-fp32": int8_runtime}
    assert metrics["fp32"]["runtime_notes"] == []  # INT8's notes say why it left OpenVINO, where it did
    assert "ONNX COCO evaluation (openvino (f32 hint)" in passed.output
    # onnxruntime stays selectable; FP32 is FP32 under both (OpenVINO with the f32 hint)
    emulated = CliRunner().invoke(main, [*args[:-1], "fp32", "--runtime", "onnxruntime", "--min-map-ratio", "0",
                                         "--json", str(tmp_path / "ort.json")])
    assert emulated.exit_code == 0, emulated.output
    ort_fp32 = json.loads((tmp_path / "ort.json").read_text())["fp32"]
    assert ort_fp32["runtime"] == "onnxruntime"
    assert abs(ort_fp32["map50_95"] - metrics["fp32"]["map50_95"]) < 1e-3
    failed = CliRunner().invoke(main, [*args, "--min-map-ratio", "1.5"])
    assert failed.exit_code != 0 and "Error: INT8 accuracy gate failed" in failed.output


def test_cli_eval_onnx_missing_build(tmp_path, assets):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["eval-onnx", "--build", str(tmp_path), "--val-images", str(tmp_path),
                                       "--val-annotations", str(ground_truth_path(assets))])
    assert result.exit_code != 0 and "Error: " in result.output and "manifest.json" in result.output
