"""The rendered `local` repository in a real tritonserver, queried with the real tritonclient (gRPC)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from packager.cli.main import main
from packager.core.contracts import YqpackError
from packager.inference.letterbox import preprocess_bytes
from packager.inference.postprocess import EVAL_THRESHOLDS, PRODUCTION_THRESHOLDS, Thresholds, postprocess
from packager.repository.targets import detector_name
from packager.inference.runtime import RuntimeOptions, open_served_model, runtime_on_this_machine
from packager.serve.embedded import LocalTritonServer, find_free_ports
from packager.serve.records import read_state, shm_regions, stub_processes
from packager.serve.server_env import MALLOC_ENV

pytestmark = pytest.mark.slow
PRECISIONS = ("fp32", "fp16", "int8")
TOLERANCE = 1e-4


# -- helpers ---------------------------------------------------------------------------------------------------
class InProcessPipeline:
    """The package's own pipeline in this process: letterbox -> the served runtime (same ONNX) -> postprocess."""

    def __init__(self, version_dir: Path, imgsz: tuple[int, int], runtime: RuntimeOptions):
        self.model = open_served_model(version_dir, "model.onnx", runtime)
        self.imgsz = imgsz

    def __call__(self, data: bytes, *thresholds: Thresholds) -> np.ndarray | list[np.ndarray]:
        """Detections for each thresholds given (production by default): one detector run for all."""
        tensor, info = preprocess_bytes(data, self.imgsz)
        raw = self.model.run(tensor[None])[0]
        results = [postprocess(raw, info, t) for t in thresholds or (PRODUCTION_THRESHOLDS,)]
        return results if len(thresholds) > 1 else results[0]


def _request(data: bytes, client_module=grpcclient):
    image = client_module.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=object))
    return [image]


def _params(thresholds: Thresholds) -> dict:
    return {
        "conf_threshold": thresholds.conf,
        "iou_threshold": thresholds.iou,
        "max_det": thresholds.max_det,
        "multi_label": thresholds.multi_label,
    }


def _detect(client, model: str, data: bytes, thresholds: Thresholds | None = None) -> np.ndarray:
    params = _params(thresholds) if thresholds else None
    result = client.infer(model, _request(data), parameters=params)
    detections = result.as_numpy("DETECTIONS")
    assert detections.ndim == 3 and detections.shape[0] == 1 and detections.shape[2] == 6, detections.shape
    return detections[0]


def _assert_same(served: np.ndarray, local: np.ndarray, what: str) -> None:
    assert served.shape == local.shape, f"{what}: served {served.shape} vs in-process {local.shape}"
    np.testing.assert_allclose(served, local, rtol=0, atol=TOLERANCE, err_msg=what)


@pytest.fixture(scope="module")
def client(local_server):
    with grpcclient.InferenceServerClient(local_server.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="module")
def model_name(model_repository):
    return model_repository.model_name


