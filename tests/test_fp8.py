"""FP8 (ModelOpt quantize_mode="fp8") from the same export and calibration: float8 Q/DQ on convolutions,
evaluated on onnxruntime CPU (unoptimized sessions), gated, and served by the gpu target only."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import TensorProto

from packager.metrics.mac_coverage import conv_coverage

VAL_IMAGES = 8


@pytest.fixture(scope="module")
def fp8_build(assets, tmp_path_factory):
    """A small real build: imgsz 320, 16 calibration images, 8 val images, --target gpu --fp8."""
    from packager.pipeline.run import BuildOptions, run_build

    root = tmp_path_factory.mktemp("fp8")
    val = root / "val"
    val.mkdir()
    for path in sorted((assets / "coco" / "val2017").glob("*.jpg"))[:VAL_IMAGES]:
        shutil.copy(path, val / path.name)
    options = BuildOptions(
        model=assets / "weights" / "yolov8n.pt", out=root / "build", calib_images=assets / "coco" / "calib2017",
        calib_size=16, imgsz=(320, 320), val_images=val,
        val_annotations=assets / "coco" / "annotations" / "instances_val2017_128.json", min_map_ratio=0.5,
        repository=root / "repo", repository_target="gpu", show_progress=False, fp8=True,
    )
    return run_build(options)


def test_a_default_gpu_build_has_no_fp8(tmp_path):
    """FP8 plans need compute capability >= 8.9: a default --target gpu build must come up on a T4, so FP8 is
    only built when asked for (issue 20)."""
    from packager.pipeline.run import BuildOptions

    default = BuildOptions(model=tmp_path / "m.pt", out=tmp_path / "b", repository=tmp_path / "r",
                           repository_target="gpu")
    assert not default.build_fp8
    assert BuildOptions(model=tmp_path / "m.pt", out=tmp_path / "b", fp8=True).build_fp8


def test_fp8_artifacts_have_float8_qdq_on_convolutions(fp8_build):
    build = fp8_build.build_dir
    manifest = json.loads((build / "manifest.json").read_text())
    assert {"fp8", "fp8-fp32", "int8", "int8-fp32"} <= set(manifest["artifacts"])
    for variant in ("fp8-fp32", "fp8"):
        model = onnx.load(str(build / manifest["artifacts"][variant]["path"]))
        inits = {i.name: i for i in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        conv_dq = []
        for conv in (n for n in model.graph.node if n.op_type == "Conv"):
            source = producers.get(conv.input[1])
            if source is not None and source.op_type == "Cast":
                source = producers.get(source.input[0])
            if source is not None and source.op_type == "DequantizeLinear":
                conv_dq.append(source)
        assert len(conv_dq) >= 40, f"{variant}: only {len(conv_dq)} convolutions with dequantized weights"
        types = {inits[dq.input[2]].data_type for dq in conv_dq}
        assert types == {TensorProto.FLOAT8E4M3FN}, f"{variant}: weight zero-point types {types}"
    coverage = conv_coverage(build / manifest["artifacts"]["fp8-fp32"]["path"])
    assert coverage.share("int8") == 0 and 0.5 < coverage.share("fp8") < 1
    assert manifest["quantization"]["fp8"]["fp8_mac_coverage"] == round(coverage.share("fp8"), 5)
    assert 0.5 < manifest["quantization"]["int8_mac_coverage"] < 1
    assert len(manifest["calibration"]["image_sha256"]) == 16
    from packager.pipeline.summary import summary_table

    caption = summary_table(fp8_build).caption
    assert "of conv MACs in INT8" in caption and "of conv MACs in FP8" in caption and "fp8-fp32 mAP50-95" in caption


def test_fp8_evaluates_with_an_interval_and_passes_its_gate(fp8_build):
    metrics, intervals = fp8_build.metrics, fp8_build.intervals
    assert set(metrics) == {"fp32", "fp16", "int8-fp32", "fp8-fp32"}
    assert metrics["fp8-fp32"].images == VAL_IMAGES and metrics["fp8-fp32"].map50_95 > 0.1
    fp8 = intervals["fp8-fp32"]
    assert fp8.low <= fp8.ratio <= fp8.high and fp8.images == VAL_IMAGES
    assert [gate.variant for gate in fp8_build.gates] == ["int8-fp32", "fp8-fp32"]
    manifest = json.loads((fp8_build.build_dir / "manifest.json").read_text())
    assert manifest["evaluation"]["ratios_vs_fp32"]["fp8-fp32"]["high"] == pytest.approx(fp8.high)


def test_fp8_served_on_gpu_target_only(fp8_build, tmp_path):
    from packager.repository.render import render_repository

    repo = fp8_build.repository
    assert (repo / "yolov8n_fp8" / "config.pbtxt").is_file()
    detector = (repo / "yolov8n_fp8_detector" / "config.pbtxt").read_text()
    assert "tensorrt" in detector
    with pytest.raises(ValueError, match="served only on the gpu target"):
        render_repository(fp8_build.build_dir, tmp_path / "cpu_repo", target="cpu", precisions=("fp32", "fp8"))


def test_fp8_engine_needs_compute_capability_8_9(tmp_path):
    """On a GPU below sm 8.9 the fp8 plan is skipped (not a failure) with a plain message, trtexec never starts."""
    from packager.engines.plans import EngineSpec, TensorRTVersion
    from packager.engines.builder import build_engine, trtexec_command
    from packager.engines.gpu_probe import GpuInfo

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not used")
    spec = EngineSpec(name="yolov8n_fp8_detector", precision="fp8", onnx_path=onnx_path,
                      plan_path=tmp_path / "model.plan", input_name="images", input_dims=(3, 640, 640),
                      min_batch=1, opt_batch=4, max_batch=8)
    started = []
    result = build_engine(spec, "trtexec", TensorRTVersion(10, 8), GpuInfo("NVIDIA A10", "8.6", "test"),
                          runner=lambda command, log: started.append(command) or 0)
    assert result.status == "skipped" and result.ok and not result.served
    assert "compute capability >= 8.9" in result.message and not started
    command = trtexec_command("trtexec", spec, TensorRTVersion(10, 8), spec.plan_path)
    assert "--stronglyTyped" in command and "--fp8" not in command
    assert not {"--stronglyTyped", "--fp8", "--fp16"} & set(trtexec_command("trtexec", spec, TensorRTVersion(11, 1),
                                                                              spec.plan_path))
    legacy = trtexec_command("trtexec", spec, TensorRTVersion(9, 3), spec.plan_path)
    assert "--fp8" in legacy and "--fp16" in legacy
