"""Serve a model repository: an embedded tritonserver (nvidia-pytriton wheel) on 127.0.0.1, or docker compose.

`LocalTritonServer` owns one tritonserver process: it checks the ports first, starts it in its own session
(Ctrl-C reaches yqpack, which then shuts the server down cleanly), waits until *its own* process reports all
models ready, and stops it with SIGTERM then SIGKILL, checking that no Python-backend stub process and no
/dev/shm region with its unique prefix is left. Every server `yqpack serve` starts (detached or foreground) is recorded in
`serve_dir()` ($YQPACK_HOME/serve, else a per-user state folder, never the current directory) so that `yqpack
stop` from anywhere can end it; a record whose server died is cleaned up (stubs, shm) when next read. A
foreground server dies with the process that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from packager.serve import procinfo
from packager.core.contracts import Endpoints, MissingInputError, NotReadyError, ServerError, ServerGoneError
from packager.serve.readiness import wait_until_ready
from packager.serve.server_args import (
    DEFAULT_PORTS,
    busy_ports,
    find_free_ports,
    model_repository_arg,
    refuse_whitespace,
)
from packager.serve.server_env import ServerEnv
from packager.serve.records import (
    HOST,
    STATE_FILE,
    ServerState,
    StateFileError,
    StopResult,
    cleanup_leftovers,
    forget_state,
    read_state,
    recorded_server,
    restrict_shm,
    serve_dir,
    stop_detached,
    terminate,
    write_state,
)

# The serve stage's public names; find_free_ports (server_args.py) too, where tests and benchmarks import it from.
__all__ = ["ADMIN_HEADER", "DEFAULT_PORTS", "SHM_DEFAULT_BYTES", "LocalTritonServer", "ServeOptions", "find_free_ports",
           "serve_local", "stop_local"]

# Admin API groups that answer only requests with the header ADMIN_HEADER = the server's admin_key.
RESTRICTED_APIS = "shared-memory,logging,trace"
ADMIN_HEADER = "triton-admin-key"
# Python-backend shm: one region per stub; start at 64 MiB so that a batch of 640x640 images fits without growth.
SHM_DEFAULT_BYTES = 64 * 1024 * 1024


class LocalTritonServer:
    """One embedded tritonserver process serving `repository` on 127.0.0.1."""

    def __init__(
        self,
        repository: Path,
        server_env: ServerEnv,
        *,
        grpc_port: int = DEFAULT_PORTS["grpc"],
        http_port: int = DEFAULT_PORTS["http"],
        metrics_port: int = DEFAULT_PORTS["metrics"],
        log_path: Path | None = None,
        log_verbose: int = 0,
        model_control_mode: str = "none",
        die_with_parent: bool = True,
        state_dir: Path | None = None,
    ):
        self.repository, self.repository_env = model_repository_arg(repository)
        self.server_env = server_env
        self.ports = {"grpc": int(grpc_port), "http": int(http_port), "metrics": int(metrics_port)}
        self.shm_prefix = f"yqpack{uuid.uuid4().hex[:10]}"
        self.admin_key = secrets.token_hex(16)  # per server: the admin APIs stay closed to other clients
        self.log_path = Path(log_path or serve_dir() / f"tritonserver-{grpc_port}.log").resolve()
        self.log_verbose = log_verbose
        if model_control_mode not in ("none", "explicit"):
            raise ServerError(f"model_control_mode must be 'none' or 'explicit', got {model_control_mode!r}")
        # explicit: every model still loads at start-up, and clients may then unload/load models.
        self.model_control_mode = model_control_mode
        self.die_with_parent = die_with_parent  # False for `serve --detach`: it must outlive the CLI
        self.state_dir = state_dir  # tags the process (procinfo.STATE_TAG) so a lost record can be recovered
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(HOST, http_port=self.ports["http"], grpc_port=self.ports["grpc"],
                         metrics_port=self.ports["metrics"])

    @property
    def grpc_url(self) -> str:
        return self.endpoints.grpc_url

    @property
    def http_url(self) -> str:
        return self.endpoints.http_url

    @property
    def metrics_url(self) -> str:
        return self.endpoints.metrics_url

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def state(self) -> ServerState:
        if self.process is None:
            raise ServerError("the server has not been started")
        return ServerState(
            pid=self.process.pid,
            grpc_port=self.ports["grpc"],
            http_port=self.ports["http"],
            metrics_port=self.ports["metrics"],
            repository=str(self.repository),
            shm_prefix=self.shm_prefix,
            log_path=str(self.log_path),
            started_at=self.started_at,
            start_ticks=procinfo.start_ticks(self.process.pid),
            detached=not self.die_with_parent,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        env = self.server_env
        return [
            str(env.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={env.backend_dir}",
            f"--cache-directory={env.tritonserver.parent.parent / 'caches'}",
            f"--http-address={HOST}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=20",
            f"--log-verbose={self.log_verbose}",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--model-control-mode={self.model_control_mode}",
            *(["--load-model=*"] if self.model_control_mode == "explicit" else []),
        ]

    def start(self) -> "LocalTritonServer":
        if self.process is not None:
            raise ServerError("this server is already started")
        if isinstance(self.repository, Path) and not self.repository.is_dir():
            raise MissingInputError(f"model repository not found: {self.repository} (run yqpack build first)")
        refuse_whitespace(self.repository, self.server_env.backend_dir)
        if len(set(self.ports.values())) != len(self.ports):
            raise ServerError(f"the gRPC, HTTP and metrics ports must differ, got {self.ports}")
        busy = busy_ports(self.ports)
        if busy:
            raise ServerError(
                f"{' and '.join(busy)} already in use on {HOST}: stop what listens there (yqpack stop?) "
                "or choose other ports with --grpc-port/--http-port/--metrics-port"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.server_env.process_env()
        if self.state_dir is not None:
            env[procinfo.STATE_TAG] = str(Path(self.state_dir).resolve())
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, **self.repository_env},
                start_new_session=True,  # Ctrl-C goes to yqpack, which then stops the server cleanly
                preexec_fn=procinfo.die_with_parent_hook() if self.die_with_parent else None,
            )
        self.started_at = time.time()
        return self

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 300.0, poll_interval: float = 0.5) -> None:
        """Block until this process reports every model ready; on death or timeout raise with the log tail.

        The one readiness poller (packager/serve/readiness.py) asks this server's HTTP port, and a 200 counts only while
        our own process is alive and holds the listening sockets (another server on the port could answer).
        """
        if self.process is None:
            raise ServerError("the server has not been started")
        try:
            wait_until_ready(self.endpoints, timeout, alive=self.is_alive, answered_by_us=self._owns_ports,
                             poll_s=poll_interval)
        except ServerGoneError:
            raise ServerError(
                f"tritonserver exited with code {self.process.poll()} before all models were ready; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            ) from None
        except NotReadyError:
            not_ready = self._models_not_ready()
            self.stop()
            raise ServerError(
                f"tritonserver was not ready after {timeout:.0f}s (models not ready: {not_ready or 'unknown'}); "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            ) from None
        restrict_shm(self.shm_prefix)

    def stop(self, timeout: float = 30.0) -> StopResult:
        """SIGTERM, then SIGKILL after `timeout`; then make sure no stub process or shm region is left."""
        if self.process is None:
            return StopResult(exit_code=None, killed=False)
        # Signal only a process not yet reaped: a reaped pid may already belong to someone else.
        killed = self.process.poll() is None and terminate(self.process.pid, timeout, waiter=self.process.wait)
        exit_code = self.process.returncode
        leftovers = cleanup_leftovers(self.shm_prefix)
        return StopResult(exit_code=exit_code, killed=killed, leftover_processes=leftovers[0], leftover_shm=leftovers[1])

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalTritonServer":
        if self.process is None:
            self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------------------
    def _owns_ports(self) -> bool:
        # Whoever answers on the port is not proof: our own process must hold the listening sockets.
        return self.is_alive() and all(procinfo.owns_listener(self.process.pid, p) for p in self.ports.values())

    def _models_not_ready(self) -> list[str]:
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                index = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return [f"{m.get('name')} ({m.get('state')}: {m.get('reason', '')})" for m in index if m.get("state") != "READY"]


# -- the `yqpack serve --local` / `yqpack stop` stages ------------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    repository: Path | str  # a folder, or s3://BUCKET/PREFIX (see model_repository_arg)
    grpc_port: int = DEFAULT_PORTS["grpc"]
    http_port: int = DEFAULT_PORTS["http"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    detach: bool = False
    ready_timeout: float = 300.0
    home: Path | None = None


def serve_local(options: ServeOptions, console=None) -> ServerState:
    """Start the embedded server; return once all models are ready (detach) or after it stops (foreground).

    Both are recorded for `yqpack stop` as soon as the process exists. Foreground: Ctrl-C or SIGTERM stops the
    server cleanly, and if this process is killed outright the server gets SIGTERM from the kernel.
    """
    from rich.console import Console

    from packager.serve.server_env import ensure_server_env

    console = console or Console(stderr=True)
    repository = model_repository_arg(options.repository)[0]
    if isinstance(repository, Path) and not repository.is_dir():
        raise MissingInputError(f"model repository not found: {repository} (run yqpack build, or pass --repository)")
    running = recorded_server(options.home, console)
    if running is not None:
        kind = "detached" if running.detached else "foreground"
        raise ServerError(
            f"a {kind} yqpack server already runs (pid {running.pid}, gRPC {running.grpc_url}); run `yqpack stop` first"
        )
    ports = {"grpc": options.grpc_port, "http": options.http_port, "metrics": options.metrics_port}
    busy = busy_ports(ports)
    if busy:  # before creating the env or starting anything
        raise ServerError(f"{' and '.join(busy)} already in use on {HOST}: choose other ports or stop what listens there")
    server = LocalTritonServer(
        repository,
        ensure_server_env(options.home, console=console),
        grpc_port=options.grpc_port,
        http_port=options.http_port,
        metrics_port=options.metrics_port,
        log_path=serve_dir(options.home) / f"tritonserver-{options.grpc_port}.log",
        die_with_parent=not options.detach,
        state_dir=serve_dir(options.home),
    )
    server.start()
    state = server.state()
    write_state(state, options.home)
    try:
        with console.status(f"Loading models from {repository} (log: {server.log_path})"):
            server.wait_ready(timeout=options.ready_timeout)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C while loading: the same clean stop as once serving
            console.print("stopping tritonserver ...")
        server.stop()
        forget_state(options.home, state)
        raise
    console.print(
        f"[green]tritonserver ready[/] (pid {state.pid}): gRPC {state.grpc_url}, HTTP {state.http_url}, "
        f"metrics {server.metrics_url}; log {server.log_path}"
    )
    if options.detach:
        console.print(f"detached; stop it with `yqpack stop` (state in {serve_dir(options.home) / STATE_FILE})")
        return state
    try:
        _serve_foreground(server, console, options.home)
    finally:
        forget_state(options.home, state)
    return state


def _serve_foreground(server: LocalTritonServer, console, home: Path | None) -> None:
    # Explicit handlers: a shell may start us with SIGINT ignored (background job), and SIGTERM must stop too.
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print("serving; press Ctrl-C to stop")
        server.process.wait()
        if _stopped_by_stop_command(server, home):
            console.print("tritonserver was stopped by `yqpack stop`")
            return
        raise ServerError(
            f"tritonserver exited on its own (code {server.process.returncode}); last lines of {server.log_path}:\n"
            f"{server.log_tail()}"
        )
    except KeyboardInterrupt:
        console.print("stopping tritonserver ...")
    finally:
        result = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _report_stop(result, console)


def _stopped_by_stop_command(server: LocalTritonServer, home: Path | None) -> bool:
    try:
        state = read_state(home)
    except StateFileError:
        return False
    return state is None or state.pid != server.pid  # `yqpack stop` removes the record after stopping


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_local(home: Path | None = None, timeout: float = 30.0, console=None) -> StopResult | None:
    """End the recorded server (detached or foreground); None (and a message) when none runs."""
    from rich.console import Console

    console = console or Console(stderr=True)
    stopped = stop_detached(home, timeout, console)
    if stopped is None:
        console.print(f"no yqpack server is running (records in {serve_dir(home)})")
        return None
    state, result = stopped
    console.print(f"stopped tritonserver pid {state.pid} (gRPC {state.grpc_url})")
    _report_stop(result, console)
    return result


def _report_stop(result: StopResult, console) -> None:
    if result.killed:
        console.print("[yellow]tritonserver ignored SIGTERM and was killed[/]")
    if result.leftover_processes or result.leftover_shm:
        console.print(
            f"[yellow]cleaned up after it: stub processes {result.leftover_processes}, shm {result.leftover_shm}[/]"
        )
