"""Files everything else stands on: a file's sha256, and folders replaced in one step.

A finished directory (a build, a model repository, rendered manifests) replaces the previous one in one step.

Everything yqpack writes as a folder is built in a hidden sibling and then swapped in, so a failure leaves the
previous folder intact. Two renames (old away, new in) leave a moment in which the path does not exist, and a
tritonserver polling its repository or a `yqpack verify` reading it could fail there. Linux's
renameat2(RENAME_EXCHANGE) swaps both paths atomically: readers see the old folder or the new one, never nothing.
Where the call or the filesystem lacks it (non-Linux, old kernels, some network filesystems), the two renames remain.
Stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The call or the flag is missing, or this filesystem cannot exchange: fall back to two renames.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths (renameat2 RENAME_EXCHANGE); False where this system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux/glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_directory(staging: Path, target: Path, atomic: bool = True) -> None:
    """Put the finished `staging` folder at `target` (a sibling); a previous `target` is removed once replaced.

    `atomic=False` forces the two-rename fallback (what systems without RENAME_EXCHANGE get)."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        staging.rename(target)
        return
    if atomic and exchange_paths(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # after the exchange it holds the previous content
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
