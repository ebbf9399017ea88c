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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from packager.core.paths import DEPLOY_DIR, PACKAGE_DIR
from packager.core.contracts import (ConfigError, DockerUnavailableError, EngineBuildError, Endpoints,
                                MissingInputError, ServerError, ServerGoneError)
from packager.core.repository_index import RepositoryIndex
from packager.engines.host import trt_plugin_libraries
from packager.serve.readiness import wait_until_ready

COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"
ENV_FILE = DEPLOY_DIR / ".env"
PROJECT_NAME = "yqpack"
PLUGINS_MOUNT = "/plugins"  # where the compose file mounts TRT_PLUGIN_DIR in both services
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DOCKER_HELP = (
    "the GPU path needs Docker Engine with the compose plugin and the NVIDIA Container Toolkit on an NVIDIA GPU "
    "host (see docs/gpu.md); without a GPU use `yqpack serve --local`"
)


SERVER_SERVICE = "triton"
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class ContainerState:
    """A compose service's container as `docker inspect` reports it."""

    status: str  # created, running, restarting, exited, dead, ...
    exit_code: int
    restarts: int

    @property
    def failed(self) -> bool:
        """Exited, or restarted at least once: a server that failed to start (compose restarts it on failure)."""
        return self.status in ("exited", "dead", "restarting") or self.restarts > 0

    def describe(self) -> str:
        return f"{self.status}, exit code {self.exit_code}, restarted {self.restarts} time(s)"


def parse_container_state(text: str) -> ContainerState | None:
    """`docker inspect --format '{{json .State}} {{.RestartCount}}'` output."""
    import json

    state_json, _, restarts = text.strip().rpartition(" ")
    try:
        state = json.loads(state_json)
        return ContainerState(str(state.get("Status", "")), int(state.get("ExitCode", 0)), int(restarts))
    except (ValueError, TypeError, AttributeError):
        return None


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


@dataclass(frozen=True)
class TrtPlugins:
    """TensorRT plugin libraries of a build, as the compose services see them (one host folder at /plugins)."""

    host_dir: Path
    names: tuple[str, ...]

    @property
    def container_paths(self) -> str:
        """';'-separated, the separator of Triton's tensorrt `plugins=` setting."""
        return ";".join(f"{PLUGINS_MOUNT}/{name}" for name in self.names)

    @classmethod
    def of(cls, libraries: list[Path]) -> "TrtPlugins | None":
        if not libraries:
            return None
        missing = [str(p) for p in libraries if not Path(p).is_file()]
        if missing:
            raise MissingInputError(f"TensorRT plugin library not found on this host: {', '.join(missing)} "
                                    "(set YQPACK_TRT_PLUGINS to their paths here, separated by ':')")
        folders = {Path(p).resolve().parent for p in libraries}
        if len(folders) != 1:
            raise ConfigError("the TensorRT plugin libraries must share one folder (it is mounted at /plugins): "
                             + ", ".join(map(str, libraries)))
        return cls(folders.pop(), tuple(Path(p).name for p in libraries))


def compose_environment(repository: Path, endpoints: Endpoints, allow_missing: bool,
                        base: dict[str, str] | None = None,
                        trt_plugins: list[Path] | None = None) -> dict[str, str]:
    """Variables that override deploy/.env for this run (the shell environment beats the .env file).

    `trt_plugins` defaults to $YQPACK_TRT_PLUGINS of `base`; their folder is mounted at /plugins, trtexec gets
    them through the engines service and Triton through --backend-config=tensorrt,plugins=...
    """
    env = dict(os.environ if base is None else base)
    plugins = TrtPlugins.of(trt_plugin_libraries(environ=env) if trt_plugins is None else trt_plugins)
    if plugins is not None:
        env.update({"TRT_PLUGIN_DIR": str(plugins.host_dir), "TRT_PLUGINS": plugins.container_paths,
                    "TRITON_TENSORRT_CONFIG": f"plugins={plugins.container_paths}"})
    env.update({
        # The engines service mounts yqpack's engine code from here (a checkout or an installed wheel).
        "YQPACK_PACKAGE_DIR": str(PACKAGE_DIR),
        "MODEL_REPOSITORY": str(Path(repository).resolve()),
        "TRITON_HTTP_PORT": str(endpoints.http_port),
        "TRITON_GRPC_PORT": str(endpoints.grpc_port),
        "TRITON_METRICS_PORT": str(endpoints.metrics_port),
        "YQPACK_ALLOW_MISSING": "1" if allow_missing else "0",
        # A detector without a plan must then neither stop the server nor keep it "not ready" forever.
        "TRITON_EXIT_ON_ERROR": "false" if allow_missing else "true",
        "TRITON_STRICT_READINESS": "false" if allow_missing else "true",
    })
    env.setdefault("TRITON_ADMIN_KEY", secrets.token_hex(16))  # admin APIs closed unless the operator sets one
    return env


