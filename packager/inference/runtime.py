"""Open an ONNX model for CPU inference with onnxruntime or OpenVINO behind one `run(batch) -> output` interface.

Why two runtimes: onnxruntime runs ModelOpt's Q/DQ INT8 graph by emulation (quantize -> dequantize -> float math),
so INT8 is slower than FP32 there; OpenVINO fuses the same Q/DQ pairs into integer kernels (VNNI / AMX).
Without VNNI or AMX (AVX2-only CPUs such as AMD EPYC 7003, Intel before Cascade Lake) OpenVINO's INT8 kernels
multiply-add pairs of u8 x s8 products into saturating 16-bit sums (OpenVINO's documented "saturation issue"):
ModelOpt's full-range INT8 weights then give wrong outputs (measured: YOLOv8n INT8 mAP50-95 0.0002 instead of
0.43 on an AMD EPYC 7003), so quantized models run on onnxruntime there. With VNNI but no AMX, OpenVINO computes
ModelOpt's s8 activations wrong and their u8 twin right; which file runs where, and the self-check against
onnxruntime that guards every quantized model opened on OpenVINO: int8_cpu.py.
OpenVINO's CPU default precision on AMX or AVX512-BF16 CPUs is bf16, so `f32` is always requested explicitly
(FP32 must stay FP32); `bf16` is an opt-in.

Standalone on purpose (numpy + the chosen runtime only): the served `local` detector copies this file and
int8_cpu.py beside its model.py and runs them in the server env.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    from .int8_cpu import ACTIVATIONS_FOR, INT8_FLAGS, SelfCheck, check_images_as_float, int8_isa_in_effect, isa_cap
    from .int8_cpu import output_distance
except ImportError:  # served: copied flat next to model.py
    from int8_cpu import ACTIVATIONS_FOR, INT8_FLAGS, SelfCheck, check_images_as_float, int8_isa_in_effect, isa_cap
    from int8_cpu import output_distance

RUNTIMES = ("onnxruntime", "openvino")
# The default for evaluation and the served `local` detector, chosen from measurements (README, benchmarks/
# runtime_bench.py): OpenVINO f32 is faster than onnxruntime on FP32, and INT8 runs on integer kernels.
DEFAULT_RUNTIME = "openvino"
PRECISION_HINTS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# OpenVINO's documented CPU minimum; without it the plugin refuses to load.
OPENVINO_REQUIRED_FLAGS = ("sse4_2",)
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
    int8_activations: str | None = None  # a quantized model on OpenVINO: 's8' (model.int8-fp32) or 'u8' (the twin)
    int8_isa: str | None = None  # the INT8 instruction set in effect that chose it

    @property
    def label(self) -> str:
        """e.g. 'openvino (f32 hint)', 'openvino (f32 hint, INT8 u8 activations on AVX512-VNNI)' or 'onnxruntime':
        what produced a number, for reports."""
        if self.runtime != "openvino":
            return "onnxruntime"
        if self.int8_activations is None or self.int8_isa is None:
            return f"openvino ({self.precision_hint} hint)"
        return f"openvino ({self.precision_hint} hint, INT8 {self.int8_activations} activations on {self.int8_isa})"

    def on_onnxruntime(self, *notes: str) -> "RuntimeChoice":
        """The fallback: onnxruntime, this choice's notes kept and `notes` added."""
        return RuntimeChoice("onnxruntime", "f32", (*self.notes, *notes))


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


def int8_isa(flags: frozenset[str], cap: str | None = None) -> str | None:
    """The best integer dot-product instruction set OpenVINO will use, e.g. 'AMX-INT8', or None (`cap`: a oneDNN
    `ONEDNN_MAX_CPU_ISA` value limiting it)."""
    return int8_isa_in_effect(flags, cap)


SATURATION_NOTE = (
    "no VNNI/AMX instructions in effect on this CPU: OpenVINO's INT8 kernels saturate 16-bit intermediate sums there "
    "(its documented saturation issue) and give wrong outputs for ModelOpt's full-range INT8 weights, so this "
    "quantized model runs on onnxruntime (exact INT8 emulation, slower than FP32).")
