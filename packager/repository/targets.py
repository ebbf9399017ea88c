"""What each serving target is made of: which artifact a precision serves, the detector's template, platform and
runtime label, instance counts, batching delay, the client-facing tensors, and the model names (stdlib only)."""

from __future__ import annotations

from packager.core.contracts import TensorSpec

TARGETS = ("local", "cpu", "cpu-openvino", "gpu", "gpu-ort")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# Which build artifact each target serves per precision (onnxruntime CPU mis-rounds FP16 Q/DQ inputs).
ONNX_VARIANT = {
    "local": {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"},
    "cpu": {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"},
    # Triton's openvino backend cannot pick a file per CPU: the u8-activation twin is right on every VNNI and AMX
    # CPU, the s8 file only on AMX (docs/cpu-openvino.md).
    "cpu-openvino": {"fp32": "fp32", "fp16": "fp16", "int8": "int8-u8"},
    # gpu-ort: the FP16 graph itself, so FP16 needs no builder flag (TensorRT 11 removed them; docs/gpu.md).
    "gpu-ort": {"fp32": "fp32", "fp16": "fp16", "int8": "int8"},
    "gpu": {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "fp8": "fp8"},
}
# Build artifacts served beside the `local` INT8 detector's model.onnx, by the names its runtime looks for
# (inference/runtime.py: SERVED_U8_TWIN, SERVED_CHECK_IMAGES; a test checks they agree).
LOCAL_INT8_COMPANIONS = {"int8-u8": "model.u8.onnx", "int8-check": "int8_check_images.npy"}
# FP8 is served by TensorRT only: onnxruntime CPU runs ModelOpt's float8 Q/DQ only with graph optimizations off
# (several times slower than FP32); the CPU-side fp8-fp32 twin exists to measure accuracy, not to serve.
FP8_TARGETS = ("gpu",)
# Python pre/post instances per target: on a CPU target the detector needs the cores (one of each keeps up
# with it); a GPU detector is fast enough that decoding JPEGs on several host cores becomes the bottleneck.
PRE_POST_INSTANCES = {"local": (1, 1), "cpu": (1, 1), "cpu-openvino": (1, 1), "gpu": (4, 2), "gpu-ort": (4, 2)}
# GPU targets: the engines step re-sizes these from the serving host's cores (packager/engines/host_sizing.py)
# unless render was given the counts; the counts above are what a repository gets before that step.
HOST_SIZED_TARGETS = ("gpu", "gpu-ort")
# How long the detector's batcher waits for more requests. A CPU detector runs ~100 ms per batch, so requests
# pile up behind it anyway and a wait only adds latency (2 ms per request at concurrency 1, measured); a GPU
# detector is done in a few ms, and a short wait is what lets batches form at all.
MAX_QUEUE_DELAY_US = {"local": 0, "cpu": 0, "cpu-openvino": 0, "gpu": 2000, "gpu-ort": 2000}
# The Triton backend/platform each target's detector runs on (recorded in the repository index).
DETECTOR_PLATFORM = {"local": "python", "cpu": "onnxruntime", "cpu-openvino": "openvino", "gpu": "tensorrt_plan",
                     "gpu-ort": "onnxruntime"}
# Detector template per precision where it differs from the target's own: Triton's openvino backend has no f32
# precision hint (bf16 by default on AMX hosts), so cpu-openvino keeps FP32/FP16 exact on the onnxruntime backend.
DETECTOR_TEMPLATE = {"cpu-openvino": {"fp32": "cpu", "fp16": "cpu"}}
# What executes each template's detector (the local one: the runtime chosen at render), named in reports.
DETECTOR_RUNTIME = {"cpu": "onnxruntime (Triton backend)", "cpu-openvino": "openvino (Triton backend)",
                    "gpu": "tensorrt", "gpu-ort": "onnxruntime + tensorrt (Triton backend)"}
# Targets whose detector is a Python model (the embedded server's): the ensemble hands it the letterboxed uint8
# pixels on a second input - a quarter of float32's bytes through shared memory - and it normalises them itself, to
# the same bits. The float input stays first, for clients of the bare detector (Ultralytics' Triton client casts
# to the first input's type).
PIXEL_INPUT_TARGETS = {"local"}
TRITON_DTYPE = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}
LABELS_FILE = "labels.txt"
# The ensemble's client-facing tensors: one encoded image in, (n, 6) detections in original pixels out.
IMAGE_TENSOR = TensorSpec("IMAGE", (-1, 1), "bytes")
DETECTIONS_TENSOR = TensorSpec("DETECTIONS", (-1, -1, 6))


def ensemble_name(model_name: str, precision: str) -> str:
    return f"{model_name}_{precision}"


def detector_name(model_name: str, precision: str) -> str:
    return f"{model_name}_{precision}_detector"


def detector_template(target: str, precision: str) -> str:
    """The templates/detector/<name> a target's detector of this precision is rendered from."""
    return DETECTOR_TEMPLATE.get(target, {}).get(precision, target)


def default_precisions(target: str) -> tuple[str, ...]:
    """TensorRT targets serve the fp16/int8 engines; CPU targets also serve the fp32 reference."""
    return ("fp16", "int8") if target.startswith("gpu") else ("fp32", "fp16", "int8")
