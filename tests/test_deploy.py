"""Docker deployment, the parts that run without a Docker engine or GPU: the compose file checked by a real compose
implementation (Debian's docker-compose, when installed) and structurally, the .env/Dockerfile contract, the
engine reachability probe against real sockets, and the health wait against a real HTTP server."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from packager.serve import compose as deploy
from packager.core.contracts import Endpoints
from packager.core.contracts import NotReadyError, ServerGoneError
from packager.serve.readiness import wait_until_ready
from packager.core.paths import DEPLOY_DIR, PROJECT_ROOT
from packager.serve.server_env import MALLOC_ENV

DEPLOY = DEPLOY_DIR


def compose_v1() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("no compose implementation installed (apt-get install docker-compose)")
    return path


def compose_config(compose_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`docker-compose config`: parses, interpolates .env and validates against the compose schema; no engine."""
    env = {**(os.environ if env is None else env)}  # nothing injected: what a user's shell gives (issue 20)
    return subprocess.run([compose_v1(), "-f", str(compose_dir / "docker-compose.yml"), "config"],
                          cwd=compose_dir, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def env_file() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / ".env").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


# ------------------------------------------------------------------------------------- compose file


def test_compose_file_is_valid_for_a_real_compose(tmp_path):
    run = compose_config(DEPLOY)
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)
    image = f"{env_file()['TRITON_IMAGE_NAME']}:{env_file()['TRITON_TAG']}"
    assert resolved["services"]["engines"]["image"] == image
    assert resolved["services"]["triton"]["build"]["args"]["TRITON_IMAGE"] == image


