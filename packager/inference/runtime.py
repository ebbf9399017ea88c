"""Open an ONNX model for CPU inference with onnxruntime or OpenVINO behind one `run(batch) -> output` interface.

Why two runtimes: onnxruntime runs ModelOpt's Q/DQ INT8 graph by emulation (quantize -> dequantize -> float math),
so INT8 is slower than FP32 there; OpenVINO fuses the same Q/DQ pairs into integer kernels (VNNI / AMX).
Without VNNI or AMX (AVX2-only CPUs such as AMD EPYC 7003, Intel before Cascade Lake) OpenVINO's INT8 kernels
multiply-add pairs of u8 x s8 products into saturating 16-bit sums (OpenVINO's documented "saturation issue"):
ModelOpt's full-range INT8 weights then give wrong outputs (measured: YOLOv8n INT8 mAP50-95 0.0002 instead of
0.43 on an AMD EPYC 7003), so quantized models run on onnxruntime there.
OpenVINO's CPU default precision on AMX or AVX512-BF16 CPUs is bf16, so `f32` is always requested explicitly
(FP32 must stay FP32); `bf16` is an opt-in.

Standalone on purpose (numpy + the chosen runtime only): the served `local` detector copies this file beside its
model.py and runs it in the server env.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")
# The default for evaluation and the served `local` detector, chosen from measurements (README, benchmarks/
# runtime_bench.py): OpenVINO f32 is faster than onnxruntime on FP32, and INT8 runs on integer kernels.
DEFAULT_RUNTIME = "openvino"
PRECISION_HINTS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# OpenVINO's documented CPU minimum; without it the plugin refuses to load.
OPENVINO_REQUIRED_FLAGS = ("sse4_2",)
# Dot-product instructions that make OpenVINO's INT8 kernels fast, best first (as named in /proc/cpuinfo).
INT8_FLAGS = {"amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI"}
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


@dataclass(frozen=True)
class RuntimeOptions:
    runtime: str = DEFAULT_RUNTIME
    precision_hint: str = "f32"  # OpenVINO only: f32 keeps FP32 exact; bf16 is faster on AMX and less exact
    performance_hint: str = "LATENCY"  # OpenVINO only
    threads: int = 0  # 0: the runtime's default (all cores)
    cache_dir: str | None = None  # OpenVINO only: compiled-model cache, so a restart does not recompile
    allow_spinning: bool = True  # onnxruntime only: spinning threads save the wake-up latency
    # OpenVINO only. Its CPU default pins each inference thread to one core: best when it has the cores to itself,
    # a straggler when other processes (the served pre/postprocess, the server) need one of them for a moment.
    cpu_pinning: bool = True
    # onnxruntime only. False for FP8 Q/DQ: with optimizations on, onnxruntime fuses Q/DQ into kernels that either
    # reject float8 or change the outputs; unoptimized it runs the Q/DQ semantics faithfully.
    graph_optimizations: bool = True

    def __post_init__(self):
        for value, allowed, what in (
            (self.runtime, RUNTIMES, "runtime"),
            (self.precision_hint, PRECISION_HINTS, "precision hint"),
            (self.performance_hint, PERFORMANCE_HINTS, "performance hint"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class RuntimeChoice:
    """What will actually run, and why it differs from what was asked (each note is a plain sentence)."""

    runtime: str
    precision_hint: str
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """e.g. 'openvino (f32 hint)' or 'onnxruntime': what produced a number, for reports."""
        return f"openvino ({self.precision_hint} hint)" if self.runtime == "openvino" else "onnxruntime"


def _first_processor_field(cpuinfo_text: str, name: str) -> str | None:
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The instruction-set flags of the first processor in /proc/cpuinfo text."""
    return frozenset((_first_processor_field(cpuinfo_text, "flags") or "").split())


def cpu_vendor(cpuinfo_text: str) -> str | None:
    """The vendor_id of the first processor in /proc/cpuinfo text ('GenuineIntel', 'AuthenticAMD'), or None."""
    return _first_processor_field(cpuinfo_text, "vendor_id")


