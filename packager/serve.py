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
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packager import procinfo
from packager.assets import yqpack_home
from packager.contracts import ServerError, YqpackError
from packager.server_env import ServerEnv

HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
STATE_FILE = "server.json"
# Admin API groups that answer only requests with the header ADMIN_HEADER = the server's admin_key.
RESTRICTED_APIS = "shared-memory,logging,trace"
ADMIN_HEADER = "triton-admin-key"
# Python-backend shm: one region per stub; start at 64 MiB so that a batch of 640x640 images fits without growth.
SHM_DEFAULT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerState:
    """What `yqpack stop` (or another process) needs to find and end a server."""

    pid: int
    grpc_port: int
    http_port: int
    metrics_port: int
    repository: str
    shm_prefix: str
    log_path: str
    started_at: float
    start_ticks: int | None = None  # /proc start time: a recycled pid has another
    detached: bool = True

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


@dataclass(frozen=True)
class StopResult:
    exit_code: int | None
    killed: bool  # SIGTERM was not enough
    leftover_processes: list[int] = field(default_factory=list)  # stubs that had to be killed
    leftover_shm: list[str] = field(default_factory=list)  # regions that had to be removed


class StateFileError(YqpackError):
    """The server record exists but cannot be read (truncated, edited, another version's schema)."""


def serve_dir(home: Path | None = None) -> Path:
    """Where server records and logs live: home/serve, $YQPACK_HOME/serve, else a per-user state folder
    ($XDG_STATE_HOME/yqpack/serve): never tied to the current directory."""
    if home is None and not os.environ.get("YQPACK_HOME"):
        state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(state_home) / "yqpack" / "serve"
    return Path(home or yqpack_home()) / "serve"


def model_repository_arg(repository: str | Path) -> tuple[Path | str, dict[str, str]]:
    """tritonserver's --model-repository value and extra environment: a local folder, or an S3 URL in Triton's form.

    s3://BUCKET/PREFIX (endpoint from AWS_ENDPOINT_URL) or s3://HOST:PORT/BUCKET/PREFIX; credentials reach the
    server through the environment it inherits (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    """
    if str(repository).startswith("s3://"):
        from packager.push import triton_s3_repository

        return triton_s3_repository(str(repository))
    return Path(repository).resolve(), {}