def test_real_compose_rejects_a_broken_copy(tmp_path):
    """The validation above can fail: the same file with a wrongly typed key is refused."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    broken = tmp_path / "deploy" / "docker-compose.yml"
    broken.write_text(broken.read_text().replace("      retries: 30", "      retries: [30]"))
    run = compose_config(tmp_path / "deploy")
    assert run.returncode != 0 and "retries" in run.stderr


def test_compose_environment_reaches_the_services(tmp_path):
    """What compose_up passes (repository, ports, --allow-missing) overrides .env in the resolved file."""
    repository = tmp_path / "model_repository"
    env = deploy.compose_environment(repository, Endpoints(http_port=9000, grpc_port=9001, metrics_port=9002), allow_missing=True,
                                     base={"PATH": "/usr/bin:/bin"})
    run = compose_config(DEPLOY, env)
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    triton, engines = services["triton"], services["engines"]
    assert f"{repository}:/models:ro" in triton["volumes"]
    assert f"{repository}:/models:rw" in engines["volumes"]
    published = {int(p["published"]) if isinstance(p, dict) else int(p.split(":")[-2]) for p in triton["ports"]}
    assert published == {9000, 9001, 9002}
    assert "--exit-on-error=false" in triton["command"] and "--strict-readiness=false" in triton["command"]
    assert engines["environment"]["YQPACK_ALLOW_MISSING"] == "1"

    strict = deploy.compose_environment(repository, Endpoints(), allow_missing=False, base={})
    assert (strict["TRITON_EXIT_ON_ERROR"], strict["YQPACK_ALLOW_MISSING"]) == ("true", "0")


def test_compose_structure(compose):
    services = compose["services"]
    assert set(services) == {"engines", "engine-check", "triton"}
    engines, check, triton = services["engines"], services["engine-check"], services["triton"]
    # engines first, with the very image the server is built from; then the check; the server only after both.
    assert check["depends_on"] == {"engines": {"condition": "service_completed_successfully"}}
    assert triton["depends_on"] == {"engine-check": {"condition": "service_completed_successfully"}}
    assert engines["image"].startswith("${TRITON_IMAGE_NAME")
    assert triton["build"]["args"]["TRITON_IMAGE"] == engines["image"]
    assert engines["command"][:3] == ["python3", "/yqpack/deploy/build_engines.py", "/models"]
    assert check["command"][:3] == ["python3", "/yqpack/deploy/check_engines.py", "/models"]
    assert check["build"]["dockerfile"] == "Dockerfile.check"
    assert triton["command"][:4] == ["python3", "/yqpack/deploy/start_triton.py", "tritonserver",
                                     "--model-repository=/models"]
    for service in (engines, check, triton):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # one selected GPU (index, UUID or MIG UUID), never "count: 1" = whichever GPU 0 is (issue 20)
        assert device["device_ids"] == ["${TRITON_GPU_DEVICE:-0}"] and "count" not in device
    # A server that fails at start is not restarted forever (issue 20: crash loop with --exit-on-error).
    assert triton["restart"] == "on-failure:3"
    assert "--backend-config=python,shm-default-byte-size=${TRITON_PYTHON_SHM_BYTES:-67108864}" in triton["command"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    assert any(v.endswith(":/models") for v in engines["volumes"])  # writes model.plan
    assert any(v.startswith("trt-cache:/trt_cache") for v in triton["volumes"])
    assert "trt-cache" in compose["volumes"]
    assert triton["shm_size"] and triton["ulimits"]["memlock"] == -1 and triton["ulimits"]["stack"] == 67108864
    assert [p.rsplit(":", 1)[1].strip('"') for p in triton["ports"]] == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert "--model-repository=/models" in triton["command"]
    # The same allocator settings as the embedded server (the Python steps page-fault without them).
    assert {name: str(value) for name, value in triton["environment"].items()
            if name.startswith("MALLOC_")} == MALLOC_ENV
    assert set(triton["environment"]) - set(MALLOC_ENV) == {"TRITON_ADMIN_KEY", "YQPACK_ENGINE_CHECK"}


def test_image_tag_is_set_in_one_place():
    tag = f"{env_file()['TRITON_IMAGE_NAME']}:{env_file()['TRITON_TAG']}"
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", tag)
    for image in ("nvcr.io/nvidia/tritonserver", "nvcr.io/nvidia/tensorrt"):
        mentions = [p.name for p in DEPLOY.iterdir() if p.is_file() and image in p.read_text()]
        assert mentions == [".env"], mentions
    from packager.engines.images import image_facts

    facts = image_facts(DEPLOY / ".env", environ={})
    assert facts.tag == "26.08-py3" and facts.tensorrt_major == 11 and facts.triton == "2.72.0"
    assert (facts.cuda, facts.onnxruntime, facts.openvino) == ("13.4.1", "1.28.0", "2026.3.0")
    assert env_file()["CHECK_IMAGE_TAG"] == facts.tag  # the check's TensorRT image of the same release
    text = (DEPLOY / ".env").read_text()
    assert "TRITON_TAG=25.01-py3" in text and "TRITON_TENSORRT_VERSION=10.8.0.43" in text  # the override


def test_dockerfile_adds_what_the_python_models_import():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", dockerfile, re.M)
    assert '"numpy<2"' in dockerfile and '"opencv-python-headless<4.12"' in dockerfile
    # OpenVINO only where asked for: the GPU image's detectors run on TensorRT (issue 20)
    assert "ARG WITH_OPENVINO=0" in dockerfile and 'if [ "$WITH_OPENVINO" = "1" ]' in dockerfile
    imports = set()
    copied = ("letterbox", "postprocess", "image_header", "request_params")  # flat copies beside model.py
    for module in ("templates/preprocess/model.py", "templates/postprocess/model.py",
                   *(f"packager/inference/{name}.py" for name in copied)):
        imports |= set(re.findall(r"^(?:import|from) (\w+)", (PROJECT_ROOT / module).read_text(), re.M))
    third_party = imports - set(sys.stdlib_module_names) - {"triton_python_backend_utils", "packager",
                                                            "__future__", *copied}
    assert third_party <= {"numpy", "cv2"}, third_party


@pytest.mark.parametrize("script", ["build_engines.py", "check_engines.py"])
def test_entry_script_help_needs_only_the_standard_library(script):
    run = subprocess.run([sys.executable, "-S", "-I", str(DEPLOY / script), "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--allow-missing" in run.stdout


def test_start_triton_runs_with_the_standard_library_only(tmp_path):
    """deploy/start_triton.py as the serving image runs it (bare python3): with a repository yqpack did not render
    it still closes the admin APIs, then execs the server (here: `echo`, which prints the final command line)."""
    run = subprocess.run([sys.executable, "-S", "-I", str(DEPLOY / "start_triton.py"), "echo",
                          f"--model-repository={tmp_path}"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "TRITON_ADMIN_KEY": ""})
    assert run.returncode == 0, run.stderr
    assert f"--model-repository={tmp_path} --http-restricted-api=shared-memory,logging,trace:triton-admin-key=" \
        in run.stdout


# ---------------------------------------------------------------------------------- docker engine probe


class _PingHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(self.status if self.path == "/_ping" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


class _UnixHTTPServer(http.server.HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self):
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "docker", 0


def _serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("status, reachable", [(200, True), (500, False)])
def test_engine_probe_over_a_real_unix_socket(tmp_path, status, reachable):
    handler = type("Handler", (_PingHandler,), {"status": status})
    server = _UnixHTTPServer(str(tmp_path / "docker.sock"), handler)
    _serve(server)
    try:
        ok, reason = deploy.docker_engine_status(f"unix://{tmp_path / 'docker.sock'}")
    finally:
        server.shutdown()
        server.server_close()
    assert ok is reachable, reason


def test_engine_probe_reports_a_missing_engine(tmp_path):
    ok, reason = deploy.docker_engine_status(f"unix://{tmp_path / 'absent.sock'}")
    assert not ok and "no Docker engine answers" in reason
    ok, reason = deploy.docker_engine_status("ssh://somewhere")
    assert not ok and "unsupported DOCKER_HOST" in reason


def test_compose_up_without_an_engine_says_so(yolov8n_build, tmp_path, monkeypatch):
    from packager.repository.render import render_repository

    repository = render_repository(yolov8n_build, tmp_path / "model_repository", target="gpu").path
    with pytest.raises(deploy.DockerUnavailableError, match="Docker") as failure:
        deploy.compose_up(repository, docker_host=f"unix://{tmp_path / 'absent.sock'}", echo=lambda _: None)
    assert "docs/gpu.md" in str(failure.value)


def test_compose_up_checks_the_repository_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="model repository not found"):
        deploy.compose_up(tmp_path / "nope", echo=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a yqpack model repository"):
        deploy.compose_up(tmp_path / "empty", echo=lambda _: None)


def test_no_compose_implementation_is_a_clear_error():
    with pytest.raises(deploy.DockerUnavailableError, match="Docker Compose not found"):
        deploy.compose_command(which=lambda _: None)


# ----------------------------------------------------------------------------------------- health wait


class _ReadyAfter(http.server.BaseHTTPRequestHandler):
    calls = 0
    ready_after = 2

    def do_GET(self):  # noqa: N802
        type(self).calls += 1
        ready = self.path == "/v2/health/ready" and type(self).calls > self.ready_after
        self.send_response(200 if ready else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def _http_server(ready_after: int):
    handler = type("Handler", (_ReadyAfter,), {"calls": 0, "ready_after": ready_after})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    _serve(server)
    return server, handler


def test_the_readiness_poller_polls_until_200():
    server, handler = _http_server(ready_after=2)
    try:
        waited = wait_until_ready(Endpoints("127.0.0.1", http_port=server.server_port), timeout_s=30, poll_s=0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.calls == 3 and waited >= 0.1


def test_the_readiness_poller_gives_up_or_sees_the_server_die():
    server, _ = _http_server(ready_after=10**9)
    endpoints = Endpoints("127.0.0.1", http_port=server.server_port)
    try:
        with pytest.raises(NotReadyError, match="not ready after"):
            wait_until_ready(endpoints, timeout_s=0.2, poll_s=0.05)
        with pytest.raises(ServerGoneError, match="stopped before"):
            wait_until_ready(endpoints, timeout_s=30, poll_s=0.05, alive=lambda: False)
    finally:
        server.shutdown()
        server.server_close()


def test_a_ready_answer_from_a_dead_server_is_not_ready():
    """Another process answering on the port must not pass for ours once our process is gone."""
    server, handler = _http_server(ready_after=0)
    answers = iter([True, False])  # alive before the poll, dead right after it answered 200
    try:
        with pytest.raises(ServerGoneError):
            wait_until_ready(Endpoints("127.0.0.1", http_port=server.server_port), timeout_s=5, poll_s=0.05,
                             alive=lambda: next(answers, False))
    finally:
        server.shutdown()
        server.server_close()
    assert handler.calls == 1


def test_endpoints_text():
    endpoints = Endpoints("gpu-host")
    assert endpoints.grpc_url == "gpu-host:8001"
    assert endpoints.http_url == "http://gpu-host:8000"
    assert endpoints.metrics_url == "http://gpu-host:8002/metrics"


def test_engines_command_without_docker_is_a_plain_error(yolov8n_build, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from packager.cli.main import main
    from packager.repository.render import render_repository

    repository = render_repository(yolov8n_build, tmp_path / "model_repository", target="gpu").path
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'absent.sock'}")
    result = CliRunner().invoke(main, ["engines", "--repository", str(repository)])
    assert result.exit_code != 0
    assert result.output.startswith("Error:") and "Docker" in result.output and "docs/gpu.md" in result.output


def test_compose_up_refuses_a_gpu_repository_without_engine_sources(yolov8n_build, tmp_path):
    from packager.repository.render import render_repository

    repository = render_repository(yolov8n_build, tmp_path / "model_repository", target="gpu", precisions=("fp16",)).path
    source = repository / "yolov8n_fp16_detector" / "1" / "model.onnx"
    source.rename(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="yolov8n_fp16_detector: neither model.onnx nor model.plan"):
        deploy.compose_up(repository, echo=lambda _: None)
    (tmp_path / "model.onnx").rename(source)
    deploy.check_repository(repository)  # sources present: passes


# ------------------------------------------------------------------------------------------ issue 13


def test_server_image_and_engine_cache_follow_the_triton_tag():
    """A new TRITON_TAG can never be served by the old image or trip over the old onnxruntime engine cache."""
    resolved = {}
    for tag in ("26.08-py3", "25.01-py3", "24.04-py3"):
        run = compose_config(DEPLOY, {"PATH": "/usr/bin:/bin", "TRITON_TAG": tag})
        assert run.returncode == 0, run.stderr
        resolved[tag] = yaml.safe_load(run.stdout)
        services = resolved[tag]["services"]
        assert services["engines"]["image"] == f"nvcr.io/nvidia/tritonserver:{tag}"
        assert services["triton"]["build"]["args"]["TRITON_IMAGE"] == f"nvcr.io/nvidia/tritonserver:{tag}"
        assert services["triton"]["image"] == f"yqpack/tritonserver:{tag}"
        assert resolved[tag]["volumes"]["trt-cache"]["name"] == f"yqpack-trt-cache-{tag}"
    # The by-hand command in the header and compose_up both rebuild (Dockerfile edits included).
    header = [line for line in (DEPLOY / "docker-compose.yml").read_text().splitlines() if line.startswith("#")]
    assert any("docker compose -p yqpack up -d --build" in line for line in header)
    assert "docker compose -p yqpack up -d --build" in (PROJECT_ROOT / "docs" / "gpu.md").read_text()


def test_engine_overrides_reach_the_engines_service():
    env = {"PATH": "/usr/bin:/bin", "YQPACK_GPU_COMPUTE_CAPABILITY": "7.5", "YQPACK_GPU_NAME": "Tesla T4",
           "YQPACK_TENSORRT_VERSION": "10.8.0", "TRTEXEC": "/opt/tensorrt/bin/trtexec"}
    run = compose_config(DEPLOY, env)
    assert run.returncode == 0, run.stderr
    environment = yaml.safe_load(run.stdout)["services"]["engines"]["environment"]
    assert {k: environment[k] for k in env if k != "PATH"} == {k: v for k, v in env.items() if k != "PATH"}
    defaults = yaml.safe_load(compose_config(DEPLOY, {"PATH": "/usr/bin:/bin"}).stdout)["services"]["engines"]
    assert defaults["environment"]["YQPACK_GPU_COMPUTE_CAPABILITY"] == ""  # empty = detect in the container


def test_trt_plugins_reach_trtexec_and_triton(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    libraries = [plugins / "libnms.so", plugins / "libdcn.so"]
    for library in libraries:
        library.write_bytes(b"\x7fELF")
    env = deploy.compose_environment(tmp_path / "repo", Endpoints(), False,
                                     base={"PATH": "/usr/bin:/bin",
                                           "YQPACK_TRT_PLUGINS": os.pathsep.join(map(str, libraries))})
    run = compose_config(DEPLOY, env)
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    expected = "/plugins/libnms.so;/plugins/libdcn.so"
    assert services["engines"]["command"][-2:] == ["--plugins", expected]
    assert f"--backend-config=tensorrt,plugins={expected}" in services["triton"]["command"]
    for service in ("engines", "triton"):
        assert f"{plugins}:/plugins:ro" in services[service]["volumes"]
    plain = yaml.safe_load(compose_config(DEPLOY, {"PATH": "/usr/bin:/bin"}).stdout)["services"]["triton"]
    # Triton refuses an empty --backend-config value: without plugins the setting is the backend's own default.
    assert "--backend-config=tensorrt,coalesce-request-input=false" in plain["command"]


def test_trt_plugin_sources_and_mistakes(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({
        "model_name": "m", "class_names": ["a"], "imgsz": [64, 64], "artifacts": {},
        "input": {"name": "images", "shape": [-1, 3, 64, 64]}, "output": {"name": "output0", "shape": [-1, 5, 84]},
        "quantization": {"preset": "mixed", "calibration_method": "max", "trt_plugins": ["/opt/x/libnms.so"]},
    }))
    assert deploy.trt_plugin_libraries(build, environ={}) == [Path("/opt/x/libnms.so")]
    assert deploy.trt_plugin_libraries(build, environ={"YQPACK_TRT_PLUGINS": "/a/l.so:/a/m.so"}) == [
        Path("/a/l.so"), Path("/a/m.so")]  # the environment wins: paths differ on the GPU host
    with pytest.raises(FileNotFoundError, match="set YQPACK_TRT_PLUGINS"):
        deploy.TrtPlugins.of(deploy.trt_plugin_libraries(build, environ={}))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for library in (tmp_path / "a" / "l.so", tmp_path / "b" / "m.so"):
        library.write_bytes(b"\x7fELF")
    with pytest.raises(ValueError, match="share one folder"):
        deploy.TrtPlugins.of([tmp_path / "a" / "l.so", tmp_path / "b" / "m.so"])
    assert deploy.TrtPlugins.of([]) is None


def test_env_file_lists_the_data_center_driver_branches():
    text = (DEPLOY / ".env").read_text()
    for branch in ("470.57", "525.85", "535.86", "545.23"):
        assert branch in text


# ------------------------------------------------------------------------------------------ issue 20


def test_compose_config_with_the_documented_by_hand_environment():
    """docs/gpu.md's by-hand commands give compose nothing but MODEL_REPOSITORY (and the 25.01 override its eight
    variables): `docker-compose config` must succeed with only that, TRITON_ADMIN_KEY included (empty = random)."""
    by_hand = {"PATH": "/usr/bin:/bin", "MODEL_REPOSITORY": str(DEPLOY.parent / "model_repository")}
    run = compose_config(DEPLOY, by_hand)
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert services["triton"]["environment"]["TRITON_ADMIN_KEY"] == ""
    assert services["engines"]["environment"]["YQPACK_SERVING_IMAGE"] == "nvcr.io/nvidia/tritonserver:26.08-py3"
    override = {"TRITON_TAG": "25.01-py3", "TRITON_VERSION": "2.54.0", "TRITON_TENSORRT_VERSION": "10.8.0.43",
                "TRITON_CUDA_VERSION": "12.8.0", "TRITON_DRIVER_MINIMUM": "570", "TRITON_ONNXRUNTIME_VERSION": "1.20.1",
                "TRITON_OPENVINO_VERSION": "2024.5.0", "CHECK_IMAGE_TAG": "25.01-py3"}
    text = (DEPLOY / ".env").read_text()
    assert all(f"{k}={v}" in text for k, v in override.items())  # the documented override, verbatim
    old = yaml.safe_load(compose_config(DEPLOY, {**by_hand, **override}).stdout)["services"]
    assert old["engines"]["image"] == "nvcr.io/nvidia/tritonserver:25.01-py3"
    assert old["engine-check"]["build"]["args"]["CHECK_IMAGE"] == "nvcr.io/nvidia/tensorrt:25.01-py3"
    gpu = yaml.safe_load(compose_config(DEPLOY, {**by_hand, "TRITON_GPU_DEVICE": "MIG-c6d4f1ef"}).stdout)
    for service in gpu["services"].values():
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["MIG-c6d4f1ef"]


def test_container_state_parsing():
    running = deploy.parse_container_state('{"Status":"running","ExitCode":0,"Restarting":false} 0')
    assert running == deploy.ContainerState("running", 0, 0) and not running.failed
    assert deploy.parse_container_state('{"Status":"restarting","ExitCode":1} 2').failed
    assert deploy.parse_container_state('{"Status":"running","ExitCode":0} 1').failed  # it restarted once already
    assert deploy.parse_container_state("garbage") is None


STAND_IN_DOCKER = """#!{python}
# Stand-in for the docker CLI (no Docker engine on this machine): `compose up -d` starts the real tritonserver
# command saved in {state}/command.json in the background, `ps`/`inspect` report that process's real state and
# exit code, `logs` its real log.
import json, subprocess, sys
from pathlib import Path
state = Path("{state}")
args = sys.argv[1:]
if args[:1] == ["compose"]:
    args = args[1:]
    while args[:1] in (["-p"], ["-f"]):
        args = args[2:]
    verb = args[0]
    if verb == "version":
        print("Docker Compose version v2.29.0 (stand-in)")
    elif verb == "up":  # returns at once, like `up -d`; the server runs on in its own session
        (state / "up").write_text("yes")
        subprocess.Popen([sys.executable, __file__, "run-server"], start_new_session=True)
    elif verb == "ps":
        print("c0ffee" if (state / "up").exists() else "")
    elif verb == "logs":
        print(chr(10).join((state / "log").read_text().splitlines()[-int(args[args.index("--tail") + 1]):]))
    elif verb == "stop":
        (state / "stopped").write_text("yes")