@pytest.fixture(scope="module")
def pipelines(model_repository, model_name):
    imgsz = tuple(json.loads((model_repository.path / "yqpack_repository.json").read_text())["imgsz"])
    pipelines = {}
    for precision in PRECISIONS:
        detector = model_repository.path / detector_name(model_name, precision)
        params = text_format.Parse((detector / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()).parameters
        runtime = RuntimeOptions(params["runtime"].string_value, params["precision_hint"].string_value)
        pipelines[precision] = InProcessPipeline(detector / "1", imgsz, runtime)
    return pipelines


@pytest.fixture(scope="module")
def sample_images(assets):
    paths = sorted((assets / "coco" / "val2017").glob("*.jpg"))[:20]
    assert len(paths) == 20
    return [p.read_bytes() for p in paths]


# -- served == in-process ----------------------------------------------------------------------------------------
def test_all_models_ready(client, model_repository):
    for model in model_repository.models:
        assert client.is_model_ready(model), model


@pytest.mark.parametrize("precision", PRECISIONS)
def test_served_detections_equal_in_process(client, model_repository, pipelines, sample_images, precision):
    ensemble = model_repository.ensembles[precision]
    total = 0
    for index, data in enumerate(sample_images):
        all_thresholds = (PRODUCTION_THRESHOLDS, EVAL_THRESHOLDS)
        for thresholds, local in zip(all_thresholds, pipelines[precision](data, *all_thresholds)):
            served = _detect(client, ensemble, data, thresholds)
            _assert_same(served, local, f"{precision} image {index} {thresholds}")
            total += len(served)
    assert total > 20 * 5, "yolov8n finds objects in COCO images; almost none means a broken pipeline"


def test_served_detectors_run_openvino_with_the_f32_hint(local_server, model_repository, pipelines):
    """The default local repository serves on OpenVINO (f32 hint), INT8 too where the CPU has VNNI/AMX (else
    onnxruntime, whose kernels do not saturate): the same runtime in process, said in the log."""
    expected = {p: runtime_on_this_machine(RuntimeOptions("openvino"), quantized=p == "int8").label for p in PRECISIONS}
    for precision in PRECISIONS:
        config = model_repository.path / detector_name(model_repository.model_name, precision) / "config.pbtxt"
        params = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig()).parameters
        assert (params["runtime"].string_value, params["precision_hint"].string_value) == ("openvino", "f32")
    assert {p: pipeline.model.label for p, pipeline in pipelines.items()} == expected
    log = Path(local_server.log_path).read_text()
    for precision in PRECISIONS:
        assert f"{detector_name(model_repository.model_name, precision)}: {expected[precision]}, compiled in" in log
    on_openvino = [p for p in PRECISIONS if expected[p].startswith("openvino")]
    assert all((model_repository.path / detector_name(model_repository.model_name, p) / "openvino_cache").is_dir()
               for p in on_openvino), "OpenVINO's compiled-model cache lives beside each detector"


def test_request_parameters_reach_postprocess_through_the_ensemble(client, model_repository, pipelines, sample_images):
    ensemble, data = model_repository.ensembles["fp32"], sample_images[0]
    default = _detect(client, ensemble, data)  # no parameters: production defaults from the config
    _assert_same(default, pipelines["fp32"](data, PRODUCTION_THRESHOLDS), "defaults")
    loose = _detect(client, ensemble, data, Thresholds(conf=0.001, iou=0.7, max_det=300, multi_label=True))
    assert len(loose) == 300 > len(default)
    capped = client.infer(ensemble, _request(data), parameters={"max_det": 2, "conf_threshold": 0.01})
    assert capped.as_numpy("DETECTIONS").shape == (1, 2, 6)
    with pytest.raises(InferenceServerException, match=r"conf_threshold must be within \[0, 1\]"):
        client.infer(ensemble, _request(data), parameters={"conf_threshold": 2.5})
    with pytest.raises(InferenceServerException, match="max_det must be"):
        client.infer(ensemble, _request(data), parameters={"max_det": 0})
    _assert_same(_detect(client, ensemble, data), default, "after a rejected request")


def test_the_local_detector_takes_its_float_input_or_the_letterboxed_pixels(client, model_repository, model_name,
                                                                          sample_images):
    """The ensemble sends the detector uint8 pixels (a quarter of the bytes), clients of the bare detector its
    float input: the same output either way, also when both kinds share one dynamic batch; a request with
    neither is refused alone."""
    detector = detector_name(model_name, "int8")
    floats, pixels = [], []
    for data in sample_images[:4]:
        tensor, _ = preprocess_bytes(data, model_repository.index.model.imgsz)
        floats.append(tensor[None])
        pixels.append(np.rint(tensor * 255).astype(np.uint8)[None])  # exact: every value is a multiple of 1/255

    def tensor_input(name, array):
        item = grpcclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "UINT8")
        item.set_data_from_numpy(array)
        return item

    want = [client.infer(detector, [tensor_input("images", x)]).as_numpy("output0") for x in floats]
    for i, x in enumerate(pixels):
        np.testing.assert_array_equal(client.infer(detector, [tensor_input("images_pixels", x)]).as_numpy("output0"),
                                      want[i])
    results = {}
    for i, (x, name) in enumerate([(floats[0], "images"), (pixels[1], "images_pixels"), (floats[2], "images"),
                                   (pixels[3], "images_pixels")]):
        client.async_infer(detector, [tensor_input(name, x)],
                           callback=lambda result, error, i=i: results.__setitem__(i, (result, error)))
    deadline = time.monotonic() + 120
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(4):
        result, error = results[i]
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("output0"), want[i])
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer(detector, [])  # refused by Triton, before the model
    np.testing.assert_array_equal(client.infer(detector, [tensor_input("images", floats[0])]).as_numpy("output0"),
                                  want[0])


