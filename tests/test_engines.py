"""GPU engine path, everything that runs without a GPU: rendered gpu/gpu-ort configs against Triton's schema and
the real ONNX, trtexec command lines, the engine cache key, and failure handling.

No TensorRT here: the cache/failure tests drive build_engine with `stand_in_trtexec`, a small executable that
writes a plan file (or fails with a long log) — what is under test is yqpack's own logic around the builder
(key, rebuild decisions, no broken plan left, log tail), not TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jinja2
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from packager.engines import host as engine_host

from packager.engines import plans as engine_plans

from packager.engines import builder as engines

from packager.engines import gpu_probe
from packager.core.paths import PROJECT_ROOT, TEMPLATES_DIR
from packager.cli.main import main
from packager.core.contracts import (
    HeadFormat,
    MissingInputError,
    ModelSpec,
    Precision,
    Role,
    TensorSpec,
)
from packager.core.manifest import BuildManifest
from packager.engines.plans import TensorRTVersion
from packager.engines.builder import EngineBuildError, GpuInfo
from packager.core.repository_index import RepositoryIndex, ServedModel

TRT10 = TensorRTVersion(10, 8, 0)
TRT86 = TensorRTVersion(8, 6, 1)
L4 = GpuInfo("NVIDIA L4", "8.9", "test")
MAX_BATCH = 8
PREFERRED = [2, 4, 8]


# ------------------------------------------------------------------------------------------------ helpers


def onnx_io(path: Path) -> dict:
    """Names, element types and dims (without batch) of a real ONNX model's first input and output."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value):
        tensor = value.type.tensor_type
        return value.name, tensor.elem_type, [d.dim_value for d in tensor.shape.dim][1:]

    (in_name, in_type, in_dims), (out_name, out_type, out_dims) = describe(graph.input[0]), describe(graph.output[0])
    return {"input_name": in_name, "input_type": in_type, "input_dims": in_dims,
            "output_name": out_name, "output_type": out_type, "output_dims": out_dims}


def detector_context(io: dict, precision: str, target: str, name: str = "yolov8n") -> dict:
    """The detector template context of docs/architecture.md, made from a real ONNX."""
    return {
        "name": f"{name}_{precision}_detector",
        "max_batch_size": MAX_BATCH,
        "preferred_batch_sizes": PREFERRED,
        "max_queue_delay_us": 2000,
        "instance_count": 1,
        "precision": precision,
        "input_name": io["input_name"],
        "input_dims": io["input_dims"],
        "output_name": io["output_name"],
        "output_dims": io["output_dims"],
        "model_filename": "model.plan" if target == "gpu" else "model.onnx",
        "intra_op_threads": 0,
        "role": "detector",
        "target": target,
        "head_format": "raw",
        "model_name": name,
        "ultralytics_metadata": "{'task': 'detect', 'end2end': False}",
        "tensorrt_builder_flags": False,  # the default image's TensorRT 11 (deploy/.env)
    }


def render(target: str, context: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), undefined=jinja2.StrictUndefined)
    return env.get_template(f"detector/{target}/config.pbtxt.j2").render(**context)


def parse_model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def accelerator_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    return dict(accelerator.parameters)


def batch_of(shape_spec: str) -> int:
    """'images:8x3x640x640' -> 8"""
    return int(shape_spec.split(":", 1)[1].split("x")[0])


@pytest.fixture(scope="module")
def sample_onnx(assets) -> Path:
    return assets / "weights" / "yolov8n.onnx"


@pytest.fixture(scope="module")
def sample_io(sample_onnx) -> dict:
    return onnx_io(sample_onnx)


def served_detector(io: dict, precision: str, max_batch: int = MAX_BATCH, name: str = "yolov8n") -> ServedModel:
    """A gpu detector's repository-index entry, made from a real ONNX's I/O."""
    return ServedModel(
        f"{name}_{precision}_detector", Role.DETECTOR, Precision(precision),
        inputs=(TensorSpec(io["input_name"], (-1, *io["input_dims"])),),
        outputs=(TensorSpec(io["output_name"], (-1, *io["output_dims"])),),
        max_batch_size=max_batch, preferred_batch_sizes=tuple(b for b in PREFERRED if b <= max_batch) or (max_batch,),
        artifact={"fp32": "fp32", "fp16": "fp16", "int8": "int8"}[precision], platform="tensorrt_plan",
    )


def make_gpu_repository(root: Path, source_onnx: Path, io: dict, precisions=("fp16", "int8"),
                        max_batch: int = MAX_BATCH) -> Path:
    """A gpu-target repository of detectors only: rendered config, the source ONNX as <detector>/1/model.onnx, and
    the repository index the engine build reads."""
    repository = root / "model_repository"
    models = []
    for precision in precisions:
        context = {**detector_context(io, precision, "gpu"), "max_batch_size": max_batch,
                   "preferred_batch_sizes": [b for b in PREFERRED if b <= max_batch] or [max_batch]}
        model_dir = repository / context["name"]
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(render("gpu", context))
        shutil.copy2(source_onnx, model_dir / "1" / "model.onnx")
        models.append(served_detector(io, precision, max_batch))
    spec = ModelSpec("yolov8n", HeadFormat.RAW, models[0].inputs[0], models[0].outputs[0],
                     tuple(f"class{i}" for i in range(io["output_dims"][0] - 4)), tuple(io["input_dims"][1:]))
    RepositoryIndex(spec, "gpu", tuple(models)).save(repository)
    return repository


