"""ModelOpt ONNX PTQ: the INT8 twins (fp16-mixed for TensorRT, fp32 for onnxruntime CPU) and the FP16 baseline.

One calibration feeds both INT8 twins: ModelOpt's calibration cache is only re-applied *after* a fresh
calibration run, so it saves nothing. Instead we quantize once with high_precision_dtype="fp32" (the
`int8-fp32` twin) and derive the fp16-mixed twin with ModelOpt AutoCast's `convert_to_f16`, which is exactly
the step ModelOpt's own `quantize(high_precision_dtype="fp16")` runs after calibration. Scales are therefore
identical by construction (a slow test checks the result is bit-identical to ModelOpt's own fp16 path). The
FP16 baseline comes from the same AutoCast function on the FP32 export.

Presets: `mixed` = ModelOpt's default placement, minus the detection head's output convs and the DFL/decode tail
(found by graph structure), minus residual Adds and (`stride4_precise`, the default) minus the backbone's stride-4
stage (early_stage.py); `extreme` quantizes every listed op type, a stress test of
INT8 sensitivity, never a deployment setting; `auto` calibrates ModelOpt's default placement with no preset
exclusions, then keeps the fewest, most sensitive units precise until a label-free agreement target is met on
tuning images (never calibration or validation images): see packager/quantize/auto_preset.py and packager/quantize/sensitivity.py.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packager.core.contracts import ConfigError, MissingInputError, QuantizationError
from packager.quantize.activation_scales import ActivationScaleRecord, refine_activation_scales
from packager.quantize.adaround import AdaRoundRecord
from packager.quantize.early_stage import stride4_stage_convs
from packager.quantize.u8_activations import U8_TWIN_FILE, to_u8_activations

log = logging.getLogger(__name__)

PRESETS = ("mixed", "extreme", "auto")
# auto: pseudo-mAP50-95 of INT8 vs FP32 detections on the tuning images that must be reached (see sensitivity.py).
DEFAULT_AUTO_TARGET = 0.97
# mse: ModelOpt's max calibration, then each activation scale set to its least-rounding-MSE range from histograms
# of the same images (activation_scales.py). The default: on 640 unseen val2017 images as accurate as max, and
# closer to FP32's own detections (docs/quantization.md#int8-accuracy-recipes).
CALIBRATION_METHODS = ("mse", "max", "entropy")
DEFAULT_CALIBRATION_METHOD = "mse"
CALIBRATION_EPS = ("cpu", "cuda:0", "trt")

# The diagnostic "quantize everything" preset: a stress test of INT8 sensitivity, never a deployment setting.
EXTREME_OP_TYPES = [
    "Conv", "MatMul", "MaxPool", "Mul", "Add", "Concat", "Sigmoid", "Softmax", "Split", "Transpose",
    "Reshape", "Slice", "Resize", "Sub", "Div",
]
# mixed keeps residual Adds in high precision: with ModelOpt's default placement their Q/DQ re-quantize the
# sum of two branches; measured on yolov8n (128 val images, 64 calibration images) INT8/FP32 mAP50-95 goes
# from 0.985 to 0.996 with them excluded (head-only exclusions stay at 0.985).
MIXED_OPS_TO_EXCLUDE = ["Add"]
# Ops a graph-walk passes through without doing arithmetic that would change a tensor's meaning for exclusion.
_CONV_OPS = {"Conv", "ConvTranspose"}


class NoGpuProbeNoise(logging.Filter):
    """ModelOpt's calibrator probes NVML and logs an ERROR when there is no GPU; with CPU-only calibration
    that is expected, and an ERROR line in a successful build would only alarm the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to get GPU count" not in record.getMessage()


