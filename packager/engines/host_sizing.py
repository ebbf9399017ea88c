"""Instance counts of the Python steps of a GPU repository, from the cores of the host that serves it.

Run by the engines step (deploy/build_engines.py -> builder.main), which runs on the serving host, in the serving
image, next to the repository it may still write: render cannot know that host. Standard library only.

Each Python model that render left to the host carries the config parameter `yqpack_host_sized` with its kind:
- `decode`: the Python preprocess (JPEG decode + letterbox on the CPU, 4-5 ms per image): every core but two;
- `nms`: the Python postprocess with box decode + NMS (1.5-2.3 ms per image): a quarter of the cores;
- `light`: the gate of the DALI preprocess and the postprocess after an in-graph NMS (well under 0.5 ms per
  image, benchmarks/gpu_prepost_bench.py): one instance per 8 cores, 1 to 4.
Cores = the CPUs this process may run on (sched_getaffinity: a container's cpuset), or $YQPACK_HOST_CORES.
Counts given at render time (`preprocess_instances` / `postprocess_instances`) carry no such parameter and stay.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOST_CORES_ENV = "YQPACK_HOST_CORES"
SIZED_PARAMETER = "yqpack_host_sized"
_PARAMETER = re.compile(r'key:\s*"' + SIZED_PARAMETER + r'"\s+value:\s*\{\s*string_value:\s*"(\w+)"')
_INSTANCE_COUNT = re.compile(r"(instance_group\s*\[\s*\{\s*count:\s*)(\d+)(\s+kind:\s*KIND_CPU)")


def host_cores() -> int:
    override = os.environ.get(HOST_CORES_ENV, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{HOST_CORES_ENV} must be a positive integer, got {override!r}")
        return int(override)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def instances_for(kind: str, cores: int) -> int:
    """How many instances a step of this kind gets on a host with `cores` cores (the table above)."""
    if kind == "decode":
        return max(1, cores - 2)
    if kind == "nms":
        return max(1, cores // 4)
    if kind == "light":
        return min(4, max(1, cores // 8))
    raise ValueError(f"unknown {SIZED_PARAMETER} kind {kind!r}: expected decode, nms or light")


def size_python_steps(repository: Path, cores: int | None = None) -> dict[str, int]:
    """Rewrite the instance count of every host-sized model's config.pbtxt; returns model -> count."""
    cores = host_cores() if cores is None else int(cores)
    sized = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        text = config.read_text()
        match = _PARAMETER.search(text)
        if match is None:
            continue
        count = instances_for(match.group(1), cores)
        updated, replaced = _INSTANCE_COUNT.subn(lambda m: f"{m.group(1)}{count}{m.group(3)}", text, count=1)
        if replaced != 1:
            raise ValueError(f"{config}: no `instance_group [ {{ count: N kind: KIND_CPU }} ]` line to size")
        if updated != text:
            staging = config.with_name(config.name + ".sizing")
            staging.write_text(updated)
            os.replace(staging, config)
        sized[config.parent.name] = count
    return sized