def find_free_ports(count: int = 3) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 right now (for tests and parallel servers)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as servers use it: TIME_WAIT leftovers are fine, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


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
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"

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
            raise FileNotFoundError(f"model repository not found: {self.repository} (run yqpack build first)")
        _refuse_whitespace(self.repository, self.server_env.backend_dir)
        if len(set(self.ports.values())) != len(self.ports):
            raise ServerError(f"the gRPC, HTTP and metrics ports must differ, got {self.ports}")
        busy = [f"{kind} port {port}" for kind, port in self.ports.items() if port_in_use(port)]
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

        Readiness is asked over this server's HTTP port, but a process that died is never taken as ready
        (another server on the same port could answer for it).
        """
        if self.process is None:
            raise ServerError("the server has not been started")
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} before all models were ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self._http_ok("/v2/health/ready") and self._owns_ports():
                restrict_shm(self.shm_prefix)
                return
            if time.monotonic() > deadline:
                not_ready = self._models_not_ready()
                self.stop()
                raise ServerError(
                    f"tritonserver was not ready after {timeout:.0f}s (models not ready: {not_ready or 'unknown'}); "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(poll_interval)

    def stop(self, timeout: float = 30.0) -> StopResult:
        """SIGTERM, then SIGKILL after `timeout`; then make sure no stub process or shm region is left."""
        if self.process is None:
            return StopResult(exit_code=None, killed=False)
        # Signal only a process not yet reaped: a reaped pid may already belong to someone else.
        killed = self.process.poll() is None and _terminate(self.process.pid, timeout, waiter=self.process.wait)
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

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _models_not_ready(self) -> list[str]:
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                index = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return [f"{m.get('name')} ({m.get('state')}: {m.get('reason', '')})" for m in index if m.get("state") != "READY"]


# -- server records ---------------------------------------------------------------------------------------------
def write_state(state: ServerState, home: Path | None = None) -> Path:
    path = serve_dir(home) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(asdict(state), indent=2) + "\n")
    partial.replace(path)  # atomic: a reader never sees half a record
    return path


def read_state(home: Path | None = None) -> ServerState | None:
    """The recorded server, None without a record; StateFileError when the record is unreadable."""
    path = serve_dir(home) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return ServerState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:  # truncated JSON, or keys of another schema
        raise StateFileError(f"the server record {path} is unreadable ({error})") from None


def _forget_state(home: Path | None, state: ServerState | None = None) -> None:
    """Remove the record (only if it is still `state`'s: a newer server may have replaced it)."""
    path = serve_dir(home) / STATE_FILE
    try:
        if state is None or read_state(home) == state:
            path.unlink(missing_ok=True)
    except StateFileError:
        path.unlink(missing_ok=True)


def recorded_server(home: Path | None = None, console=None) -> ServerState | None:
    """The recorded server if it still runs. A dead server's record is removed after killing its stubs and
    removing its shm regions; an unreadable record is moved aside and the servers tagged with this state
    folder are found from their own environment (never lost, never left running)."""
    try:
        state = read_state(home)
    except StateFileError as error:
        return _recover(home, error, console)
    if state is None or _is_our_tritonserver(state.pid, state.start_ticks):
        return state
    processes, shm = cleanup_leftovers(state.shm_prefix)
    _forget_state(home, state)
    _say(console, f"removed the record of tritonserver pid {state.pid}, which is no longer running"
                  + (f"; killed its stubs {processes}, removed its shm {shm}" if processes or shm else ""))
    return None


def _recover(home: Path | None, error: StateFileError, console) -> ServerState | None:
    path = serve_dir(home) / STATE_FILE
    aside = path.with_name(f"{STATE_FILE}.unreadable-{int(time.time())}")
    path.replace(aside)
    tagged = [pid for pid in procinfo.tagged_processes(procinfo.STATE_TAG, str(serve_dir(home).resolve()))
              if procinfo.argv(pid)[0].endswith("tritonserver")]
    _say(console, f"[yellow]{error}; moved it to {aside.name}[/]"
                  + (f"; found tritonserver pid {tagged[0]} of this state folder" if tagged else ""))
    return _state_from_process(tagged[0]) if tagged else None


def _state_from_process(pid: int) -> ServerState:
    """Rebuild a record from the server's own command line (ports, repository, shm prefix)."""
    arguments = procinfo.argv(pid)
    options = dict(arg[2:].split("=", 1) for arg in arguments if arg.startswith("--") and "=" in arg)
    prefix = next((a.split("shm-region-prefix-name=", 1)[1] for a in arguments if "shm-region-prefix-name=" in a), "")
    return ServerState(pid=pid, grpc_port=int(options.get("grpc-port", 0)), http_port=int(options.get("http-port", 0)),
                       metrics_port=int(options.get("metrics-port", 0)), repository=options.get("model-repository", ""),
                       shm_prefix=prefix, log_path="", started_at=0.0, start_ticks=procinfo.start_ticks(pid))


def running_detached(home: Path | None = None) -> ServerState | None:
    """Kept for callers of the previous name: the recorded server if it still runs."""
    return recorded_server(home)


def stop_detached(home: Path | None = None, timeout: float = 30.0,
                  console=None) -> tuple[ServerState, StopResult] | None:
    """Stop the recorded server (detached or foreground); None when no recorded server runs."""
    state = recorded_server(home, console)
    if state is None:
        return None
    _forget_state(home, state)  # first: a foreground `yqpack serve` then knows the stop was asked for
    killed = _terminate(state.pid, timeout, waiter=None, start_ticks=state.start_ticks)
    processes, shm = cleanup_leftovers(state.shm_prefix)
    return state, StopResult(exit_code=None, killed=killed, leftover_processes=processes, leftover_shm=shm)


def stub_processes(shm_prefix: str) -> list[int]:
    """Python-backend stub processes of one server: the stub binary, with its unique shm prefix in argv."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        arguments = procinfo.argv(int(entry.name))
        if arguments[0].endswith("triton_python_backend_stub") and any(a.startswith(shm_prefix) for a in arguments):
            pids.append(int(entry.name))
    return pids


def shm_regions(shm_prefix: str) -> list[str]:
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.iterdir() if p.name.startswith(shm_prefix)) if shm.is_dir() else []


def restrict_shm(shm_prefix: str) -> None:
    """Owner-only shm regions: the Python backend creates them 0644 whatever the umask (it fchmods), so any
    local user could read the tensors; the stubs hold them open, so the change applies to the live regions."""
    for name in shm_regions(shm_prefix):
        try:
            os.chmod(Path("/dev/shm") / name, 0o600)
        except OSError:  # removed meanwhile
            pass


def cleanup_leftovers(shm_prefix: str) -> tuple[list[int], list[str]]:
    """Kill stub processes and remove shm regions a server left behind; return what was found."""
    processes = stub_processes(shm_prefix)
    for pid in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    regions = shm_regions(shm_prefix)
    for name in regions:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    return processes, regions


def _is_our_tritonserver(pid: int, start_ticks: int | None = None) -> bool:
    """True if pid is a live tritonserver and, when known, the one started then (a recycled pid never is)."""
    if not procinfo.is_alive(pid) or not procinfo.argv(pid)[0].endswith("tritonserver"):
        return False
    return start_ticks is None or procinfo.start_ticks(pid) == start_ticks


def _refuse_whitespace(*paths: Path) -> None:
    """The Python backend hands model paths to its stubs unquoted: a space makes every stub crash."""
    for path in paths:
        names = [path, *(child for child in Path(path).iterdir() if child.is_dir())]
        spaced = [str(name) for name in names if any(c.isspace() for c in str(name))]
        if spaced:
            raise ServerError(f"path with whitespace: {spaced[0]!r}; the Python backend cannot start models from "
                              "it. Move or rename it to a path without spaces (a symlink resolves back to it).")


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)


def _terminate(pid: int, timeout: float, waiter, start_ticks: int | None = None) -> bool:
    """SIGTERM then SIGKILL; returns True when SIGKILL was needed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_gone(pid, timeout, waiter, start_ticks):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    _wait_gone(pid, 10, waiter, start_ticks)
    return True


def _wait_gone(pid: int, timeout: float, waiter, start_ticks: int | None = None) -> bool:
    if waiter is not None:  # our own child: reap it
        try:
            waiter(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_tritonserver(pid, start_ticks):
            return True
        time.sleep(0.2)
    return False


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

    from packager.server_env import ensure_server_env

    console = console or Console(stderr=True)
    repository = model_repository_arg(options.repository)[0]
    if isinstance(repository, Path) and not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository} (run yqpack build, or pass --repository)")
    running = recorded_server(options.home, console)
    if running is not None:
        kind = "detached" if running.detached else "foreground"
        raise ServerError(
            f"a {kind} yqpack server already runs (pid {running.pid}, gRPC {running.grpc_url}); run `yqpack stop` first"
        )
    ports = {"grpc": options.grpc_port, "http": options.http_port, "metrics": options.metrics_port}
    busy = [f"{kind} port {port}" for kind, port in ports.items() if port_in_use(port)]
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
        _forget_state(options.home, state)
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
        _forget_state(options.home, state)
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
