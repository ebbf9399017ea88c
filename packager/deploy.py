"""`docker compose up` of deploy/docker-compose.yml: engines (TensorRT plans) then Triton, on an NVIDIA GPU host.

`compose_up` checks that a Docker engine answers before anything else (and says so plainly when none does),
runs compose with the repository and ports passed as environment (overriding deploy/.env), waits for
/v2/health/ready and returns where the endpoints are. `yqpack serve --docker` calls it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from packager.assets import PROJECT_ROOT

DEPLOY_DIR = PROJECT_ROOT / "deploy"
COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"
ENV_FILE = DEPLOY_DIR / ".env"
PROJECT_NAME = "yqpack"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DOCKER_HELP = (
    "the GPU path needs Docker Engine with the compose plugin and the NVIDIA Container Toolkit on an NVIDIA GPU "
    "host (see docs/gpu.md); without a GPU use `yqpack serve --local`"
)


class DockerUnavailableError(RuntimeError):
    """No Docker engine or no compose implementation: the message says which and what to do."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: str

    @classmethod
    def on(cls, host: str, ports: Ports) -> "Endpoints":
        return cls(http=f"http://{host}:{ports.http}", grpc=f"{host}:{ports.grpc}",
                   metrics=f"http://{host}:{ports.metrics}/metrics")

    @property
    def ready_url(self) -> str:
        return f"{self.http}/v2/health/ready"


@dataclass(frozen=True)
class ComposeResult:
    endpoints: Endpoints
    command: list[str]  # the compose invocation, to repeat `logs` / `down` by hand
    ready_after_s: float


# ------------------------------------------------------------------------------------------- docker checks


def docker_engine_status(docker_host: str | None = None, timeout_s: float = 3.0) -> tuple[bool, str]:
    """Ask the engine's /_ping on $DOCKER_HOST (unix socket or tcp) — works without the docker CLI."""
    host = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    parsed = urlparse(host)
    try:
        if parsed.scheme == "unix":
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(timeout_s)
            connection.connect(parsed.path)
        elif parsed.scheme == "tcp":
            connection = socket.create_connection((parsed.hostname, parsed.port or 2375), timeout=timeout_s)
        else:
            return False, f"unsupported DOCKER_HOST {host!r} (expected unix:// or tcp://)"
        with connection:
            connection.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = connection.recv(4096).decode("latin-1")
    except OSError as error:
        return False, f"no Docker engine answers at {host} ({error.strerror or error})"
    status_line = reply.split("\r\n", 1)[0]
    if " 200 " not in f"{status_line} ":
        return False, f"the Docker engine at {host} answered {status_line!r} to /_ping"
    return True, f"Docker engine at {host}"


def compose_command(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """`docker compose` (v2 plugin) if present, else the standalone `docker-compose`."""
    docker = which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = which("docker-compose")
    if standalone is not None:
        return [standalone]
    raise DockerUnavailableError(f"Docker Compose not found (neither `docker compose` nor `docker-compose`): {DOCKER_HELP}")


def compose_environment(repository: Path, ports: Ports, allow_missing: bool,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """Variables that override deploy/.env for this run (the shell environment beats the .env file)."""
    env = dict(os.environ if base is None else base)
    env.update({
        "MODEL_REPOSITORY": str(Path(repository).resolve()),
        "TRITON_HTTP_PORT": str(ports.http),
        "TRITON_GRPC_PORT": str(ports.grpc),
        "TRITON_METRICS_PORT": str(ports.metrics),
        "YQPACK_ALLOW_MISSING": "1" if allow_missing else "0",
        # A detector without a plan must then neither stop the server nor keep it "not ready" forever.
        "TRITON_EXIT_ON_ERROR": "false" if allow_missing else "true",
        "TRITON_STRICT_READINESS": "false" if allow_missing else "true",
    })
    env.setdefault("TRITON_ADMIN_KEY", secrets.token_hex(16))  # admin APIs closed unless the operator sets one
    return env


def check_repository(repository: Path) -> None:
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository} (render it with `yqpack build`)")
    if not any(repository.glob("*/config.pbtxt")):
        raise ValueError(f"{repository} holds no Triton model (no */config.pbtxt): render it with `yqpack build`")
    from packager.engines import repository_engine_specs

    unbuildable = [s.name for s in repository_engine_specs(repository)
                   if not s.onnx_path.is_file() and not s.plan_path.is_file()]
    if unbuildable:
        raise ValueError(
            f"{', '.join(unbuildable)}: neither model.onnx nor model.plan in the version folder, so no engine can be "
            f"built; copy the sources with `yqpack engines --build BUILD_DIR --repository {repository} --engines print`"
        )


# ------------------------------------------------------------------------------------------------- health


def wait_for_ready(url: str, timeout_s: float, *, poll_s: float = 2.0,
                   still_starting: Callable[[], bool] = lambda: True,
                   on_poll: Callable[[float], None] | None = None) -> float:
    """Poll `url` until it answers 200; returns the seconds waited. Gives up when `still_starting()` is False."""
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, poll_s + 1)) as response:
                if response.status == 200:
                    return waited
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not up yet
        if not still_starting():
            raise RuntimeError(f"the server stopped before {url} reported ready")
        if waited >= timeout_s:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
        if on_poll is not None:
            on_poll(waited)
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------- up