@dataclass
class QuantizeOptions:
    preset: str = "mixed"
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    calibration_eps: list[str] = field(default_factory=lambda: ["cpu"])
    dq_only: bool = False
    exclude_nodes: list[str] = field(default_factory=list)  # user regexes, matched from the start of node names
    exclude_ops: list[str] = field(default_factory=list)
    calibrate_per_node: bool = False
    trt_plugins: list[str] = field(default_factory=list)
    auto_target: float = DEFAULT_AUTO_TARGET
    auto_refine: int = 2  # auto: split this many of the most sensitive units one level deeper
    stride4_precise: bool = True  # mixed: keep the backbone's stride-4 stage out of INT8 (early_stage.py)
    adaround: bool = False  # learned weight rounding after calibration (adaround.py): minutes, a GPU helps
    adaround_iterations: int = 1500
    adaround_device: str = "auto"

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if not 0 < self.auto_target <= 1:
            raise ConfigError(f"--auto-target must be in (0, 1], got {self.auto_target}")
        if self.preset == "auto" and self.dq_only:
            # Keeping a unit precise restores its FP32 weights from the QuantizeLinear input; dq_only has none.
            raise ConfigError("--preset auto does not support --dq-only yet")
        if self.adaround and self.dq_only:
            # AdaRound learns from the FP32 weights, which dq_only does not keep.
            raise ConfigError("--adaround does not support --dq-only yet")
        if self.adaround_iterations < 1:
            raise ConfigError(f"--adaround-iterations must be at least 1, got {self.adaround_iterations}")
        if self.adaround_device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.adaround_device):
            raise ConfigError(f"--adaround-device must be auto, cpu, cuda or cuda:N, got {self.adaround_device!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"unknown calibration method {self.calibration_method!r}: choose {', '.join(CALIBRATION_METHODS)}"
            )
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"--exclude-nodes {pattern!r} is not a valid regular expression: {error}") from None
        for plugin in self.trt_plugins:
            if not Path(plugin).is_file():
                raise MissingInputError(f"TensorRT plugin library not found: {plugin}")


@dataclass
class QuantizeResult:
    int8_path: Path  # fp16-mixed, for TensorRT
    int8_fp32_path: Path  # fp32 non-quantized part, for onnxruntime CPU
    preset: str
    excluded_nodes: list[str]  # concrete node names kept out of INT8 (head + user matches)
    excluded_ops: list[str]  # op types kept out of INT8 (preset + user)
    op_types_to_quantize: list[str] | None
    quantized_nodes: int  # nodes with a DequantizeLinear on an input
    calibration_images: int
    wall_time_s: float
    auto: AutoSelection | None = None  # preset auto: what was kept precise and why
    activation_scales: ActivationScaleRecord | None = None  # calibration method mse: the refined ranges
    adaround: AdaRoundRecord | None = None  # --adaround: the learned rounding


