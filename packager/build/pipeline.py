"""`yqpack build`: export -> calibration -> INT8 twins + FP16 -> manifest -> optional eval gate -> optional render.

Everything is built in a temporary sibling of `--out` and moved into place only when complete (and, if an
evaluation was asked for, only when the accuracy gate passed), so `--out` never holds half a build.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from packager.calibration.calibration import (
    DEFAULT_CALIB_SIZE,
    CalibrationResult,
    build_calibration,
    calibration_files,
    check_no_overlap,
    image_hashes,
    list_images,
    load_calibration_file,
    split_calibration_and_tuning,
)
from packager.metrics.intervals import RatioInterval
from packager.build.manifest import assemble_manifest, record_quantization_extras
from packager.metrics.coco_eval import CocoMetrics
from packager.metrics.mac_coverage import ConvCoverage, conv_coverage
from packager.core.files import replace_directory
from packager.export.onnx_export import DEFAULT_OPSET, ExportResult, check_model_path, export_onnx, parse_imgsz
from packager.core.contracts import (
    ARTIFACT_FILES,
    MANIFEST_NAME,
    AccuracyGateError,
    BuildManifest,
    ConfigError,
    MissingInputError,
)
from packager.evaluate.onnx_eval import (
    DEFAULT_MIN_MAP_RATIO,
    DEFAULT_VARIANTS,
    GATED_VARIANT,
    BuildGateResult,
    check_gate,
    evaluate_build_detailed,
    validation_files,
)
from packager.quantize.auto_preset import apply_auto_preset
from packager.quantize.int8 import QuantizeOptions, QuantizeResult, convert_fp16, quantize_int8_twins
from packager.quantize.fp8 import Fp8Result, quantize_fp8_twins
from packager.inference.runtime import RuntimeOptions, evaluation_label

# Random-init models (.yaml) get their BatchNorm statistics from this many calibration images.
BATCHNORM_IMAGES = 16


@dataclass
class BuildOptions:
    model: Path
    out: Path
    calib_images: Path | None = None
    calib_data: Path | None = None  # .npy / .npz tensor instead of an image folder
    calib_size: int = DEFAULT_CALIB_SIZE
    tune_images: Path | None = None  # preset auto: tuning images (default: --calib-images after the first calib_size)
    max_tune_images: int = 64
    imgsz: tuple[int, int] = (640, 640)
    max_batch: int = 8
    dynamic_batch: bool = True
    opset: int = DEFAULT_OPSET
    end2end: bool | None = None  # None: the NMS-free head when the model has one (YOLO26); False: classic head
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    val_images: Path | None = None
    val_annotations: Path | None = None
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


def validate_options(options: BuildOptions) -> None:
    """Every cheap check before any heavy work, so mistakes fail in a second with a plain message."""
    check_model_path(options.model)
    options.imgsz = parse_imgsz(options.imgsz)
    if options.calib_images is None and options.calib_data is None:
        raise ConfigError(
            "INT8 calibration needs real images: pass --calib-images DIR (or --calib-data FILE.npy/.npz); "
            "ModelOpt would otherwise calibrate on random data"
        )
    if options.calib_images is not None and options.calib_data is not None:
        raise ConfigError("pass either --calib-images or --calib-data, not both")
    if options.calib_images is not None:
        list_images(options.calib_images)
    elif not Path(options.calib_data).is_file():
        raise MissingInputError(f"calibration data file not found: {options.calib_data}")
    if options.calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {options.calib_size}")
    if options.tune_images is not None:
        list_images(options.tune_images)
    if options.quantize.preset == "auto" and options.tune_images is None and (
            options.calib_images is None or len(list_images(options.calib_images)) <= options.calib_size):
        raise ConfigError("--preset auto needs tuning images besides the calibration images: give more "
                         "--calib-images than --calib-size, or --tune-images DIR")
    if options.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {options.max_batch}")
    if (options.val_images is None) != (options.val_annotations is None):
        raise ConfigError("evaluation needs both --val-images and --val-annotations")
    if options.val_annotations is not None and not Path(options.val_annotations).is_file():
        raise MissingInputError(f"annotation file not found: {options.val_annotations}")
    if options.val_images is not None and not Path(options.val_images).is_dir():
        raise MissingInputError(f"validation image folder not found: {options.val_images}")
    if not 0 < options.min_map_ratio <= 1.5:
        raise ConfigError(f"--min-map-ratio must be in (0, 1.5], got {options.min_map_ratio}")
    options.quantize.validate()
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise ConfigError(f"--out {out} exists and is not a yqpack build directory: refusing to overwrite it")


def run_build(options: BuildOptions, console: Console | None = None) -> BuildResult:
    console = console or Console(stderr=True)
    validate_options(options)
    out = Path(options.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would follow the build into --out
    try:
        result = _build_into(staging, options, console)
        replace_directory(staging, out)
        result.build_dir = out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if options.repository is not None:
        result.repository = _render_repository(out, options, console)
    return result


def _build_into(build_dir: Path, options: BuildOptions, console: Console) -> BuildResult:
    timings: dict[str, float] = {}
    (build_dir / "onnx").mkdir(parents=True)

    started = time.perf_counter()
    calibration, tuning = _calibration(options)
    calibration.save(build_dir / ARTIFACT_FILES["calib"])
    timings["calibration"] = time.perf_counter() - started
    if calibration.skipped:
        console.print(f"[yellow]Skipped {len(calibration.skipped)} unreadable calibration image(s):[/] "
                      + ", ".join(calibration.skipped))
    used_hashes = _check_disjoint(options, calibration, tuning, console)

    started = time.perf_counter()
    random_init = Path(options.model).suffix.lower() in (".yaml", ".yml")
    with console.status(f"Exporting {Path(options.model).name} to ONNX"):
        exported = export_onnx(
            options.model, build_dir / ARTIFACT_FILES["fp32"], options.imgsz, options.dynamic_batch, options.opset,
            batchnorm_images=calibration.data[:BATCHNORM_IMAGES] if random_init else None, end2end=options.end2end,
        )
    timings["export"] = time.perf_counter() - started
    if random_init:
        console.print(f"Random-init model: BatchNorm statistics re-estimated on "
                      f"{min(BATCHNORM_IMAGES, calibration.count)} calibration images")

    quantization = _quantize(build_dir, options, calibration.data, tuning, exported.class_names, console, timings)
    coverage = {"int8": conv_coverage(quantization.int8_fp32_path)}
    fp8 = _fp8_twins(build_dir, options, calibration, quantization, timings, console)
    if fp8 is not None:
        coverage["fp8"] = conv_coverage(fp8.fp8_fp32_path)

    started = time.perf_counter()
    with console.status("FP16 baseline (ModelOpt AutoCast)"):
        convert_fp16(build_dir / ARTIFACT_FILES["fp32"], build_dir / ARTIFACT_FILES["fp16"])
    timings["fp16"] = time.perf_counter() - started

    manifest = assemble_manifest(build_dir, exported, calibration, quantization, tuning, options.quantize,
                                 options.max_batch)
    record_quantization_extras(manifest, coverage, fp8, used_hashes)
    manifest.save(build_dir)
    result = BuildResult(build_dir, manifest, exported, quantization, timings_s=timings, coverage=coverage, fp8=fp8)
    if options.val_images is not None:
        started = time.perf_counter()
        _evaluate_and_gate(result, options, console)
        timings["evaluation"] = time.perf_counter() - started
        manifest.save(build_dir)
    return result


def _quantize(build_dir: Path, options: BuildOptions, calibration: np.ndarray, tuning: list[Path],
              class_names: list[str], console: Console, timings: dict[str, float]) -> QuantizeResult:
    """INT8 twins from one calibration; preset auto then picks what to keep precise on the `tuning` images."""
    started = time.perf_counter()
    with console.status(f"ModelOpt INT8 PTQ ({options.quantize.preset}, {options.quantize.calibration_method} "
                        f"calibration on {len(calibration)} images)"):
        quantization = quantize_int8_twins(
            build_dir / ARTIFACT_FILES["fp32"], calibration, build_dir / "onnx", options.quantize
        )
    timings["quantize"] = time.perf_counter() - started
    if options.quantize.preset == "auto":
        started = time.perf_counter()
        apply_auto_preset(quantization, build_dir / ARTIFACT_FILES["fp32"], tuning, options.imgsz,
                          class_names, options.quantize, options.show_progress)
        timings["auto_preset"] = time.perf_counter() - started
        console.print(f"Auto preset: {quantization.auto.reason()}")
    elif quantization.excluded_nodes:
        console.print(f"Kept in high precision ({len(quantization.excluded_nodes)} nodes): "
                      + ", ".join(quantization.excluded_nodes))
    if quantization.excluded_ops:
        console.print("Op types kept in high precision: " + ", ".join(quantization.excluded_ops))
    return quantization


def _fp8_twins(build_dir: Path, options: BuildOptions, calibration: CalibrationResult, quantization: QuantizeResult,
               timings: dict[str, float], console: Console) -> Fp8Result | None:
    """FP8 from the same export, calibration tensor and exclusions as INT8 (when asked for or the target is gpu)."""
    if not options.build_fp8:
        return None
    started = time.perf_counter()
    with console.status(f"ModelOpt FP8 PTQ (same calibration, {calibration.count} images)"):
        fp8 = quantize_fp8_twins(build_dir / ARTIFACT_FILES["fp32"], calibration.data, build_dir / "onnx",
                                 quantization.excluded_nodes, quantization.excluded_ops, options.quantize)
    timings["fp8"] = time.perf_counter() - started
    return fp8


def _check_disjoint(options: BuildOptions, calibration: CalibrationResult, tuning: list[Path],
                    console: Console) -> dict[str, dict[str, str]]:
    """sha256 of the calibration and tuning images (recorded in the manifest for eval-onnx), and refuse validation
    images that are one of them too (same bytes, whatever their names)."""
    used = {"calibration": image_hashes(calibration_files(options.calib_images, calibration))
            if options.calib_images is not None else {}, "tuning": image_hashes(tuning)}
    if options.val_images is not None:
        _, val_files = validation_files(options.val_images, options.val_annotations)
        overlaps = check_no_overlap(val_files, used, allow=options.allow_overlap)
        if overlaps:
            console.print(f"[bold red]WARNING: {len(overlaps)} validation image(s) are calibration/tuning images; "
                          "the accuracy gate below is measured partly on seen data[/]")
    return used


def _evaluate_and_gate(result: BuildResult, options: BuildOptions, console: Console) -> None:
    """mAP of every variant, ratios vs fp32 with paired bootstrap intervals, and the gate on each quantized one."""
    gated = [GATED_VARIANT] + (["fp8-fp32"] if result.fp8 is not None else [])
    evaluation = evaluate_build_detailed(result.build_dir, options.val_images, options.val_annotations,
                                         tuple(DEFAULT_VARIANTS) + tuple(gated[1:]),
                                         show_progress=options.show_progress, allow_overlap=options.allow_overlap,
                                         runtime=options.runtime)
    result.metrics, result.intervals = evaluation.metrics, evaluation.intervals
    manifest = result.manifest
    manifest.evaluation = {variant: m.as_dict() for variant, m in result.metrics.items()}
    manifest.evaluation["ratios_vs_fp32"] = {v: i.as_dict() for v, i in result.intervals.items()}
    runtime_label = evaluation_label(options.runtime)
    manifest.evaluation["runtime"] = runtime_label
    console.print(metrics_table(result.metrics, runtime_label, result.intervals, evaluation.coverage))
    for variant in gated:
        try:
            gate = check_gate(result.metrics, options.min_map_ratio, variant, result.intervals.get(variant))
        except AccuracyGateError as failure:
            raise AccuracyGateError(f"{failure}; nothing was written to {options.out}") from None
        if gate.decidable is False:
            console.print(f"[bold yellow]Gate: {gate.message()}[/]")
        result.gates.append(gate)
    result.gate = result.gates[0]
    manifest.evaluation["gate"] = {"variant": result.gate.variant, "min_ratio": options.min_map_ratio,
                                   "ratio": round(result.gate.ratio, 5), "passed": True,
                                   "decidable": result.gate.decidable}
    manifest.evaluation["gates"] = [{"variant": g.variant, "ratio": round(g.ratio, 5), "passed": True,
                                        "decidable": g.decidable} for g in result.gates]


def _calibration(options: BuildOptions) -> tuple[CalibrationResult, list[Path]]:
    """The calibration tensor and the tuning image files (disjoint from calibration; used by preset auto)."""
    tune_files = list_images(options.tune_images) if options.tune_images is not None else None
    if options.calib_data is not None:
        data = load_calibration_file(options.calib_data, options.imgsz)[: options.calib_size]
        return CalibrationResult(data, str(Path(options.calib_data).resolve())), (tune_files or [])[
            : options.max_tune_images]
    files, tuning = split_calibration_and_tuning(list_images(options.calib_images), options.calib_size, tune_files,
                                                 options.max_tune_images)
    calibration = build_calibration(options.calib_images, options.imgsz, options.calib_size, options.show_progress,
                                    files=files)
    return calibration, tuning


def _render_repository(build_dir: Path, options: BuildOptions, console: Console) -> Path:
    from packager.repository.render import RenderOptions, render
    from packager.repository.targets import default_precisions

    with console.status(f"Rendering the Triton model repository into {options.repository}"):
        target = options.repository_target
        # FP8 is served by TensorRT only (gpu target); CPU targets never serve it (see README).
        fp8 = ("fp8",) if target == "gpu" and (build_dir / ARTIFACT_FILES["fp8"]).is_file() else ()
        render(build_dir, Path(options.repository), RenderOptions(
            target=target, precisions=default_precisions(target) + fp8, runtime=options.runtime.runtime,
            precision_hint=options.runtime.precision_hint))
    return Path(options.repository)


def metrics_table(metrics: dict[str, CocoMetrics], runtime_label: str = "onnxruntime",
                  intervals: dict[str, RatioInterval] | None = None, coverage: dict[str, float] | None = None) -> Table:
    """Per variant: mAP, the ratio vs fp32 with its 95 % paired bootstrap interval, and quantized MAC coverage."""
    intervals, coverage = intervals or {}, coverage or {}
    table = Table(title=f"ONNX COCO evaluation ({runtime_label}, CPU)")
    columns = ["variant", "mAP50-95", "mAP50", "ratio vs fp32", "95% interval", "images", "detections"]
    if coverage:
        columns.append("quantized MACs")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, m in metrics.items():
        interval = intervals.get(variant)
        row = [variant, f"{m.map50_95:.4f}", f"{m.map50:.4f}", f"{interval.ratio:.4f}" if interval else "-",
               f"{interval.low:.4f}-{interval.high:.4f}" if interval else "-", str(m.images), str(m.detections)]
        if coverage:
            row.append(f"{coverage[variant]:.1%}" if variant in coverage else "-")
        table.add_row(*row)
    if intervals:
        any_interval = next(iter(intervals.values()))
        table.caption = (f"interval: paired bootstrap over images, {any_interval.resamples} resamples, "
                         f"seed {any_interval.seed}"
                         + ("; fp8 variants run on onnxruntime, graph optimizations off" if any(
                             v.startswith("fp8") for v in metrics) else ""))
    return table


def summary_table(result: BuildResult) -> Table:
    manifest = result.manifest
    table = Table(title=f"yqpack build: {manifest.model.name} ({manifest.model.head.value} head) -> {result.build_dir}")
    table.add_column("artifact")
    table.add_column("path")
    table.add_column("MB", justify="right")
    for variant, entry in manifest.artifacts.items():
        size = (result.build_dir / entry.path).stat().st_size / 1e6
        table.add_row(variant, entry.path, f"{size:.1f}")
    quant = manifest.quantization
    table.caption = (
        f"preset {quant['preset']}, {quant['calibration_method']} calibration on {manifest.calibration['count']} "
        f"images, {quant['quantized_nodes']} quantized nodes, {len(quant['excluded_nodes'])} kept precise, "
        + (f"auto: {result.quantization.auto.reason()}; " if result.quantization.auto else "")
        + ", ".join(f"{k} {c.share(k):.1%} of conv MACs in {k.upper()}" for k, c in result.coverage.items()) + "; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items())
        + "".join(f"; gate {gate.message()}" for gate in (result.gates or ([result.gate] if result.gate else [])))
    )
    return table