def compose_up(
    repository: Path,
    detach: bool = True,
    *,
    allow_missing: bool = False,
    ports: Ports = Ports(),
    host: str = "localhost",
    timeout_s: float = 1800.0,
    compose_file: Path = COMPOSE_FILE,
    docker_host: str | None = None,
    echo: Callable[[str], None] = print,
) -> ComposeResult:
    """Build the engines and start Triton with docker compose, wait until ready, and report the endpoints.

    detach=True returns once the server is ready (containers keep running; `yqpack stop --docker` or
    `docker compose down` stops them). detach=False keeps compose in the foreground until Ctrl-C.
    """
    check_repository(repository)
    command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file)]
    reachable, reason = docker_engine_status(docker_host)
    if not reachable:
        raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
    env = compose_environment(repository, ports, allow_missing)
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    endpoints = Endpoints.on(host, ports)
    echo(f"docker compose up: engines, then triton (repository {Path(repository).resolve()})")
    if detach:
        # `up -d` returns after `engines` finished (service_completed_successfully) and triton was started.
        run = subprocess.run(command + ["up", "-d", "--build"], env=env, cwd=compose_file.parent)
        if run.returncode != 0:
            raise RuntimeError(_failure_message(command, env, compose_file, run.returncode))
        ready_after = _wait_with_progress(endpoints, timeout_s, lambda: True)
        _print_endpoints(endpoints, command, echo)
        return ComposeResult(endpoints, command, ready_after)
    process = subprocess.Popen(command + ["up", "--build"], env=env, cwd=compose_file.parent)
    try:
        ready_after = _wait_with_progress(endpoints, timeout_s, lambda: process.poll() is None)
        _print_endpoints(endpoints, command, echo)
        process.wait()
    except KeyboardInterrupt:
        process.terminate()  # compose stops the containers on SIGTERM/SIGINT
        process.wait()
        raise
    except BaseException:
        process.terminate()
        process.wait()
        raise
    return ComposeResult(endpoints, command, ready_after)


def compose_engines(
    repository: Path,
    *,
    allow_missing: bool = False,
    compose_file: Path = COMPOSE_FILE,
    docker_host: str | None = None,
) -> None:
    """Run only the one-shot `engines` service (build/reuse the plans on this host's GPU), without serving."""
    check_repository(repository)
    command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file)]
    reachable, reason = docker_engine_status(docker_host)
    if not reachable:
        raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
    env = compose_environment(repository, Ports(), allow_missing)
    run = subprocess.run(command + ["run", "--rm", "engines"], env=env, cwd=compose_file.parent)
    if run.returncode != 0:
        raise RuntimeError(f"the engines service failed (exit {run.returncode}); its log above ends with the "
                           "builder's output. Pass --allow-missing to serve without the failed model(s)")


def compose_down(compose_file: Path = COMPOSE_FILE, echo: Callable[[str], None] = print) -> None:
    """Stop and remove the containers (the engine cache volume is kept)."""
    command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file), "down"]
    reachable, reason = docker_engine_status()
    if not reachable:
        raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
    run = subprocess.run(command, cwd=compose_file.parent)
    if run.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {run.returncode}")
    echo("docker compose: stopped")


def _wait_with_progress(endpoints: Endpoints, timeout_s: float, alive: Callable[[], bool]) -> float:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(f"waiting for {endpoints.ready_url} (model load; gpu-ort builds engines now)")
        return wait_for_ready(endpoints.ready_url, timeout_s, still_starting=alive,
                              on_poll=lambda waited: bar.update(task))


def _print_endpoints(endpoints: Endpoints, command: list[str], echo: Callable[[str], None]) -> None:
    echo("Triton is ready:")
    echo(f"  HTTP     {endpoints.http}")
    echo(f"  gRPC     {endpoints.grpc}   (yqpack verify --url {endpoints.grpc})")
    echo(f"  metrics  {endpoints.metrics}")
    echo(f"  logs: {' '.join(command)} logs -f triton   stop: {' '.join(command)} down")


def _failure_message(command: list[str], env: dict[str, str], compose_file: Path, code: int) -> str:
    """Say which service failed; an engine build failure carries the tail of the builder log."""
    logs = subprocess.run(command + ["logs", "--no-color", "--tail", "40", "engines"], env=env,
                          cwd=compose_file.parent, capture_output=True, text=True)
    tail = (logs.stdout or "").strip()
    hint = f"\n--- last lines of the engines service ---\n{tail}" if tail else ""
    return (f"docker compose up failed (exit {code}); if the engine build failed, fix it or pass "
            f"--allow-missing to serve without that model{hint}")