def test_a_request_of_several_images_equals_each_in_process(client, model_repository, pipelines, sample_images):
    """One request carrying 3 images ([3, 1] BYTES) goes through the ensemble as a batch of 3 - letterboxed
    pixels, normalised by the detector, one batched run - and each image's rows equal its own in-process
    detections; rows past an image's count are padding (class -1)."""
    images = sample_images[2:5]
    tensor = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    detections = client.infer(model_repository.ensembles["int8"], [tensor]).as_numpy("DETECTIONS")
    assert detections.shape[0] == 3
    for index, data in enumerate(images):
        local = pipelines["int8"](data)
        rows = detections[index][detections[index][:, 5] >= 0]
        assert rows.shape == local.shape, f"image {index}"
        # A batch of 3 may round differently from batch 1 (as with dynamic batching above).
        np.testing.assert_allclose(rows, local, atol=1e-2, err_msg=f"image {index}")
        assert (detections[index][len(local):, 5] == -1).all()


# -- bad inputs --------------------------------------------------------------------------------------------------
def _bad_inputs(good_jpeg: bytes) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, must_fail). The others must give the correct answer."""
    image = cv2.imdecode(np.frombuffer(good_jpeg, np.uint8), cv2.IMREAD_COLOR)
    rgba = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    rgba[: rgba.shape[0] // 2, :, 3] = 0  # a real alpha channel, half transparent
    huge = cv2.resize(image, (8000, 6000), interpolation=cv2.INTER_LINEAR)
    return {
        "empty bytes": (b"", True),
        "random bytes": (np.random.default_rng(0).bytes(4096), True),
        "truncated JPEG": (good_jpeg[: len(good_jpeg) // 3], True),  # reject_corrupt (default): refused
        "1x1 PNG": (cv2.imencode(".png", image[:1, :1])[1].tobytes(), False),
        "8000x6000 JPEG": (cv2.imencode(".jpg", huge)[1].tobytes(), False),
        "grayscale JPEG": (cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes(), False),
        "RGBA PNG": (cv2.imencode(".png", rgba)[1].tobytes(), False),
    }


def test_bad_inputs_fail_alone_and_the_next_request_succeeds(client, model_repository, pipelines, sample_images):
    ensemble, good = model_repository.ensembles["int8"], sample_images[1]
    expected_good = pipelines["int8"](good)
    for name, (data, must_fail) in _bad_inputs(good).items():
        try:
            local = pipelines["int8"](data)
        except ValueError as error:  # the package itself rejects it: the server must say so too
            local = error
        if must_fail or isinstance(local, Exception):
            with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*preprocess: (empty image bytes|not an image|corrupt|could not decode)"):
                _detect(client, ensemble, data)
        else:
            _assert_same(_detect(client, ensemble, data), local, name)
        _assert_same(_detect(client, ensemble, good), expected_good, f"good request after {name}")


def test_a_batch_with_one_bad_image_fails_only_that_request(client, model_repository, sample_images):
    ensemble = model_repository.ensembles["fp32"]
    inputs = [_request(sample_images[i]) for i in range(3)] + [_request(b"not an image")]
    results = []
    for request in inputs:
        client.async_infer(ensemble, request, callback=lambda result, error: results.append((result, error)))
    deadline = time.monotonic() + 120
    while len(results) < len(inputs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) == 4
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and "not an image of an accepted format" in str(errors[0])


# -- concurrency -------------------------------------------------------------------------------------------------
def test_64_requests_in_flight_are_answered_and_batched(local_server, model_repository, model_name, pipelines, sample_images):
    precision = "fp16"
    ensemble, detector = model_repository.ensembles[precision], detector_name(model_name, precision)
    expected = [pipelines[precision](data) for data in sample_images]

    async def run():
        async with aioclient.InferenceServerClient(local_server.grpc_url) as triton:
            before = await triton.get_inference_statistics(model_name=detector, as_json=True)
            tasks = [
                triton.infer(ensemble, _request(sample_images[i % len(sample_images)], aioclient)) for i in range(64)
            ]
            results = await asyncio.gather(*tasks)
            after = await triton.get_inference_statistics(model_name=detector, as_json=True)
            return results, before, after

    results, before, after = asyncio.run(run())
    assert len(results) == 64
    for i, result in enumerate(results):
        # Batched execution may round differently from batch 1: same detections within a looser tolerance.
        served, local = result.as_numpy("DETECTIONS")[0], expected[i % len(sample_images)]
        assert served.shape == local.shape, f"request {i}"
        np.testing.assert_allclose(served, local, atol=1e-2, err_msg=f"request {i}")

    def batch_counts(stats):
        model = stats["model_stats"][0]
        return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in model.get("batch_stats", [])}

    new = {size: count - batch_counts(before).get(size, 0) for size, count in batch_counts(after).items()}
    assert sum(size * count for size, count in new.items()) == 64
    assert any(size > 1 and count > 0 for size, count in new.items()), f"no dynamic batching observed: {new}"


# -- lifecycle ---------------------------------------------------------------------------------------------------
@pytest.fixture
def free_ports():
    return find_free_ports(3)


def test_shutdown_leaves_no_process_and_no_shm(model_repository, server_env, free_ports, tmp_path):
    grpc_port, http_port, metrics_port = free_ports
    server = LocalTritonServer(
        model_repository.path, server_env, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
        log_path=tmp_path / "server.log",
    )
    with server:
        pid = server.pid
        stubs = stub_processes(server.shm_prefix)
        assert len(stubs) >= 5, "each Python-backend instance runs a stub process"
        assert shm_regions(server.shm_prefix), "the Python backend keeps its shm regions under our prefix"
        assert server.is_alive()
        for process in (pid, *stubs):  # the stubs inherit the server's allocator settings
            environ = dict(
                item.split("=", 1) for item in Path(f"/proc/{process}/environ").read_text().split("\0") if "=" in item
            )
            assert {name: environ.get(name) for name in MALLOC_ENV} == MALLOC_ENV
    assert server.process.returncode == 0, server.log_tail()
    assert not Path(f"/proc/{pid}").exists()
    assert not any(Path(f"/proc/{stub}").exists() for stub in stubs)
    assert stub_processes(server.shm_prefix) == [] and shm_regions(server.shm_prefix) == []


def test_port_in_use_is_reported_before_starting(model_repository, server_env, free_ports, tmp_path):
    grpc_port, http_port, metrics_port = free_ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", http_port))
        busy.listen()
        server = LocalTritonServer(
            model_repository.path, server_env, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
            log_path=tmp_path / "server.log",
        )
        with pytest.raises(YqpackError, match=f"http port {http_port} already in use"):
            server.start()
        assert server.process is None
        result = CliRunner().invoke(
            main,
            ["serve", "--repository", str(model_repository.path), "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--metrics-port", str(metrics_port)],
        )
        assert result.exit_code != 0
        assert f"Error: http port {http_port} already in use" in result.output


def _server_for_one_python_model(server_env, free_ports, tmp_path, name: str, model_source: str) -> LocalTritonServer:
    """A (not yet started) server for a repository holding one Python model `name` with the given model.py."""
    version = tmp_path / "repo" / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(model_source)
    (version.parent / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    grpc_port, http_port, metrics_port = free_ports
    return LocalTritonServer(
        tmp_path / "repo", server_env, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
        log_path=tmp_path / "server.log",
    )


def test_model_load_failure_reports_the_log_tail(server_env, free_ports, tmp_path):
    server = _server_for_one_python_model(
        server_env, free_ports, tmp_path, "broken",
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('deliberately broken model')\n",
    )
    with pytest.raises(YqpackError, match="(?s)before all models were ready.*deliberately broken model"):
        with server:
            pass
    assert not server.is_alive()
    assert stub_processes(server.shm_prefix) == [] and shm_regions(server.shm_prefix) == []


def test_a_hanging_model_load_times_out_and_is_cleaned_up(server_env, free_ports, tmp_path):
    server = _server_for_one_python_model(
        server_env, free_ports, tmp_path, "slow",
        "import time\nclass TritonPythonModel:\n    def initialize(self, args):\n        time.sleep(600)\n",
    )
    server.start()
    try:
        with pytest.raises(YqpackError, match="(?s)not ready after 5s.*slow"):
            server.wait_ready(timeout=5)
    finally:
        server.stop(timeout=10)
    assert not server.is_alive()
    assert stub_processes(server.shm_prefix) == [] and shm_regions(server.shm_prefix) == []


def _cli_env(tmp_path: Path, server_env) -> dict[str, str]:
    """A private YQPACK_HOME (own state file) that reuses the session's server env instead of reinstalling it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "server-env").symlink_to(server_env.root)
    return {**os.environ, "YQPACK_HOME": str(home)}


