"""The first GPU run (issue 20), everything that runs without a GPU: the engine check's Polygraphy command lines and
comparison logic, what Triton serves when a plan is skipped or refused, and the tritonserver command line.

No TensorRT here. The comparison logic runs the real Polygraphy CLI with onnxruntime on both sides: the build's own
twins stand in for "a plan" (an ONNX whose outputs agree, and one whose outputs do not). That exercises yqpack's
command lines, tolerances and verdict records, never TensorRT, and is named a stand-in wherever it is used.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from packager.core.contracts import Role, YqpackError
from packager.core.manifest import BuildManifest
from packager.core.repository_index import RepositoryIndex
from packager.engines import builder, check, serving
from packager.engines.gpu_probe import detect_gpu
from packager.engines.plans import TensorRTVersion, check_path, repository_engine_specs
from packager.engines.reference import polygraphy_executable, write_check_inputs

T4_SMI = '#!/bin/sh\ncase "$1" in\n  --query-gpu=*) echo "Tesla T4, 7.5";;\n  -L) echo "GPU 0: Tesla T4 (UUID: GPU-1)";;\nesac\n'


# ------------------------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8"])
def test_polygraphy_command_lines_per_precision(precision, tmp_path):
    plan, inputs, reference = tmp_path / "model.plan", tmp_path / "in.json", tmp_path / "ref.json"
    tolerance = check.TOLERANCES[precision]
    command = check.engine_check_command(plan, inputs, reference, precision, plugins=["/plugins/a.so"])
    assert command[:6] == ["polygraphy", "run", str(plan), "--model-type", "engine", "--trt"]
    assert command[command.index("--load-inputs") + 1] == str(inputs)
    assert command[command.index("--load-outputs") + 1] == str(reference)
    assert command[command.index("--atol") + 1] == f"{tolerance.atol:g}"
    assert command[command.index("--rtol") + 1] == "0" and command[command.index("--check-error-stat") + 1] == "mean"
    assert "--validate" in command and command[-2:] == ["--plugins", "/plugins/a.so"]
    assert "--onnxrt" not in command  # the TensorRT side runs the plan itself, never a rebuilt engine
    onnx = tmp_path / "model.onnx"
    made = check.reference_command(onnx, inputs, reference, precision)
    assert made[:4] == ["polygraphy", "run", str(onnx), "--onnxrt"] and "--save-outputs" in made
    assert ("--graph-optimization-level" in made) == (precision == "fp8")
    stand_in = check.stand_in_command(onnx, inputs, reference, precision)
    assert stand_in[stand_in.index("--atol") + 1] == f"{tolerance.atol:g}" and "--trt" not in stand_in
    # each precision is compared with a reference onnxruntime runs faithfully (INT8: its FP32 twin)
    assert check.REFERENCE_VARIANT[precision] == {"int8": "int8-fp32", "fp8": "fp8-fp32"}.get(precision, precision)
    # YOLO26's end-to-end rows: the median, which near-tied rows swapped by rounding do not move
    end2end = check.engine_check_command(plan, inputs, reference, precision, head_format="end2end")
    assert end2end[end2end.index("--check-error-stat") + 1] == "median"
    assert end2end[end2end.index("--atol") + 1] == f"{tolerance.atol:g}"


def test_tolerances_grow_with_the_precision_loss():
    t = check.TOLERANCES
    assert t["fp32"].atol <= t["fp16"].atol < t["fp8"].atol <= t["int8"].atol
    assert all(x.rtol == 0 and x.stat == "mean" for x in t.values())


# ------------------------------------------------------- the comparison logic, onnxruntime on both sides


@pytest.fixture(scope="module")
def check_inputs(yolov8n_build, tmp_path_factory) -> tuple[Path, Path]:
    """One calibration image as Polygraphy inputs, and the FP32 model's onnxruntime reference on it."""
    root = tmp_path_factory.mktemp("check")
    inputs = write_check_inputs(yolov8n_build, root, images=1)
    reference = root / "fp32-reference.json"
    manifest = BuildManifest.load(yolov8n_build)
    run = subprocess.run(check.reference_command(manifest.artifact_path(yolov8n_build, "fp32"), inputs, reference,
                                                 "fp32", polygraphy_executable()), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return inputs, reference


def _compare(yolov8n_build, variant: str, tolerance_of: str, inputs: Path, reference: Path):
    manifest = BuildManifest.load(yolov8n_build)
    command = check.stand_in_command(manifest.artifact_path(yolov8n_build, variant), inputs, reference,
                                     tolerance_of, polygraphy_executable())
    return subprocess.run(command, capture_output=True, text=True)


def test_polygraphy_accepts_outputs_within_the_tolerance(yolov8n_build, check_inputs):
    """Stand-in: the FP16 model (onnxruntime) against the FP32 reference, judged with the FP16 tolerance."""
    run = _compare(yolov8n_build, "fp16", "fp16", *check_inputs)
    assert run.returncode == 0, run.stdout[-2000:]
    error = check.abs_error(run.stdout + run.stderr)
    assert error is not None and error < check.TOLERANCES["fp16"].atol


def test_polygraphy_refuses_outputs_beyond_the_tolerance(yolov8n_build, check_inputs):
    """Stand-in: the INT8 model (onnxruntime) judged with the FP16 tolerance disagrees with the FP32 reference."""
    run = _compare(yolov8n_build, "int8-fp32", "fp16", *check_inputs)
    assert run.returncode != 0
    assert check.abs_error(run.stdout + run.stderr) > check.TOLERANCES["fp16"].atol


def _gpu_repository(yolov8n_build, root: Path, precisions=("fp16", "int8"), nms: str = "python") -> Path:
    """A gpu repository; its detectors end in the raw head (--nms python) unless `nms` is "graph": element-wise
    statistics tell a broken raw head from a good one, not the rows of an in-graph NMS (docs/gpu-prepost.md)."""
    from packager.repository.render import render_repository

    return render_repository(yolov8n_build, root / "repo", target="gpu", precisions=precisions, nms=nms).path


@pytest.mark.slow
def test_an_in_graph_nms_plan_is_checked_against_the_same_graph_on_onnxruntime(yolov8n_build, tmp_path):
    """The reference of a detector ending in the in-graph NMS comes from its reference twin with that NMS appended
    (same output name and shape as the plan's), compared by the median as an end-to-end head's rows."""
    from polygraphy.comparator import RunResults

    repository = _gpu_repository(yolov8n_build, tmp_path, precisions=("int8",), nms="graph")
    (spec,) = repository_engine_specs(repository)
    ((_, iterations),) = RunResults.load(str(spec.plan_path.parent / check.REFERENCE_FILENAME)).items()
    assert {name: output.shape for name, output in iterations[0].items()} == {"detections": (1, 2, 1000, 6)}
    spec.plan_path.write_bytes(b"stand-in plan")
    commands = []
    check.check_repository_plans(repository, runner=lambda command, log: commands.append(command) or 0,
                                 report=lambda _: None)
    assert commands and commands[0][commands[0].index("--check-error-stat") + 1] == "median"


@pytest.mark.slow
def test_a_refused_plan_is_recorded_and_not_served(yolov8n_build, tmp_path):
    """The gpu render writes the onnxruntime references; a "plan" whose stand-in comparison disagrees gets a
    failing verdict beside it, the check step fails (or, --allow-missing, reports it) and Triton's view leaves
    that detector and its ensemble out."""
    repository = _gpu_repository(yolov8n_build, tmp_path)
    assert (repository / check.CHECK_INPUTS).is_file()
    manifest = BuildManifest.load(yolov8n_build)
    specs = {s.precision: s for s in repository_engine_specs(repository)}
    for spec in specs.values():
        assert (spec.plan_path.parent / check.REFERENCE_FILENAME).is_file()
        spec.plan_path.write_bytes(b"stand-in plan " + spec.precision.encode())  # no TensorRT here

    substitutes = {"fp16": "fp16", "int8": "int8-fp32"}  # each "plan" stands in as its own reference ONNX

    def stand_in_runner(command, log_path):
        plan = Path(command[2])
        precision = next(p for p, s in specs.items() if s.plan_path == plan)
        substitute = check.stand_in_command(manifest.artifact_path(yolov8n_build, substitutes[precision]),
                                            repository / check.CHECK_INPUTS, plan.parent / check.REFERENCE_FILENAME,
                                            precision, polygraphy_executable())
        return check.run_logged(substitute, log_path)

    records = check.check_repository_plans(repository, runner=stand_in_runner, report=lambda _: None)
    assert all(r.passed for r in records.values()) and set(records) == {s.name for s in specs.values()}
    assert serving.served_models(repository).complete

    # A new fp16 "plan" whose outputs are the INT8 model's: 0.26 from the FP16 reference, over its 0.05.
    specs["fp16"].plan_path.write_bytes(b"another stand-in plan")
    substitutes["fp16"] = "int8-fp32"
    with pytest.raises(builder.EngineBuildError, match="failed the engine check"):
        check.check_repository_plans(repository, runner=stand_in_runner, report=lambda _: None)
    verdict = json.loads(check_path(specs["fp16"].plan_path).read_text())
    assert not verdict["passed"] and "mean |plan - ONNX|" in verdict["summary"]
    assert verdict["abs_error"] > check.TOLERANCES["fp16"].atol
    assert json.loads(check_path(specs["int8"].plan_path).read_text())["passed"]  # unchanged, not re-run
    served = serving.served_models(repository)
    assert set(served.excluded) == {"yolov8n_fp16_detector", "yolov8n_fp16"}
    assert "engine check failed" in served.excluded["yolov8n_fp16_detector"]
    assert {"yolov8n_int8_detector", "yolov8n_int8", "yolov8n_preprocess", "yolov8n_postprocess"} <= set(served.models)
    specs["int8"].plan_path.write_bytes(b"rebuilt")  # a verdict on another plan never counts: nothing servable
    with pytest.raises(YqpackError, match="no ensemble of this repository can be served.*made on another plan"):
        serving.served_models(repository)


# ------------------------------------------------------------- FP8 on a T4: skipped, the rest is served


@pytest.mark.slow
def test_fp8_is_skipped_on_a_t4_and_triton_serves_the_rest(yolov8n_build, tmp_path, monkeypatch):
    """A repository asked for with --fp8, on a GPU whose probe answers like a T4 (compute capability 7.5): the
    engines step skips the FP8 plan (exit 0) and Triton is never asked to load it or its ensemble."""
    if "fp8" not in BuildManifest.load(yolov8n_build).artifacts:
        pytest.skip("the session build has no FP8 twins (build with --fp8)")
    repository = _gpu_repository(yolov8n_build, tmp_path, precisions=("fp16", "int8", "fp8"))
    smi = tmp_path / "nvidia-smi"
    smi.write_text(T4_SMI)
    smi.chmod(0o755)
    monkeypatch.delenv("YQPACK_GPU_COMPUTE_CAPABILITY", raising=False)
    t4 = detect_gpu(nvidia_smi=str(smi), library="libnotcuda.so")
    assert (t4.name, t4.compute_capability) == ("Tesla T4", "7.5")
    trtexec = tmp_path / "trtexec"
    trtexec.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in --saveEngine=*) printf PLAN > "${a#--saveEngine=}";;'
                       ' esac; done\n')
    trtexec.chmod(0o755)
    results = builder.build_repository_engines(repository, trtexec=trtexec, version=TensorRTVersion(11, 1, 0, 106),
                                               gpu=t4, report=lambda _: None)
    assert {r.precision: r.status for r in results} == {"fp16": "built", "int8": "built", "fp8": "skipped"}
    served = serving.served_models(repository, environ={"YQPACK_ENGINE_CHECK": "0"})
    assert set(served.excluded) == {"yolov8n_fp8_detector", "yolov8n_fp8"}
    assert "compute capability >= 8.9" in served.excluded["yolov8n_fp8_detector"]
    assert set(served.unchecked) == {"yolov8n_fp16_detector", "yolov8n_int8_detector"}
    arguments = serving.tritonserver_arguments(["tritonserver", "--model-repository=/models"], served,
                                               tmp_path / "view", "k3y")
    view = Path(arguments[1].split("=", 1)[1])
    assert sorted(p.name for p in view.iterdir()) == sorted([*served.models, "yqpack_repository.json"])
    assert "--http-restricted-api=shared-memory,logging,trace:triton-admin-key=k3y" in arguments


