"""What the build's stages recorded in manifest.json, as typed records (standard library only).

- `CalibrationRecord`: where the calibration tensor came from, which images calibrated and tuned (by content hash);
- `QuantizationRecord`: the INT8 recipe, what it kept precise, its MAC coverage (`ConvCoverage`), the FP8 twins;
- `EvaluationRecord`: the build's accuracy gate: COCO metrics per variant (`CocoMetrics`), ratios vs FP32 with
  their paired bootstrap intervals (`RatioInterval`), the gates.

`yqpack build` writes them; eval-onnx, render, engines, sensitivity and verify read them through `BuildManifest`
(manifest.py). The JSON keys are the ones yqpack has always written, so older manifests load: a record without a
`format` number is format 1. A malformed record is a ManifestError naming its key, never a KeyError; keys this
yqpack does not know (a newer yqpack's) are kept in `other` and written back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from packager.core.contracts import JsonFields, ManifestError, is_number

RECORD_FORMAT = 1


def _record_fields(data: Any, where: str) -> JsonFields:
    """The fields of a versioned record: no `format` is format 1; another is refused with the way out."""
    fields = JsonFields(data, where)
    version = fields.take("format", 1, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
    if version != RECORD_FORMAT:
        raise ManifestError(f"{where} has format {version}; this yqpack reads format {RECORD_FORMAT}: "
                            "upgrade yqpack or rebuild")
    return fields


def _with_format(data: dict, other: dict) -> dict:
    return {"format": RECORD_FORMAT, **data, **other}


# --- measurements the records hold -----------------------------------------------------------------------------
@dataclass
class CocoMetrics:
    """COCO detection metrics of one model on one image set (pycocotools' summary numbers)."""

    map50_95: float
    map50: float
    map75: float
    map_small: float
    map_medium: float
    map_large: float
    images: int
    detections: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "metrics") -> "CocoMetrics":
        fields = JsonFields(data, where)
        scores = [fields.number(key) for key in ("map50_95", "map50", "map75", "map_small", "map_medium",
                                                 "map_large")]
        return cls(*scores, fields.integer("images"), fields.integer("detections"))


@dataclass
class RatioInterval:
    """candidate / reference mAP50-95 on the full set, with a paired percentile bootstrap interval."""

    candidate: str
    reference: str
    ratio: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    images: int

    @property
    def width(self) -> float:
        return self.high - self.low

    def too_small_to_decide(self, margin: float) -> bool:
        """The interval is wider than the margin being tested (e.g. 0.01 for a 0.99 gate)."""
        return self.width > margin

    def images_needed(self, half_width: float) -> int:
        """Images for an interval of +-half_width, extrapolated with the 1/sqrt(n) scaling of the width."""
        if self.width <= 0:
            return self.images
        return int(math.ceil(self.images * (self.width / (2 * half_width)) ** 2))

    def text(self) -> str:
        return f"{self.ratio:.4f} ({self.confidence:.0%} CI {self.low:.4f}-{self.high:.4f}, n={self.images})"

    def as_dict(self) -> dict:
        return {**asdict(self), "width": self.width}

    @classmethod
    def from_dict(cls, data: Any, where: str = "interval") -> "RatioInterval":
        fields = JsonFields(data, where)  # `width` is derived
        return cls(fields.text("candidate"), fields.text("reference"), fields.number("ratio"), fields.number("low"),
                   fields.number("high"), fields.number("confidence"), fields.integer("resamples"),
                   fields.integer("seed"), fields.integer("images"))


@dataclass
class ConvCoverage:
    """Convolution MACs per image, in total and by the precision the convolution runs in."""

    total_macs: int
    quantized_macs: dict[str, int]  # {"int8": ..., "fp8": ...}
    convolutions: int
    quantized_convolutions: dict[str, int]

    def share(self, precision: str = "int8") -> float:
        return self.quantized_macs.get(precision, 0) / self.total_macs if self.total_macs else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "int8_mac_coverage": round(self.share("int8"), 5),
                "fp8_mac_coverage": round(self.share("fp8"), 5)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "conv_coverage") -> "ConvCoverage":
        fields = JsonFields(data, where)  # the *_mac_coverage keys are derived
        return cls(fields.integer("total_macs"), fields.counts("quantized_macs"), fields.integer("convolutions"),
                   fields.counts("quantized_convolutions"))


# --- calibration ------------------------------------------------------------------------------------------------
LETTERBOX = "packager.inference.letterbox.preprocess"


