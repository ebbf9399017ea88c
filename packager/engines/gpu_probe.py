"""Which GPU will run the plans: name and compute capability, for the engine cache key (standard library only).

Runs inside the tritonserver image (the compose `engines` service), so it must not import anything outside the
standard library. Sources, first that answers wins:
1. $YQPACK_GPU_COMPUTE_CAPABILITY (+ $YQPACK_GPU_NAME): the documented override.
2. `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` (the `compute_cap` field needs driver >= R510).
3. The CUDA driver API through ctypes: cuDeviceGetAttribute(75/76) and cuDeviceGetName on libcuda.so.1, which
   the NVIDIA Container Toolkit mounts into every GPU container, whatever the driver branch.
4. `nvidia-smi -q` text: the product name always; the compute capability only from "Product Architecture"
   (printed by newer drivers) where that architecture has a single one. R470's `-q` prints neither.
The GPU is the one the container was given (compose `device_ids`, a pod's nvidia.com/gpu): device 0 of what it
sees. A MIG slice answers with its parent's name and compute capability, so `nvidia-smi -L` adds the slice's
profile to the name ("NVIDIA A100-SXM4-40GB MIG 1g.5gb"): plans are tuned for the slice's SMs and memory.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from packager.core.contracts import GpuProbeError

# CUdevice_attribute values from cuda.h (CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR).
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
LIBCUDA = "libcuda.so.1"
# Architectures with exactly one compute capability among data-center and desktop parts. Ampere (8.0 / 8.6 /
# 8.7) and Blackwell (10.x / 12.x) are ambiguous and deliberately absent: a wrong guess would key plans wrongly.
ARCHITECTURE_CAPABILITY = {"Turing": "7.5", "Ada Lovelace": "8.9", "Hopper": "9.0"}


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "Tesla T4"; "unknown" when only the compute capability could be read
    compute_capability: str  # "7.5"
    source: str  # which probe answered, for the build log


def parse_compute_capability(text: str) -> str:
    """The first 'major.minor' line, e.g. of `nvidia-smi --query-gpu=compute_cap --format=csv,noheader`."""
    for line in text.splitlines():
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            return f"{match.group(1)}.{match.group(2)}"
    raise ValueError(f"no compute capability in: {text.strip()[:200]!r}")


def parse_query_csv(text: str) -> GpuInfo | None:
    """First GPU of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` ("Tesla T4, 7.5")."""
    for line in text.splitlines():
        name, _, capability = line.rpartition(",")
        if name.strip() and re.fullmatch(r"\s*\d+\.\d+\s*", capability):
            return GpuInfo(name.strip(), capability.strip(), "nvidia-smi --query-gpu")
    return None


def parse_mig_devices(text: str) -> list[tuple[str, str]]:
    """(profile, UUID) of every MIG device in `nvidia-smi -L` ("  MIG 1g.5gb  Device  0: (UUID: MIG-...)")."""
    return re.findall(r"^\s*MIG\s+(\S+)\s+Device\s+\d+:\s*\(UUID:\s*(MIG-[^)\s]+)\)", text, re.M)


def with_mig_profile(gpu: GpuInfo, list_text: str) -> GpuInfo:
    """`gpu` named after the MIG slice CUDA uses (its first MIG device), when the container sees MIG devices."""
    devices = parse_mig_devices(list_text)
    if not devices:
        return gpu
    profile, uuid = devices[0]
    return GpuInfo(f"{gpu.name} MIG {profile}", gpu.compute_capability, f"{gpu.source} + nvidia-smi -L ({uuid})")


def parse_nvidia_smi_q(text: str) -> tuple[str | None, str | None]:
    """(product name, architecture) of the first GPU in `nvidia-smi -q` text; None where a field is absent."""
    name = re.search(r"^\s*Product Name\s*:\s*(.+?)\s*$", text, re.M)
    architecture = re.search(r"^\s*Product Architecture\s*:\s*(.+?)\s*$", text, re.M)
    return (name.group(1) if name else None), (architecture.group(1) if architecture else None)


def gpu_from_nvidia_smi_q(text: str, cuda_capability: str | None = None) -> GpuInfo | None:
    """Name from `-q`; compute capability from the CUDA driver if given, else from an unambiguous architecture."""
    name, architecture = parse_nvidia_smi_q(text)
    if cuda_capability:
        return GpuInfo(name or "unknown", cuda_capability, "nvidia-smi -q + libcuda")
    capability = ARCHITECTURE_CAPABILITY.get(architecture or "")
    if capability is None:
        return None
    return GpuInfo(name or "unknown", capability, f"nvidia-smi -q (Product Architecture {architecture})")


def cuda_driver_gpu(library: str = LIBCUDA) -> GpuInfo | None:
    """Device 0 through the CUDA driver API (ctypes); None when the library or a GPU is missing."""
    try:
        cuda = ctypes.CDLL(library)
        init, get_device, get_attribute, get_name = (cuda.cuInit, cuda.cuDeviceGet, cuda.cuDeviceGetAttribute,
                                                     cuda.cuDeviceGetName)
    except (OSError, AttributeError):  # no such library, or not the CUDA driver
        return None
    major, minor, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if init(0) != 0 or get_device(ctypes.byref(device), 0) != 0:
        return None
    for value, attribute in ((major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                             (minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)):
        if get_attribute(ctypes.byref(value), attribute, device) != 0:
            return None
    name = ctypes.create_string_buffer(256)
    named = get_name(name, len(name), device) == 0
    return GpuInfo(name.value.decode(errors="replace") if named else "unknown", f"{major.value}.{minor.value}",
                   "libcuda cuDeviceGetAttribute")


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def detect_gpu(nvidia_smi: str | None = None, library: str = LIBCUDA) -> GpuInfo:
    """The serving GPU (device 0) from the first source that answers; GpuProbeError if none does."""
    override = os.environ.get("YQPACK_GPU_COMPUTE_CAPABILITY")
    if override:
        return GpuInfo(os.environ.get("YQPACK_GPU_NAME") or "unknown", parse_compute_capability(override),
                       "YQPACK_GPU_COMPUTE_CAPABILITY")
    smi = nvidia_smi or shutil.which("nvidia-smi")
    found = _detect(smi, library)
    if smi and found.source != "libcuda cuDeviceGetAttribute":
        listing = _run([smi, "-L"])
        if listing.returncode == 0:
            return with_mig_profile(found, listing.stdout)
    return found


def _detect(smi: str | None, library: str) -> GpuInfo:
    attempts = []
    if smi:
        query = _run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"])
        found = parse_query_csv(query.stdout) if query.returncode == 0 else None
        if found:
            return found
        attempts.append(f"`nvidia-smi --query-gpu=compute_cap` failed: {(query.stderr or query.stdout).strip()[:160]}")
    driver = cuda_driver_gpu(library)
    if smi:
        details = _run([smi, "-q"])
        found = gpu_from_nvidia_smi_q(details.stdout, driver.compute_capability if driver else None)
        if found:
            return found
        attempts.append("`nvidia-smi -q` shows no usable Product Architecture")
    else:
        attempts.append("nvidia-smi not found")
    if driver:
        return driver
    attempts.append(f"{library} not loadable or no CUDA device")
    raise GpuProbeError(
        "cannot tell the GPU's compute capability (" + "; ".join(attempts) + "). TensorRT engines must be built "
        "on the GPU that serves them: run the compose `engines` service on the GPU host, or set "
        "YQPACK_GPU_COMPUTE_CAPABILITY (and YQPACK_GPU_NAME) in deploy/.env (see docs/gpu.md)"
    )