def _read_cpuinfo(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    return cpu_flags(_read_cpuinfo(path))


def read_cpu(path: str = "/proc/cpuinfo") -> tuple[frozenset[str], str | None]:
    """This machine's (flags, vendor), from one read of /proc/cpuinfo."""
    text = _read_cpuinfo(path)
    return cpu_flags(text), cpu_vendor(text)


def int8_isa(flags: frozenset[str]) -> str | None:
    """The best integer dot-product instruction set present, e.g. 'AMX-INT8', or None."""
    return next((name for flag, name in INT8_FLAGS.items() if flag in flags), None)


SATURATION_NOTE = (
    "this CPU has no VNNI/AMX: OpenVINO's INT8 kernels saturate 16-bit intermediate sums there (its documented "
    "saturation issue) and give wrong outputs for ModelOpt's full-range INT8 weights, so this quantized model runs "
    "on onnxruntime (exact INT8 emulation, slower than FP32).")


# OpenVINO's INT8 CPU kernels are validated on Intel only (its maintainers: "AMD EPYC processors are not officially
# supported", openvinotoolkit/openvino#35943). Measured with yolov8n's default INT8 build, OpenVINO 2026.4.1, 640
# val2017-dev images: an AMD EPYC 9004 (Zen 4, KVM) that reports AVX512-VNNI still gets OpenVINO's plain-AVX-512
# int8 kernels (brgconv_avx512_I8) and INT8/FP32 mAP50-95 0.008; onnxruntime 0.986 there, OpenVINO 0.9945 on an
# AMX Xeon (docs/cpu-openvino.md). So VNNI flags count only on Intel.
INT8_VENDORS = ("GenuineIntel",)
VENDOR_NOTE = (
    "OpenVINO's INT8 kernels give wrong outputs on this {vendor} CPU even though it reports {isa} (measured on an "
    "AMD EPYC 9004: INT8 mAP 0.008 of FP32's; OpenVINO validates INT8 on Intel only), so this quantized model runs "
    "on onnxruntime (exact INT8 emulation, slower than FP32).")


def resolve_runtime(options: RuntimeOptions, flags: frozenset[str], openvino_installed: bool = True,
                    quantized: bool = False, vendor: str | None = None) -> RuntimeChoice:
    """Decide what runs on this CPU: fall back to onnxruntime / f32 (with a note saying why) when needed.
    `quantized`: the model holds INT8 Q/DQ (see `is_quantized`). `vendor`: /proc/cpuinfo's vendor_id (None: unknown,
    the flags alone decide)."""
    if options.runtime == "onnxruntime":
        return RuntimeChoice("onnxruntime", "f32")
    if not flags:  # not x86 Linux (e.g. ARM lists "Features"): nothing to check, OpenVINO decides itself
        return RuntimeChoice("openvino", options.precision_hint, (
            "no x86 instruction-set flags in /proc/cpuinfo: OpenVINO picks its kernels itself.",))
    missing = [flag for flag in OPENVINO_REQUIRED_FLAGS if flag not in flags]
    if missing:
        return RuntimeChoice("onnxruntime", "f32", (
            f"OpenVINO needs the {', '.join(missing).upper()} instruction set, which this CPU does not report: "
            "falling back to onnxruntime (INT8 then runs emulated, slower than FP32).",))
    if not openvino_installed:
        return RuntimeChoice("onnxruntime", "f32", (
            "the openvino package is not installed in this Python: falling back to onnxruntime "
            "(pip install openvino; yqpack's server env pins it).",))
    notes = []
    precision = options.precision_hint
    if precision == "bf16" and not any(flag in flags for flag in BF16_FLAGS):
        precision = "f32"
        notes.append("bf16 was requested but this CPU has neither AMX-BF16 nor AVX512-BF16: running f32.")
    if quantized and int8_isa(flags) is None:
        return RuntimeChoice("onnxruntime", "f32", (*notes, SATURATION_NOTE))
    if quantized and vendor is not None and vendor not in INT8_VENDORS:
        return RuntimeChoice("onnxruntime", "f32", (*notes, VENDOR_NOTE.format(vendor=vendor, isa=int8_isa(flags))))
    return RuntimeChoice("openvino", precision, tuple(notes))


def runtime_on_this_machine(options: RuntimeOptions, quantized: bool = False) -> RuntimeChoice:
    """What `open_model` will run here for `options` and a model that is (not) `quantized`, fallbacks included,
    without opening a model."""
    flags, vendor = read_cpu()
    return resolve_runtime(options, flags, options.runtime != "openvino" or openvino_installed(), quantized, vendor)


def evaluation_label(options: RuntimeOptions) -> str:
    """What runs a build's variants here, for reports: one runtime, or the float one and the quantized one."""
    plain, quantized = runtime_on_this_machine(options).label, runtime_on_this_machine(options, quantized=True).label
    return plain if plain == quantized else f"{plain}; quantized variants on {quantized} (OpenVINO INT8 unsafe here)"


def variant_label(variant: str, options: RuntimeOptions) -> str:
    """What runs one build variant here ('fp32', 'int8-fp32', 'fp8-fp32', ...), for a number's report line."""
    if variant.startswith("fp8"):  # ModelOpt's FP8 Q/DQ runs on onnxruntime CPU only unoptimized
        return "onnxruntime (graph optimizations off)"
    return runtime_on_this_machine(options, quantized=variant.startswith("int8")).label


def is_quantized(path: str | Path) -> bool:
    """True when the ONNX file holds Q/DQ nodes. A scan of the serialized graph for the op type's name: the `onnx`
    package is not in the server env, and operator names are plain strings in the protobuf."""
    with open(path, "rb") as handle:
        return b"DequantizeLinear" in handle.read()


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@dataclass
class CompiledModel:
    """One opened model: `run(batch)` takes N x C x H x W float32 and returns the first output."""

    path: Path
    choice: RuntimeChoice
    input_name: str
    output_name: str
    compile_seconds: float
    static_batch: int | None  # a fixed-batch ONNX runs a larger batch in slices
    _infer: object = field(repr=False, default=None)
    _compiled: object = field(repr=False, default=None)

    @property
    def runtime(self) -> str:
        return self.choice.runtime

    @property
    def label(self) -> str:
        return self.choice.label

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output for `batch`, an array of its own."""
        return self._run(batch, copy=True)

    def run_borrowed(self, batch: np.ndarray) -> np.ndarray:
        """Like `run`, but the result may be the runtime's own output buffer (OpenVINO reuses it): valid only until
        the next call. For a caller that copies it at once anyway, e.g. the served detector, whose output tensors
        the Python backend copies into shared memory before the next execute()."""
        return self._run(batch, copy=False)

    def _run(self, batch: np.ndarray, copy: bool) -> np.ndarray:
        if self.static_batch is None or self.static_batch == len(batch):
            return self._infer(batch, copy)
        parts = [batch[i : i + self.static_batch] for i in range(0, len(batch), self.static_batch)]
        return np.concatenate([self._infer(part, True) for part in parts])

    def layer_precisions(self) -> dict[str, dict[str, int]]:
        """OpenVINO only: executed layers per type and runtime precision, from the compiled execution graph,
        e.g. {'Convolution': {'i8': 57, 'f32': 7}, ...} (constants left out)."""
        if self.runtime != "openvino":
            raise ValueError("layer precisions come from OpenVINO's execution graph; this model runs onnxruntime")
        counts: dict[str, dict[str, int]] = {}
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind, precision = info["layerType"].value, info["runtimePrecision"].value.lower()
            if kind != "Const":
                counts.setdefault(kind, {}).setdefault(precision, 0)
                counts[kind][precision] += 1
        return counts


def open_model(path: str | Path, options: RuntimeOptions = RuntimeOptions(),
               flags: frozenset[str] | None = None, vendor: str | None = None) -> CompiledModel:
    """Open `path` with the runtime `options` ask for, or the fallback `resolve_runtime` picks on this CPU
    (`flags` / `vendor` given: as on a CPU with those; flags without a vendor: the flags alone decide)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    installed = options.runtime != "openvino" or openvino_installed()
    quantized = options.runtime == "openvino" and is_quantized(path)
    if flags is None:
        flags, vendor = read_cpu()
    choice = resolve_runtime(options, flags, installed, quantized, vendor)
    start = time.perf_counter()
    opener = _open_openvino if choice.runtime == "openvino" else _open_onnxruntime
    model = opener(path, options, choice)
    model.compile_seconds = time.perf_counter() - start
    return model


def _open_onnxruntime(path: Path, options: RuntimeOptions, choice: RuntimeChoice) -> CompiledModel:
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.threads
    session_options.inter_op_num_threads = 1
    session_options.log_severity_level = 3  # warnings about unused initializers are noise here
    if not options.graph_optimizations:
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]

    def infer(batch: np.ndarray, copy: bool) -> np.ndarray:  # onnxruntime returns a fresh array either way
        return session.run([output_name], {input_name: batch})[0]

    return CompiledModel(path, choice, input_name, output_name, 0.0,
                         batch_dim if isinstance(batch_dim, int) else None, infer, session)


def _open_openvino(path: Path, options: RuntimeOptions, choice: RuntimeChoice) -> CompiledModel:
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": choice.precision_hint,
        "PERFORMANCE_HINT": options.performance_hint,
        "ENABLE_CPU_PINNING": options.cpu_pinning,
    }
    if options.threads > 0:
        config["INFERENCE_NUM_THREADS"] = options.threads
    if options.cache_dir:
        os.makedirs(options.cache_dir, exist_ok=True)
        config["CACHE_DIR"] = str(options.cache_dir)
    # Compiling from the file path lets OpenVINO skip reading and compiling the ONNX on a cache hit.
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    batch_dim = compiled.input(0).get_partial_shape()[0]

    def infer(batch: np.ndarray, copy: bool) -> np.ndarray:
        # share_inputs: OpenVINO reads the caller's contiguous float32 array in place instead of copying 4.9 MB
        # per image first (the call is synchronous, so the array outlives its use).
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        output = request.get_output_tensor(0).data  # the request's own buffer, overwritten by the next call
        return output.copy() if copy else output

    return CompiledModel(path, choice, compiled.input(0).get_any_name(), compiled.output(0).get_any_name(), 0.0,
                         None if batch_dim.is_dynamic else batch_dim.get_length(), infer, compiled)
