"""Docker deployment, the parts that run without a Docker engine or GPU: the compose file checked by a real compose
implementation (Debian's docker-compose, when installed) and structurally, the .env/Dockerfile contract, the
engine reachability probe against real sockets, and the health wait against a real HTTP server."""

from __future__ import annotations

import http.server
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

from packager import deploy
from packager.assets import PROJECT_ROOT
from packager.server_env import MALLOC_ENV

DEPLOY = PROJECT_ROOT / "deploy"


def compose_v1() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("no compose implementation installed (apt-get install docker-compose)")
    return path


def compose_config(compose_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`docker-compose config`: parses, interpolates .env and validates against the compose schema; no engine."""
    env = {**(os.environ if env is None else env)}
    env.setdefault("TRITON_ADMIN_KEY", "test-admin-key")  # compose refuses to start without one
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
    assert resolved["services"]["engines"]["image"] == env_file()["TRITON_IMAGE"]
    assert resolved["services"]["triton"]["build"]["args"]["TRITON_IMAGE"] == env_file()["TRITON_IMAGE"]


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
    env = deploy.compose_environment(repository, deploy.Ports(9000, 9001, 9002), allow_missing=True,
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

    strict = deploy.compose_environment(repository, deploy.Ports(), allow_missing=False, base={})
    assert (strict["TRITON_EXIT_ON_ERROR"], strict["YQPACK_ALLOW_MISSING"]) == ("true", "0")


def test_compose_structure(compose):
    services = compose["services"]
    assert set(services) == {"engines", "triton"}
    engines, triton = services["engines"], services["triton"]
    # engines first, with the very image the server is built from; the server only after it succeeded.
    assert triton["depends_on"] == {"engines": {"condition": "service_completed_successfully"}}
    assert engines["image"].startswith("${TRITON_IMAGE")
    assert triton["build"]["args"]["TRITON_IMAGE"].startswith("${TRITON_IMAGE")
    assert engines["command"][:3] == ["python3", "/yqpack/deploy/build_engines.py", "/models"]
    for service in (engines, triton):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    assert any(v.endswith(":/models") for v in engines["volumes"])  # writes model.plan
    assert any(v.startswith("trt-cache:/trt_cache") for v in triton["volumes"])
    assert "trt-cache" in compose["volumes"]
    assert triton["shm_size"] and triton["ulimits"]["memlock"] == -1 and triton["ulimits"]["stack"] == 67108864
    assert [p.rsplit(":", 1)[1].strip('"') for p in triton["ports"]] == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert "--model-repository=/models" in triton["command"]
    # The same allocator settings as the embedded server (the Python steps page-fault without them).
    assert {name: str(value) for name, value in triton["environment"].items()} == MALLOC_ENV


def test_image_tag_is_set_in_one_place():
    tag = env_file()["TRITON_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", tag)
    mentions = [p.name for p in DEPLOY.iterdir() if p.is_file() and "nvcr.io/nvidia/tritonserver:" in p.read_text()]
    assert mentions == [".env"], mentions
    assert "TensorRT 10.8" in (DEPLOY / ".env").read_text()  # the documented default's TensorRT version


def test_dockerfile_adds_what_the_python_models_import():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", dockerfile, re.M)
    assert '"numpy<2"' in dockerfile and '"opencv-python-headless<4.12"' in dockerfile
    imports = set()
    copied = ("letterbox", "postprocess", "image_header", "request_params")  # flat copies beside model.py
    for module in ("templates/preprocess/model.py", "templates/postprocess/model.py",
                   *(f"packager/{name}.py" for name in copied)):
        imports |= set(re.findall(r"^(?:import|from) (\w+)", (PROJECT_ROOT / module).read_text(), re.M))
    third_party = imports - set(sys.stdlib_module_names) - {"triton_python_backend_utils", "packager",
                                                            "__future__", *copied}
    assert third_party <= {"numpy", "cv2"}, third_party


def test_entry_script_help_needs_only_the_standard_library():
    run = subprocess.run([sys.executable, "-S", "-I", str(DEPLOY / "build_engines.py"), "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--allow-missing" in run.stdout


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


def test_compose_up_without_an_engine_says_so(tmp_path, monkeypatch):
    repository = tmp_path / "model_repository"
    (repository / "m").mkdir(parents=True)
    (repository / "m" / "config.pbtxt").write_text('name: "m"\n')
    with pytest.raises(deploy.DockerUnavailableError, match="Docker") as failure:
        deploy.compose_up(repository, docker_host=f"unix://{tmp_path / 'absent.sock'}", echo=lambda _: None)
    assert "docs/gpu.md" in str(failure.value)


def test_compose_up_checks_the_repository_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="model repository not found"):
        deploy.compose_up(tmp_path / "nope", echo=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no Triton model"):
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


def test_wait_for_ready_polls_until_200():
    server, handler = _http_server(ready_after=2)
    try:
        endpoints = deploy.Endpoints.on("127.0.0.1", deploy.Ports(http=server.server_port))
        deploy.wait_for_ready(endpoints.ready_url, timeout_s=30, poll_s=0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.calls == 3


def test_wait_for_ready_gives_up():
    server, _ = _http_server(ready_after=10**9)
    url = f"http://127.0.0.1:{server.server_port}/v2/health/ready"
    try:
        with pytest.raises(TimeoutError, match="not ready"):
            deploy.wait_for_ready(url, timeout_s=0.2, poll_s=0.05)
        with pytest.raises(RuntimeError, match="stopped before"):
            deploy.wait_for_ready(url, timeout_s=30, poll_s=0.05, still_starting=lambda: False)
    finally:
        server.shutdown()
        server.server_close()


def test_endpoints_text():
    endpoints = deploy.Endpoints.on("gpu-host", deploy.Ports())
    assert endpoints.grpc == "gpu-host:8001"
    assert endpoints.ready_url == "http://gpu-host:8000/v2/health/ready"
    assert endpoints.metrics == "http://gpu-host:8002/metrics"


def test_engines_command_without_docker_is_a_plain_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from packager.cli import main

    repository = tmp_path / "model_repository"
    (repository / "m").mkdir(parents=True)
    (repository / "m" / "config.pbtxt").write_text('name: "m"\n')
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'absent.sock'}")
    result = CliRunner().invoke(main, ["engines", "--repository", str(repository)])
    assert result.exit_code != 0
    assert result.output.startswith("Error:") and "Docker" in result.output and "docs/gpu.md" in result.output


def test_compose_up_refuses_a_gpu_repository_without_engine_sources(tmp_path):
    repository = tmp_path / "model_repository"
    (repository / "m_fp16_detector" / "1").mkdir(parents=True)
    (repository / "m_fp16_detector" / "config.pbtxt").write_text(
        'name: "m_fp16_detector"\nplatform: "tensorrt_plan"\nmax_batch_size: 4\n'
        'input [ { name: "images" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]\n'
        'output [ { name: "output0" data_type: TYPE_FP32 dims: [ 84, 8400 ] } ]\n'
    )
    with pytest.raises(ValueError, match="m_fp16_detector: neither model.onnx nor model.plan"):
        deploy.compose_up(repository, echo=lambda _: None)
    (repository / "m_fp16_detector" / "1" / "model.onnx").write_bytes(b"onnx")
    deploy.check_repository(repository)  # sources present: passes