STAND_IN = """#!/bin/sh
# Stand-in for trtexec: records each call, then writes the plan named by --saveEngine (or fails loudly).
echo "$@" >> "{calls}"
for arg in "$@"; do case "$arg" in --saveEngine=*) plan="${{arg#--saveEngine=}}";; esac; done
if [ -f "{fail_flag}" ]; then
    printf 'partial' > "$plan"
    i=1; while [ $i -le 100 ]; do echo "builder line $i"; i=$((i+1)); done
    echo "[E] Error[2]: Assertion failed: extreme preset"
    exit 1
fi
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100800] # trtexec $@"
printf 'PLAN-BYTES' > "$plan"
"""


@pytest.fixture
def stand_in_trtexec(tmp_path):
    calls, fail_flag = tmp_path / "calls.txt", tmp_path / "fail"
    script = tmp_path / "bin" / "trtexec"
    script.parent.mkdir()
    script.write_text(STAND_IN.format(calls=calls, fail_flag=fail_flag))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    class StandIn:
        path = script

        @staticmethod
        def calls() -> list[str]:
            return calls.read_text().splitlines() if calls.exists() else []

        @staticmethod
        def fail(on: bool = True) -> None:
            fail_flag.touch() if on else fail_flag.unlink(missing_ok=True)

    return StandIn


def build_all(repository: Path, trtexec, version=TRT10, gpu=L4, allow_missing=False, plugins=()):
    return engines.build_repository_engines(repository, trtexec=trtexec.path, version=version, gpu=gpu,
                                            allow_missing=allow_missing, plugins=plugins, report=lambda _: None)


# ---------------------------------------------------------------------------------- versions / detection


@pytest.mark.parametrize(
    "text, expected",
    [
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v100800] # trtexec --help", (10, 8, 0)),
        ("[TensorRT v101100]", (10, 11, 0)),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", (8, 6, 1)),
        ("[TensorRT v8503]", (8, 5, 3)),
        ("10.8.0.43", (10, 8, 0, 43)),
        ("8.6", (8, 6, 0)),
        # trtexec's banner carries the build number (samples/common/logging.h, TensorRT v10.8.0 and v11.1)
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", (11, 1, 0, 106)),
        ("[TensorRT v100800] [b43]", (10, 8, 0, 43)),
    ],
)
def test_tensorrt_version_parsing(text, expected):
    assert engine_plans.parse_tensorrt_version(text) == TensorRTVersion(*expected)


def test_tensorrt_version_rejects_garbage():
    assert engine_plans.parse_tensorrt_version("no version here") is None
    with pytest.raises(ValueError, match="not a TensorRT version"):
        TensorRTVersion.parse("ten")
    assert TensorRTVersion(10, 0).strongly_typed and not TensorRTVersion(9, 3).strongly_typed


def test_compute_capability_parsing():
    assert gpu_probe.parse_compute_capability("8.9\n") == "8.9"
    assert gpu_probe.parse_compute_capability("7.5\n8.6\n") == "7.5"  # the first GPU
    with pytest.raises(ValueError):
        gpu_probe.parse_compute_capability("[N/A]\n")


def test_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    if engines.gpu_probe.cuda_driver_gpu() is not None:
        pytest.skip("a CUDA driver and GPU are present here")
    with pytest.raises(EngineBuildError, match="nvidia-smi not found.*engines.*YQPACK_GPU_COMPUTE_CAPABILITY"):
        engines.detect_gpu()


def test_missing_trtexec_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    if any(Path(p).is_file() for p in engines.TRTEXEC_CANDIDATES):
        pytest.skip("a real trtexec is installed here")
    with pytest.raises(FileNotFoundError, match="trtexec not found.*compose"):
        engines.find_trtexec()


# ------------------------------------------------------------------------------ rendered configs (schema)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_gpu_config_parses_and_matches_onnx(sample_io, precision):
    config = parse_model_config(render("gpu", detector_context(sample_io, precision, "gpu")))
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == "model.plan"
    assert config.max_batch_size == MAX_BATCH
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    (model_input,), (model_output,) = config.input, config.output
    assert (model_input.name, list(model_input.dims)) == (sample_io["input_name"], sample_io["input_dims"])
    assert (model_output.name, list(model_output.dims)) == (sample_io["output_name"], sample_io["output_dims"])
    assert sample_io["input_type"] == onnx.TensorProto.FLOAT and model_input.data_type == model_config_pb2.TYPE_FP32
    assert sample_io["output_type"] == onnx.TensorProto.FLOAT and model_output.data_type == model_config_pb2.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == PREFERRED


