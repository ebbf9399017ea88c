"""INT8 on every CPU: the file and runtime the instruction set in effect picks (oneDNN caps included), the
load-time self-check against onnxruntime, and the artifacts behind them (real OpenVINO, onnxruntime, ModelOpt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packager.core.manifest import BuildManifest
from packager.evaluate.onnx_eval import int8_runtime_files, open_variant
from packager.inference.int8_cpu import (
    AMX,
    AVX512_VNNI,
    AVX_VNNI,
    SELF_CHECK_TOLERANCE,
    int8_isa_in_effect,
    isa_cap,
    output_distance,
)
from packager.inference.runtime import (
    NO_CHECK_IMAGES_NOTE,
    SATURATION_NOTE,
    RuntimeOptions,
    open_model,
    read_cpu_flags,
    resolve_runtime,
)
from packager.pipeline.manifest import artifact_path

OPENVINO = RuntimeOptions("openvino")
BASE = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c".split())
AVX512 = BASE | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
SAPPHIRE_RAPIDS = AVX512 | {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
CASCADE_LAKE = AVX512 | {"avx512_vnni"}
GENOA = AVX512 | {"avx512_vnni", "avx512_bf16"}  # AMD EPYC 9004 (Zen 4): VNNI, no AVX-VNNI, no AMX
ALDER_LAKE = BASE | {"avx_vnni"}
MILAN = BASE  # AMD EPYC 7003: AVX2 only


@pytest.mark.parametrize("flags, cap, isa", [
    (SAPPHIRE_RAPIDS, None, AMX),
    (SAPPHIRE_RAPIDS, "AVX512_CORE_AMX", AMX),
    (SAPPHIRE_RAPIDS, "AVX512_CORE_VNNI", AVX512_VNNI),
    (SAPPHIRE_RAPIDS, "AVX512_CORE_BF16", AVX512_VNNI),
    (SAPPHIRE_RAPIDS, "AVX2_VNNI", AVX_VNNI),
    (SAPPHIRE_RAPIDS, "AVX512_CORE", None),
    (SAPPHIRE_RAPIDS, "AVX2", None),
    (CASCADE_LAKE, None, AVX512_VNNI),
    (CASCADE_LAKE, "AVX512_CORE_AMX", AVX512_VNNI),  # a cap above the CPU changes nothing
    (CASCADE_LAKE, "AVX2_VNNI", None),  # no AVX-VNNI on Cascade Lake: oneDNN runs AVX2 kernels
    (GENOA, None, AVX512_VNNI),
    (ALDER_LAKE, None, AVX_VNNI),
    (ALDER_LAKE, "AVX512_CORE_VNNI", None),  # oneDNN's AVX-512 masks leave out the VEX AVX-VNNI
    (MILAN, None, None),
    (SAPPHIRE_RAPIDS, "SOMETHING_NEW", None),  # an unknown cap: INT8 stays off OpenVINO (slower, never wrong)
])
def test_the_instruction_set_in_effect_picks_file_and_runtime(flags, cap, isa):
    assert int8_isa_in_effect(flags, cap) == isa
    choice = resolve_runtime(OPENVINO, flags, quantized=True, cap=cap)
    if isa is None:
        assert (choice.runtime, choice.int8_activations) == ("onnxruntime", None)
        assert choice.notes == (SATURATION_NOTE,)
    else:
        # AMX computes ModelOpt's symmetric s8 activations right (and faster); the VNNI kernels need u8 ones.
        assert (choice.runtime, choice.int8_activations) == ("openvino", "s8" if isa == AMX else "u8")
        assert isa in choice.label and choice.int8_activations in choice.label
    # float models are not affected by any of this
    assert resolve_runtime(OPENVINO, flags, cap=cap).runtime == "openvino"


def test_the_cap_is_read_from_onednn_variables():
    assert isa_cap({}) is None and isa_cap({"ONEDNN_MAX_CPU_ISA": "all"}) is None
    assert isa_cap({"ONEDNN_MAX_CPU_ISA": "avx2_vnni"}) == "AVX2_VNNI"
    assert isa_cap({"DNNL_MAX_CPU_ISA": "AVX2"}) == "AVX2"


def test_the_u8_twin_holds_the_same_values_and_tensorrt_keeps_symmetric_s8(yolov8n_build):
    """model.int8-u8.onnx differs from model.int8-fp32.onnx only in its activation zero points (uint8 128 instead of
    int8 0): onnxruntime gives the same outputs for both. model.int8.onnx (TensorRT's) keeps symmetric s8 activations
    and weights, on the same quantized nodes with the same scales."""
    import onnx
    from onnx import numpy_helper

    def qdq(path):
        model = onnx.load(str(path))
        values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        # Constant nodes (the fp16 twin may fold initializers into them) count as values too.
        for node in model.graph.node:
            if node.op_type == "Constant":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        rows = {}
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear":
                scale, zero = values[node.input[1]], values[node.input[2]]
                rows[node.name] = (node.input[0] in values, np.asarray(scale, np.float32), zero.dtype, zero)
        return rows

    s8, u8, tensorrt = (qdq(artifact_path(yolov8n_build, v)) for v in ("int8-fp32", "int8-u8", "int8"))
    assert s8.keys() == u8.keys() == tensorrt.keys() and len(s8) > 50
    for name, (weight, scale, dtype, zero) in s8.items():
        assert dtype == np.int8 and not zero.any(), name
        np.testing.assert_array_equal(u8[name][1], scale, err_msg=name)
        np.testing.assert_allclose(tensorrt[name][1], scale, rtol=1e-3, err_msg=name)  # stored as fp16 there
        assert tensorrt[name][2] == np.int8 and not tensorrt[name][3].any(), name
        assert u8[name][2] == (np.int8 if weight else np.uint8), name
        assert (u8[name][3] == (0 if weight else 128)).all(), name
    images = np.load(artifact_path(yolov8n_build, "int8-check"))
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 640, 640) and len(images) >= 2
    onnxruntime = RuntimeOptions("onnxruntime")
    batch = images[:2].astype(np.float32) / 255
    np.testing.assert_allclose(open_model(artifact_path(yolov8n_build, "int8-u8"), onnxruntime).run(batch),
                               open_model(artifact_path(yolov8n_build, "int8-fp32"), onnxruntime).run(batch),
                               rtol=1e-5, atol=1e-3)


def test_the_self_check_passes_quietly_on_the_real_files(yolov8n_build):
    build = Path(yolov8n_build)
    manifest = BuildManifest.load(build)
    model = open_variant(build, manifest, "int8-fp32")
    if int8_isa_in_effect(read_cpu_flags(), isa_cap()) is None:
        assert model.runtime == "onnxruntime" and model.choice.notes == (SATURATION_NOTE,)
        pytest.skip("no VNNI/AMX in effect on this CPU: INT8 runs on onnxruntime, no self-check to pass")
    assert model.runtime == "openvino" and model.choice.notes == ()
    assert model.self_check.passed and model.self_check.distance < SELF_CHECK_TOLERANCE / 2, model.self_check
    reference = open_model(artifact_path(build, "int8-fp32"), RuntimeOptions("onnxruntime"))
    batch = np.load(artifact_path(build, "int8-check"))[:1].astype(np.float32) / 255
    assert output_distance(model.run(batch), reference.run(batch)) < SELF_CHECK_TOLERANCE


def test_the_self_check_falls_back_on_a_broken_twin(yolov8n_build, tmp_path):
    """A u8 twin made wrong on purpose (its input quantizer's scale x16) is caught on any CPU: the rule is told the
    CPU has VNNI without AMX, so OpenVINO opens the broken twin, disagrees with onnxruntime and is replaced by it."""
    import onnx
    from onnx import numpy_helper

    build = Path(yolov8n_build)
    broken = onnx.load(str(artifact_path(build, "int8-u8")))
    quantizer = next(node for node in broken.graph.node if node.op_type == "QuantizeLinear")
    scale = next(init for init in broken.graph.initializer if init.name == quantizer.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(16), scale.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    files = int8_runtime_files(build, BuildManifest.load(build), "int8-fp32")
    model = open_model(artifact_path(build, "int8-fp32"), OPENVINO, flags=CASCADE_LAKE,
                       u8_twin=tmp_path / "broken.onnx", check_images=files["check_images"])
    assert model.runtime == "onnxruntime"
    assert not model.self_check.passed and model.self_check.distance > SELF_CHECK_TOLERANCE
    assert "DISAGREES" in model.choice.notes[-1] and "runs on onnxruntime instead" in model.choice.notes[-1]
    batch = files["check_images"][:1].astype(np.float32) / 255
    np.testing.assert_array_equal(
        model.run(batch), open_model(artifact_path(build, "int8-fp32"), RuntimeOptions("onnxruntime")).run(batch))
    # without check images nothing quantized runs on OpenVINO unchecked
    unchecked = open_model(artifact_path(build, "int8-fp32"), OPENVINO, flags=CASCADE_LAKE,
                           u8_twin=artifact_path(build, "int8-u8"))
    assert unchecked.runtime == "onnxruntime" and unchecked.choice.notes == (NO_CHECK_IMAGES_NOTE,)


# Each cap's INT8 (as the rule picks it under that cap) scored on the 128 sample images, in a subprocess: oneDNN
# reads ONEDNN_MAX_CPU_ISA once per process.
CAP_SCRIPT = """
import json, sys
from pathlib import Path
from packager.core.manifest import BuildManifest
from packager.evaluate.onnx_eval import detect_with, open_variant
from packager.inference.runtime import RuntimeOptions
from packager.metrics.coco_eval import CocoGroundTruth, evaluate
build, images, annotations = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
manifest = BuildManifest.load(build)
truth = CocoGroundTruth(annotations)
files = truth.image_files(images)
out = {}
for name, runtime in (("rule", RuntimeOptions("openvino")), ("onnxruntime", RuntimeOptions("onnxruntime"))):
    model = open_variant(build, manifest, "int8-fp32", runtime)
    detections = detect_with(model, files, manifest.model.imgsz, show_progress=False, head_format=manifest.model.head)
    out[name] = {"label": model.label, "notes": list(model.choice.notes),
                 "map": evaluate(detections, truth, list(manifest.model.class_names)).map50_95}
print(json.dumps(out))
"""
CAPS = {"AVX512_CORE_AMX": AMX, "AVX512_CORE_VNNI": AVX512_VNNI, "AVX2_VNNI": AVX_VNNI, "AVX2": None}


@pytest.mark.slow
@pytest.mark.parametrize("cap", list(CAPS))
def test_each_instruction_set_serves_int8_within_0_005_of_onnxruntime(cap, yolov8n_build, sample_val):
    flags = read_cpu_flags()
    needed = CAPS[cap]
    if needed is not None and int8_isa_in_effect(flags, cap) != needed:
        pytest.skip(f"this CPU has no {needed}: the {cap} cap would run other kernels here")
    images, annotations = sample_val
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    done = subprocess.run([sys.executable, "-c", CAP_SCRIPT, str(yolov8n_build), str(images), str(annotations)],
                          env=env, capture_output=True, text=True, timeout=900, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rule, reference = result["rule"], result["onnxruntime"]
    assert abs(rule["map"] - reference["map"]) <= 0.005, result
    assert reference["map"] > 0.4, result
    if needed is None:
        assert rule["label"] == "onnxruntime" and rule["notes"] == [SATURATION_NOTE], result
    else:
        assert rule["label"].startswith("openvino") and needed in rule["label"], result


def test_the_local_int8_detector_is_served_with_its_twin_and_check_images(model_repository):
    """render copies the u8 twin and the self-check images beside the `local` INT8 detector, under the names its
    runtime opens them by; the float detectors get none."""
    from packager.inference.runtime import SERVED_CHECK_IMAGES, SERVED_U8_TWIN
    from packager.repository.targets import LOCAL_INT8_COMPANIONS, detector_name

    assert set(LOCAL_INT8_COMPANIONS.values()) == {SERVED_U8_TWIN, SERVED_CHECK_IMAGES}
    for precision in ("fp32", "fp16", "int8"):
        version = model_repository.path / detector_name(model_repository.model_name, precision) / "1"
        served = {path.name for path in version.iterdir()}
        assert ({SERVED_U8_TWIN, SERVED_CHECK_IMAGES} <= served) == (precision == "int8"), (precision, served)
        assert "int8_cpu.py" in served and "runtime.py" in served


def test_build_says_plainly_where_int8_is_only_emulated(monkeypatch):
    """The build summary's INT8 line follows the instruction set in effect: under a cap without VNNI it says INT8
    is emulated and slower than FP32 here; where VNNI or AMX is in effect, which OpenVINO file runs."""
    from packager.pipeline.summary import int8_cpu_line

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "EMULATED by onnxruntime" in int8_cpu_line(OPENVINO) and "SLOWER than FP32" in int8_cpu_line(OPENVINO)
    assert "as asked" in int8_cpu_line(RuntimeOptions("onnxruntime"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    isa = int8_isa_in_effect(read_cpu_flags(), None)
    line = int8_cpu_line(OPENVINO)
    assert (isa is not None and isa in line and "integer kernels" in line) or (isa is None and "EMULATED" in line)