@dataclass(frozen=True)
class TuningRecord:
    """The tuning images (preset auto's): never calibration images."""

    count: int = 0
    files: tuple[str, ...] = ()
    used_by: str | None = None  # "preset auto", or None when nothing tuned on them

    def to_dict(self) -> dict:
        return {"count": self.count, "files": list(self.files), "used_by": self.used_by}

    @classmethod
    def from_dict(cls, data: Any, where: str = "tuning") -> "TuningRecord":
        fields = JsonFields(data, where)
        return cls(fields.integer("count", 0), fields.texts("files"), fields.optional_text("used_by"))


@dataclass(frozen=True)
class CalibrationRecord:
    """manifest.json `calibration`: the calibration tensor's source and size, and the images behind it."""

    source: str  # the image folder, or the .npy/.npz file (resolved)
    count: int
    skipped: tuple[str, ...] = ()  # unreadable calibration files left out
    letterbox: str = LETTERBOX
    tuning: TuningRecord = field(default_factory=TuningRecord)
    image_sha256: dict[str, str] = field(default_factory=dict)  # {sha256: file name} of the calibration images
    tuning_image_sha256: dict[str, str] = field(default_factory=dict)
    selection: str = ""  # how the images were chosen, e.g. spread over a dataset YAML's train split
    other: dict = field(default_factory=dict)

    def used_images(self) -> dict[str, dict[str, str]]:
        """{role: {sha256: file name}} of every image that shaped the recipe (what validation images must not be)."""
        used = {"calibration": self.image_sha256, "tuning": self.tuning_image_sha256}
        return {role: hashes for role, hashes in used.items() if hashes}

    def to_dict(self) -> dict:
        return _with_format({
            "source": self.source, "count": self.count, "skipped": list(self.skipped), "letterbox": self.letterbox,
            "tuning": self.tuning.to_dict(), "image_sha256": dict(self.image_sha256),
            "tuning_image_sha256": dict(self.tuning_image_sha256),
            **({"selection": self.selection} if self.selection else {}),
        }, self.other)

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "CalibrationRecord":
        fields = _record_fields(data, where)
        return cls(
            source=fields.text("source"), count=fields.integer("count"), skipped=fields.texts("skipped"),
            letterbox=fields.text("letterbox", LETTERBOX),
            tuning=fields.optional("tuning", TuningRecord.from_dict) or TuningRecord(),
            image_sha256=fields.names("image_sha256"), tuning_image_sha256=fields.names("tuning_image_sha256"),
            selection=fields.text("selection", ""), other=fields.other(),
        )


# --- quantization -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Record:
    """manifest.json `quantization.fp8`: the FP8 (E4M3) twins, made from the INT8 recipe's calibration and exclusions."""

    quantized_nodes: int
    fp8_mac_coverage: float | None = None
    wall_time_s: float | None = None
    calibration_method: str | None = None  # ModelOpt's: INT8's MSE refinement is for the 8-bit integer grid only
    quantize_mode: str = "fp8"
    format: str = "E4M3 (float8e4m3fn) Q/DQ"
    high_precision_dtype: dict[str, str] = field(default_factory=lambda: {"fp8": "fp16", "fp8-fp32": "fp32"})
    same_calibration_and_exclusions_as_int8: bool = True
    served_on: str = "gpu target only (TensorRT, compute capability >= 8.9)"
    cpu_evaluation: str = "onnxruntime CPU with graph optimizations disabled"
    other: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        # No record format number here: `format` has always named the FP8 encoding; the quantization record's counts.
        data = {key: value for key, value in asdict(self).items() if key != "other"
                and not (key == "calibration_method" and value is None)}  # builds before it: INT8's method
        return {**data, "high_precision_dtype": dict(self.high_precision_dtype), **self.other}

    @classmethod
    def from_dict(cls, data: Any, where: str = "fp8") -> "Fp8Record":
        fields = JsonFields(data, where)
        defaults = cls(0)
        return cls(
            quantized_nodes=fields.integer("quantized_nodes"), fp8_mac_coverage=fields.number("fp8_mac_coverage", None),
            wall_time_s=fields.number("wall_time_s", None),
            calibration_method=fields.optional_text("calibration_method"),
            quantize_mode=fields.text("quantize_mode", defaults.quantize_mode),
            format=fields.text("format", defaults.format),
            high_precision_dtype=fields.names("high_precision_dtype") or defaults.high_precision_dtype,
            same_calibration_and_exclusions_as_int8=fields.flag("same_calibration_and_exclusions_as_int8", True),
            served_on=fields.text("served_on", defaults.served_on),
            cpu_evaluation=fields.text("cpu_evaluation", defaults.cpu_evaluation),
            other=fields.other(),
        )