@pytest.mark.parametrize("precision, mode", [("fp32", "FP32"), ("fp16", "FP16"), ("int8", "INT8")])
@pytest.mark.parametrize("builder_flags", [True, False], ids=["tensorrt10", "tensorrt11"])
def test_gpu_ort_config_parses_with_tensorrt_accelerator(sample_io, precision, mode, builder_flags):
    context = {**detector_context(sample_io, precision, "gpu-ort"), "tensorrt_builder_flags": builder_flags}
    config = parse_model_config(render("gpu-ort", context))
    assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    (model_input,), (model_output,) = config.input, config.output
    assert (model_input.name, list(model_input.dims)) == (sample_io["input_name"], sample_io["input_dims"])
    assert (model_output.name, list(model_output.dims)) == (sample_io["output_name"], sample_io["output_dims"])
    parameters = accelerator_parameters(config)
    # TensorRT 11 has no FP16/INT8 builder flags: the ONNX's own types decide, so no precision_mode (issue 20)
    assert parameters.get("precision_mode") == (mode if builder_flags else None)
    assert parameters["trt_engine_cache_enable"] == "1"
    # The repository is mounted read-only: the engine cache must live in the writable /trt_cache volume.
    assert parameters["trt_engine_cache_path"] == f"/trt_cache/{context['name']}"
    assert batch_of(parameters["trt_profile_min_shapes"]) == 1
    assert batch_of(parameters["trt_profile_max_shapes"]) >= config.max_batch_size
    expected_tail = "x".join(str(d) for d in sample_io["input_dims"])
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        name, shape = parameters[key].split(":")
        assert name == sample_io["input_name"] and shape.split("x", 1)[1] == expected_tail


def test_trtexec_profile_agrees_with_the_rendered_gpu_config(sample_onnx, sample_io, tmp_path):
    """The engine's profile comes from the repository index; it must agree with what Triton reads from the config."""
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("int8",))
    (spec,) = engine_plans.repository_engine_specs(repository)
    config = parse_model_config((repository / spec.name / "config.pbtxt").read_text())
    assert (spec.name, spec.precision, spec.artifact) == (config.name, "int8", "int8")
    assert spec.max_batch == config.max_batch_size and list(spec.input_dims) == list(config.input[0].dims)
    command = engines.trtexec_command("trtexec", spec, TRT10, spec.plan_path)
    flags = dict(arg.split("=", 1) for arg in command[1:] if "=" in arg)
    assert batch_of(flags["--maxShapes"]) >= config.max_batch_size
    assert batch_of(flags["--minShapes"]) == 1
    assert batch_of(flags["--optShapes"]) == max(config.dynamic_batching.preferred_batch_size)
    assert flags["--onnx"] == str(repository / spec.name / "1" / "model.onnx")


def test_only_tensorrt_plan_detectors_are_engine_builds(yolov8n_build, tmp_path):
    from packager.repository.render import render_repository

    ort = render_repository(yolov8n_build, tmp_path / "ort", target="gpu-ort")
    assert engine_plans.repository_engine_specs(ort.path) == []
    gpu = render_repository(yolov8n_build, tmp_path / "gpu", target="gpu")
    assert [s.precision for s in engine_plans.repository_engine_specs(gpu.path)] == ["fp16", "int8"]


def test_a_repository_without_an_index_is_a_clear_error(sample_onnx, sample_io, tmp_path):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io)
    (repository / "yqpack_repository.json").unlink()
    with pytest.raises(MissingInputError, match="not a yqpack model repository.*yqpack render"):
        engine_plans.repository_engine_specs(repository)


# ------------------------------------------------------------------------------------------ command lines


