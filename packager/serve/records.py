"""Records of the servers `yqpack serve` started, so that `yqpack stop` (from any folder) and a later `serve` can
find, identify and end them, and clean up after one that died (stub processes, /dev/shm regions).

A record is `serve_dir()/server.json`; a process is identified by its pid *and* its /proc start time, so a recycled
pid is never signalled. A record that cannot be read is moved aside and the server found again by its
environment tag (procinfo.STATE_TAG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packager.serve import procinfo
from packager.core.paths import yqpack_home
from packager.core.contracts import Endpoints, StateFileError

HOST = "127.0.0.1"
STATE_FILE = "server.json"


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
    def endpoints(self) -> Endpoints:
        return Endpoints(HOST, http_port=self.http_port, grpc_port=self.grpc_port, metrics_port=self.metrics_port)

    @property
    def grpc_url(self) -> str:
        return self.endpoints.grpc_url

    @property
    def http_url(self) -> str:
        return self.endpoints.http_url


@dataclass(frozen=True)
class StopResult:
    exit_code: int | None
    killed: bool  # SIGTERM was not enough
    leftover_processes: list[int] = field(default_factory=list)  # stubs that had to be killed
    leftover_shm: list[str] = field(default_factory=list)  # regions that had to be removed


def serve_dir(home: Path | None = None) -> Path:
    """Where server records and logs live: home/serve, $YQPACK_HOME/serve, else a per-user state folder
    ($XDG_STATE_HOME/yqpack/serve): never tied to the current directory."""
    if home is None and not os.environ.get("YQPACK_HOME"):
        state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(state_home) / "yqpack" / "serve"
    return Path(home or yqpack_home()) / "serve"


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


def forget_state(home: Path | None, state: ServerState | None = None) -> None:
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
    forget_state(home, state)
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
    forget_state(home, state)  # first: a foreground `yqpack serve` then knows the stop was asked for
    killed = terminate(state.pid, timeout, waiter=None, start_ticks=state.start_ticks)
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


def cleanup_leftovers(shm_prefix: str, settle_s: float = 0.3) -> tuple[list[int], list[str]]:
    """Kill stub processes and remove shm regions a server left behind; return what was found.

    A child the server forked just before it died shows up as a stub only once it has exec'd: scan once more
    after `settle_s`, and again while scans still find some (bounded: 10 rounds)."""
    processes: list[int] = []
    for round_ in range(10):
        found = [pid for pid in stub_processes(shm_prefix) if pid not in processes]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        processes += found
        if not found and round_ > 0:
            break
        time.sleep(settle_s)
    regions = shm_regions(shm_prefix)
    for name in regions:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    return processes, regions


def _is_our_tritonserver(pid: int, start_ticks: int | None = None) -> bool:
    """True if pid is a live tritonserver and, when known, the one started then (a recycled pid never is)."""
    if not procinfo.is_alive(pid) or not procinfo.argv(pid)[0].endswith("tritonserver"):
        return False
    return start_ticks is None or procinfo.start_ticks(pid) == start_ticks


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)


def terminate(pid: int, timeout: float, waiter, start_ticks: int | None = None) -> bool:
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
