"""Who a process is, from /proc (Linux): enough to never signal a stranger or trust a stranger's port.

A pid alone can be recycled, a name alone can be shared, a port can be answered by whoever bound it first:
a server is identified by pid + start time, and it is ready only when *its* process holds the listening socket.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Environment variable tagging the tritonserver processes of one yqpack state folder, so a lost or broken
# record can be recovered by looking at the processes themselves.
STATE_TAG = "YQPACK_SERVER_STATE_DIR"


def start_ticks(pid: int) -> int | None:
    """The process start time (clock ticks after boot, /proc/<pid>/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name start at field 3


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def argv(pid: int) -> list[str]:
    """The command line; [""] for a process that is gone (or a kernel thread), so argv(pid)[0] always works."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return [""]


def environ_value(pid: int, name: str) -> str | None:
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    return next((item[len(prefix):].decode() for item in items if item.startswith(prefix)), None)


def tagged_processes(name: str, value: str) -> list[int]:
    """Live processes of this user whose environment has name=value."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and environ_value(int(entry.name), name) == value and is_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def owns_listener(pid: int, port: int) -> bool:
    """True when `pid` holds a listening TCP socket on `port` (not merely: something answers there)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            link = os.readlink(descriptor)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            return True
    return False


def _listening_inodes(port: int) -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(int(fields[9]))
    return inodes


def die_with_parent_hook(sig: int = signal.SIGTERM):
    """A Popen preexec_fn: the child gets `sig` when the process that started it dies (even by SIGKILL).

    The kernel ties the death signal to the parent *thread*: start servers from a thread that lives as long.
    """
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to import in the child

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return hook
