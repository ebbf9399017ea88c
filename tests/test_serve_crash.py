"""Issue 12: server state survives crashes - real tritonserver processes killed, records truncated, pids recycled."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from packager.serve import procinfo
from packager.core.contracts import YqpackError
from packager.serve.embedded import LocalTritonServer, find_free_ports, stop_local
from packager.serve.records import ServerState, read_state, serve_dir, shm_regions, stub_processes, write_state

REPO = Path(__file__).resolve().parent.parent


def _yqpack(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _env(tmp_path: Path, server_env, *, home: bool) -> tuple[dict, Path]:
    """(environment, working folder): with a private YQPACK_HOME, or without one (per-user state folder)."""
    work = tmp_path / "work"
    (work / ".yqpack").mkdir(parents=True)
    (work / ".yqpack" / "server-env").symlink_to(server_env.root)  # reuse the session's server env
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("YQPACK_HOME", None)
    if home:
        env["YQPACK_HOME"] = str(work / ".yqpack")
    return env, work


def _serve_args(repository: Path) -> list[str]:
    grpc, http, metrics = find_free_ports(3)
    return ["serve", "--repository", str(repository), "--grpc-port", str(grpc), "--http-port", str(http),
            "--metrics-port", str(metrics)]


def _wait_gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procinfo.is_alive(pid):
            return True
        time.sleep(0.2)
    return False


def _tritonserver_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [p for p in pids if procinfo.argv(p)[0].endswith("tritonserver")]


@pytest.mark.slow
def test_truncated_record_is_recovered_and_stop_works_from_another_folder(model_repository, server_env, tmp_path):
    env, work = _env(tmp_path, server_env, home=False)
    started = _yqpack(*_serve_args(model_repository.path), "--detach", env=env, cwd=work)
    assert started.returncode == 0, started.stderr
    record = tmp_path / "state" / "yqpack" / "serve" / "server.json"  # per-user, not under the working folder
    state = ServerState(**__import__("json").loads(record.read_text()))
    try:
        assert state.start_ticks == procinfo.start_ticks(state.pid) and state.detached
        record.write_text(record.read_text()[:40])  # truncated mid-write
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        stopped = _yqpack("stop", env=env, cwd=elsewhere, timeout=120)
    finally:
        if procinfo.is_alive(state.pid):
            os.kill(state.pid, signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr
    assert "is unreadable" in stopped.stderr and f"stopped tritonserver pid {state.pid}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert _wait_gone(state.pid, 10)
    assert stub_processes(state.shm_prefix) == [] and shm_regions(state.shm_prefix) == []
    again = _yqpack("stop", env=env, cwd=elsewhere, timeout=60)
    assert again.returncode == 1 and "no yqpack server is running" in again.stderr


@pytest.mark.slow
def test_kill_9_of_the_server_leaves_nothing_after_the_next_command(model_repository, server_env, tmp_path):
    env, work = _env(tmp_path, server_env, home=True)
    started = _yqpack(*_serve_args(model_repository.path), "--detach", env=env, cwd=work)
    assert started.returncode == 0, started.stderr
    state = read_state(Path(env["YQPACK_HOME"]))
    stubs = stub_processes(state.shm_prefix)
    try:
        assert len(stubs) >= 5 and shm_regions(state.shm_prefix)
        modes = {oct(os.stat(f"/dev/shm/{name}").st_mode & 0o777) for name in shm_regions(state.shm_prefix)}
        assert modes == {"0o600"}, f"shm regions must be owner-only, got {modes}"
    finally:
        os.kill(state.pid, signal.SIGKILL)
    assert _wait_gone(state.pid, 10)
    stopped = _yqpack("stop", env=env, cwd=work, timeout=60)
    assert stopped.returncode == 1, stopped.stderr  # nothing was running to stop ...
    assert f"tritonserver pid {state.pid}, which is no longer running" in stopped.stderr  # ... but it cleaned up
    assert all(_wait_gone(stub, 10) for stub in stubs)
    assert stub_processes(state.shm_prefix) == [] and shm_regions(state.shm_prefix) == []
    assert read_state(Path(env["YQPACK_HOME"])) is None


@pytest.mark.slow
def test_kill_9_of_a_foreground_serve_takes_the_server_with_it(model_repository, server_env, tmp_path):
    env, work = _env(tmp_path, server_env, home=True)
    process = subprocess.Popen([sys.executable, "-m", "packager.cli.main", *_serve_args(model_repository.path)],
                               env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline and process.poll() is None:
            state = read_state(Path(env["YQPACK_HOME"]))  # foreground servers are recorded too
            if state is not None and len(stub_processes(state.shm_prefix)) >= 5:
                break
            time.sleep(0.5)
        assert state is not None and not state.detached
        assert _tritonserver_children(process.pid) == [state.pid]
        process.kill()
        process.wait(timeout=30)
        assert _wait_gone(state.pid, 60), "tritonserver outlived the yqpack serve that started it"
    finally:
        if process.poll() is None:
            process.kill()
    stopped = _yqpack("stop", env=env, cwd=work, timeout=60)
    assert stopped.returncode == 1 and "no longer running" in stopped.stderr
    assert stub_processes(state.shm_prefix) == [] and shm_regions(state.shm_prefix) == []


def test_a_recycled_pid_is_never_signalled(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ticks = procinfo.start_ticks(sleeper.pid)
        # a record pointing at a live process that is not the recorded server (other start time, other name)
        state = ServerState(pid=sleeper.pid, grpc_port=1, http_port=2, metrics_port=3, repository="/x",
                            shm_prefix="yqpacknonexistent", log_path="", started_at=0.0, start_ticks=ticks + 1)
        write_state(state, tmp_path)
        assert stop_local(home=tmp_path, timeout=1) is None
        assert sleeper.poll() is None and read_state(tmp_path) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_wrong_schema_record_is_a_plain_message(tmp_path):
    path = serve_dir(tmp_path) / "server.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"pid": 1, "port": 8001}')
    assert stop_local(home=tmp_path, timeout=1) is None
    assert not path.exists() and list(path.parent.glob("server.json.unreadable-*"))


def test_readiness_needs_the_listening_socket_in_our_own_process():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert procinfo.owns_listener(os.getpid(), port)
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            assert not procinfo.owns_listener(sleeper.pid, port)
        finally:
            sleeper.kill()
            sleeper.wait()
    assert not procinfo.owns_listener(os.getpid(), port)


def test_repository_path_with_a_space_is_refused_at_once(model_repository, server_env, tmp_path):
    spaced = tmp_path / "my models"
    shutil.copytree(model_repository.path / "yolov8n_preprocess", spaced / "yolov8n_preprocess")
    server = LocalTritonServer(spaced, server_env, log_path=tmp_path / "log", **dict(
        zip(("grpc_port", "http_port", "metrics_port"), find_free_ports(3))))
    started = time.monotonic()
    with pytest.raises(YqpackError, match="path with whitespace: .*my models"):
        server.start()
    assert server.process is None and time.monotonic() - started < 5
