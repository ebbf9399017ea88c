"""What `yqpack build` is asked (`BuildOptions`: every option of the command, also the keys of a --config file)
and what it answers (`BuildResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from packager.calibration.calibration import DEFAULT_CALIB_SIZE
from packager.core.build_records import ConvCoverage, CocoMetrics, RatioInterval
from packager.core.manifest import BuildManifest
from packager.evaluate.onnx_eval import DEFAULT_MIN_MAP_RATIO, BuildGateResult
from packager.export.onnx_export import DEFAULT_OPSET, ExportResult
from packager.inference.runtime import RuntimeOptions
from packager.quantize.fp8 import Fp8Result
from packager.quantize.int8 import QuantizeOptions, QuantizeResult


@dataclass
class BuildOptions:
    model: Path
    out: Path
    calib_images: Path | None = None
    calib_data: Path | None = None  # .npy / .npz tensor instead of an image folder
    calib_size: int = DEFAULT_CALIB_SIZE
    tune_images: Path | None = None  # preset auto: tuning images (default: --calib-images after the first calib_size)
    max_tune_images: int = 64
    imgsz: tuple[int, int] | None = None  # None: the size the model was trained at (export.model_imgsz)
    max_batch: int = 8
    dynamic_batch: bool = True
    opset: int = DEFAULT_OPSET
    end2end: bool | None = None  # None: the NMS-free head when the model has one (YOLO26); False: classic head
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    val_images: Path | None = None
    val_annotations: Path | None = None
    # A dataset YAML: calibration (and tuning) images spread over its train split, evaluation on its `split`.
    data: Path | None = None
    split: str = "val"
    # --preset not given: `mixed`, then `auto` when mixed misses the accuracy gate (pipeline/gate.py).
    auto_fallback: bool = False
    min_map_ratio: float = DEFAULT_MIN_MAP_RATIO
    repository: Path | None = None  # render a Triton model repository from the finished build
    repository_target: str = "local"
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # runs the eval gate and the local detector
    show_progress: bool = True
    # FP8 twins only when asked for: FP8 plans need compute capability >= 8.9, and a default gpu repository must
    # come up on a T4 (the engines step skips an FP8 plan below 8.9 and Triton then serves the other precisions).
    fp8: bool | None = None
    allow_overlap: bool = False  # validation images shared with calibration/tuning: warn instead of refusing

    @property
    def build_fp8(self) -> bool:
        return bool(self.fp8)


@dataclass
class BuildResult:
    build_dir: Path
    manifest: BuildManifest
    export: ExportResult
    quantization: QuantizeResult
    metrics: dict[str, CocoMetrics] = field(default_factory=dict)
    gate: BuildGateResult | None = None
    repository: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    coverage: dict[str, ConvCoverage] = field(default_factory=dict)  # int8 / fp8 artifact -> MAC coverage
    fp8: Fp8Result | None = None
    intervals: dict[str, RatioInterval] = field(default_factory=dict)  # variant -> ratio vs fp32 with interval
    gates: list[BuildGateResult] = field(default_factory=list)
    attempts: list = field(default_factory=list)  # pipeline/gate.py GateAttempt per INT8 preset gated