# ---------------------------------------------------------- the view, served by a real tritonserver


@pytest.mark.slow
def test_tritonserver_serves_a_view_of_symbolic_links(model_repository, server_env, tmp_path):
    """What start_triton.py hands Triton when models are left out: the embedded tritonserver 2.51 loads every model
    of the view (links to the real model folders) and none other."""
    import tritonclient.grpc as grpc

    from packager.serve.embedded import LocalTritonServer, find_free_ports

    index = RepositoryIndex.load(model_repository.path)
    left_out = {m.name for m in index.models if m.precision is not None and m.precision.value == "int8"}
    kept = tuple(m.name for m in index.models if m.name not in left_out)
    served = serving.ServedSet(model_repository.path, kept, {name: "left out by the test" for name in left_out})
    view = serving.make_view(served, tmp_path / "view")
    grpc_port, http_port, metrics_port = find_free_ports(3)
    with LocalTritonServer(view, server_env, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                           log_path=tmp_path / "triton.log") as server:
        server.wait_ready(timeout=300)
        client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        index_json = client.get_model_repository_index(as_json=True)
        ready = {m["name"] for m in index_json.get("models", []) if m.get("state") == "READY"}
    assert ready == set(kept) and not ready & left_out
    assert any(index.get(name).role is Role.ENSEMBLE for name in ready)


def test_start_triton_command_line_and_admin_key(tmp_path, monkeypatch, capsys):
    """deploy/start_triton.py's arguments: the admin API groups closed behind TRITON_ADMIN_KEY, or a random key
    when it is empty (the by-hand `docker compose up` with deploy/.env as shipped)."""
    argv = ["tritonserver", f"--model-repository={tmp_path}", "--exit-on-error=true"]
    monkeypatch.setenv("TRITON_ADMIN_KEY", "")
    arguments = serving.main(argv, execute=False)
    assert arguments[:3] == argv
    key = arguments[3].rsplit("=", 1)[1]
    assert len(key) == 32 and arguments[4].endswith(f"triton-admin-key={key}")
    assert "admin APIs" in capsys.readouterr().out
    monkeypatch.setenv("TRITON_ADMIN_KEY", "operator-key")
    assert serving.main(["--", *argv], execute=False)[3].endswith("=operator-key")
