"""The server environment: a venv of yqpack's own holding tritonserver (from the nvidia-pytriton wheel).

The build tools need numpy 2 (ModelOpt) while the Python backend stub of tritonserver 2.51 silently corrupts
tensors under numpy 2, so the served Python models run in a separate venv with numpy<2. It lives under
$YQPACK_HOME/server-env, is created on first use and reused when its marker file lists the same requirements.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from packager.core.paths import yqpack_home
from packager.core.contracts import ServerError

# Pinned so that served numerics equal the build env's in-process onnxruntime (1.24.4) and numpy 1.x.
SERVER_REQUIREMENTS = (
    "nvidia-pytriton==0.7.0",
    "numpy==1.26.4",
    "opencv-python-headless==4.11.0.86",
    "onnxruntime==1.24.4",
    # The local detector's integer runtime (runtime=openvino); 2026.4 supports numpy>=1.16.6,<2.6, so 1.26.4 holds.
    "openvino==2026.4.1",
)
# glibc hands every freed multi-MB buffer (a 4.9 MB letterboxed image, a 2.7 MB head output) back to the OS and
# page-faults it in again on the next request: the served preprocess took 14 ms per image instead of 5.5.
# Buffers below 64 MiB stay in the heap instead, for the server and, inherited, every Python backend stub.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
MARKER_NAME = "yqpack-server-env.json"
INSTALL_LOG_NAME = "install.log"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class ServerEnv:
    """A ready server env: where tritonserver is and what its process environment must contain."""

    root: Path
    python: Path
    tritonserver: Path
    backend_dir: Path  # holds python/ with symlinks into the wheel (a copied stub would lose its RPATH)
    lib_dir: Path  # the interpreter's libpython, needed by the stub
    requirements: tuple[str, ...]

    def process_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for tritonserver: the stub finds the venv through `python3` on PATH, not PYTHONPATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH")) if p)
        env["VIRTUAL_ENV"] = str(self.root)
        for name in ("PYTHONPATH", "PYTHONHOME"):  # the build env's paths must not leak into the stub
            env.pop(name, None)
        for name, value in MALLOC_ENV.items():  # a user's own setting wins
            env.setdefault(name, value)
        return env


def default_server_env_dir(home: Path | None = None) -> Path:
    return Path(home or yqpack_home()) / "server-env"


def ensure_server_env(
    home: Path | None = None,
    *,
    root: Path | None = None,
    requirements: tuple[str, ...] = SERVER_REQUIREMENTS,
    console: Console | None = None,
) -> ServerEnv:
    """Return the server env, creating it (venv + pinned pip install) when missing or incomplete.

    `root` overrides the location ($YQPACK_HOME/server-env by default). Install output goes to
    `<root>/install.log`; a failure raises ServerError with the log's tail.
    """
    root = Path(root or default_server_env_dir(home)).resolve()
    console = console or Console(stderr=True)
    marker = root / MARKER_NAME
    if _marker_matches(marker, requirements):
        env = _locate(root, requirements)
        if env is not None:
            return env
        console.print(f"[yellow]server env at {root} is incomplete; re-creating it[/]")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log_path = root / INSTALL_LOG_NAME
    with console.status(f"Creating the Triton server env in {root} (log: {log_path})") as status:
        _run_logged([sys.executable, "-m", "venv", str(root)], log_path, status, "creating venv")
        python = root / "bin" / "python"
        _run_logged(
            [str(python), "-m", "pip", "install", "--progress-bar", "off", *requirements],
            log_path,
            status,
            "pip install " + " ".join(requirements),
        )
    env = _locate(root, requirements)
    if env is None:
        raise ServerError(f"the server env at {root} has no tritonserver after installing; see {log_path}")
    marker.write_text(json.dumps({"requirements": list(requirements), "python": _python_tag(python)}, indent=2))
    console.print(f"[green]server env ready[/] at {root}")
    return env


def _marker_matches(marker: Path, requirements: tuple[str, ...]) -> bool:
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("requirements") == list(requirements)


def _python_tag(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _locate(root: Path, requirements: tuple[str, ...]) -> ServerEnv | None:
    """Find tritonserver inside the venv and (re)build the backend folder of symlinks; None if incomplete."""
    python = root / "bin" / "python"
    if not python.exists():
        return None
    try:
        tag = _python_tag(python)
    except (OSError, subprocess.CalledProcessError):
        return None
    wheel = root / "lib" / f"python{tag}" / "site-packages" / "pytriton" / "tritonserver"
    tritonserver = wheel / "bin" / "tritonserver"
    stub = wheel / "python_backend_stubs" / tag / "triton_python_backend_stub"
    sources = [wheel / "backends" / "python" / name for name in _BACKEND_FILES] + [stub]
    if not tritonserver.is_file() or not all(path.is_file() for path in sources):
        return None
    backend_python = root / "yqpack-backends" / "python"
    backend_python.mkdir(parents=True, exist_ok=True)
    for source in sources:
        link = backend_python / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    lib_dir = Path(sysconfig.get_config_var("LIBDIR") or Path(sys.base_prefix) / "lib")
    # The venv shares the build env's base interpreter, so its LIBDIR is ours; ask it anyway when it differs.
    if _python_tag(python) != f"{sys.version_info[0]}.{sys.version_info[1]}":
        lib_dir = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    return ServerEnv(
        root=root,
        python=python,
        tritonserver=tritonserver,
        backend_dir=backend_python.parent,
        lib_dir=lib_dir,
        requirements=tuple(requirements),
    )


def _run_logged(command: list[str], log_path: Path, status, label: str) -> None:
    """Run a command appending to the log, showing its latest line in the status spinner."""
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip())
            status.update(f"{label}: {line.strip()[:100]}")
        code = process.wait()
    if code != 0:
        raise ServerError(
            f"{label} failed (exit {code}); last lines of {log_path}:\n" + "\n".join(tail)
        )