def _wait_ready(grpc_url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with grpcclient.InferenceServerClient(grpc_url) as triton:
        while time.monotonic() < deadline:
            assert process is None or process.poll() is None, "yqpack serve exited early"
            try:
                if triton.is_server_ready():
                    return
            except InferenceServerException:
                pass
            time.sleep(0.5)
    raise AssertionError(f"server at {grpc_url} not ready after {timeout}s")


def test_detach_then_stop(model_repository, server_env, free_ports, tmp_path):
    env = _cli_env(tmp_path, server_env)
    grpc_port, http_port, metrics_port = free_ports
    command = [sys.executable, "-m", "packager.cli.main", "serve", "--repository", str(model_repository.path),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    started = subprocess.run([*command, "--detach"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    state = read_state(Path(env["YQPACK_HOME"]))
    try:
        assert state is not None and state.grpc_port == grpc_port
        with grpcclient.InferenceServerClient(state.grpc_url) as triton:
            assert all(triton.is_model_ready(m) for m in model_repository.models)
        again = subprocess.run([*command, "--detach"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already runs" in again.stderr
    finally:
        stopped = subprocess.run([sys.executable, "-m", "packager.cli.main", "stop"], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped tritonserver pid {state.pid}" in stopped.stderr
    assert not Path(f"/proc/{state.pid}").exists() or "Z" in Path(f"/proc/{state.pid}/stat").read_text().split()[2]
    assert stub_processes(state.shm_prefix) == [] and shm_regions(state.shm_prefix) == []
    assert read_state(Path(env["YQPACK_HOME"])) is None


def test_foreground_serve_stops_cleanly_on_ctrl_c(model_repository, server_env, free_ports, tmp_path):
    env = _cli_env(tmp_path, server_env)
    grpc_port, http_port, metrics_port = free_ports
    process = subprocess.Popen(
        [sys.executable, "-m", "packager.cli.main", "serve", "--repository", str(model_repository.path),
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_ready(f"127.0.0.1:{grpc_port}", process)
        server_pids = [p for p in _children(process.pid) if b"tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(server_pids) == 1
        arguments = Path(f"/proc/{server_pids[0]}/cmdline").read_bytes().decode().split("\0")
        (prefix,) = [a.split("shm-region-prefix-name=")[1] for a in arguments if "shm-region-prefix-name=" in a]
        assert stub_processes(prefix) and shm_regions(prefix)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopping tritonserver" in output
    assert not Path(f"/proc/{server_pids[0]}").exists()
    assert stub_processes(prefix) == [] and shm_regions(prefix) == []


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_server_env_is_reused_and_keeps_numpy_1(server_env):
    from packager.serve.server_env import INSTALL_LOG_NAME, MARKER_NAME, ensure_server_env

    log = server_env.root / INSTALL_LOG_NAME
    stamp = log.stat().st_mtime_ns if log.exists() else None
    again = ensure_server_env(root=server_env.root)
    assert again == server_env
    assert (log.stat().st_mtime_ns if log.exists() else None) == stamp, "a complete env must not be reinstalled"
    assert json.loads((server_env.root / MARKER_NAME).read_text())["requirements"] == list(server_env.requirements)
    versions = subprocess.run(
        [str(server_env.python), "-c",
         "import numpy, onnxruntime, cv2, openvino; print(numpy.__version__, onnxruntime.__version__, openvino.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    import openvino

    assert versions[2] == openvino.__version__, "served and in-process OpenVINO should be the same version"
    assert int(versions[0].split(".")[0]) < 2, f"numpy {versions[0]} in the server env corrupts tensors"
    assert versions[1] == ort.__version__, "served and in-process onnxruntime should be the same version"


@pytest.mark.skipif(Path("/var/run/docker.sock").exists(), reason="a Docker engine is present")
def test_serve_docker_without_docker_is_a_clear_error(model_repository):
    result = CliRunner().invoke(main, ["serve", "--docker", "--repository", str(model_repository.path)])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and "Docker" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