def spec_for(precision: str, tmp_path: Path) -> engine_plans.EngineSpec:
    io = {"input_name": "images", "input_dims": [3, 640, 640], "output_name": "output0", "output_dims": [84, 8400]}
    return engine_plans.engine_spec(served_detector(io, precision), tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trtexec_strongly_typed_on_tensorrt_10(precision, tmp_path):
    spec = spec_for(precision, tmp_path)
    command = engines.trtexec_command("/usr/src/tensorrt/bin/trtexec", spec, TRT10, tmp_path / "out.plan",
                                      timing_cache=tmp_path / "timing.cache")
    assert command == [
        "/usr/src/tensorrt/bin/trtexec",
        f"--onnx={tmp_path / 'model.onnx'}",
        f"--saveEngine={tmp_path / 'out.plan'}",
        "--stronglyTyped",
        "--minShapes=images:1x3x640x640",
        "--optShapes=images:8x3x640x640",
        "--maxShapes=images:8x3x640x640",
        f"--timingCacheFile={tmp_path / 'timing.cache'}",
        "--skipInference",
    ]


@pytest.mark.parametrize("precision, flags", [("fp32", []), ("fp16", ["--fp16"]), ("int8", ["--fp16", "--int8"])])
def test_trtexec_legacy_flags_before_tensorrt_10(precision, flags, tmp_path):
    command = engines.trtexec_command("trtexec", spec_for(precision, tmp_path), TRT86, tmp_path / "p")
    assert "--stronglyTyped" not in command
    assert [a for a in command if a in ("--fp16", "--int8")] == flags
    assert "--skipInference" in command
    older = engines.trtexec_command("trtexec", spec_for(precision, tmp_path), TensorRTVersion(8, 5, 3), tmp_path / "p")
    assert "--buildOnly" in older and "--skipInference" not in older


def test_opt_batch_never_exceeds_max_batch(tmp_path):
    io = {"input_name": "images", "input_dims": [3, 320, 320], "output_name": "output0", "output_dims": [84, 2100]}
    spec = engine_plans.engine_spec(replace(served_detector(io, "fp16", max_batch=4), preferred_batch_sizes=(2, 4, 8)),
                               tmp_path)
    assert (spec.min_batch, spec.opt_batch, spec.max_batch) == (1, 4, 4)


def test_timing_cache_is_per_version_and_gpu(tmp_path):
    assert engine_plans.timing_cache_path(tmp_path, TRT10, "8.9").name == "timing-trt10.8.0-sm89.cache"
    assert engine_plans.timing_cache_path(tmp_path, TRT10, "8.9") != engine_plans.timing_cache_path(tmp_path, TRT10, "7.5")


# ---------------------------------------------------------------------------- cache key and build loop


def test_build_then_reuse_then_rebuild_on_each_key_change(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("int8",))
    plan = repository / "yolov8n_int8_detector" / "1" / "model.plan"

    first = build_all(repository, stand_in_trtexec)
    assert [r.status for r in first] == ["built"] and plan.read_bytes() == b"PLAN-BYTES"
    key = json.loads((plan.parent / "model.plan.key.json").read_text())
    assert key["onnx_sha256"] == engine_plans.sha256_file(sample_onnx)
    assert (key["tensorrt_version"], key["compute_capability"], key["strongly_typed"]) == ("10.8.0", "8.9", True)
    assert key["gpu_name"] == "NVIDIA L4" and key["plugins"] == []
    assert key["profile"]["max"] == "images:8x3x640x640"
    assert len(stand_in_trtexec.calls()) == 1 and "--stronglyTyped" in stand_in_trtexec.calls()[0]

    assert [r.status for r in build_all(repository, stand_in_trtexec)] == ["cached"]
    assert len(stand_in_trtexec.calls()) == 1  # nothing rebuilt

    assert [r.status for r in build_all(repository, stand_in_trtexec, version=TensorRTVersion(10, 11, 0))] == ["built"]
    t4 = GpuInfo("Tesla T4", "7.5", "test")
    assert [r.status for r in build_all(repository, stand_in_trtexec, version=TensorRTVersion(10, 11, 0),
                                        gpu=t4)] == ["built"]
    onnx_path = plan.parent / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # a re-quantized model: new sha256
    assert [r.status for r in build_all(repository, stand_in_trtexec, version=TensorRTVersion(10, 11, 0),
                                        gpu=t4)] == ["built"]
    assert len(stand_in_trtexec.calls()) == 4

    make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("int8",), max_batch=4)  # new profile
    rebuilt = build_all(repository, stand_in_trtexec)
    assert [r.status for r in rebuilt] == ["built"] and rebuilt[0].key.profile["max"] == "images:4x3x640x640"


def test_legacy_build_logs_the_fallback(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("int8",))
    messages = []
    engines.build_repository_engines(repository, trtexec=stand_in_trtexec.path, version=TRT86,
                                     gpu=GpuInfo("Tesla T4", "7.5", "test"), report=messages.append)
    assert any("falling back to --fp16 / --fp16 --int8" in m for m in messages)
    assert "--fp16 --int8" in stand_in_trtexec.calls()[0] and "--stronglyTyped" not in stand_in_trtexec.calls()[0]


def test_failed_build_leaves_no_plan_and_reports_log_tail(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io)
    assert all(r.status == "built" for r in build_all(repository, stand_in_trtexec))
    stand_in_trtexec.fail()
    onnx_path = repository / "yolov8n_int8_detector" / "1" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # forces a rebuild of int8 only

    with pytest.raises(EngineBuildError) as failure:
        build_all(repository, stand_in_trtexec)
    assert "yolov8n_int8_detector" in str(failure.value) and "--allow-missing" in str(failure.value)
    version_dir = onnx_path.parent
    # The stale plan of the old ONNX and the partial new one are both gone; the log stays for the user.
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "model.plan.log"]
    assert (repository / "yolov8n_fp16_detector" / "1" / "model.plan").is_file()  # untouched, still cached

    results = build_all(repository, stand_in_trtexec, allow_missing=True)
    failed = {r.name: r for r in results}["yolov8n_int8_detector"]
    assert failed.status == "failed" and failed.message == "trtexec exited with 1"
    assert "Assertion failed: extreme preset" in failed.log_tail
    assert "builder line 1\n" not in failed.log_tail and len(failed.log_tail.splitlines()) == engines.LOG_TAIL_LINES
    assert {r.name: r.status for r in results}["yolov8n_fp16_detector"] == "cached"