def check_repository(repository: Path) -> None:
    """Something to serve (`RepositoryIndex.load_servable`), and every TensorRT detector has a plan or the ONNX to
    build one from."""
    RepositoryIndex.load_servable(repository)
    from packager.engines.plans import repository_engine_specs

    unbuildable = [s.name for s in repository_engine_specs(repository)
                   if not s.onnx_path.is_file() and not s.plan_path.is_file()]
    if unbuildable:
        raise ConfigError(
            f"{', '.join(unbuildable)}: neither model.onnx nor model.plan in the version folder, so no engine can be "
            f"built; copy the sources with `yqpack engines --build BUILD_DIR --repository {repository} --engines print`"
        )


# --------------------------------------------------------------------------------------------------- up


class ComposeDeployment:
    """The compose deployment behind the same lifecycle as the embedded server (contracts.ServerLifecycle):
    start = `up` (the `engines` service builds the plans on this GPU, then `triton` starts), wait_ready = the one
    readiness poller, stop = `down`. detach=False keeps compose in the foreground (is_alive follows it)."""

    def __init__(self, repository: Path, *, endpoints: Endpoints = Endpoints(host="localhost"),
                 allow_missing: bool = False, detach: bool = True, compose_file: Path = COMPOSE_FILE,
                 docker_host: str | None = None):
        self.repository = Path(repository)
        self.endpoints = endpoints
        self.allow_missing = allow_missing
        self.detach = detach
        self.compose_file = compose_file
        self.docker_host = docker_host
        self.command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file)]
        self.process: subprocess.Popen | None = None
        self.last_state: ContainerState | None = None  # what is_alive saw last
        self._environment: dict[str, str] | None = None

    def environment(self) -> dict[str, str]:
        """The same variables (the admin key included) for every compose call of this deployment."""
        if self._environment is None:
            env = compose_environment(self.repository, self.endpoints, self.allow_missing)
            if self.docker_host:
                env["DOCKER_HOST"] = self.docker_host
            self._environment = env
        return dict(self._environment)

    def start(self) -> "ComposeDeployment":
        check_repository(self.repository)
        reachable, reason = docker_engine_status(self.docker_host)
        if not reachable:
            raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
        env, cwd = self.environment(), self.compose_file.parent
        if self.detach:
            # `up -d` returns after `engines` finished (service_completed_successfully) and triton was started.
            run = subprocess.run(self.command + ["up", "-d", "--build"], env=env, cwd=cwd)
            if run.returncode != 0:
                raise ServerError(_failure_message(self.command, env, self.compose_file, run.returncode))
        else:
            self.process = subprocess.Popen(self.command + ["up", "--build"], env=env, cwd=cwd)
        return self

    def container_state(self, service: str = SERVER_SERVICE) -> ContainerState | None:
        """The service's container (None while it does not exist yet, or without a docker CLI to ask)."""
        env, cwd = self.environment(), self.compose_file.parent
        ids = subprocess.run(self.command + ["ps", "-a", "-q", service], env=env, cwd=cwd, capture_output=True,
                             text=True)
        container = (ids.stdout or "").split()
        docker = shutil.which("docker")
        if ids.returncode != 0 or not container or docker is None:
            return None
        inspect = subprocess.run([docker, "inspect", "--format", "{{json .State}} {{.RestartCount}}", container[0]],
                                 env=env, capture_output=True, text=True)
        return parse_container_state(inspect.stdout) if inspect.returncode == 0 else None

    def is_alive(self) -> bool:
        if self.process is not None:  # foreground: compose itself
            return self.process.poll() is None
        # Detached: Triton's container. One that exited or is being restarted failed to start (a model that
        # did not load, with --exit-on-error): say so now, not after the whole timeout.
        state = self.container_state()
        self.last_state = state
        return state is None or not state.failed

    def server_log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        logs = subprocess.run(self.command + ["logs", "--no-color", "--tail", str(lines), SERVER_SERVICE],
                              env=self.environment(), cwd=self.compose_file.parent, capture_output=True, text=True)
        return (logs.stdout or "").strip()

    def fail_started_server(self) -> ServerError:
        """Stop the failed server (restart: on-failure would start it again) and describe it with its log tail."""
        tail = self.server_log_tail()
        state = self.last_state
        subprocess.run(self.command + ["stop", SERVER_SERVICE], env=self.environment(), cwd=self.compose_file.parent,
                       capture_output=True)
        return ServerError(
            f"Triton failed to start ({state.describe() if state else 'its container is gone'}); stopped it. "
            f"Last lines of its log:\n{tail}\nA model that does not load stops the server (--exit-on-error): "
            f"fix it, or serve without it (--allow-missing leaves out detectors without a plan)")

    def wait_ready(self, timeout: float = 1800.0) -> float:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(f"waiting for {self.endpoints.http_url}/v2/health/ready "
                                "(model load; gpu-ort builds engines now)")
            return wait_until_ready(self.endpoints, timeout, alive=self.is_alive, poll_s=2.0,
                                    on_poll=lambda waited: bar.update(task))

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # compose stops the containers on SIGTERM/SIGINT
            self.process.wait(timeout=timeout)
        elif self.detach:
            compose_down(self.compose_file, echo=lambda _: None)


