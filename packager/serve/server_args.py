"""tritonserver's arguments that are settled before the process starts: its ports on 127.0.0.1 (free ones for
tests and parallel servers, a busy one refused up front) and its model repository (a local folder without
whitespace, or an S3 URL in Triton's form with the environment that carries its credentials)."""

from __future__ import annotations

import socket
from pathlib import Path

from packager.core.contracts import ServerError
from packager.serve.records import HOST

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


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


def busy_ports(ports: dict[str, int]) -> list[str]:
    """The ports something already listens on, named for a message ("grpc port 8001")."""
    return [f"{kind} port {port}" for kind, port in ports.items() if port_in_use(port)]


def model_repository_arg(repository: str | Path) -> tuple[Path | str, dict[str, str]]:
    """tritonserver's --model-repository value and extra environment: a local folder, or an S3 URL in Triton's form.

    s3://BUCKET/PREFIX (endpoint from AWS_ENDPOINT_URL) or s3://HOST:PORT/BUCKET/PREFIX; credentials reach the
    server through the environment it inherits (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    """
    if str(repository).startswith("s3://"):
        from packager.serve.s3_push import triton_s3_repository

        return triton_s3_repository(str(repository))
    return Path(repository).resolve(), {}


def refuse_whitespace(*paths: Path | str) -> None:
    """The Python backend hands model paths to its stubs unquoted: a space makes every stub crash. (An s3://
    repository is downloaded by Triton to a temporary folder of its own.)"""
    for path in (p for p in paths if isinstance(p, Path)):
        names = [path, *(child for child in Path(path).iterdir() if child.is_dir())]
        spaced = [str(name) for name in names if any(c.isspace() for c in str(name))]
        if spaced:
            raise ServerError(f"path with whitespace: {spaced[0]!r}; the Python backend cannot start models from "
                              "it. Move or rename it to a path without spaces (a symlink resolves back to it).")