@dataclass(frozen=True)
class QuantizationRecord:
    """manifest.json `quantization`: the INT8 recipe (ModelOpt's settings, what was kept precise), what it
    quantized (nodes, MAC coverage per quantized artifact), the FP8 twins and preset auto's selection."""

    preset: str
    calibration_method: str
    calibration_eps: tuple[str, ...] = ("cpu",)
    dq_only: bool = False
    calibrate_per_node: bool = False
    trt_plugins: tuple[str, ...] = ()
    excluded_nodes: tuple[str, ...] = ()  # the resolved names
    excluded_node_patterns: tuple[str, ...] = ()  # --exclude-nodes as given
    excluded_ops: tuple[str, ...] = ()
    op_types_to_quantize: tuple[str, ...] | None = None
    quantized_nodes: int | None = None
    wall_time_s: float | None = None
    int8_mac_coverage: float | None = None
    conv_coverage: dict[str, ConvCoverage] = field(default_factory=dict)  # "int8" / "fp8" artifact -> coverage
    fp8: Fp8Record | None = None
    auto: dict | None = None  # preset auto's own report (AutoSelection.as_dict: target, steps, ranking, ...)
    stride4_precise: bool = False  # mixed: the backbone's stride-4 stage kept out of INT8 (builds before: False)
    activation_scales: dict | None = None  # calibration mse: the refined ranges (ActivationScaleRecord.as_dict)
    adaround: dict | None = None  # --adaround: the learned rounding (AdaRoundRecord.as_dict)
    tool: str = "nvidia-modelopt onnx PTQ"
    quantize_mode: str = "int8"
    high_precision_dtype: dict[str, str] = field(default_factory=lambda: {"int8": "fp16", "int8-fp32": "fp32"})
    twins_from_one_calibration: bool = True
    fp16_conversion: str = "modelopt.onnx.autocast.convert_to_f16 (keep_io_types=True)"
    other: dict = field(default_factory=dict)

    def mac_coverage(self, precision: str) -> float | None:
        """Share of convolution MACs the `precision` ("int8" / "fp8") artifact runs quantized; None if unrecorded."""
        if precision in self.conv_coverage:
            return self.conv_coverage[precision].share(precision)
        if precision == "int8":
            return self.int8_mac_coverage
        return self.fp8.fp8_mac_coverage if precision == "fp8" and self.fp8 is not None else None

    def to_dict(self) -> dict:
        data = {
            "tool": self.tool, "quantize_mode": self.quantize_mode, "preset": self.preset,
            "calibration_method": self.calibration_method, "calibration_eps": list(self.calibration_eps),
            "dq_only": self.dq_only, "calibrate_per_node": self.calibrate_per_node,
            "trt_plugins": list(self.trt_plugins), "excluded_nodes": list(self.excluded_nodes),
            "excluded_node_patterns": list(self.excluded_node_patterns), "excluded_ops": list(self.excluded_ops),
            "op_types_to_quantize": None if self.op_types_to_quantize is None else list(self.op_types_to_quantize),
            "quantized_nodes": self.quantized_nodes, "high_precision_dtype": dict(self.high_precision_dtype),
            "twins_from_one_calibration": self.twins_from_one_calibration, "fp16_conversion": self.fp16_conversion,
            "wall_time_s": self.wall_time_s,
        }
        if self.auto is not None:
            data["auto"] = self.auto
        if self.stride4_precise:  # absent in the builds that predate it, which all quantized that stage
            data["stride4_precise"] = True
        for key in ("activation_scales", "adaround"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.int8_mac_coverage is not None:
            data["int8_mac_coverage"] = self.int8_mac_coverage
        if self.conv_coverage:
            data["conv_coverage"] = {name: coverage.as_dict() for name, coverage in self.conv_coverage.items()}
        if self.fp8 is not None:
            data["fp8"] = self.fp8.to_dict()
        return _with_format(data, self.other)

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantization") -> "QuantizationRecord":
        fields = _record_fields(data, where)
        defaults = cls("", "")
        auto = fields.take("auto", None, lambda v: v is None or isinstance(v, dict), "an object")
        return cls(
            preset=fields.text("preset"), calibration_method=fields.text("calibration_method"),
            calibration_eps=fields.texts("calibration_eps", defaults.calibration_eps),
            dq_only=fields.flag("dq_only", False), calibrate_per_node=fields.flag("calibrate_per_node", False),
            trt_plugins=fields.texts("trt_plugins"), excluded_nodes=fields.texts("excluded_nodes"),
            excluded_node_patterns=fields.texts("excluded_node_patterns"), excluded_ops=fields.texts("excluded_ops"),
            op_types_to_quantize=fields.texts("op_types_to_quantize", None),
            quantized_nodes=fields.integer("quantized_nodes", None),
            wall_time_s=fields.number("wall_time_s", None), int8_mac_coverage=fields.number("int8_mac_coverage", None),
            conv_coverage=fields.objects("conv_coverage", ConvCoverage.from_dict),
            fp8=fields.optional("fp8", Fp8Record.from_dict), auto=auto,
            stride4_precise=fields.flag("stride4_precise", False),
            activation_scales=fields.take("activation_scales", None, lambda v: v is None or isinstance(v, dict),
                                          "an object"),
            adaround=fields.take("adaround", None, lambda v: v is None or isinstance(v, dict), "an object"),
            tool=fields.text("tool", defaults.tool), quantize_mode=fields.text("quantize_mode", "int8"),
            high_precision_dtype=fields.names("high_precision_dtype") or defaults.high_precision_dtype,
            twins_from_one_calibration=fields.flag("twins_from_one_calibration", True),
            fp16_conversion=fields.text("fp16_conversion", defaults.fp16_conversion),
            other=fields.other(),
        )


# --- evaluation -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateRecord:
    """One accuracy gate the build passed: `variant` mAP50-95 / fp32 mAP50-95 = `ratio`."""

    variant: str
    ratio: float
    passed: bool = True
    decidable: bool | None = None  # False: the interval was wider than the margin tested

    def to_dict(self) -> dict:
        return {"variant": self.variant, "ratio": round(self.ratio, 5), "passed": self.passed,
                "decidable": self.decidable}

    @classmethod
    def from_dict(cls, data: Any, where: str = "gate") -> "GateRecord":
        fields = JsonFields(data, where)
        return cls(fields.text("variant"), fields.number("ratio"), fields.flag("passed", True),
                   fields.flag("decidable", None))


_EVALUATION_KEYS = ("format", "ratios_vs_fp32", "runtime", "gate", "gates", "attempts")


@dataclass(frozen=True)
class EvaluationRecord:
    """manifest.json `evaluation` (builds made with --val-images): COCO metrics of each ONNX variant (one key per
    variant), their ratios vs fp32 with paired bootstrap intervals, the runtime that ran them and the gates."""

    metrics: dict[str, CocoMetrics]
    ratios_vs_fp32: dict[str, RatioInterval] = field(default_factory=dict)
    runtime: str = "onnxruntime"  # what ran the evaluation (builds before the runtime choice ran onnxruntime)
    min_ratio: float | None = None
    gates: tuple[GateRecord, ...] = ()  # the first is the INT8 gate
    attempts: tuple[dict, ...] = ()  # each INT8 preset gated, in order (pipeline/gate.py GateAttempt.as_dict)
    other: dict = field(default_factory=dict)

    @property
    def gate(self) -> GateRecord | None:
        return self.gates[0] if self.gates else None

    def map50_95(self, variant: str, images: int) -> float | None:
        """The recorded mAP50-95 of `variant` if it was measured on `images` images, else None."""
        metrics = self.metrics.get(variant)
        return metrics.map50_95 if metrics is not None and metrics.images == images else None

    def to_dict(self) -> dict:
        data: dict = {variant: metrics.as_dict() for variant, metrics in self.metrics.items()}
        data["ratios_vs_fp32"] = {variant: interval.as_dict() for variant, interval in self.ratios_vs_fp32.items()}
        data["runtime"] = self.runtime
        if self.gates:
            first = self.gates[0].to_dict()
            data["gate"] = {"variant": first["variant"], "min_ratio": self.min_ratio, "ratio": first["ratio"],
                            "passed": first["passed"], "decidable": first["decidable"]}
            data["gates"] = [gate.to_dict() for gate in self.gates]
        if self.attempts:
            data["attempts"] = list(self.attempts)
        return _with_format(data, self.other)

    @classmethod
    def from_dict(cls, data: Any, where: str = "evaluation") -> "EvaluationRecord":
        fields = _record_fields(data, where)
        ratios = fields.objects("ratios_vs_fp32", RatioInterval.from_dict)
        runtime = fields.text("runtime", "onnxruntime")
        gate = fields.optional("gate", GateRecord.from_dict)
        listed = fields.take("gates", [], lambda v: isinstance(v, list), "a list")
        gates = tuple(GateRecord.from_dict(item, f"{where}: gates[{i}]") for i, item in enumerate(listed))
        if not gates and gate is not None:  # builds before the FP8 gate recorded only `gate`
            gates = (gate,)
        min_ratio = (fields.data.get("gate") or {}).get("min_ratio")
        if min_ratio is not None and not is_number(min_ratio):
            raise ManifestError(f"{where}: gate.min_ratio must be a number, got {min_ratio!r}")
        metrics = {variant: CocoMetrics.from_dict(value, f"{where}: {variant}")
                   for variant, value in data.items() if variant not in _EVALUATION_KEYS}
        attempts = fields.take("attempts", [], lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v),
                               "a list of objects")
        return cls(metrics, ratios, runtime, None if min_ratio is None else float(min_ratio), gates, tuple(attempts))