NO_U8_TWIN_NOTE = (
    "OpenVINO's {isa} INT8 kernels need the u8-activation twin (model.int8-u8.onnx), which this build or repository "
    "lacks (made before yqpack wrote it): this quantized model runs on onnxruntime; rebuild to run it on OpenVINO.")
NO_CHECK_IMAGES_NOTE = (
    "no INT8 self-check images came with this quantized model (int8_check_images.npy, written by yqpack build), so "
    "OpenVINO's INT8 cannot be checked against onnxruntime here: it runs on onnxruntime; rebuild to run it on "
    "OpenVINO.")
SELF_CHECK_FAILED_NOTE = "{check}: this quantized model runs on onnxruntime instead."


def resolve_runtime(options: RuntimeOptions, flags: frozenset[str], openvino_installed: bool = True,
                    quantized: bool = False, cap: str | None = None) -> RuntimeChoice:
    """Decide what runs on this CPU: fall back to onnxruntime / f32 (with a note saying why) when needed.
    `quantized`: the model holds INT8 Q/DQ (see `is_quantized`); it then runs on OpenVINO only where a VNNI or AMX
    instruction set is in effect (`cap`: a oneDNN `ONEDNN_MAX_CPU_ISA` value limiting the flags), with the file
    that instruction set computes right (`int8_activations`, int8_cpu.ACTIVATIONS_FOR)."""
    if options.runtime == "onnxruntime":
        return RuntimeChoice("onnxruntime", "f32")
    if not flags:  # not x86 Linux (e.g. ARM lists "Features"): nothing to check, OpenVINO decides itself
        return RuntimeChoice("openvino", options.precision_hint, (
            "no x86 instruction-set flags in /proc/cpuinfo: OpenVINO picks its kernels itself.",),
            "s8" if quantized else None)
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
    if not quantized:
        return RuntimeChoice("openvino", precision, tuple(notes))
    isa = int8_isa_in_effect(flags, cap)
    if isa is None:
        return RuntimeChoice("onnxruntime", "f32", (*notes, SATURATION_NOTE))
    return RuntimeChoice("openvino", precision, tuple(notes), ACTIVATIONS_FOR[isa], isa)


def runtime_on_this_machine(options: RuntimeOptions, quantized: bool = False) -> RuntimeChoice:
    """What `open_model` will run here for `options` and a model that is (not) `quantized`, fallbacks included,
    without opening a model (the INT8 self-check, which needs the model, can still send it to onnxruntime)."""
    return resolve_runtime(options, read_cpu_flags(), options.runtime != "openvino" or openvino_installed(),
                           quantized, isa_cap())