def head_nodes_to_keep_precise(onnx_model) -> list[str]:
    """The detection head's final convolutions and the decode/DFL tail, found by graph structure.

    A node belongs to the tail when some graph output is reachable from it without passing through a
    feature convolution (the DFL conv, fed by a Softmax, is an expectation over bins, not a feature layer,
    so the walk passes through it): for YOLOv8/YOLO11 that is every per-level box/class output conv (`cv2.*.2`, `cv3.*.2`),
    the DFL conv and the decode arithmetic after them (concat, split, softmax, dist2bbox, sigmoid).
    The same walk covers both head formats: for an end-to-end head (YOLO26) it finds the one-to-one branch's
    output convs (`one2one_cv2.*.2`, `one2one_cv3.*.2`), the box decode and the selection tail (ReduceMax,
    TopK, GatherElements, Mod/Div class index, Concat of the (k, 6) rows), since none of those is a conv.
    """
    nodes = list(onnx_model.graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    graph_outputs = {o.name for o in onnx_model.graph.output}
    producers = {name: node for node in nodes for name in node.output}

    # reaches[i]: node i's result reaches a graph output through non-conv nodes only (conv nodes themselves
    # may be the start of such a path). Walk in reverse topological order (ONNX nodes are topologically sorted).
    reaches = [False] * len(nodes)
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        if any(name in graph_outputs for name in node.output):
            reaches[index] = True
            continue
        reaches[index] = any(
            reaches[c] and (nodes[c].op_type not in _CONV_OPS or _is_dfl_conv(nodes[c], producers))
            for name in node.output
            for c in consumers.get(name, [])
        )
    head_convs = [i for i, node in enumerate(nodes) if reaches[i] and node.op_type in _CONV_OPS]
    if not head_convs:
        return []
    # The tail: everything downstream of the head convs.
    first = min(head_convs)
    downstream = set(head_convs)
    for index in range(first, len(nodes)):
        if index in downstream:
            for name in nodes[index].output:
                downstream.update(consumers.get(name, []))
    return [nodes[i].name for i in sorted(downstream)]


def _is_dfl_conv(node, producers) -> bool:
    """A conv over a softmax: the DFL's fixed-weight expectation over distance bins."""
    producer = producers.get(node.input[0])
    return producer is not None and producer.op_type == "Softmax"


def expand_node_patterns(onnx_model, patterns: list[str]) -> list[str]:
    """Node names matched by user regexes the way ModelOpt matches them (re.match: from the start)."""
    compiled = [re.compile(p) for p in patterns]
    return [n.name for n in onnx_model.graph.node if any(c.match(n.name) for c in compiled)]


def quantize_int8_twins(
    fp32_path: str | Path,
    calibration: np.ndarray,
    out_dir: str | Path,
    options: QuantizeOptions | None = None,
) -> QuantizeResult:
    """Calibrate once on `calibration` and write `model.int8-fp32.onnx` and `model.int8.onnx` into `out_dir`."""
    import onnx

    options = options or QuantizeOptions()
    options.validate()
    if calibration is None or len(calibration) == 0:
        # ModelOpt would fall back to random data: never allow that.
        raise ConfigError("INT8 quantization needs calibration data (real images), got none")
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    source = onnx.load(str(fp32_path))
    batch_dim = source.graph.input[0].type.tensor_type.shape.dim[0]
    if options.calibrate_per_node and not batch_dim.HasField("dim_value"):
        # Verified here: ModelOpt's per-node calibrator runs onnxruntime's symbolic shape inference, which
        # gives up on a dynamic batch ("Incomplete symbolic shape inference").
        raise ConfigError("--calibrate-per-node needs a static-batch model: add --static-batch")
    op_types_present = {n.op_type for n in source.graph.node}
    unknown_ops = [op for op in options.exclude_ops if op not in op_types_present]
    if unknown_ops:
        log.warning("--exclude-ops %s: no such op type in the model", ", ".join(unknown_ops))

    excluded = expand_node_patterns(source, options.exclude_nodes)
    excluded_ops = list(dict.fromkeys(options.exclude_ops))
    op_types_to_quantize = None
    if options.preset == "mixed":
        kept = set(head_nodes_to_keep_precise(source)) | set(stride4_stage_convs(source) if options.stride4_precise
                                                             else [])
        excluded = sorted(set(excluded) | kept, key=node_order(source))
        excluded_ops = list(dict.fromkeys(MIXED_OPS_TO_EXCLUDE + excluded_ops))
    elif options.preset == "extreme":  # only the ops the model has (ModelOpt rejects unknown spellings)
        op_types_to_quantize = [op for op in EXTREME_OP_TYPES if op in op_types_present]
    # auto: ModelOpt's default placement with only the user's exclusions; apply_auto_preset picks the rest.
    nodes_to_exclude = [re.escape(name) + "$" for name in excluded]

    modelopt_logger = logging.getLogger("modelopt.onnx")
    noise_filter = NoGpuProbeNoise()
    if all(ep == "cpu" for ep in options.calibration_eps):
        modelopt_logger.addFilter(noise_filter)
    started = time.perf_counter()
    try:
        result = _quantize_in_temp_dir(fp32_path, source, calibration, out_dir, options, op_types_to_quantize,
                                       excluded_ops, nodes_to_exclude)
    finally:
        modelopt_logger.removeFilter(noise_filter)
    wall_time = time.perf_counter() - started
    int8_path, int8_fp32_path, quantized_nodes, scales = result
    return QuantizeResult(
        int8_path=int8_path,
        int8_fp32_path=int8_fp32_path,
        preset=options.preset,
        excluded_nodes=excluded,
        excluded_ops=excluded_ops,
        op_types_to_quantize=op_types_to_quantize,
        quantized_nodes=quantized_nodes,
        calibration_images=int(len(calibration)),
        wall_time_s=round(wall_time, 2),
        activation_scales=scales,
    )


def _quantize_in_temp_dir(
    fp32_path, source, calibration, out_dir, options, op_types_to_quantize, op_types_to_exclude, nodes_to_exclude
):
    import onnx
    from modelopt.onnx.quantization import quantize

    with tempfile.TemporaryDirectory(prefix="yqpack-quantize-") as tmp:
        # ModelOpt leaves *_named.onnx / *_opset19.onnx etc. beside its input when killed: work in a temp dir.
        work_input = Path(tmp) / "model.onnx"
        shutil.copyfile(fp32_path, work_input)
        fp32_twin = Path(tmp) / "model.int8-fp32.onnx"
        quantize(
            onnx_path=str(work_input),
            quantize_mode="int8",
            calibration_data={source.graph.input[0].name: np.ascontiguousarray(calibration, dtype=np.float32)},
            calibration_method=modelopt_calibration_method(options.calibration_method),
            calibration_eps=list(options.calibration_eps),
            op_types_to_quantize=op_types_to_quantize,
            op_types_to_exclude=list(op_types_to_exclude) or None,
            nodes_to_exclude=nodes_to_exclude,
            high_precision_dtype="fp32",
            dq_only=options.dq_only,
            calibrate_per_node=options.calibrate_per_node,
            trt_plugins=list(options.trt_plugins) or None,
            output_path=str(fp32_twin),
            log_level="WARNING",
        )
        if not fp32_twin.is_file():
            raise QuantizationError("ModelOpt finished without writing a quantized model (see its log above)")
        quantized = onnx.load(str(fp32_twin))
        scales = None
        if options.calibration_method == "mse":
            scales = refine_activation_scales(quantized, source, calibration)
        out_dir.mkdir(parents=True, exist_ok=True)
        int8_fp32_path, int8_path = write_int8_twins(quantized, out_dir)
    return int8_path, int8_fp32_path, len(quantized_node_names(quantized)), scales


def modelopt_calibration_method(method: str) -> str:
    """What ModelOpt calibrates with: `mse` starts from ModelOpt's max ranges (then refined here)."""
    return "max" if method == "mse" else method


def write_int8_twins(quantized, out_dir: Path) -> tuple[Path, Path]:
    """Save the FP32-elsewhere twin and derive the FP16-elsewhere twin from it (same scales, FP32 I/O kept: what
    TensorRT builds the engine from), and the u8-activation twin OpenVINO's VNNI kernels need (u8_activations.py).
    Returns (int8-fp32 path, int8 path)."""
    import onnx
    from modelopt.onnx.autocast import convert_to_f16

    int8_fp32_path, int8_path = out_dir / "model.int8-fp32.onnx", out_dir / "model.int8.onnx"
    onnx.save(quantized, str(int8_fp32_path))
    onnx.save(convert_to_f16(quantized, low_precision_type="fp16", keep_io_types=True), str(int8_path))
    onnx.save(to_u8_activations(quantized), str(out_dir / U8_TWIN_FILE))
    return int8_fp32_path, int8_path


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """FP16 baseline with ModelOpt AutoCast (`convert_to_f16`), inputs and outputs kept FP32."""
    import onnx
    from modelopt.onnx.autocast import convert_to_f16

    model = convert_to_f16(onnx.load(str(fp32_path)), low_precision_type="fp16", keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)


def quantized_node_names(onnx_model) -> list[str]:
    """Compute nodes fed by a DequantizeLinear (directly, or through a Cast in fp16-mixed graphs)."""
    producers = {out: node for node in onnx_model.graph.node for out in node.output}

    def from_dequantize(tensor: str) -> bool:
        producer = producers.get(tensor)
        if producer is not None and producer.op_type == "Cast":
            producer = producers.get(producer.input[0])
        return producer is not None and producer.op_type == "DequantizeLinear"

    return [
        node.name
        for node in onnx_model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast") and any(map(from_dequantize, node.input))
    ]


def node_order(onnx_model):
    """Sort key: a node name's position in the graph (unknown names last)."""
    order = {n.name: i for i, n in enumerate(onnx_model.graph.node)}
    return lambda name: order.get(name, len(order))


@dataclass
class AutoSelection:
    """What the auto preset kept precise, and the label-free evidence for it."""

    target: float
    tuning_images: int
    met_target: bool
    kept_precise: list[str]  # units, most sensitive first
    final: dict  # agreement, SQNR and INT8 conv-MAC share of the chosen configuration
    steps: list[dict]  # per greedy trial: unit tried, accepted?, units kept precise, agreement, SQNR, coverage
    ranking: list[dict]  # every unit: only-this-unit-INT8 agreement and SQNR, most sensitive first
    all_int8: dict  # agreement and SQNR with everything INT8
    wall_time_s: float

    def reason(self) -> str:
        final = self.final
        verdict = "reached" if self.met_target else "NOT reached"
        return (f"agreement target {self.target} {verdict} on {self.tuning_images} tuning images: "
                f"{self.all_int8['agreement']:.4f} with everything INT8 -> {final['agreement']:.4f} with "
                f"{len(self.kept_precise)} unit(s) kept precise ({', '.join(self.kept_precise) or 'none'}), "
                f"INT8 conv MACs {final['int8_mac_coverage']:.1%}")

    def as_dict(self) -> dict:
        return {"target": self.target, "tuning_images": self.tuning_images, "met_target": self.met_target,
                "kept_precise": self.kept_precise, "reason": self.reason(), "final": self.final,
                "all_int8": self.all_int8,
                "steps": self.steps, "ranking": self.ranking, "wall_time_s": self.wall_time_s}