def compose_up(
    repository: Path,
    detach: bool = True,
    *,
    allow_missing: bool = False,
    endpoints: Endpoints = Endpoints(host="localhost"),
    timeout_s: float = 1800.0,
    compose_file: Path = COMPOSE_FILE,
    docker_host: str | None = None,
    echo: Callable[[str], None] = print,
) -> ComposeResult:
    """Build the engines and start Triton with docker compose, wait until ready, and report the endpoints.

    detach=True returns once the server is ready (containers keep running; `yqpack stop --docker` or
    `docker compose down` stops them). detach=False keeps compose in the foreground until Ctrl-C.
    """
    deployment = ComposeDeployment(repository, endpoints=endpoints, allow_missing=allow_missing, detach=detach,
                                   compose_file=compose_file, docker_host=docker_host)
    echo(f"docker compose up: engines, then triton (repository {Path(repository).resolve()})")
    deployment.start()
    try:
        try:
            ready_after = deployment.wait_ready(timeout_s)
        except ServerGoneError:
            if deployment.process is not None:
                raise
            raise deployment.fail_started_server() from None
        _print_endpoints(endpoints, deployment.command, echo)
        if deployment.process is not None:
            deployment.process.wait()
    except BaseException:
        if deployment.process is not None:  # foreground: Ctrl-C or a failed wait ends compose too
            deployment.stop()
        raise
    return ComposeResult(endpoints, deployment.command, ready_after)


def compose_engines(
    repository: Path,
    *,
    allow_missing: bool = False,
    trt_plugins: list[Path] | None = None,
    compose_file: Path = COMPOSE_FILE,
    docker_host: str | None = None,
) -> None:
    """Run only the one-shot `engines` service (build/reuse the plans on this host's GPU), without serving."""
    check_repository(repository)
    command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file)]
    reachable, reason = docker_engine_status(docker_host)
    if not reachable:
        raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
    env = compose_environment(repository, Endpoints(), allow_missing, trt_plugins=trt_plugins)
    run = subprocess.run(command + ["run", "--rm", "engines"], env=env, cwd=compose_file.parent)
    if run.returncode != 0:
        raise EngineBuildError(f"the engines service failed (exit {run.returncode}); its log above ends with the "
                           "builder's output. Pass --allow-missing to serve without the failed model(s)")
    check = subprocess.run(command + ["run", "--rm", "--no-deps", "engine-check"], env=env, cwd=compose_file.parent)
    if check.returncode != 0:
        raise EngineBuildError(f"the engine-check service failed (exit {check.returncode}): a plan disagrees with "
                               "its ONNX beyond the tolerance of its precision (its log above, and "
                               "<detector>/1/model.plan.check.log). Triton will not serve it")


def compose_down(compose_file: Path = COMPOSE_FILE, echo: Callable[[str], None] = print) -> None:
    """Stop and remove the containers (the engine cache volume is kept)."""
    command = compose_command() + ["-p", PROJECT_NAME, "-f", str(compose_file), "down"]
    reachable, reason = docker_engine_status()
    if not reachable:
        raise DockerUnavailableError(f"{reason}: {DOCKER_HELP}")
    run = subprocess.run(command, cwd=compose_file.parent)
    if run.returncode != 0:
        raise ServerError(f"`{' '.join(command)}` failed with exit code {run.returncode}")
    echo("docker compose: stopped")


def _print_endpoints(endpoints: Endpoints, command: list[str], echo: Callable[[str], None]) -> None:
    echo("Triton is ready:")
    echo(f"  HTTP     {endpoints.http_url}")
    echo(f"  gRPC     {endpoints.grpc_url}   (yqpack verify --url {endpoints.grpc_url})")
    echo(f"  metrics  {endpoints.metrics_url}")
    echo(f"  logs: {' '.join(command)} logs -f triton   stop: {' '.join(command)} down")


def _failure_message(command: list[str], env: dict[str, str], compose_file: Path, code: int) -> str:
    """Say which service failed; an engine build failure carries the tail of the builder log."""
    logs = subprocess.run(command + ["logs", "--no-color", "--tail", "40", "engines"], env=env,
                          cwd=compose_file.parent, capture_output=True, text=True)
    tail = (logs.stdout or "").strip()
    hint = f"\n--- last lines of the engines service ---\n{tail}" if tail else ""
    return (f"docker compose up failed (exit {code}); if the engine build failed, fix it or pass "
            f"--allow-missing to serve without that model{hint}")
