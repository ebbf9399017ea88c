"""Which INT8 file and runtime are right on this CPU, and the load-time self-check that proves it.

Measured with yolov8n's default INT8 build, OpenVINO 2026.4.1, oneDNN's `ONEDNN_MAX_CPU_ISA` cap selecting the
kernels of lesser CPUs (docs/cpu-openvino.md, benchmarks/int8_isa.py):
- AMX (Sapphire Rapids and later): the symmetric s8-activation file (`model.int8-fp32.onnx`) is right and the
  faster of the two;
- AVX512-VNNI (Cascade Lake, Ice Lake, AMD Zen 4) and AVX-VNNI (Alder Lake, Sierra Forest): s8 activations give
  wrong outputs (top class scores ~0.01 instead of ~0.93); the u8-activation twin (`model.int8-u8.onnx`, the same
  values with zero point 128) is right and faster than FP32;
- no VNNI (AVX2, AVX-512 without VNNI): both files saturate 16-bit sums and are wrong, so INT8 runs on onnxruntime
  (exact Q/DQ emulation, slower than FP32).
The vendor does not matter: an AMD EPYC 9004 with AVX512-VNNI computes the u8 twin right, as Intel VNNI does.
Whatever the rule says, a quantized model opened on OpenVINO is first checked against onnxruntime on a few real
images kept in the build (`self_check`), and runs on onnxruntime instead if they disagree.

Standalone (numpy and os only): copied beside the served `local` detector with runtime.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# INT8 instruction sets, best first, with the /proc/cpuinfo flag that reports each.
AMX, AVX512_VNNI, AVX_VNNI = "AMX-INT8", "AVX512-VNNI", "AVX-VNNI"
INT8_FLAGS = {"amx_int8": AMX, "avx512_vnni": AVX512_VNNI, "avx_vnni": AVX_VNNI}
# What each oneDNN `ONEDNN_MAX_CPU_ISA` value lets oneDNN (inside OpenVINO) use of them. Its ISA masks are bit
# sets: the AVX-512 levels do not include the VEX-encoded AVX-VNNI, and AVX2_VNNI allows no AVX-512 at all.
_AVX512_VNNI_CAPS = ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512")
_AMX_CAPS = ("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2")
ISA_CAP_ALLOWS = {
    **{cap: (AMX, AVX512_VNNI) for cap in _AMX_CAPS},
    **{cap: (AVX512_VNNI,) for cap in _AVX512_VNNI_CAPS},
    "AVX2_VNNI": (AVX_VNNI,), "AVX2_VNNI_2": (AVX_VNNI,),
    **{cap: () for cap in ("SSE41", "AVX", "AVX2", "AVX512_CORE")},
}
NO_CAP = ("", "ALL", "DEFAULT")
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

# Which file each INT8 instruction set runs on OpenVINO ('s8': model.int8-fp32.onnx, 'u8': model.int8-u8.onnx).
ACTIVATIONS_FOR = {AMX: "s8", AVX512_VNNI: "u8", AVX_VNNI: "u8"}

# The self-check: per output channel (the shorter non-batch axis: 4 + classes of a raw head, the 6 columns of an
# end-to-end head), the relative L2 distance between OpenVINO's output and onnxruntime's; the median over channels
# must stay below this. Measured on yolov8n's default build, 8 val2017 images: OpenVINO on the right file 0.15,
# OpenVINO FP32 vs INT8 0.25 (so any model as close to onnxruntime as FP32 is would pass), wrong kernels 1.00.
SELF_CHECK_TOLERANCE = 0.5


def isa_cap(environ=None) -> str | None:
    """The `ONEDNN_MAX_CPU_ISA` cap in effect (upper case), or None."""
    environ = os.environ if environ is None else environ
    for name in ISA_CAP_VARIABLES:
        value = environ.get(name, "").strip().upper()
        if value not in NO_CAP:
            return value
    return None


def int8_isa_in_effect(flags: frozenset[str], cap: str | None = None) -> str | None:
    """The best INT8 instruction set OpenVINO's kernels will use: the CPU's flags, limited by a oneDNN cap.
    An unknown cap allows nothing (onnxruntime then runs INT8: slower, never wrong)."""
    present = [isa for flag, isa in INT8_FLAGS.items() if flag in flags]
    if cap is not None:
        allowed = ISA_CAP_ALLOWS.get(cap, ())
        present = [isa for isa in present if isa in allowed]
    return present[0] if present else None


@dataclass(frozen=True)
class SelfCheck:
    """The outcome of running the chosen runtime and onnxruntime on the build's check images."""

    images: int
    distance: float  # median over output channels of the relative L2 distance
    tolerance: float = SELF_CHECK_TOLERANCE

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.distance)) and self.distance <= self.tolerance

    def sentence(self) -> str:
        verdict = "agrees with" if self.passed else "DISAGREES with"
        return (f"INT8 self-check on {self.images} image(s): OpenVINO {verdict} onnxruntime's exact Q/DQ emulation "
                f"(distance {self.distance:.3f}, tolerance {self.tolerance})")


def output_distance(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Median over output channels of ||candidate - reference|| / ||reference||, channels being the shorter of the
    two non-batch axes (so a raw head's box rows and each class row count alike, whatever their scale)."""
    candidate, reference = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if candidate.shape != reference.shape:
        return float("inf")
    if reference.ndim != 3:
        reference, candidate = reference.reshape(len(reference), 1, -1), candidate.reshape(len(candidate), 1, -1)
    axis = 1 if reference.shape[1] <= reference.shape[2] else 2
    channels = reference.shape[axis]
    ref = np.moveaxis(reference, axis, 0).reshape(channels, -1)
    cand = np.moveaxis(candidate, axis, 0).reshape(channels, -1)
    norms = np.linalg.norm(ref, axis=1)
    distances = np.linalg.norm(cand - ref, axis=1) / np.maximum(norms, 1e-12)
    # A channel that is zero in the reference says nothing about agreement unless the candidate is not zero there.
    distances = np.where(norms > 0, distances, np.where(np.linalg.norm(cand, axis=1) > 0, 1.0, 0.0))
    return float(np.median(distances))


def check_images_as_float(images: np.ndarray) -> np.ndarray:
    """Stored check images (uint8 letterboxed pixels, N x 3 x H x W) as the detector's float input in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray(images, dtype=np.float32)