def test_missing_source_onnx_fails_that_detector(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    (repository / "yolov8n_fp16_detector" / "1" / "model.onnx").unlink()
    with pytest.raises(EngineBuildError, match="source ONNX missing"):
        build_all(repository, stand_in_trtexec)


def test_entry_script_runs_with_the_standard_library_only(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    """deploy/build_engines.py as the image runs it: a bare python3 (-S: no site-packages), exit codes."""
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    env = {"PATH": os.environ["PATH"], "YQPACK_TENSORRT_VERSION": "10.8.0", "YQPACK_GPU_COMPUTE_CAPABILITY": "8.6"}
    script = PROJECT_ROOT / "deploy" / "build_engines.py"
    command = [sys.executable, "-S", "-I", str(script), str(repository), "--trtexec", str(stand_in_trtexec.path),
               "--timing-cache-dir", str(tmp_path)]
    ok = subprocess.run(command, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "engines: 1 built, 0 reused, 0 skipped on this GPU, 0 failed" in ok.stdout
    assert f"--timingCacheFile={tmp_path / 'timing-trt10.8.0-sm86.cache'}" in stand_in_trtexec.calls()[0]

    stand_in_trtexec.fail()
    (repository / "yolov8n_fp16_detector" / "1" / "model.plan.key.json").unlink()  # invalidates the cache
    failed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "Error: 1 engine build(s) failed" in failed.stderr
    assert "Assertion failed: extreme preset" in failed.stdout
    allowed = subprocess.run(command, env={**env, "YQPACK_ALLOW_MISSING": "1"}, capture_output=True, text=True)
    assert allowed.returncode == 0 and "0 built, 0 reused, 0 skipped on this GPU, 1 failed" in allowed.stdout


def test_record_engines_writes_keys_into_the_manifest(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io)
    build_all(repository, stand_in_trtexec)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    BuildManifest(RepositoryIndex.load(repository).model, "yolov8n.pt", 17, {}).save(build_dir)
    recorded = engine_host.record_engines(build_dir, repository)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    assert manifest["model_name"] == "yolov8n" and manifest["engines"] == recorded
    assert set(recorded) == {"yolov8n_fp16_detector", "yolov8n_int8_detector"}
    assert recorded["yolov8n_int8_detector"]["onnx_sha256"] == engine_plans.sha256_file(sample_onnx)
    assert recorded["yolov8n_int8_detector"]["precision"] == "int8"


# -------------------------------------------------------------------------------------------------- CLI


def test_engines_local_without_tensorrt_says_so(sample_onnx, sample_io, tmp_path):
    if engine_host.tensorrt_api_status()[0]:
        pytest.skip("tensorrt and a GPU are present here")
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    result = CliRunner().invoke(main, ["engines", "--repository", str(repository), "--engines", "local"])
    assert result.exit_code != 0
    assert "Error:" in result.output and "docker compose" in result.output


def test_engines_print_shows_the_trtexec_commands(sample_onnx, sample_io, tmp_path):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io)
    result = CliRunner().invoke(main, ["engines", "--repository", str(repository), "--engines", "print",
                                       "--tensorrt-version", "10.8.0"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all("--stronglyTyped" in line and "--maxShapes=images:8x3x640x640" in line
                                   for line in lines)
    legacy = CliRunner().invoke(main, ["engines", "--repository", str(repository), "--engines", "print",
                                       "--tensorrt-version", "8.6.1"])
    assert "--fp16 --int8" in legacy.output


def test_engines_on_a_missing_repository_is_a_plain_error(tmp_path):
    result = CliRunner().invoke(main, ["engines", "--repository", str(tmp_path / "nope"), "--engines", "print"])
    assert result.exit_code != 0 and "Error: model repository not found" in result.output


# ------------------------------------------------------------ with the real build (session fixture)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gpu", "gpu-ort"])
def test_rendered_gpu_repository_from_the_build(yolov8n_build, tmp_path, target):
    """repository.py renders these templates from a real build; every detector config matches its ONNX."""
    from packager.export.nms_graph import NmsSpec, write_nms_graph
    from packager.repository.render import render_repository
    from packager.repository.targets import ONNX_VARIANT

    build_dir = yolov8n_build
    manifest = json.loads((build_dir / "manifest.json").read_text())
    result = render_repository(build_dir, tmp_path / "repo", target=target, precisions=("fp32", "fp16", "int8"))
    for precision in ("fp32", "fp16", "int8"):
        config_path = result.path / f"{result.model_name}_{precision}_detector" / "config.pbtxt"
        config = parse_model_config(config_path.read_text())
        io = onnx_io(build_dir / manifest["artifacts"][ONNX_VARIANT[target][precision]]["path"])
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert (config.input[0].name, list(config.input[0].dims)) == (io["input_name"], io["input_dims"])
        # gpu: the engine source ends in the in-graph NMS's rows (docs/gpu-prepost.md), gpu-ort in the raw head.
        nms = NmsSpec()
        head = ((nms.output_name, [len(nms.profiles), nms.rows(80, 8400), 6]) if target == "gpu"
                else (io["output_name"], io["output_dims"]))
        assert (config.output[0].name, list(config.output[0].dims)) == head
        if target == "gpu":
            (spec,) = [s for s in engine_plans.repository_engine_specs(result.path) if s.name == config.name]
            assert spec.max_batch >= config.max_batch_size
        else:
            assert batch_of(accelerator_parameters(config)["trt_profile_max_shapes"]) >= config.max_batch_size

    if target == "gpu":
        rendered = {path: engine_plans.sha256_file(path) for path in result.path.glob("*_detector/1/model.onnx")}
        staged = engine_host.stage_engine_sources(build_dir, result.path)
        assert len(staged) == 3
        for path in staged:
            precision = path.parent.parent.name.split("_")[-2]
            artifact = manifest["artifacts"][ONNX_VARIANT["gpu"][precision]]
            # The build's artifact with the NMS appended, derived again to the same bytes as render wrote.
            derived = write_nms_graph(build_dir / artifact["path"], tmp_path / f"{precision}.onnx")
            assert engine_plans.sha256_file(path) == engine_plans.sha256_file(derived) == rendered[path]


# ------------------------------------------------------------- GPU detection without compute_cap (issue 13)

# Real `nvidia-smi -q` headers. NVIDIA's own documentation pages found by the search tool show the command but no
# full output, so these are user-posted captures of the real tool (whitespace as nvidia-smi prints it):
#   R470: https://pastebin.com/BAswyuH6 (driver 470.103.01, no "Product Architecture" line at all)
#   R560: https://pastebin.com/7aivMN92 (driver 560.35.03, RTX 3090, "Product Architecture : Ampere")
#   R566: github.com/Jesse3692/MultiLanguageLearning cuda-c/docs/nvidia-smi.md (RTX 4070 Laptop, Ada Lovelace)
SMI_Q_R470 = """
==============NVSMI LOG==============

Timestamp                                 : Mon Feb 21 10:05:47 2022
Driver Version                            : 470.103.01
CUDA Version                              : 11.4

Attached GPUs                             : 1
GPU 00000000:2D:00.0
    Product Name                          : NVIDIA GeForce GTX 670
    Product Brand                         : GeForce
    Display Mode                          : N/A
    Display Active                        : N/A
    Persistence Mode                      : Disabled
"""
SMI_Q_R560_AMPERE = """
==============NVSMI LOG==============

Timestamp                                 : Thu Oct 17 12:40:42 2024
Driver Version                            : 560.35.03
CUDA Version                              : 12.6

Attached GPUs                             : 1
GPU 00000000:01:00.0
    Product Name                          : NVIDIA GeForce RTX 3090
    Product Brand                         : GeForce
    Product Architecture                  : Ampere
    Display Mode                          : Disabled
"""
SMI_Q_R566_ADA = """
==============NVSMI LOG==============

Timestamp                                 : Thu Jan 30 16:14:43 2025
Driver Version                            : 566.36
CUDA Version                              : 12.7

Attached GPUs                             : 1
GPU 00000000:01:00.0
    Product Name                          : NVIDIA GeForce RTX 4070 Laptop GPU
    Product Brand                         : GeForce
    Product Architecture                  : Ada Lovelace
    Display Mode                          : Disabled
"""

STAND_IN_SMI = """#!/bin/sh
# Stand-in for nvidia-smi: answers --query-gpu like a driver >= R510 (or refuses compute_cap like R470) and -q
# with the captured text in {q_file}.
case "$1" in
  --query-gpu=*)
    if [ -f "{modern_flag}" ]; then echo "NVIDIA L4, 8.9"; exit 0; fi
    echo 'Field "compute_cap" is not a valid field to query.' >&2; exit 2;;
  -q) cat "{q_file}";;
esac
"""


@pytest.fixture
def stand_in_smi(tmp_path):
    q_file, modern_flag, script = tmp_path / "smi-q.txt", tmp_path / "modern", tmp_path / "smi" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(STAND_IN_SMI.format(q_file=q_file, modern_flag=modern_flag))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def with_output(q_text: str, modern: bool = False) -> str:
        q_file.write_text(q_text)
        modern_flag.touch() if modern else modern_flag.unlink(missing_ok=True)
        return str(script)

    return with_output


def test_nvidia_smi_q_parsing_on_real_output():
    assert engines.gpu_probe.parse_nvidia_smi_q(SMI_Q_R470) == ("NVIDIA GeForce GTX 670", None)
    assert engines.gpu_probe.parse_nvidia_smi_q(SMI_Q_R560_AMPERE) == ("NVIDIA GeForce RTX 3090", "Ampere")
    collapsed = " ".join(SMI_Q_R566_ADA.split("    "))  # as pasted on web pages, indentation squeezed
    assert engines.gpu_probe.parse_nvidia_smi_q(collapsed) == ("NVIDIA GeForce RTX 4070 Laptop GPU", "Ada Lovelace")


def test_detect_gpu_uses_the_query_when_the_driver_has_compute_cap(stand_in_smi, monkeypatch):
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    gpu = engines.gpu_probe.detect_gpu(stand_in_smi(SMI_Q_R470, modern=True), library="absent-libcuda.so.1")
    assert gpu == GpuInfo("NVIDIA L4", "8.9", "nvidia-smi --query-gpu")


def test_detect_gpu_falls_back_to_nvidia_smi_q(stand_in_smi, monkeypatch):
    """No compute_cap field (R470-style refusal): the -q architecture answers where it is unambiguous."""
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    gpu = engines.gpu_probe.detect_gpu(stand_in_smi(SMI_Q_R566_ADA), library="absent-libcuda.so.1")
    assert (gpu.name, gpu.compute_capability) == ("NVIDIA GeForce RTX 4070 Laptop GPU", "8.9")
    assert "Product Architecture Ada Lovelace" in gpu.source
    # With the CUDA driver's answer the -q text only contributes the name.
    assert engines.gpu_probe.gpu_from_nvidia_smi_q(SMI_Q_R470, "8.6") == GpuInfo(
        "NVIDIA GeForce GTX 670", "8.6", "nvidia-smi -q + libcuda")


@pytest.mark.parametrize("q_text", [SMI_Q_R470, SMI_Q_R560_AMPERE])
def test_detect_gpu_refuses_to_guess(stand_in_smi, monkeypatch, q_text):
    """R470 -q has no architecture, Ampere spans 8.0/8.6/8.7: without libcuda, say what to set instead."""
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    if engines.gpu_probe.cuda_driver_gpu() is not None:
        pytest.skip("a CUDA driver and GPU are present here")
    with pytest.raises(engines.gpu_probe.GpuProbeError, match='compute_cap" is not a valid field.*YQPACK_GPU_COMPUTE_CAP'):
        engines.gpu_probe.detect_gpu(stand_in_smi(q_text))


def test_cuda_driver_probe_without_a_driver():
    """ctypes path: a missing library and a real library that is not the CUDA driver both mean 'no answer'."""
    assert engines.gpu_probe.cuda_driver_gpu("absent-libcuda.so.1") is None
    assert engines.gpu_probe.cuda_driver_gpu("libc.so.6") is None


def test_override_names_the_gpu(monkeypatch):
    monkeypatch.setenv("YQPACK_GPU_COMPUTE_CAPABILITY", "7.5")
    monkeypatch.setenv("YQPACK_GPU_NAME", "Tesla T4")
    assert engines.detect_gpu() == GpuInfo("Tesla T4", "7.5", "YQPACK_GPU_COMPUTE_CAPABILITY")


def test_another_gpu_of_the_same_compute_capability_rebuilds(sample_onnx, sample_io, tmp_path, stand_in_trtexec):
    """Plans are tied to the GPU model: an RTX 4070 (sm 8.9 like the L4) gets its own plan, keyed by name."""
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    assert [r.status for r in build_all(repository, stand_in_trtexec)] == ["built"]
    assert [r.status for r in build_all(repository, stand_in_trtexec)] == ["cached"]
    name, _ = engines.gpu_probe.parse_nvidia_smi_q(SMI_Q_R566_ADA)
    rebuilt = build_all(repository, stand_in_trtexec, gpu=GpuInfo(name, "8.9", "nvidia-smi -q"))
    assert [r.status for r in rebuilt] == ["built"] and rebuilt[0].key.gpu_name == name


# ------------------------------------------------------------------------- TensorRT plugins (issue 13)


def test_trtexec_loads_plugins_with_the_flag_of_its_version(tmp_path):
    spec = spec_for("int8", tmp_path)
    plugins = [tmp_path / "libA.so", tmp_path / "libB.so"]
    command = engines.trtexec_command("trtexec", spec, TRT10, tmp_path / "p", plugins=plugins)
    assert [a for a in command if "Plugins=" in a] == [f"--staticPlugins={p}" for p in plugins]
    old = engines.trtexec_command("trtexec", spec, TensorRTVersion(8, 5, 3), tmp_path / "p", plugins=plugins)
    assert [a for a in old if a.startswith("--plugins=")] == [f"--plugins={p}" for p in plugins]


def test_plugins_are_part_of_the_key_and_reach_trtexec_in_the_image(sample_onnx, sample_io, tmp_path,
                                                                    stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "libyolo_nms.so").write_bytes(b"\x7fELF plugin v1")
    env = {"PATH": os.environ["PATH"], "YQPACK_TENSORRT_VERSION": "10.8.0", "YQPACK_GPU_COMPUTE_CAPABILITY": "8.6"}
    command = [sys.executable, "-S", "-I", str(PROJECT_ROOT / "deploy" / "build_engines.py"), str(repository),
               "--trtexec", str(stand_in_trtexec.path), "--plugins", str(plugin_dir / "libyolo_nms.so")]
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert f"--staticPlugins={plugin_dir / 'libyolo_nms.so'}" in stand_in_trtexec.calls()[0]
    key = json.loads((repository / "yolov8n_fp16_detector" / "1" / "model.plan.key.json").read_text())
    assert key["plugins"] == [f"libyolo_nms.so:{engine_plans.sha256_file(plugin_dir / 'libyolo_nms.so')}"]
    (plugin_dir / "libyolo_nms.so").write_bytes(b"\x7fELF plugin v2")  # a new plugin build: the plan is stale
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert "engines: 1 built, 0 reused" in second.stdout and len(stand_in_trtexec.calls()) == 2
    (plugin_dir / "libyolo_nms.so").unlink()
    missing = subprocess.run(command, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "plugin library not found" in missing.stderr


# ------------------------------------------------------------------------------- gpu-ort INT8 (issue 13)

# The TensorRT accelerator parameters Triton's onnxruntime backend accepts at r25.01 (src/onnxruntime.cc, the
# `param_key ==` branches); any other key makes the model fail to load ("unknown parameter"). There is no FP16
# key besides precision_mode, which maps to exactly one of trt_fp16_enable / trt_int8_enable.
ORT_BACKEND_TRT_KEYS_R2501 = {
    "precision_mode", "max_workspace_size_bytes", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "int8_calibration_table_name", "int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
    "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_ep_context_embed_mode",
}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_gpu_ort_uses_only_keys_the_backend_accepts(sample_io, precision):
    text = render("gpu-ort", detector_context(sample_io, precision, "gpu-ort"))
    parameters = accelerator_parameters(parse_model_config(text))
    assert set(parameters) <= ORT_BACKEND_TRT_KEYS_R2501
    assert "precision_mode" not in parameters and "strongly typed only" in text  # TensorRT 11 (the default)
    legacy = render("gpu-ort", {**detector_context(sample_io, precision, "gpu-ort"), "tensorrt_builder_flags": True})
    legacy_parameters = accelerator_parameters(parse_model_config(legacy))
    assert set(legacy_parameters) <= ORT_BACKEND_TRT_KEYS_R2501
    if precision == "int8":  # the TensorRT 10 limitation is stated where the user reads the config
        assert legacy_parameters["precision_mode"] == "INT8" and "exactly one of trt_int8_enable" in legacy


# ------------------------------------------------------------------ TensorRT 11, cache key, GPU selection (issue 20)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8"])
def test_trtexec_on_tensorrt_11_has_no_precision_flags(precision, tmp_path):
    """trtexec v11.1 (samples/common/sampleOptions.cpp): --fp16/--int8/--best are gone, --stronglyTyped is a
    deprecated no-op; the options yqpack passes are all still parsed there."""
    spec = engine_plans.engine_spec(served_detector({"input_name": "images", "input_dims": [3, 640, 640],
                                                     "output_name": "output0", "output_dims": [84, 8400]}, "fp16"),
                                    tmp_path)
    spec = replace(spec, precision=precision)
    command = engines.trtexec_command("trtexec", spec, TensorRTVersion(11, 1, 0, 106), tmp_path / "p",
                                      timing_cache=tmp_path / "t.cache", plugins=["/plugins/a.so"])
    options = [a.split("=", 1)[0] for a in command[1:]]
    assert options == ["--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--timingCacheFile",
                       "--staticPlugins", "--skipInference"]


def test_cache_key_changes_with_tensorrt_build_image_and_command_line(sample_onnx, sample_io, tmp_path,
                                                                     stand_in_trtexec):
    repository = make_gpu_repository(tmp_path, sample_onnx, sample_io, precisions=("fp16",))
    plan = repository / "yolov8n_fp16_detector" / "1" / "model.plan"
    trt = TensorRTVersion(11, 1, 0, 106)

    def build(version=trt, image="nvcr.io/nvidia/tritonserver:26.08-py3", plugins=()):
        results = engines.build_repository_engines(repository, trtexec=stand_in_trtexec.path, version=version,
                                                   gpu=L4, image=image, plugins=plugins, report=lambda _: None)
        return [r.status for r in results]

    assert build() == ["built"]
    key = json.loads((plan.parent / "model.plan.key.json").read_text())
    assert key["tensorrt_version"] == "11.1.0.106" and key["image"] == "nvcr.io/nvidia/tritonserver:26.08-py3"
    assert key["command"][0] == "--onnx=model.onnx" and "--saveEngine=model.plan" in key["command"]
    assert build() == ["cached"]  # the per-process temporary plan name is not part of the key
    assert build(version=TensorRTVersion(11, 1, 0, 107)) == ["built"]  # same major.minor.patch, another build
    assert build(version=TensorRTVersion(11, 1, 0, 107), image="registry.example/tritonserver:26.08") == ["built"]
    library = tmp_path / "plugins" / "libyolo.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF plugin")
    assert build(version=TensorRTVersion(11, 1, 0, 107), image="registry.example/tritonserver:26.08",
                 plugins=[library]) == ["built"]  # another command line (--staticPlugins) and plugin set
    outcome = json.loads((repository / "yqpack_engines.json").read_text())
    assert outcome["detectors"]["yolov8n_fp16_detector"]["status"] == "built"
    assert not list(plan.parent.glob("*.building*"))


def test_the_temporary_plan_is_named_per_builder(tmp_path):
    """Replicas sharing one volume never write into each other's half-built plan (issue 20, Kubernetes)."""
    name = engines.building_path(tmp_path / "model.plan").name
    assert name.startswith("model.plan.building.") and name.endswith(f"-{os.getpid()}")


# `nvidia-smi -L` of the H200 this project borrowed (driver 580.159.04), captured by packager's device run; the MIG
# listing follows the layout of NVIDIA's MIG user guide (no MIG-enabled GPU was available here).
SMI_L_H200 = "GPU 0: NVIDIA H200 (UUID: GPU-587b91e4-5ba3-bdca-0ff7-dcd7a31789c9)\n"
SMI_L_MIG = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
  MIG 1g.5gb      Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
"""


def test_a_mig_slice_is_keyed_by_its_profile_not_its_parent():
    a100 = GpuInfo("NVIDIA A100-SXM4-40GB", "8.0", "nvidia-smi --query-gpu")
    assert gpu_probe.with_mig_profile(a100, SMI_L_H200) == a100
    sliced = gpu_probe.with_mig_profile(a100, SMI_L_MIG)
    assert sliced.name == "NVIDIA A100-SXM4-40GB MIG 1g.5gb" and sliced.compute_capability == "8.0"
    assert "MIG-c6d4f1ef" in sliced.source


def test_detect_gpu_names_the_mig_slice(stand_in_smi, monkeypatch, tmp_path):
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    listing = tmp_path / "mig.txt"
    listing.write_text(SMI_L_MIG)
    smi = tmp_path / "smi-mig"
    smi.write_text(f'#!/bin/sh\ncase "$1" in\n  --query-gpu=*) echo "NVIDIA A100-SXM4-40GB, 8.0";;\n'
                   f'  -L) cat "{listing}";;\nesac\n')
    smi.chmod(0o755)
    found = gpu_probe.detect_gpu(nvidia_smi=str(smi), library="libnotcuda.so")
    assert found.name == "NVIDIA A100-SXM4-40GB MIG 1g.5gb" and found.compute_capability == "8.0"