elif args[:1] == ["run-server"]:
    spec = json.loads((state / "command.json").read_text())
    with open(state / "log", "w") as log:
        code = subprocess.call(spec["command"], env=spec["env"], stdout=log, stderr=subprocess.STDOUT)
    (state / "rc").write_text(str(code))
elif args[:1] == ["inspect"]:
    rc = state / "rc"
    status = {{"Status": "exited", "ExitCode": int(rc.read_text())}} if rc.exists() else {{"Status": "running", "ExitCode": 0}}
    print(json.dumps(status), 0)
"""


@pytest.mark.slow
def test_a_server_whose_model_fails_to_load_is_reported_at_once(model_repository, server_env, tmp_path, monkeypatch):
    """`serve --docker --detach` when Triton exits because a model does not load (--exit-on-error): compose_up
    raises at once with Triton's last log lines and stops the container, instead of waiting out the timeout.
    The server is the real tritonserver 2.51 failing on a real broken model; only the container runtime (the
    docker CLI) is a stand-in, reporting that process's real state."""
    from packager.serve.embedded import find_free_ports

    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository.path, repository, symlinks=True)
    broken = repository / "yolov8n_postprocess" / "1" / "model.py"
    broken.write_text(broken.read_text().replace("    def initialize(self, args):",
                                                 "    def initialize(self, args):\n"
                                                 "        raise RuntimeError('broken on purpose by the test')", 1))
    state = tmp_path / "docker-state"
    state.mkdir()
    grpc_port, http_port, metrics_port = find_free_ports(3)
    command = [str(server_env.tritonserver), f"--model-repository={repository}",
               f"--backend-directory={server_env.backend_dir}", "--exit-on-error=true",
               f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--allow-metrics=false"]
    (state / "command.json").write_text(json.dumps({"command": command, "env": server_env.process_env()}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(STAND_IN_DOCKER.format(python=sys.executable, state=state))
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    server = _UnixHTTPServer(str(tmp_path / "docker.sock"), _PingHandler)  # the engine's /_ping
    _serve(server)
    try:
        with pytest.raises(deploy.ServerError) as failure:
            deploy.compose_up(repository, endpoints=Endpoints("127.0.0.1", http_port=http_port, grpc_port=grpc_port,
                                                              metrics_port=metrics_port),
                              timeout_s=1800, docker_host=f"unix://{tmp_path / 'docker.sock'}", echo=lambda _: None)
    finally:
        server.shutdown()
        server.server_close()
    message = str(failure.value)
    assert not isinstance(failure.value, NotReadyError)  # reported as failed, not as "not ready after 1800 s"
    assert re.search(r"Triton failed to start \(exited, exit code -?[1-9]", message), message  # 2.51 may segfault on its way out
    assert "broken on purpose by the test" in message  # Triton's own log lines
    assert (state / "stopped").is_file()  # stopped, so restart: on-failure does not bring it back