def evaluation_label(options: RuntimeOptions) -> str:
    """What runs a build's variants here, for reports: one runtime, or the float one and the quantized one."""
    plain, quantized = runtime_on_this_machine(options), runtime_on_this_machine(options, quantized=True)
    if plain.label == quantized.label:
        return plain.label
    unsafe = " (OpenVINO INT8 unsafe here)" if quantized.runtime != plain.runtime else ""
    return f"{plain.label}; quantized variants on {quantized.label}{unsafe}"


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
    self_check: SelfCheck | None = None  # a quantized model first opened on OpenVINO: its check against onnxruntime
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
               flags: frozenset[str] | None = None, cap: str | None = None, u8_twin: str | Path | None = None,
               check_images: np.ndarray | None = None) -> CompiledModel:
    """Open `path` with the runtime `options` ask for, or the fallback `resolve_runtime` picks on this CPU
    (`flags` given: decide as on a CPU with those flags and oneDNN cap `cap`; None: this machine's, and its
    `ONEDNN_MAX_CPU_ISA`).

    A quantized model (`path`: the s8 `model.int8-fp32.onnx`) runs on OpenVINO only after a self-check: OpenVINO
    opens `path` or its u8-activation twin `u8_twin` (as the instruction set in effect requires), runs
    `check_images` (uint8 letterboxed N x 3 x H x W, kept in the build), and must agree with onnxruntime's exact Q/DQ
    emulation of `path` on them; otherwise - or without the twin or the images - onnxruntime runs it, with a note."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    installed = options.runtime != "openvino" or openvino_installed()
    quantized = options.runtime == "openvino" and is_quantized(path)
    if flags is None:
        flags, cap = read_cpu_flags(), isa_cap()
    choice = resolve_runtime(options, flags, installed, quantized, cap)
    source = path
    if quantized and choice.runtime == "openvino":
        if choice.int8_activations == "u8":
            source = Path(u8_twin) if u8_twin is not None else None
            if source is None or not source.is_file():
                choice, source = choice.on_onnxruntime(NO_U8_TWIN_NOTE.format(isa=choice.int8_isa)), path
        if choice.runtime == "openvino" and check_images is None:
            choice = choice.on_onnxruntime(NO_CHECK_IMAGES_NOTE)
    start = time.perf_counter()
    opener = _open_openvino if choice.runtime == "openvino" else _open_onnxruntime
    model = opener(source, options, choice)
    if quantized and model.runtime == "openvino":
        model.self_check = run_self_check(model, path, check_images, options)
        if not model.self_check.passed:
            check = model.self_check
            model = _open_onnxruntime(path, options, choice.on_onnxruntime(
                SELF_CHECK_FAILED_NOTE.format(check=check.sentence())))
            model.self_check = check
    model.compile_seconds = time.perf_counter() - start
    return model


# Beside a served INT8 detector's model.onnx (render copies them there from the build; repository/targets.py).
SERVED_U8_TWIN, SERVED_CHECK_IMAGES = "model.u8.onnx", "int8_check_images.npy"


def open_served_model(version_dir: str | Path, filename: str = "model.onnx",
                      options: RuntimeOptions = RuntimeOptions()) -> CompiledModel:
    """A served detector's model, opened as `open_model` opens a build's: an INT8 one with the u8 twin and
    self-check images that lie beside it (the `local` target's detector, and tests that must match it)."""
    version_dir = Path(version_dir)
    u8_twin, check_images = version_dir / SERVED_U8_TWIN, version_dir / SERVED_CHECK_IMAGES
    return open_model(version_dir / filename, options, u8_twin=u8_twin if u8_twin.is_file() else None,
                      check_images=np.load(check_images) if check_images.is_file() else None)


def run_self_check(model: CompiledModel, reference_path: Path, check_images: np.ndarray,
                   options: RuntimeOptions) -> SelfCheck:
    """Run `check_images` through `model` and through onnxruntime's exact Q/DQ emulation of `reference_path`."""
    images = check_images_as_float(check_images)
    reference = _open_onnxruntime(reference_path, RuntimeOptions("onnxruntime", threads=options.threads),
                                  RuntimeChoice("onnxruntime", "f32"))
    # One image at a time: the same call shape as serving at batch 1, and any static batch of 1 is met.
    expected = np.concatenate([reference.run(images[i : i + 1]) for i in range(len(images))])
    try:
        candidate = np.concatenate([model.run(images[i : i + 1]) for i in range(len(images))])
    except Exception:  # noqa: BLE001  (a runtime that cannot even run the check fails it: onnxruntime serves)
        return SelfCheck(len(images), float("inf"))
    return SelfCheck(len(images), output_distance(candidate, expected))


def open_exactly(path: str | Path, options: RuntimeOptions) -> CompiledModel:
    """`path` on exactly the runtime `options` name: no fallback, no INT8 self-check. For benchmarks and tests that
    measure a runtime itself (OpenVINO's INT8 where it is wrong included); never for serving or evaluation."""
    choice = RuntimeChoice(options.runtime, options.precision_hint if options.runtime == "openvino" else "f32")
    opener = _open_openvino if options.runtime == "openvino" else _open_onnxruntime
    return opener(Path(path), options, choice)


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
                         batch_dim if isinstance(batch_dim, int) else None, _infer=infer, _compiled=session)


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
                         None if batch_dim.is_dynamic else batch_dim.get_length(), _infer=infer, _compiled=compiled)
